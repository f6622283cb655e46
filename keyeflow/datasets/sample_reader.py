"""The loader's sample reader: train_samples rows + their stored media patches → model Features.

Pixels come back from Lance by key (``video_frames`` by sample, ``image_samples`` by id) exactly as
pre-tokenisation stored them; nothing is decoded again. Each rank calls this only for its own samples.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from keyeflow.datasets import tables
from keyeflow.model.processor import Features, MediaPatches, encode_sample
from keyeflow.model.tokenizer import load_tokenizer

_PATCH_VALUES = 3 * 14 * 14


class LanceSampleReader:
    """Callable ``reader(sample_ids) -> list[Features]`` (same order) over pinned tables."""

    def __init__(self, train_samples: tables.TableRef, tokenizer=None, root: str | None = None):
        self.samples = tables.open_table("train_samples", version=train_samples.version, root=root)
        self.tokenizer = tokenizer or load_tokenizer()
        self.root = root

    def __call__(self, sample_ids: list[str]) -> list[Features]:
        wanted = list(dict.fromkeys(sample_ids))
        rows = {
            r["sample_id"]: r
            for r in self.samples.to_table(
                columns=["sample_id", "messages", "media_ids"], filter=pc.field("sample_id").isin(wanted)
            ).to_pylist()
        }
        missing = [s for s in wanted if s not in rows]
        if missing:
            raise KeyError(f"train_samples@v{self.samples.version} has no rows {missing[:5]}")
        media = read_media({m for r in rows.values() for m in r["media_ids"]}, self.root)
        return [self._encode(rows[sid], media) for sid in sample_ids]

    def _encode(self, row: dict, media: dict[str, MediaPatches]) -> Features:
        order = iter(row["media_ids"])  # media parts are rendered in the order they were counted
        return encode_sample(json.loads(row["messages"]), self.tokenizer, lambda part: media[next(order)])


def read_media(media_ids: set[str], root: str | None = None) -> dict[str, MediaPatches]:
    """Stored patches of video samples (frames in order, one (1, h, w) grid each) and image samples,
    by their sample ids; a missing id, or a video with missing frames, is a KeyError."""
    out: dict[str, MediaPatches] = {}
    if not media_ids:
        return out
    ids = sorted(media_ids)
    if tables.exists("video_samples", root):
        videos = (
            tables.open_table("video_samples", root=root)
            .to_table(
                columns=["sample_id", "frame_types", "timestamps", "slow_tokens", "fast_tokens"],
                filter=pc.field("sample_id").isin(ids),
            )
            .to_pylist()
        )
        if videos:
            frames = (
                tables.open_table("video_frames", root=root)
                .to_table(
                    columns=["sample_id", "frame_index", "grid_h", "grid_w", "patches"],
                    filter=pc.field("sample_id").isin([v["sample_id"] for v in videos]),
                )
                .to_pylist()
            )
            by_video: dict[str, list[dict]] = {}
            for f in frames:
                by_video.setdefault(f["sample_id"], []).append(f)
            for v in videos:
                fs = sorted(by_video.get(v["sample_id"], []), key=lambda f: f["frame_index"])
                if len(fs) != len(v["frame_types"]):
                    raise KeyError(
                        f"video sample {v['sample_id']} has {len(fs)} stored frames, "
                        f"expected {len(v['frame_types'])}"
                    )
                out[v["sample_id"]] = MediaPatches(
                    patches=np.concatenate([_patches(f) for f in fs]),
                    grids=[(1, f["grid_h"], f["grid_w"]) for f in fs],
                    frame_types=v["frame_types"],
                    timestamps=v["timestamps"],
                    slow_tokens=v["slow_tokens"],
                    fast_tokens=v["fast_tokens"] if 1 in v["frame_types"] else None,
                )
    if tables.exists("image_samples", root):
        for img in (
            tables.open_table("image_samples", root=root)
            .to_table(
                columns=["sample_id", "grid_h", "grid_w", "patches"], filter=pc.field("sample_id").isin(ids)
            )
            .to_pylist()
        ):
            # copy: Arrow buffers are read-only and torch warns on wrapping them
            out[img["sample_id"]] = MediaPatches(
                patches=_patches(img).copy(), grids=[(1, img["grid_h"], img["grid_w"])]
            )
    missing = media_ids - set(out)
    if missing:
        raise KeyError(f"media not found in video_samples/image_samples: {sorted(missing)[:5]}")
    return out


def _patches(row: dict) -> np.ndarray:
    return np.frombuffer(row["patches"], dtype=np.uint8).reshape(row["grid_h"] * row["grid_w"], _PATCH_VALUES)
