"""Loader → processor glue: Features read back from Lance match the counted tokens and stored pixels."""

from __future__ import annotations

import numpy as np
import torch

from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.sample_reader import LanceSampleReader
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

    # and the tiny model trains on them: one forward/backward on a packed batch
    model = KeyeForConditionalGeneration(tiny())
    batch = collate(features[:3], pack=True, max_length=sum(len(f) for f in features[:3]))
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
