"""Ingestion from fsspec URIs (not local paths): discovery, hashing, probing and decoding through fsspec."""

from __future__ import annotations

import fsspec

from keyeflow.datasets import ingest, pretokenize, sql, tables
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.video import content_hash


def test_ingest_and_pretokenize_from_memory_filesystem(home, sample_videos, bad_inputs):
    fs = fsspec.filesystem("memory")
    for path in sample_videos[:3]:
        fs.pipe(f"/clips/{path.name}", path.read_bytes())
    fs.pipe("/clips/not a video.mp4", bad_inputs["text_as_mp4"].read_bytes())
    fs.pipe("/clips/notes.txt", b"ignored: not a video suffix")

    shards = ingest.plan_shards(["memory://clips/"])
    uris = [u for shard in shards for u in shard]
    assert len(uris) == 4 and all(u.startswith("memory://") for u in uris)
    for shard in shards:
        ingest.ingest_shard(shard)
    config = resolve_config("paper")
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), config), config)

    videos = sql.query("select uri, video_id from videos order by uri")
    assert [u.rsplit("/", 1)[-1] for u in videos.uri] == sorted(p.name for p in sample_videos[:3])
    assert all(u.startswith("memory://") for u in videos.uri)
    # identity is the bytes: the same clip on local disk hashes the same
    local = {content_hash(str(p))[0] for p in sample_videos[:3]}
    assert set(videos.video_id) == local
    assert sql.query("select count(*) as n from video_samples").n[0] == 3
    reason = sql.query("select reason from quarantine where uri like '%not a video%'").reason[0]
    assert reason.startswith("not a readable video container")
