"""encode_sample and collate on literal inputs: ids from the token stream, patches in token order, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keyeflow.model.processor import MediaPatches, collate, collate_rows, encode_sample, join_rows
from keyeflow.model.token_stream import IGNORE_INDEX, image_ids, render_conversation, render_text, video_ids
from keyeflow.model.tokenizer import load_tokenizer

PATCH_VALUES = 3 * 14 * 14


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def patches(num: int, fill: int) -> np.ndarray:
    return np.full((num, PATCH_VALUES), fill, dtype=np.uint8)


IMAGE = MediaPatches(patches(4 * 6, 1), [(1, 4, 6)])  # 6 tokens
VIDEO = MediaPatches(
    np.concatenate([patches(16, 2), patches(4, 3), patches(16, 4)]),
    [(1, 4, 4), (1, 2, 2), (1, 4, 4)],
    frame_types=[0, 1, 0],
    timestamps=[0.0, 0.5, 1.0],
)


def lookup(part):
    return {"image": IMAGE, "video": VIDEO}[part["type"]]


MESSAGES = [
    {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "and"},
                                 {"type": "image", "image": "i.png"}, {"type": "text", "text": " what?"}]},
    {"role": "assistant", "content": "Both."},
]  # fmt: skip


def test_encode_sample_matches_the_token_stream(tokenizer):
    features = encode_sample(MESSAGES, tokenizer, lookup)
    media = {
        "video": video_ids(tokenizer, [0, 1, 0], [0.0, 0.5, 1.0], 4, 1),
        "image": image_ids(tokenizer, 6),
    }
    expected = render_conversation(tokenizer, MESSAGES, lambda part: media[part["type"]])
    assert features.input_ids.tolist() == expected.input_ids
    assert features.labels.tolist() == expected.labels
    assert features.num_vision_tokens == expected.num_vision_tokens
    # Patches and grids in token order: the video's frames, then the image.
    assert features.grid_thw.tolist() == [[1, 4, 4], [1, 2, 2], [1, 4, 4], [1, 4, 6]]
    assert features.pixel_values.dtype == torch.uint8
    assert features.pixel_values[:, 0].tolist() == [2] * 16 + [3] * 4 + [4] * 16 + [1] * 24
    assert features.position_ids.shape == (3, len(features))


def test_encode_sample_checks_video_token_counts(tokenizer):
    wrong = MediaPatches(VIDEO.patches, VIDEO.grids, VIDEO.frame_types, VIDEO.timestamps, slow_tokens=9)
    with pytest.raises(ValueError, match="slow_tokens=9"):
        encode_sample(MESSAGES, tokenizer, lambda part: wrong if part["type"] == "video" else IMAGE)
    mixed = MediaPatches(VIDEO.patches[:24], [(1, 4, 4), (1, 2, 4)], [0, 0], [0.0, 0.5])
    with pytest.raises(ValueError, match="share one size"):
        encode_sample(MESSAGES, tokenizer, lambda part: mixed if part["type"] == "video" else IMAGE)
    short = MediaPatches(IMAGE.patches[:10], IMAGE.grids)
    with pytest.raises(ValueError, match="patches must be uint8"):
        encode_sample(MESSAGES, tokenizer, lambda part: short if part["type"] == "image" else VIDEO)


def test_text_samples(tokenizer):
    text = "Some plain text."
    expected = render_text(tokenizer, text)
    for sample in (text, [{"role": "text", "content": text}]):
        features = encode_sample(sample, tokenizer)
        assert features.input_ids.tolist() == expected.input_ids
        assert features.labels.tolist() == expected.labels
        assert features.grid_thw.shape == (0, 3) and features.pixel_values.numel() == 0
        assert features.position_ids.tolist() == [list(range(len(expected.input_ids)))] * 3


def test_collate_pads_and_packs(tokenizer):
    a = encode_sample(MESSAGES, tokenizer, lookup)
    b = encode_sample("Short text.", tokenizer)
    c = encode_sample("Another short text sample.", tokenizer)
    n_a, n_b, n_c = len(a), len(b), len(c)

    padded = collate([a, b], pack=False, pad_token_id=7)
    assert padded["input_ids"].shape == (2, n_a)
    assert padded["input_ids"][1, n_b:].eq(7).all() and padded["labels"][1, n_b:].eq(IGNORE_INDEX).all()
    assert padded["sample_index"][1].tolist() == [0] * n_b + [-1] * (n_a - n_b)

    packed = collate([a, b, c], pack=True, max_length=n_a + n_b)
    assert packed["input_ids"].shape == (2, n_a + n_b)  # c does not fit after a and b: a second row
    assert packed["sample_index"][0].tolist() == [0] * n_a + [1] * n_b
    assert packed["sample_index"][1].tolist() == [0] * n_c + [-1] * (n_a + n_b - n_c)
    assert packed["input_ids"][0, n_a:].tolist() == b.input_ids.tolist()
    # Every sample's first label is dropped (nothing of its own predicts it); the rest are kept.
    assert packed["labels"][0, n_a].item() == IGNORE_INDEX
    assert packed["labels"][0, n_a + 1 : n_a + n_b].tolist() == b.labels[1:].tolist()
    # Positions restart per sample.
    assert packed["position_ids"][:, 0, n_a].tolist() == [0, 0, 0]
    assert torch.equal(packed["position_ids"][:, 0, :n_a], a.position_ids)
    assert torch.equal(packed["pixel_values"], a.pixel_values)
    assert torch.equal(packed["grid_thw"], a.grid_thw)

    with pytest.raises(ValueError, match="more than max_length"):
        collate([a], pack=True, max_length=n_a - 1)


def test_collate_rows_keeps_the_given_packs(tokenizer):
    a, b, c = (encode_sample(text, tokenizer) for text in ("One.", "Two words.", "Three little words."))
    batch = collate_rows([[a, c], [b]])
    assert batch["sample_index"][0].tolist() == [0] * len(a) + [1] * len(c)
    assert batch["input_ids"][1, : len(b)].tolist() == b.input_ids.tolist()
    assert torch.equal(
        batch["input_ids"], collate([a, c, b], pack=True, max_length=len(a) + len(c))["input_ids"]
    )


def test_media_already_back_to_back_are_joined_without_a_copy(tokenizer):
    # As the sample reader lays out a micro-batch: the video's then the image's patches in one tensor.
    buffer = torch.from_numpy(np.concatenate([VIDEO.patches, IMAGE.patches]))
    video_rows, image_rows = buffer.split([len(VIDEO.patches), len(IMAGE.patches)])
    video = MediaPatches(video_rows, VIDEO.grids, VIDEO.frame_types, VIDEO.timestamps)
    image = MediaPatches(image_rows, IMAGE.grids)
    a = encode_sample(MESSAGES, tokenizer, lambda part: {"video": video, "image": image}[part["type"]])
    copied = encode_sample(MESSAGES, tokenizer, lookup)  # numpy media: joined by a copy
    assert torch.equal(a.pixel_values, copied.pixel_values)
    assert a.pixel_values.data_ptr() == buffer.data_ptr() and a.pixel_values.shape == buffer.shape
    assert copied.pixel_values.data_ptr() not in (IMAGE.patches.ctypes.data, VIDEO.patches.ctypes.data)

    # collate of samples whose pixels are adjacent: still a view; otherwise torch.cat's values.
    halves = buffer.split([10, len(buffer) - 10])
    assert join_rows(list(halves)).data_ptr() == buffer.data_ptr()
    assert torch.equal(join_rows(list(halves)), buffer)
    swapped = join_rows([halves[1], halves[0]])
    assert torch.equal(swapped, torch.cat([halves[1], halves[0]]))
    assert swapped.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    gap = join_rows([buffer[:5], buffer[6:9]])
    assert torch.equal(gap, torch.cat([buffer[:5], buffer[6:9]]))
    assert gap.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
