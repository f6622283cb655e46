"""Gate semantics on the real video flows (Prefect's test harness, Lance, DuckDB, MLflow): an odd but valid
clip goes through; a row breaking a row-level check is quarantined and the rest go on; past the gate's
max_failing_share the gate stops the flow, naming the check; the threshold is in every report."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from keyeflow import lineage
from keyeflow.datasets import pretokenize, sql, tables
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.quality import gates
from keyeflow.quality.gates import GateFailed

TIMESTAMPS_CHECK = "timestamps strictly increase"


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield


@pytest.fixture()
def folder_with_tiny_clip(tmp_path, sample_videos):
    """Two good sample clips and a valid 16x16-pixel clip (smaller than one 28x28 token)."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for path in sample_videos[:2]:
        shutil.copy(path, folder / path.name)
    tiny = folder / "tiny 16x16.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=16x16:rate=10", "-t", "2"]
        + ["-pix_fmt", "yuv420p", str(tiny)],
        check=True,
    )
    return folder, tiny


def _samples_by_uri():
    return sql.query(
        "select uri, sample_id, num_fast, slow_tokens, fast_tokens, timestamps from video_samples "
        "order by uri"
    )


def test_tiny_valid_clip_goes_through_ingest_with_the_others(home, folder_with_tiny_clip):
    from keyeflow.flows.video import video_pipeline

    folder, tiny = folder_with_tiny_clip
    result = video_pipeline([str(folder)], preset="keye-vl-utils")

    samples = _samples_by_uri()
    assert sorted(samples.uri) == sorted(str(p) for p in folder.iterdir())
    assert result["pretokenize"]["num_done"] == 3
    assert not tables.exists("quarantine") or tables.open_table("quarantine").count_rows() == 0
    tiny_row = samples[samples.uri == str(tiny)].iloc[0]
    # The case the issue met: at the per-frame floor smart_resize enlarges the frame to 7x7 tokens, so a
    # Fast frame costs as much as a Slow one, more than max(int(0.3 * slow), 48).
    config = resolve_config("keye-vl-utils")
    assert tiny_row.num_fast > 0
    assert tiny_row.fast_tokens > max(
        int(config.fast_ratio * tiny_row.slow_tokens), config.min_tokens_per_frame
    )
    verdicts = sql.query("select gate, passed, failures from gate_results order by gate")
    assert verdicts.passed.all()
    summary = json.loads(verdicts[verdicts.gate == "video_samples"].failures.iloc[0])
    assert summary == {
        "max_failing_share": 0.01,
        "num_failing_rows": 0,
        "num_quarantined": 0,
        "failures": [],
    }


def _break_timestamps_of(monkeypatch, name: str) -> None:
    """Make pre-tokenisation emit one clip's sample with timestamps going backwards."""
    real = pretokenize.tokenize_video

    def tokenize_video(info, video_id, config, spool_dir=None):
        sample, frames = real(info, video_id, config, spool_dir)
        if info.uri.endswith(name):
            sample["timestamps"] = sample["timestamps"][::-1]
        return sample, frames

    monkeypatch.setattr(pretokenize, "tokenize_video", tokenize_video)


def test_bad_row_stops_the_flow_over_the_threshold_and_is_quarantined_under_it(
    home, monkeypatch, folder_with_tiny_clip
):
    from keyeflow.flows.video import ingest_videos, pretokenize_videos

    folder, tiny = folder_with_tiny_clip
    clips = sorted(folder.iterdir())
    bad = next(p for p in clips if p != tiny)
    _break_timestamps_of(monkeypatch, bad.name)
    ingest_videos([str(folder)])

    # 1 of 3 rows is over the default 1%: the gate stops the flow, names the check, quarantines nothing.
    with pytest.raises(GateFailed, match=TIMESTAMPS_CHECK) as stopped:
        pretokenize_videos("paper")
    assert "max_failing_share 1.0%" in str(stopped.value)
    assert stopped.value.result.num_failing_rows == 1
    verdict = sql.query("select passed, failures from gate_results where gate = 'video_samples'")
    failed = json.loads(verdict.failures[0])
    assert not verdict.passed[0] and failed["max_failing_share"] == 0.01 and failed["num_quarantined"] == 0
    assert [(f["check"], f["level"], f["action"]) for f in failed["failures"]] == [
        (TIMESTAMPS_CHECK, "row", "stopped")
    ]
    assert sql.query("select count(*) as n from quarantine where stage like 'gate:%'").n[0] == 0

    # Under a per-gate threshold of 50% the same table goes on: the bad row is quarantined with the gate,
    # the check, its expectation and the failing value; the other clips' rows are kept.
    monkeypatch.setenv("KEYEFLOW_GATE_MAX_FAILING_SHARE", '{"video_samples": 0.5}')
    result = pretokenize_videos("paper")
    assert lineage.run_tags(result["run_id"])["keyeflow.gate.video_samples"] == "passed"
    quarantined = sql.query("select uri, stage, reason, content_hash, config_hash from quarantine")
    assert quarantined.to_dict("records") == [
        {
            "uri": str(bad),
            "stage": "gate:video_samples",
            "reason": f"gate video_samples: {TIMESTAMPS_CHECK} [expect_column_values_to_be_in_set] "
            "timestamps_increasing=False",
            "content_hash": quarantined.content_hash[0],
            "config_hash": resolve_config("paper").config_hash(),
        }
    ]
    assert sorted(_samples_by_uri().uri) == [str(p) for p in clips]
    passed = sql.query(
        "select failures from gate_results where gate = 'video_samples' and passed order by checked_at"
    )
    summary = json.loads(passed.failures.iloc[-1])
    assert summary["max_failing_share"] == 0.5 and summary["num_quarantined"] == 1
    assert summary["failures"][0]["action"] == "quarantined"
    report = lineage.client().download_artifacts(result["run_id"], "gates/video_samples.json")
    with open(report) as f:
        assert json.load(f)["max_failing_share"] == 0.5
    markdown = lineage.client().download_artifacts(result["run_id"], "gates/video_samples.md")
    with open(markdown) as f:
        assert "stops the flow above 50.00%" in f.read()

    # The verdict and the quarantine are idempotent: a rerun quarantines the same row once.
    pretokenize_videos("paper")
    assert tables.open_table("quarantine").count_rows() == 1
    # A gate's rows are recomputed from the table: the quarantined row still fails, nothing else does.
    again = gates.check_video_samples(
        tables.ref("video_samples"),
        tables.ref("video_frames"),
        resolve_config("paper"),
        max_failing_share=0.5,
    )
    assert again.passed and [q["uri"] for q in again.quarantined] == [str(bad)]
