"""Loader → processor glue: Features read back from Lance match the counted tokens and stored pixels."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.sample_reader import LanceSampleReader, MediaReader, read_media
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import collate

PAPER = resolve_config("paper")


def test_features_match_counts_and_stored_pixels(home, sample_corpus, media_dir):
    corpus = str(sample_corpus["conversations"].parent)
    media = conversations.referenced_media([corpus], str(media_dir))
    ingest.ingest_shard(media["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), PAPER), PAPER)
    images.ingest_images_shard(media["image"], ImageConfig(max_tokens=256))
    conversations.build_train_samples([corpus], str(media_dir), PAPER, ImageConfig(max_tokens=256))

    rows = (
        tables.open_table("train_samples")
        .to_table(columns=["sample_id", "modality", "num_tokens", "num_vision_tokens", "media_ids"])
        .to_pylist()
    )
    picks = {}
    for row in sorted(rows, key=lambda r: r["num_tokens"]):
        picks.setdefault(row["modality"], row)
    reader = LanceSampleReader(tables.ref("train_samples"))
    ids = [picks[m]["sample_id"] for m in ("video", "image", "text")]
    features = reader(ids + ids[:1])  # order kept, repeats allowed
    assert len(features) == 4
    for f, m in zip(features, ("video", "image", "text")):
        assert len(f) == picks[m]["num_tokens"]
        assert f.num_vision_tokens == picks[m]["num_vision_tokens"]
    video = features[0]
    frames = (
        tables.open_table("video_frames")
        .to_table(filter=f"sample_id = '{picks['video']['media_ids'][0]}'")
        .to_pylist()
    )
    frames.sort(key=lambda r: r["frame_index"])
    stored = np.concatenate([np.frombuffer(r["patches"], np.uint8).reshape(-1, 588) for r in frames])
    assert torch.equal(video.pixel_values, torch.from_numpy(stored))
    assert video.grid_thw.tolist() == [[1, r["grid_h"], r["grid_w"]] for r in frames]

    # One copy of the pixels: the reader lays the call's media out in sample order in one tensor, so every
    # sample's pixel_values, and the batch collated in that order, are views of it (encode_sample and
    # collate copy nothing); the repeated video has its own bytes there.
    padded = collate(features, pack=False)
    buffer = video.pixel_values.untyped_storage()
    assert padded["pixel_values"].untyped_storage().data_ptr() == buffer.data_ptr()
    assert padded["pixel_values"].data_ptr() == buffer.data_ptr()
    assert padded["pixel_values"].nbytes == buffer.nbytes() == sum(f.pixel_values.nbytes for f in features)
    assert torch.equal(
        padded["pixel_values"], torch.cat([f.pixel_values for f in features if f.pixel_values.numel()])
    )

    # and the tiny model trains on them: one forward/backward on a packed batch
    model = KeyeForConditionalGeneration(tiny())
    batch = collate(features[:3], pack=True, max_length=sum(len(f) for f in features[:3]))
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def _frames(
    video: str, grids: list[tuple[int, int]], seed: int, noise: int = 4
) -> tuple[pa.Table, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Pixel-like values (smooth, with noise) so the stored column has something to compress.
    pixels = [
        ((np.arange(h * w * 588) // 7 + rng.integers(0, noise, h * w * 588)) % 256)
        .astype(np.uint8)
        .reshape(-1, 588)
        for h, w in grids
    ]
    table = pa.Table.from_pylist(
        [
            {"frame_id": f"{video}/{i:06d}", "sample_id": video, "frame_index": i, "frame_type": 0,
             "timestamp": float(i), "grid_h": h, "grid_w": w, "num_tokens": h * w // 4,
             "patches": p.tobytes()}
            for i, ((h, w), p) in enumerate(zip(grids, pixels))
        ],
        schema=tables.SCHEMAS["video_frames"],
    )  # fmt: skip
    return table, pixels


def test_media_are_read_by_row_offsets_exactly_into_one_tensor(home, monkeypatch):
    expected: dict[str, tuple[list, list[np.ndarray]]] = {}
    videos = []
    # Three appends (fragments), then two videos written again: deleted rows and a newer fragment.
    for shard in range(3):
        frames = []
        for k in range(6):
            video = f"vs-{shard}{k}"
            grids = [(2, 2 + (k % 3))] * (2 + k % 2) + [(2, 2)]
            table, pixels = _frames(video, grids, seed=10 * shard + k)
            frames.append(table)
            expected[video] = (grids, pixels)
            videos.append({"sample_id": video, "frame_types": [0] * len(grids),
                           "timestamps": [0.0] * len(grids), "slow_tokens": 1, "fast_tokens": 1})  # fmt: skip
        tables.replace_groups("video_frames", pa.concat_tables(frames), "sample_id")
    for video in ("vs-03", "vs-14"):
        grids = expected[video][0]
        table, pixels = _frames(video, grids, seed=99)
        tables.replace_groups("video_frames", table, "sample_id")
        expected[video] = (grids, pixels)
    tables.upsert("video_samples", videos)
    image = ((np.arange(4 * 588) * 3) % 256).astype(np.uint8).reshape(4, 588)
    tables.upsert(
        "image_samples", [{"sample_id": "img-0", "grid_h": 2, "grid_w": 2, "patches": image.tobytes()}]
    )
    expected["img-0"] = ([(2, 2)], [image])

    reader = MediaReader()
    reader(["vs-00", "img-0"])  # builds the row indexes: one scan of the key columns of each table
    scans = []

    def counting(method):
        original = getattr(lance.LanceDataset, method)

        def counted(self, *args, **kwargs):
            scans.append(method)
            return original(self, *args, **kwargs)

        return counted

    wanted = ["vs-14", "img-0", "vs-03", "vs-21", "vs-00"]
    with monkeypatch.context() as patched:
        for method in ("to_table", "scanner", "to_batches"):
            patched.setattr(lance.LanceDataset, method, counting(method))
        got = reader(wanted)
    assert scans == []  # after the index is built, a read is takes only: no scan of any table
    for media_id in wanted:
        grids, pixels = expected[media_id]
        assert [g[1:] for g in got[media_id].grids] == grids
        assert torch.equal(got[media_id].patches, torch.from_numpy(np.concatenate(pixels)))
    # One copy: every media of the call is a view of one tensor.
    assert len({m.patches.untyped_storage().data_ptr() for m in got.values()}) == 1
    # The one-off filtered path gives the same pixels.
    again = read_media(set(wanted))
    assert all(torch.equal(torch.as_tensor(again[m].patches), got[m].patches) for m in wanted)

    with pytest.raises(KeyError, match="nope"):
        reader(["vs-00", "nope"])
    tables.delete_rows("video_frames", pc.field("frame_id") == "vs-20/000001")
    with pytest.raises(KeyError, match="vs-20 has 2 stored frames, expected 3"):
        MediaReader()(["vs-20"])
    tables.delete_rows("video_frames", pc.field("sample_id") == "vs-21")
    with pytest.raises(KeyError, match="vs-21 has 0 stored frames, expected 4"):
        MediaReader()(["vs-00", "vs-21"])


def test_patches_are_stored_compressed_and_round_trip_exactly(home):
    table, pixels = _frames("vs-0", [(8, 8)] * 20, seed=0, noise=1)  # smooth pixels: compressible
    tables.replace_groups("video_frames", table, "sample_id")
    stored = tables.open_table("video_frames")
    assert stored.schema.field("patches").metadata == {
        b"lance-encoding:compression": b"zstd",
        b"lance-encoding:compression-level": b"9",
    }
    on_disk = sum(f.stat().st_size for f in Path(stored.uri, "data").iterdir())
    raw = sum(p.nbytes for p in pixels)
    assert on_disk < raw / 4
    back = stored.to_table(columns=["patches"]).column("patches").to_pylist()
    assert [np.frombuffer(b, np.uint8).reshape(-1, 588).tolist() for b in back] == [
        p.tolist() for p in pixels
    ]
