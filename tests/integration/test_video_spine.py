"""The video path on real files: ffmpeg clips, real Lance tables, DuckDB, GX gates (no Prefect)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from keyeflow.datasets import ingest, pretokenize, sql, tables
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.quality import gates


def run_spine(paths, config, shard_size=16):
    reports = [
        ingest.ingest_shard(shard)
        for shard in ingest.plan_shards([str(p) for p in paths], ingest.IngestConfig(shard_size))
    ]
    rows = pretokenize.pending_videos(tables.ref("videos"), config)
    return reports, pretokenize.pretokenize_shard(rows, config)


EXPECTED_QUARANTINE = {
    "zero_byte": ("ingest", "empty file (0 bytes)"),
    "truncated": ("ingest", "not a readable video container"),
    "text_as_mp4": ("ingest", "not a readable video container"),
    "audio_only": ("ingest", "no video stream (streams present: audio)"),
    "unreadable": ("ingest", "unreadable: file not found"),
    "extreme_wide": ("ingest", "extreme aspect ratio 2000x8 (250:1, limit 200:1)"),
    "truncated_tail": ("pretokenize", "corrupt or truncated: decoded"),
}


def test_mixed_batch_quarantines_bad_inputs_and_completes_the_rest(
    home, mixed_batch, bad_inputs, sample_videos
):
    config = resolve_config("paper")
    run_spine([mixed_batch], config, shard_size=5)

    quarantined = sql.query("select uri, reason, stage from quarantine")
    by_name = {
        os.path.basename(u): (s, r) for u, s, r in zip(quarantined.uri, quarantined.stage, quarantined.reason)
    }
    for key, (stage, reason) in EXPECTED_QUARANTINE.items():
        got_stage, got_reason = by_name[bad_inputs[key].name]
        assert got_stage == stage, key
        assert got_reason.startswith(reason), (key, got_reason)
    # Same bytes under two names: the first in sorted order is kept, the other is a counted duplicate.
    pair = [f"copy of {sample_videos[0].name}", sample_videos[0].name]
    duplicates = [n for n in pair if n in by_name]
    assert duplicates == [pair[1]]
    stage, reason = by_name[pair[1]]
    assert stage == "ingest"
    assert reason.startswith(f"duplicate content: same bytes as {mixed_batch / pair[0]}")

    samples = sql.query(
        "select v.uri, v.width, v.height, v.rotation, v.bit_depth, v.is_vfr, s.num_frames, "
        "s.total_tokens from video_samples s join videos v using (video_id)"
    )
    names = {os.path.basename(u): row for u, row in zip(samples.uri, samples.itertuples())}
    good_odd = [
        "one_frame",
        "extreme_tall_ok",
        "rotated",
        "vfr",
        "ten_bit",
        "name_spaces",
        "name_quotes",
        "name_unicode",
    ]
    for key in good_odd:
        assert bad_inputs[key].name in names, f"{key} should have been tokenised"
    for path in sample_videos[1:]:
        assert path.name in names
    assert f"copy of {sample_videos[0].name}" in names
    assert names[bad_inputs["one_frame"].name].num_frames == 1
    rotated = names[bad_inputs["rotated"].name]
    assert (rotated.width, rotated.height) == (360, 640) and rotated.rotation in (90, 270)
    assert names[bad_inputs["ten_bit"].name].bit_depth == 10
    assert names[bad_inputs["vfr"].name].is_vfr

    # Nothing is lost: every file found is either a sample or a quarantine row.
    found = set(ingest.discover([str(mixed_batch)]))
    assert found == set(samples.uri) | set(quarantined.uri)
    assert not set(samples.uri) & set(quarantined.uri)

    for result in (
        gates.check_videos(tables.ref("videos")),
        gates.check_video_samples(tables.ref("video_samples"), tables.ref("video_frames"), config),
    ):
        assert result.passed, result.failures


def test_rerun_writes_nothing_and_config_change_retokenises(home, sample_videos):
    paper = resolve_config("paper")
    run_spine(sample_videos, paper)
    versions = {name: tables.ref(name).version for name in ("videos", "video_samples", "video_frames")}
    counts = {name: tables.open_table(name).count_rows() for name in versions}

    reports, again = run_spine(sample_videos, paper)
    assert sum(r.num_already_present for r in reports) == len(sample_videos)
    assert again.num_videos == 0
    assert {name: tables.ref(name).version for name in versions} == versions

    slower = resolve_config("paper", fps=1.0)
    _, redone = run_spine(sample_videos, slower)
    assert redone.num_done == len(sample_videos)
    by_config = sql.query(
        "select config_hash, count(*) as n, sum(num_frames) as frames from video_samples group by config_hash"
    )
    assert sorted(by_config.n) == [len(sample_videos)] * 2
    assert set(by_config.config_hash) == {paper.config_hash(), slower.config_hash()}
    # The old rows are untouched and still readable at their version.
    old = tables.open_table("video_samples", version=versions["video_samples"]).count_rows()
    assert old == counts["video_samples"]


def test_stored_patches_round_trip_to_the_frame_sizes(home, sample_videos):
    config = resolve_config("keye-vl-utils")
    run_spine(sample_videos[:2], config)
    frame = tables.open_table("video_frames").to_table(limit=1).to_pylist()[0]
    patches = np.frombuffer(frame["patches"], dtype=np.uint8).reshape(frame["grid_h"] * frame["grid_w"], 588)
    image = pretokenize.unpatchify(patches, frame["grid_h"], frame["grid_w"], 14, 2)
    assert image.shape == (frame["grid_h"] * 14, frame["grid_w"] * 14, 3)
    assert frame["num_tokens"] == frame["grid_h"] * frame["grid_w"] // 4
    np.testing.assert_array_equal(pretokenize.patchify(image, 14, 2), patches)
    sample = sql.query(
        "select * from video_samples where sample_id = ?".replace("?", f"'{frame['sample_id']}'")
    )
    assert sample.preset[0] == "keye-vl-utils"
    assert sample.num_slow[0] + sample.num_fast[0] == sample.num_frames[0]


def test_gate_names_the_failed_expectation_and_the_rows(home, sample_videos):
    config = resolve_config("paper")
    run_spine(sample_videos[:2], config)
    row = tables.open_table("video_samples").to_table(limit=1).to_pylist()[0]
    row.update(
        sample_id="broken-" + row["sample_id"],
        frame_types=[1] + row["frame_types"][1:],
        slow_height=row["slow_height"] + 3,
    )
    tables.upsert("video_samples", pa.Table.from_pylist([row], schema=tables.SCHEMAS["video_samples"]))

    result = gates.check_video_samples(tables.ref("video_samples"), tables.ref("video_frames"), config)
    assert not result.passed
    failed = {f["check"]: f for f in result.failures}
    assert set(failed) == {
        "first frame is slow",
        "frame sizes are multiples of 28",
        "stored frames match the sample (count and tokens)",
    }
    assert failed["first frame is slow"]["examples"] == [row["sample_id"]]
    assert failed["first frame is slow"]["expectation"] == "expect_column_values_to_be_in_set"
    with pytest.raises(gates.GateFailed, match="first frame is slow"):
        result.raise_if_failed()


def test_empty_table_fails_its_gate(home):
    tables.ensure("videos")
    result = gates.check_videos(tables.ref("videos"))
    assert not result.passed and result.failures[0]["check"] == "table has rows"
