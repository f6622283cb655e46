"""The video flows under Prefect's test harness (a real local API), with MLflow and Lance underneath."""

from __future__ import annotations

import pyarrow as pa
import pytest

from keyeflow import lineage
from keyeflow.datasets import sql, tables
from keyeflow.quality.gates import GateFailed


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield


def _artifacts():
    """The newest artifact of each key. The harness server holds the artifacts of every test in the session
    (a failing gate's too), so the newest is this test's: its order by id is random."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    keys = ["gate-videos", "gate-video-samples", "slowfast-strips", "ingest-progress", "pretokenize-progress"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), sort=ArtifactSort.CREATED_DESC
        )
    newest = {}
    for artifact in found:
        newest.setdefault(artifact.key, artifact)
    return newest


def test_video_pipeline_tracks_lineage_gates_and_pictures(home, sample_videos, bad_inputs):
    from keyeflow.flows.video import video_pipeline

    folder = sample_videos[0].parent
    result = video_pipeline([str(folder), str(bad_inputs["zero_byte"]), str(bad_inputs["one_frame"])])
    ing, tok = result["ingest"], result["pretokenize"]
    assert ing["num_ingested"] == len(sample_videos) + 1 and ing["num_quarantined"] == 1
    assert tok["num_done"] == len(sample_videos) + 1
    # Shards of 4 videos: several appends to video_frames, merged into one fragment at the end of the flow
    # (the loader's take costs per fragment touched; tables.compact).
    assert tok["num_done"] > 4
    frames = tables.open_table("video_frames", version=tok["video_frames"].version)
    assert len(frames.get_fragments()) == 1
    assert frames.count_rows() == sum(
        tables.open_table("video_samples").to_table(columns=["num_frames"]).column(0).to_pylist()
    )

    # pre-tokenisation read exactly the videos version ingestion produced
    child = lineage.run_tags(tok["run_id"])
    assert child["keyeflow.input.videos"] == f"{ing['videos'].uri}@v{ing['videos'].version}"
    assert child["keyeflow.output.video_samples"].endswith(f"@v{tok['video_samples'].version}")
    assert child[lineage.PARENT_TAG] == result["run_id"] == child["mlflow.parentRunId"]
    assert child["keyeflow.gate.video_samples"] == "passed"

    run = lineage.client().get_run(tok["run_id"])
    assert run.data.params["config_hash"] == tok["config_hash"]
    assert run.data.metrics["num_done"] == len(sample_videos) + 1
    files = {a.path for a in lineage.client().list_artifacts(tok["run_id"])}
    assert "slowfast_strips.png" in files and "gates" in files
    gate_files = {a.path for a in lineage.client().list_artifacts(tok["run_id"], "gates")}
    assert gate_files == {"gates/video_samples.json", "gates/video_samples.md"}

    verdicts = sql.query("select gate, passed from gate_results order by gate")
    assert verdicts.to_dict("records") == [
        {"gate": "video_samples", "passed": True},
        {"gate": "videos", "passed": True},
    ]
    arts = _artifacts()
    assert {"gate-videos", "gate-video-samples", "slowfast-strips", "ingest-progress"} <= set(arts)
    assert "PASSED" in arts["gate-video-samples"].data

    again = video_pipeline([str(folder)])
    assert again["ingest"]["num_ingested"] == 0 and again["pretokenize"]["num_videos"] == 0
    # nothing written, so nothing compacted either: the version downstream ids are keyed on stays
    assert again["pretokenize"]["video_frames"] == tok["video_frames"]


def test_failing_gate_stops_the_flow_and_names_the_check(home, sample_videos):
    from keyeflow.flows.video import ingest_videos, pretokenize_videos

    ingest_videos([str(p) for p in sample_videos[:2]])
    first = pretokenize_videos("paper")
    row = tables.open_table("video_samples").to_table(limit=1).to_pylist()[0]
    row.update(sample_id="tampered", frame_types=[1] * len(row["frame_types"]))
    tables.upsert("video_samples", pa.Table.from_pylist([row], schema=tables.SCHEMAS["video_samples"]))

    with pytest.raises(GateFailed, match="first frame is slow"):
        pretokenize_videos("paper")
    failed = lineage.client().search_runs(
        [lineage.experiment_id()], "tags.`keyeflow.gate.video_samples` = 'failed'"
    )
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    # downstream of the gate did not run: no strip picture on the failed run
    assert "slowfast_strips.png" not in {
        a.path for a in lineage.client().list_artifacts(failed[0].info.run_id)
    }
    assert first["run_id"] != failed[0].info.run_id
    verdict = sql.query("select passed, failures from gate_results where not passed")
    assert len(verdict) == 1 and "tampered" in verdict.failures[0]
