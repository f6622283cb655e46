"""LocalGenerator on the tiny randomly initialised model saved to disk: n completions with per-token logprobs,
reproducible seeds, greedy decoding, the KV-cached loop against a plain loop over `model.forward` (text and an
image prompt), stop tokens, and the token/offset bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.config import tiny
from keyeflow.model.generation import (
    BatchGenerationError,
    Completion,
    Generator,
    LocalGenerator,
    conversation_seed,
    offsets_of,
    token_pieces,
)
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches
from keyeflow.model.tokenizer import IM_END, load_tokenizer

QUESTION = [{"role": "user", "content": "How many apples are on the table? /think"}]
OTHER = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Describe a red boat."}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> KeyeForConditionalGeneration:
    torch.manual_seed(0)
    return KeyeForConditionalGeneration(tiny(tokenizer)).eval()


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generator(model_dir) -> LocalGenerator:
    return LocalGenerator(model_dir)


def check_completion(c: Completion, max_new_tokens: int) -> None:
    assert c.finish_reason in ("stop", "length")
    assert 1 <= len(c.tokens) <= max_new_tokens
    assert len(c.token_logprobs) == len(c.tokens) == len(c.token_offsets)
    assert all(lp <= 0 and np.isfinite(lp) for lp in c.token_logprobs)
    assert "".join(c.tokens) == c.text
    for token, offset in zip(c.tokens, c.token_offsets):
        assert c.text[offset : offset + len(token)] == token
    if c.finish_reason == "length":
        assert len(c.tokens) == max_new_tokens


def assert_same_completions(
    got: list[Completion], expected: list[Completion], tolerance: float = 1e-5
) -> None:
    """The same completions up to the last bits of the logprobs: ids, text, pieces, offsets, finish reasons
    equal."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.token_ids == e.token_ids and g.text == e.text and g.finish_reason == e.finish_reason
        assert g.tokens == e.tokens and g.token_offsets == e.token_offsets
        assert g.token_logprobs == pytest.approx(e.token_logprobs, abs=tolerance)


def test_n_completions_with_logprobs(generator):
    assert isinstance(generator, Generator)
    out = generator.generate(
        [QUESTION, OTHER], n=4, max_new_tokens=16, temperature=1.0, seed=3, logprobs=True
    )
    assert [len(group) for group in out] == [4, 4]
    for group in out:
        for completion in group:
            check_completion(completion, 16)
        assert len({c.text for c in group}) == 4, "n samples of one prompt should differ"
    assert out[0][0].text != out[1][0].text


def test_seed_makes_it_reproducible_and_each_conversation_independent(generator):
    args = {"n": 3, "max_new_tokens": 12, "temperature": 0.9, "logprobs": True}
    first = generator.generate([QUESTION, OTHER], seed=11, **args)
    assert generator.generate([QUESTION, OTHER], seed=11, **args) == first
    # A conversation's completions do not depend on its place in the batch (one seed per request);
    # decoded beside others, its logprobs may differ in the last bits (a batched matmul), never its tokens.
    alone = generator.generate([OTHER], seed=11, **args)[0]
    assert_same_completions(alone, first[1])
    assert generator.generate([QUESTION], seed=12, **args)[0] != first[0]
    # What a server does with one request: the conversation's derived seed, used as given.
    assert generator.generate_one(OTHER, seed=conversation_seed(11, OTHER), **args) == alone
    assert_same_completions(
        generator.generate_one(OTHER, seed=conversation_seed(11, OTHER), **args), first[1]
    )
    assert conversation_seed(11, OTHER) != conversation_seed(11, QUESTION) != conversation_seed(12, QUESTION)
    # seed=None: fresh randomness each call.
    assert generator.generate([QUESTION], seed=None, **args) != generator.generate(
        [QUESTION], seed=None, **args
    )


def test_greedy_is_deterministic_and_equals_temperature_to_zero(generator):
    greedy = generator.generate(
        [QUESTION], n=2, max_new_tokens=12, temperature=0.0, seed=None, logprobs=True
    )[0]
    # Rows of one batch may differ in the last bits (a batched matmul), never in their tokens.
    assert greedy[0].tokens == greedy[1].tokens
    assert greedy[0].token_logprobs == pytest.approx(greedy[1].token_logprobs, abs=1e-5)
    for seed in (0, 1):
        cold = generator.generate(
            [QUESTION], n=2, max_new_tokens=12, temperature=1e-6, seed=seed, logprobs=True
        )
        for completion in cold[0]:
            assert completion.text == greedy[0].text
            assert completion.token_logprobs == pytest.approx(greedy[0].token_logprobs, abs=1e-6)


