"""A flow's MLflow run after a kill: the rerun reopens the run the dead process left RUNNING (and the
subflow runs under it) instead of leaving an orphan beside a twin; a live process's run, a finished top-level
run and a run of other parameters are never taken over. Real MLflow store, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from keyeflow import lineage

# A process that opens a flow run and a subflow run under it, then SIGKILLs itself (or waits, alive).
OPENER = textwrap.dedent(
    """
    import os, signal, sys
    from keyeflow import lineage
    parent = lineage.open_flow_run("pipeline", {"paths": ["a", "b"]})
    child = lineage.open_flow_run("ingest", {"shard": 1}, parent)
    lineage.end_run(child)
    print(parent, child, flush=True)
    if sys.argv[1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # alive until the test closes stdin
    """
)


def opener(mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", OPENER, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def status(run_id: str) -> str:
    return lineage.client().get_run(run_id).info.status


def test_rerun_reopens_the_killed_flow_run_and_its_finished_subflow(home):
    proc = opener("die")
    parent, child = proc.stdout.readline().split()
    assert proc.wait() == -signal.SIGKILL
    assert status(parent) == "RUNNING" and status(child) == "FINISHED"

    again = lineage.open_flow_run("pipeline", {"paths": ["a", "b"]})
    assert again == parent and status(parent) == "RUNNING"
    assert lineage.run_tags(parent)[lineage.OWNER_TAG] == lineage.process_owner()
    assert lineage.open_flow_run("ingest", {"shard": 1}, again) == child  # not a twin
    lineage.end_run(child)
    lineage.end_run(again)
    assert len(lineage.runs_with_tag("keyeflow.kind", "pipeline")) == 1
    assert len(lineage.runs_with_tag("keyeflow.kind", "ingest")) == 1

    # Finished: the next invocation is a new run, and so is its subflow.
    fresh = lineage.open_flow_run("pipeline", {"paths": ["a", "b"]})
    assert fresh != parent
    assert lineage.open_flow_run("ingest", {"shard": 1}, fresh) != child
    # Within one process, the same subflow called twice is two runs.
    first = lineage.open_flow_run("ingest", {"shard": 2}, fresh)
    assert lineage.open_flow_run("ingest", {"shard": 2}, fresh) != first


def test_a_live_process_run_and_other_parameters_are_not_taken_over(home):
    proc = opener("live")
    try:
        parent, _ = proc.stdout.readline().split()
        assert lineage.open_flow_run("pipeline", {"paths": ["a", "b"]}) != parent  # its owner is alive
    finally:
        proc.stdin.close()
        proc.wait()
    dead = opener("die")
    killed, _ = dead.stdout.readline().split()
    dead.wait()
    assert lineage.open_flow_run("pipeline", {"paths": ["a"]}) != killed  # another attempt's parameters
    assert lineage.open_flow_run("pipeline", {"paths": ["a", "b"]}) == killed


def test_owner_liveness():
    assert not lineage.owner_is_dead(lineage.process_owner())
    host, pid, ticks = lineage.process_owner().rsplit(":", 2)
    assert lineage.owner_is_dead(f"{host}:{pid}:{int(ticks) + 1}")  # the pid now names another process
    assert not lineage.owner_is_dead(f"another-host.invalid:{pid}:{ticks}")  # cannot be checked: alive
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    assert lineage.owner_is_dead(f"{host}:{int(done.stdout)}:{ticks}")
