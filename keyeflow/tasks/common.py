"""Orchestration policy shared by every flow: lineage runs, progress, gate reporting.

Domain functions take plain callbacks for progress; here those callbacks drive a rich bar in the
terminal and a Prefect progress artifact in the UI.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.quality import gates


class ProgressTracker:
    """Counts finished items from any worker thread; shows them in the terminal and in Prefect."""

    def __init__(self, total: int, key: str, description: str):
        self.total = max(total, 1)
        self.done = 0
        self._lock = threading.Lock()
        self._last_reported = -1.0
        self._artifact = create_progress_artifact(0.0, key=key, description=description)
        self._bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._task = self._bar.add_task(description, total=total)
        self._bar.start()

    def advance(self) -> None:
        with self._lock:
            self.done += 1
            self._bar.update(self._task, completed=self.done)
            percent = 100.0 * self.done / self.total
            # Each artifact update is an API call; a few per run is enough to watch.
            if percent - self._last_reported >= 5 or self.done == self.total:
                self._last_reported = percent
                update_progress_artifact(self._artifact, percent)

    def close(self) -> None:
        self._bar.stop()


@contextlib.contextmanager
def progress(total: int, key: str, description: str) -> Iterator[ProgressTracker]:
    tracker = ProgressTracker(total, key, description)
    try:
        yield tracker
    finally:
        tracker.close()


@contextlib.contextmanager
def lineage_run(name: str, params: dict, parent_run_id: str | None = None) -> Iterator[str]:
    """An MLflow run spanning a flow; marked FAILED if the flow raises."""
    run_id = lineage.start_run(name, params, parent_run_id)
    try:
        yield run_id
    except BaseException:
        lineage.end_run(run_id, failed=True)
        raise
    lineage.end_run(run_id)


@task(cache_policy=NO_CACHE)
def current_ref(name: str) -> tables.TableRef:
    return tables.ref(name)


@task(cache_policy=NO_CACHE)
def record_outputs(run_id: str, refs: list[tables.TableRef], inputs: list[tables.TableRef] = (),
                   metrics: dict | None = None) -> None:
    lineage.log_metrics(run_id, metrics or {})
    for r in inputs:
        lineage.log_input(run_id, r)
    for r in refs:
        lineage.log_output(run_id, r)


def log_quarantined(quarantined: dict[str, str]) -> None:
    """Each quarantined input, one warning line, in the task's Prefect log."""
    logger = get_run_logger()
    for uri, reason in quarantined.items():
        logger.warning("quarantined %s: %s", uri, reason)


def publish_gate(result: gates.GateResult, table: tables.TableRef, run_id: str) -> None:
    """Report a verdict everywhere a person looks (MLflow, Prefect, the gate_results table), then
    stop the flow if it failed."""
    key = f"gate-{result.gate.replace('_', '-')}"
    lineage.log_dict(run_id, result.to_dict(), f"gates/{result.gate}.json")
    lineage.log_text(run_id, result.markdown(), f"gates/{result.gate}.md")
    lineage.set_tags(run_id, {f"keyeflow.gate.{result.gate}": "passed" if result.passed else "failed"})
    create_markdown_artifact(result.markdown(), key=key, description=f"{result.gate} @ {table}")
    gates.record(result, table, run_id)
    if not result.passed:
        get_run_logger().error("gate %s failed: %s", result.gate, result.failures)
    result.raise_if_failed()