def test_logprobs_flag_off_gives_text_only(generator):
    with_lp = generator.generate([QUESTION], n=2, max_new_tokens=8, temperature=1.0, seed=5, logprobs=True)[0]
    without = generator.generate([QUESTION], n=2, max_new_tokens=8, temperature=1.0, seed=5, logprobs=False)[
        0
    ]
    for a, b in zip(with_lp, without):
        assert b.text == a.text and b.finish_reason == a.finish_reason
        assert b.tokens == b.token_logprobs == b.token_offsets == []


def reference_greedy(model, tokenizer, batch: dict, max_new_tokens: int) -> tuple[str, list[float]]:
    """The simplest correct decoder: the full sequence through `model.forward` at every step, no cache."""
    ids = batch["input_ids"]
    generated, logprobs = [], []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(
                input_ids=ids, pixel_values=batch.get("pixel_values"), grid_thw=batch.get("grid_thw")
            )
        logp = F.log_softmax(logits.logits[0, -1].float(), dim=-1)
        token = int(logp.argmax())
        generated.append(token)
        logprobs.append(float(logp[token]))
        if token == tokenizer.convert_tokens_to_ids(IM_END):
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(generated, skip_special_tokens=True), logprobs


def test_cached_decoding_equals_plain_forward_loop_on_text(model, tokenizer, generator):
    prompt = generator.encode_prompt(QUESTION)
    expected_text, expected_lp = reference_greedy(model, tokenizer, {"input_ids": prompt.input_ids[None]}, 20)
    got = generator.generate([QUESTION], n=1, max_new_tokens=20, temperature=0, seed=None, logprobs=True)[0][
        0
    ]
    assert got.text == expected_text
    assert got.token_logprobs == pytest.approx(expected_lp, abs=1e-4)


def image_lookup(part) -> MediaPatches:
    height, width = 56, 84  # 4×6 patches → 2×3 = 6 LLM tokens
    pixels = np.random.default_rng(part["seed"]).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return MediaPatches(patchify(pixels, 14, 2), [(1, height // 14, width // 14)])


def test_image_prompt_with_media_lookup_equals_plain_forward_loop(model, tokenizer):
    generator = LocalGenerator(model, tokenizer, media_lookup=image_lookup)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "seed": 1}, {"type": "text", "text": "What is shown?"}],
        }
    ]
    prompt = generator.encode_prompt(messages)
    assert prompt.grid_thw.tolist() == [[1, 4, 6]]
    # 3D RoPE: the image spans fewer positions than tokens, so positions run behind indices afterwards.
    assert int(prompt.position_ids.max()) < len(prompt) - 1
    batch = {
        "input_ids": prompt.input_ids[None],
        "pixel_values": prompt.pixel_values,
        "grid_thw": prompt.grid_thw,
    }
    expected_text, expected_lp = reference_greedy(model, tokenizer, batch, 16)
    got = generator.generate([messages], n=2, max_new_tokens=16, temperature=0, seed=None, logprobs=True)[0]
    assert got[0].tokens == got[1].tokens
    assert got[0].text == expected_text
    assert got[0].token_logprobs == pytest.approx(expected_lp, abs=1e-4)
    # A different image changes the answer's logprobs: the pixels reach the LLM.
    other = [
        {
            "role": "user",
            "content": [{"type": "image", "seed": 2}, {"type": "text", "text": "What is shown?"}],
        }
    ]
    other_lp = generator.generate([other], n=1, max_new_tokens=4, temperature=0, seed=None, logprobs=True)[0][
        0
    ]
    assert other_lp.token_logprobs != pytest.approx(got[0].token_logprobs[:4], abs=1e-6)
    with pytest.raises(ValueError, match="media_lookup"):
        LocalGenerator(model, tokenizer).generate([messages], n=1, max_new_tokens=2, temperature=0, seed=0,
                                                  logprobs=False)  # fmt: skip


def test_stop_token_ends_a_completion(model, tokenizer):
    # A copy of the model whose head favours <|im_end|> (P ≈ 0.3 a step): completions stop at different
    # lengths.
    torch.manual_seed(0)
    biased = KeyeForConditionalGeneration(model.config).eval()
    biased.load_state_dict(model.state_dict())
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    head.bias.data[im_end] = 7.5
    biased.lm_head = head
    biased.train()  # as a trainer would lend it: sampled in eval mode, handed back in train mode
    generator = LocalGenerator(biased, tokenizer)
    out = generator.generate([QUESTION], n=8, max_new_tokens=30, temperature=1.0, seed=0, logprobs=True)[0]
    assert biased.training
    stopped = [c for c in out if c.finish_reason == "stop"]
    assert len(stopped) >= 6
    assert len({len(c.tokens) for c in stopped}) > 1
    for c in stopped:
        check_completion(c, 30)
        assert c.tokens[-1] == "" and IM_END not in c.text  # the stop token is scored but adds no text
        assert c.token_logprobs[-1] > -3


