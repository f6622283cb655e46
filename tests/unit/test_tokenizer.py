"""The shipped tokenizer: special tokens, no automatic BOS/EOS, deterministic build, loading a local dir."""

from __future__ import annotations

import re

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from keyeflow.model.tokenizer import (
    SHIPPED_TOKENIZER_DIR,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_version,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_vocab_and_named_tokens(tok):
    assert len(tok) == VOCAB_SIZE == 4096
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None
    assert len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 22


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_token_is_one_id_never_merged(tok, token):
    (token_id,) = tok.encode(token, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(token_id) == token
    # Glued to text and digits on both sides it still stands alone.
    for text in (f"a{token}b", f"1.5{token}2.0", f" {token}\n", f"{token}{token}"):
        ids = tok.encode(text, add_special_tokens=False)
        assert token_id in ids
        assert tok.decode(ids) == text


def test_all_special_tokens_in_a_row(tok):
    text = "".join(SPECIAL_TOKENS)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text


def test_markup_survives_skip_special_tokens_decode(tok):
    text = "<think>1 + 1 = 2</think><answer><|box_start|>[[10,20,30,40]]<|box_end|></answer><|im_end|>"
    decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == "<think>1 + 1 = 2</think><answer><|box_start|>[[10,20,30,40]]<|box_end|></answer>"


def test_no_automatic_bos_or_eos(tok):
    ids = tok("hi")["input_ids"]
    assert ids == tok.encode("hi", add_special_tokens=False)
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    assert tok.decode(ids) == "hi"
    assert tok("")["input_ids"] == []


@pytest.mark.parametrize(
    "text",
    [
        "The event happens in 23.5 - 27.0 seconds.",
        "Café, naïve, 東京, 🙂",
        "  two  spaces\n\nand tabs\t!",
        "",
    ],
)
def test_text_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_numbers_split_into_digits(tok):
    assert tok.tokenize("12.5") == ["1", "2", ".", "5"]


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What? /no_think"}],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What? /no_think<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_shipped_tokenizer_equals_fresh_build(tmp_path):
    save_tokenizer(build_tokenizer(), tmp_path / "fresh")
    shipped = {p.name: p.read_bytes() for p in SHIPPED_TOKENIZER_DIR.iterdir()}
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "fresh").iterdir()}
    assert (
        sorted(shipped) == sorted(fresh) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    )
    for name, content in shipped.items():
        assert content == fresh[name], f"{name} differs: run scripts/build_tokenizer.py"


def test_load_tokenizer_none_is_cached(tok):
    assert load_tokenizer() is tok


def test_load_local_dir_saved_with_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    text = "<|im_start|>user\n<|vision_start|><|frame|>0.5<|video_pad|><|vision_end|>Hi /think<|im_end|>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert tokenizer_version(loaded) == tokenizer_version(tok)


def _tiny_tokenizer_without(missing: str) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(["a cat sat on a mat", "the dog ran at 1.5 seconds"], trainer)
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t != missing]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_local_dir_missing_video_pad_raises(tmp_path):
    _tiny_tokenizer_without("<|video_pad|>").save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=re.escape("lacks vision tokens as single ids: <|video_pad|>;")):
        load_tokenizer(tmp_path / "bad")


def test_local_dir_with_every_vision_token_loads(tmp_path):
    _tiny_tokenizer_without("<think>").save_pretrained(tmp_path / "ok")
    assert load_tokenizer(tmp_path / "ok").convert_tokens_to_ids("<|video_pad|>") is not None


def test_load_tokenizer_rejects_non_directory(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_tokenizer(tmp_path / "does-not-exist")


def test_tokenizer_version_tracks_vocabulary(tok, tmp_path):
    version = tokenizer_version(tok)
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    tok("padding and truncation settings do not count", padding="max_length", max_length=20, truncation=True)
    assert tokenizer_version(tok) == version
    tok.save_pretrained(tmp_path / "copy")
    changed = load_tokenizer(tmp_path / "copy")
    changed.add_tokens(["<|new_token|>"])
    assert tokenizer_version(changed) != version
