"""Data flows on Dask: the video pipeline run on a real 2-process Dask cluster writes exactly the rows the
default thread runner writes, and ``KEYEFLOW_TASK_RUNNER`` picks the runner when the flows are imported."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from keyeflow.datasets import tables

REPO = Path(__file__).resolve().parents[2]

# What the video pipeline writes; `gate_results` is left out because its rows name the MLflow run.
TABLES = ("videos", "video_samples", "video_frames", "quarantine")


def snapshot(home: Path) -> dict[str, dict]:
    """Each table's rows by primary key, without the columns that record when a row was written."""
    out = {}
    for name in TABLES:
        table = lance.dataset(str(home / "tables" / f"{name}.lance")).to_table()
        columns = [f.name for f in table.schema if not pa.types.is_timestamp(f.type)]
        key = tables.PRIMARY_KEYS[name]
        rows = {}
        for row in table.select(columns).to_pylist():
            assert row[key] not in rows, f"duplicate {name} row {row[key]}"
            rows[row[key]] = {
                k: hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for k, v in row.items()
            }
        out[name] = rows
    return out


def _use_home(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("KEYEFLOW_HOME", str(home))
    for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


def _progress_artifact(key: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        (latest,) = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
        )
    return float(latest.data)


def test_task_runner_from_settings(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from keyeflow.tasks.common import task_runner

    for var in ("KEYEFLOW_TASK_RUNNER", "KEYEFLOW_DASK_WORKERS", "KEYEFLOW_DASK_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(task_runner(), ThreadPoolTaskRunner)

    monkeypatch.setenv("KEYEFLOW_TASK_RUNNER", "dask")
    runner = task_runner()
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 2, "processes": True}
    monkeypatch.setenv("KEYEFLOW_DASK_WORKERS", "3")
    assert task_runner().cluster_kwargs["n_workers"] == 3

    monkeypatch.setenv("KEYEFLOW_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    runner = task_runner()
    assert runner.address == "tcp://10.0.0.5:8786" and runner.cluster_kwargs == {}

    monkeypatch.setenv("KEYEFLOW_TASK_RUNNER", "thread")
    with pytest.raises(ValueError, match="KEYEFLOW_TASK_RUNNER=dask"):
        task_runner()
    monkeypatch.delenv("KEYEFLOW_DASK_ADDRESS")
    monkeypatch.setenv("KEYEFLOW_DASK_WORKERS", "0")
    with pytest.raises(ValueError, match="KEYEFLOW_DASK_WORKERS must be at least 1"):
        task_runner()
    monkeypatch.setenv("KEYEFLOW_DASK_WORKERS", "2")
    monkeypatch.setenv("KEYEFLOW_TASK_RUNNER", "ray")
    with pytest.raises(ValueError, match="task_runner"):
        task_runner()


def test_flows_read_the_runner_at_import():
    """The setting reaches the flows' decorators when their modules are imported (a fresh process)."""
    code = (
        "import json; from keyeflow.flows import data, video; r = video.pretokenize_videos.task_runner; "
        "print(json.dumps([type(r).__name__, r.cluster_kwargs, type(data.ingest_images.task_runner).__name__,"
        " type(video.video_pipeline.task_runner).__name__]))"
    )
    env = {**os.environ, "KEYEFLOW_TASK_RUNNER": "dask", "KEYEFLOW_DASK_WORKERS": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    kind, kwargs, images, pipeline = json.loads(out.stdout.strip().splitlines()[-1])
    assert (kind, kwargs, images) == ("DaskTaskRunner", {"n_workers": 3, "processes": True}, "DaskTaskRunner")
    # The pipeline flow itself submits nothing; it keeps Prefect's default runner.
    assert pipeline == "ThreadPoolTaskRunner"


def test_video_pipeline_on_dask_matches_default_runner(tmp_path, monkeypatch, sample_videos, prefect_harness):
    """Same clips, two fresh data roots: thread runner in one, a real 2-process local Dask cluster (the one
    ``KEYEFLOW_TASK_RUNNER=dask`` starts) in the other; every row must be the same."""
    import distributed

    from keyeflow.flows import video
    from keyeflow.tasks.common import task_runner

    folder = str(sample_videos[0].parent)

    _use_home(monkeypatch, tmp_path / "threads")
    threaded = video.video_pipeline([folder], pretokenize_shard_size=2)
    assert threaded["pretokenize"]["num_done"] == len(sample_videos)

    # Record the clusters the runner starts, to show the shards really ran in their worker processes.
    executed = []

    class RecordingCluster(distributed.LocalCluster):
        def close(self, *args, **kwargs):
            if self.status.name == "running":
                with distributed.Client(self) as client:
                    executed.append(
                        client.run(lambda dask_worker: (os.getpid(), dask_worker.state.executed_count))
                    )
            return super().close(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", RecordingCluster)
    _use_home(monkeypatch, tmp_path / "dask")
    monkeypatch.setenv("KEYEFLOW_TASK_RUNNER", "dask")
    monkeypatch.setenv("KEYEFLOW_DASK_WORKERS", "2")
    # The flows took their runner at import (the thread pool here); give them the one the setting picks now,
    # as a process started with KEYEFLOW_TASK_RUNNER=dask would have (test_flows_read_the_runner_at_import).
    for flow in (video.ingest_videos, video.pretokenize_videos):
        monkeypatch.setattr(flow, "task_runner", task_runner())
    on_dask = video.video_pipeline([folder], pretokenize_shard_size=2)

    # Only pre-tokenisation submits tasks (ingestion runs its shards in order, in the flow): one cluster.
    (workers,) = executed
    assert len(workers) == 2 and os.getpid() not in {pid for pid, _ in workers.values()}
    num_shards = -(-len(sample_videos) // 2)
    assert sum(count for _, count in workers.values()) == num_shards
    for step in ("ingest", "pretokenize"):
        counts = {k: v for k, v in on_dask[step].items() if k.startswith(("num_", "total_"))}
        assert counts == {k: v for k, v in threaded[step].items() if k.startswith(("num_", "total_"))}
    # The flow counted each shard as it came back: the progress artifact reached 100%.
    assert _progress_artifact("pretokenize-progress") == pytest.approx(100.0)
    expected = snapshot(tmp_path / "threads")
    assert len(expected["video_samples"]) == len(sample_videos) and expected["video_frames"]
    assert snapshot(tmp_path / "dask") == expected
