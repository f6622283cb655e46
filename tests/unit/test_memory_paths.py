"""A training step that fits at scale, at tiny size (issue 14): packed attention with no [L, L] tensor,
activation checkpointing per layer in any mode, and log-probs over sequence chunks with no [T, V] tensor.
Each property is checked against the path it replaces (the dense mask, no checkpointing, full logits) and,
for memory, by recording the size of every tensor that torch allocates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.chunked_head import chunked_token_logprobs
from keyeflow.model.config import tiny
from keyeflow.model.modeling import IGNORE_INDEX, KeyeForConditionalGeneration
from keyeflow.model.packed_attention import packed_segments
from keyeflow.model.processor import MediaPatches, collate, collate_rows, encode_sample
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.training.losses import token_logprobs
from keyeflow.training.preference import sequence_logprobs
from keyeflow.training.rl import completion_logprobs
from keyeflow.training.trainer import token_loss_sum

PATCH, MERGE = 14, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
    return tiny(tokenizer)


def make_model(config, dtype=torch.float32, seed=0) -> KeyeForConditionalGeneration:
    torch.manual_seed(seed)
    return KeyeForConditionalGeneration(config).to(dtype)


def frame(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chat(media: MediaPatches, question: str, answer: str) -> list[dict]:
    kind = media.kind
    content = [{"type": kind, kind: "x", "media": media}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Text, an image and a Slow/Fast video (Slow frames 4×4 patches, Fast frames 2×4)."""
    image = MediaPatches(patchify(frame(56, 84, 1), PATCH, MERGE), [(1, 4, 6)])
    sizes = [(56, 56), (28, 56), (56, 56), (28, 56)]
    video = MediaPatches(
        np.concatenate([patchify(frame(h, w, 10 + i), PATCH, MERGE) for i, (h, w) in enumerate(sizes)]),
        [(1, h // PATCH, w // PATCH) for h, w in sizes],
        frame_types=[0, 1, 0, 1], timestamps=[0.0, 0.5, 1.0, 1.5], slow_tokens=4, fast_tokens=2,
    )  # fmt: skip
    lookup = lambda part: part["media"]
    return [
        encode_sample("Plain text for the language model, a few words long.", tokenizer),
        encode_sample(chat(image, "What is shown?", "A noisy picture."), tokenizer, lookup),
        encode_sample(chat(video, "What happens?", "Frames change over time."), tokenizer, lookup),
    ]


def loss_logits_grads(model, batch):
    """(Σ token NLL, logits, gradients by name) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    loss = -model(**inputs, logprob_labels=batch["labels"]).token_logprobs.sum()
    loss.backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }
    return loss.detach(), logits, grads


def test_packed_attention_equals_the_mask_path_and_each_sample_alone(config, samples):
    """float64 so that the comparison is about what is attended, not rounding: the three agree to 1e-9
    (logits, summed loss, every gradient); fp32 agrees to about 1e-6."""
    model = make_model(config, torch.float64).train()
    text, image, video = samples
    # Row 0 packs text + image + video; row 1 holds the image again, right-padded (padding = sample −1).
    batch = collate_rows([[text, image, video], [image]])
    assert batch["sample_index"][1, -1] == -1
    assert model.config.attention == "packed"  # the default
    packed = loss_logits_grads(model, batch)
    model.config.attention = "mask"
    masked = loss_logits_grads(model, batch)
    model.config.attention = "packed"

    alone_loss, alone_grads, alone_logits = 0.0, None, []
    for f in (text, image, video, image):
        loss, logits, grads = loss_logits_grads(model, collate([f], pack=False))
        alone_loss += loss
        alone_logits.append(logits[0])
        alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}

    starts = [0, len(text), len(text) + len(image)]
    rows_of_alone = [(0, s, len(f)) for s, f in zip(starts, (text, image, video))] + [(1, 0, len(image))]
    for (row, start, n), logits in zip(rows_of_alone, alone_logits):
        for name, path in (("packed", packed), ("mask", masked)):
            got = path[1][row, start : start + n]
            assert torch.allclose(got, logits, atol=1e-9, rtol=0), (
                f"{name} logits differ from the sample alone"
            )
    assert torch.allclose(packed[0], masked[0], atol=1e-9, rtol=0)
    assert torch.allclose(packed[0], alone_loss, atol=1e-9, rtol=0)
    for name in packed[2]:
        assert torch.allclose(packed[2][name], masked[2][name], atol=1e-9, rtol=0), name
        assert torch.allclose(packed[2][name], alone_grads[name], atol=1e-9, rtol=0), name


def test_segments_follow_sample_index_and_refuse_a_split_sample():
    index = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    segments = packed_segments(index)
    assert segments.spans == ((0, 0, 2), (0, 2, 5), (0, 5, 6), (1, 0, 1), (1, 1, 3), (1, 3, 4), (1, 4, 6))
    assert segments.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 9, 10, 12] and segments.max_length == 3
    with pytest.raises(ValueError, match="sample 0 of row 0 is not contiguous"):
        packed_segments(torch.tensor([[0, 1, 0]]))


class LargestTensors(TorchDispatchMode):
    """Records every tensor an aten op returns (forward, backward, recomputation)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


def long_row(config, length: int) -> dict[str, torch.Tensor]:
    """One row of `length` text tokens: three samples (the middle one 3/4 of the row), labels everywhere."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.image_token_id, (1, length), generator=generator)  # below the vision ids
    spans = list(itertools.pairwise([0, length // 8, length // 8 + 3 * length // 4, length]))
    index = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(spans)])[None]
    positions = torch.cat([torch.arange(b - a) for a, b in spans])[None, None].expand(3, 1, -1)
    return {"input_ids": ids, "position_ids": positions, "sample_index": index, "labels": ids.clone()}


def test_no_square_or_vocabulary_sized_tensor_at_4k(config):
    length, vocab = 4096, config.text_config.vocab_size
    model = make_model(config).train()
    batch = long_row(config, length)
    limit = min(length * length // 4, length * vocab // 4)

    with LargestTensors() as new_path:
        token_loss_sum(model, batch, torch.device("cpu")).backward()
    largest = max(new_path.sizes)
    assert largest[0] < limit, f"{largest[1]} allocated {largest[0]} elements (limit {limit})"

    # The guard sees what the old paths allocate: the dense mask ([1, 1, L, L]) and the full logits ([L, V]).
    model.zero_grad(set_to_none=True)
    model.config.attention = "mask"
    with LargestTensors() as old_path:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        F.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], reduction="sum").backward()
    assert any(n >= length * length for n, _ in old_path.sizes)
    assert any(n >= length * vocab for n, _ in old_path.sizes)


class ForwardCounter:
    """Calls of each module's forward, counted when they start (a checkpointed recomputation stops as soon as
    it has what the backward needs, before the module's forward returns)."""

    def __init__(self, modules):
        self.counts = [0] * len(modules)
        for i, m in enumerate(modules):
            m.register_forward_pre_hook(lambda *_, i=i: self.counts.__setitem__(i, self.counts[i] + 1))


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("train", [True, False])
def test_checkpointed_gradients_equal_and_layers_are_recomputed(config, samples, mode, train):
    batch = collate(samples, pack=True)
    model = make_model(config).train(train)
    _, _, reference = loss_logits_grads(model, batch)

    model.set_activation_checkpointing(mode)
    llm = ForwardCounter(model.language_model.layers)
    vit = ForwardCounter(model.vision.layers)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.zero_grad(set_to_none=True)
    (-model(**inputs, logprob_labels=batch["labels"]).token_logprobs.sum()).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, reference[name]), name
    # Two layers each: "full" reruns both in the backward, "selective" the first (every other one), in
    # train and eval mode alike.
    expected = [2, 2] if mode == "full" else [2, 1]
    assert llm.counts == expected and vit.counts == expected

    with torch.no_grad():  # nothing to recompute without autograd
        llm.counts[:] = [0, 0]
        model(**inputs)
    assert llm.counts == [1, 1]


def test_chunked_logprobs_equal_full_ones_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7), generator=generator)
    targets[0, :2] = IGNORE_INDEX
    upstream = torch.randn(2, 7, dtype=torch.float64, generator=generator)

    # The full [T, V] log-softmax, in float64 like the inputs (so both sides are exact to ~1e-15).
    full = F.log_softmax(F.linear(hidden, weight), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    full = full * (targets != IGNORE_INDEX)
    full_grads = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    for chunk_size in (1, 3, 100):
        chunked = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
        grads = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
        assert chunked.dtype == torch.float64
        assert torch.allclose(chunked, full, atol=1e-12, rtol=0)
        assert chunked[0, :2].eq(0).all()
        for got, want in zip(grads, full_grads):
            assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_loss_and_logprob_paths_equal_the_full_logits(config, samples):
    """The trainer's loss sum, MPO's/held-out's sequence log-probs and GSPO's completion log-probs, each
    against the same quantity from full logits (fp32: within 1e-5 of values in the tens)."""
    model = make_model(config).eval()
    batch = collate(samples, pack=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    full = token_logprobs(logits[:, :-1], targets.clamp(min=0)) * mask

    with torch.no_grad():
        loss = token_loss_sum(model, batch, torch.device("cpu"))
        totals, counts = sequence_logprobs(model, batch)
        logps, completion_mask = completion_logprobs(model, samples)
    assert torch.allclose(loss, -full.sum(), atol=1e-4, rtol=1e-6)
    assert torch.allclose(totals, full.sum(dim=1), atol=1e-5, rtol=1e-6)
    assert counts.tolist() == mask.sum(dim=1).tolist()
    assert torch.equal(completion_mask, mask)
    assert torch.allclose(logps * completion_mask, full, atol=1e-5, rtol=0)


def test_checkpointing_is_chosen_per_stage_full_for_keye_8b_off_for_tiny():
    from keyeflow.training.config import GSPOStageConfig, StageConfig
    from keyeflow.training.posttrain_recipe import posttrain_recipe
    from keyeflow.training.recipes import pretrain_recipe

    big, small = pretrain_recipe("keye-8b"), pretrain_recipe("tiny")
    assert {s.activation_checkpointing for s in (*big.stages.values(), big.annealing)} == {"full"}
    assert {s.activation_checkpointing for s in (*small.stages.values(), small.annealing)} == {"off"}
    post = posttrain_recipe("keye-8b")
    assert {post.sft.activation_checkpointing, post.mpo.activation_checkpointing} == {"full"}
    assert post.gspo.activation_checkpointing == "full"
    assert posttrain_recipe("tiny").gspo.activation_checkpointing == "off"

    # It changes memory, not numbers: the hash (what a resume compares) ignores it.
    stage = small.stages[1]
    recomputing = StageConfig.from_dict({**stage.to_dict(), "activation_checkpointing": "selective"})
    assert recomputing.config_hash() == stage.config_hash()
    assert "activation_checkpointing" not in stage.to_dict()  # "off" leaves the stored dict as it was
    with pytest.raises(ValueError, match="activation_checkpointing"):
        GSPOStageConfig(activation_checkpointing="sometimes")