def test_token_pieces_split_characters_and_offsets_realign():
    tokenizer = load_tokenizer()
    text = "naïve café — 日本語 ok <think>x</think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert "" in pieces  # some CJK character takes more than one byte-level token
    assert offsets_of(text, pieces) == list(np.cumsum([0] + [len(p) for p in pieces[:-1]]))
    # A server that shows the stop token, or the bytes of a split character, as token strings not in the text.
    assert offsets_of("ab日c", ["a", "b", "\ufffd", "\ufffd", "日", "c", "<|im_end|>"]) == [
        0,
        1,
        2,
        2,
        2,
        3,
        4,
    ]
    assert offsets_of("ab日c", ["a", "b", "bytes:\\xe6", "bytes:\\x97\\xa5", "c"]) == [0, 1, 2, 2, 3]


def test_bad_arguments_are_clear(generator, model, tokenizer):
    for kwargs, match in (
        ({"n": 0}, "n must be"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"seed": 1.5}, "seed"),
    ):
        args = {"n": 1, "max_new_tokens": 4, "temperature": 1.0, "seed": 0, "logprobs": True} | kwargs
        with pytest.raises(ValueError, match=match):
            generator.generate([QUESTION], **args)
    with pytest.raises(ValueError, match="role"):
        generator.generate([[{"role": "robot", "content": "hi"}]], n=1, max_new_tokens=2, temperature=0,
                           seed=0, logprobs=True)  # fmt: skip
    with pytest.raises(TypeError, match="conversation"):
        generator.generate(QUESTION, n=1, max_new_tokens=2, temperature=0, seed=0, logprobs=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generator.generate([QUESTION], n=1, max_new_tokens=5000, temperature=0, seed=0, logprobs=True)
    with pytest.raises(ValueError, match="not a local directory"):
        LocalGenerator("/nonexistent/model")


def media_patches(part) -> MediaPatches:
    """An image (as `image_lookup`) or a three-frame video (Slow, Fast, Slow: 4, 2, 4 LLM tokens)."""
    if part["type"] == "image":
        return image_lookup(part)
    rng = np.random.default_rng(part["seed"])
    sizes = [(56, 56), (28, 56), (56, 56)]
    return MediaPatches(
        patches=np.concatenate([patchify(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 14, 2)
                                for h, w in sizes]),
        grids=[(1, h // 14, w // 14) for h, w in sizes], frame_types=[0, 1, 0], timestamps=[0.0, 0.5, 1.0],
    )  # fmt: skip


BATCH = [
    QUESTION,
    OTHER,
    [{"role": "user", "content": [{"type": "image", "seed": 1}, {"type": "text", "text": "What is shown?"}]}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [{"type": "video", "seed": 3}, {"type": "text", "text": "What happens?"}]}],
]


@pytest.mark.parametrize("attention", ["packed", "mask"])
def test_a_batch_decoded_together_equals_each_conversation_alone(model, tokenizer, attention):
    """All conversations of a batch decode together (one KV cache, prompts padded to the longest, the padding
    masked): each gets the completions it gets alone with its derived seed, greedy and sampled, on both
    attention paths (the prefill's attention differs; the decode steps are SDPA with the padding mask)."""
    config = model.config.to_dict()
    del config["model_type"]
    twin = KeyeForConditionalGeneration(type(model.config)(**{**config, "attention": attention})).eval()
    twin.load_state_dict(model.state_dict())
    generator = LocalGenerator(twin, tokenizer, media_lookup=media_patches)
    lengths = [generator.num_prompt_tokens(m) for m in BATCH]
    assert len(set(lengths)) == len(BATCH), lengths  # every row is padded by a different amount
    for temperature, seed in ((0.0, 4), (1.0, 9)):
        args = {"n": 3, "max_new_tokens": 10, "temperature": temperature, "logprobs": True}
        together = generator.generate(BATCH, seed=seed, **args)
        for messages, got in zip(BATCH, together):
            assert_same_completions(
                got, generator.generate_one(messages, seed=conversation_seed(seed, messages), **args)
            )
        if temperature:
            assert len({c.text for group in together for c in group}) == 3 * len(BATCH)
    # A conversation that cannot be encoded fails alone; the others are sampled as before.
    args = {"n": 2, "max_new_tokens": 6, "temperature": 1.0, "logprobs": True}
    good = generator.generate(BATCH[:3], seed=5, **args)
    with pytest.raises(BatchGenerationError) as error:
        generator.generate([BATCH[0], [{"role": "robot", "content": "hi"}], *BATCH[1:3]], seed=5, **args)
    assert list(error.value.failures) == [1] and "role" in str(error.value.failures[1])
    for got, expected in zip([error.value.results[i] for i in (0, 2, 3)], good):
        assert_same_completions(got, expected)
