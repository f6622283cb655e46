"""`keyeflow` is quiet by default: Prefect's per-task state lines and libraries' INFO stay out of the terminal
(warnings, progress bars and the summary stay), `-v` shows them all, and the Prefect server gets every line
either way (its API log handler is untouched)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")


def _ingest(home: Path, videos: list[Path], *flags: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_LOGGING_", "MLFLOW_LOGGING"))}
    env["KEYEFLOW_HOME"] = str(home)
    done = subprocess.run(
        [KEYEFLOW, *flags, "ingest", *map(str, videos), "--shard-size", "1"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return (done.stdout + done.stderr).splitlines()


def _api_logs(flow_name: str) -> list[str]:
    """Every log line the Prefect server holds for the newest run of `flow_name` and its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
    return [log.message for log in logs]


@pytest.mark.slow  # two CLI processes: ~40 s on an idle 2-core machine
def test_quiet_by_default_everything_with_v_and_in_the_prefect_logs(tmp_path, sample_videos):
    quiet = _ingest(tmp_path / "quiet", sample_videos[:2])
    quiet_api = _api_logs("ingest-videos")
    loud = _ingest(tmp_path / "loud", sample_videos[:2], "-v")

    finished = [line for line in loud if "Finished in state Completed()" in line]
    assert finished  # Prefect's state line of every task run, with -v
    assert not [line for line in quiet if "Finished in state" in line or "| INFO " in line]
    assert not [line for line in quiet if "INFO mlflow" in line]
    # The progress bars and the summary are there either way.
    for lines in (quiet, loud):
        assert any(line.startswith("ingest ") for line in lines)
        assert any(line.startswith("MLflow run: ") for line in lines)
    assert len(quiet) < len(loud) - len(finished) // 2
    # The Prefect server got the INFO lines the quiet terminal left out.
    assert any("Finished in state Completed()" in m for m in quiet_api)
    assert any("files in" in m and "shards" in m for m in quiet_api)  # the flow's own INFO line
    print(f"keyeflow ingest: {len(quiet)} lines quiet, {len(loud)} with -v")
