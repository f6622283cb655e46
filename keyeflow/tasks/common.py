"""Orchestration policy shared by every flow: the task runner, lineage runs, progress, gate reporting.

Domain functions take plain callbacks for progress; here those callbacks drive a rich bar in the
terminal and a Prefect progress artifact in the UI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from keyeflow import lineage
from keyeflow.config import get_settings
from keyeflow.datasets import tables
from keyeflow.quality import gates
from keyeflow.training import memory_plan
from keyeflow.training.recipe_source import normalise_overrides, to_plain


class PromotionBlocked(RuntimeError):
    """A checkpoint evaluated worse than the one it would replace, beyond the recipe's margins: the flow
    stops there."""


def task_runner() -> TaskRunner:
    """The runner data flows submit shard tasks to, chosen by ``KEYEFLOW_TASK_RUNNER`` (see ``Settings``).

    ``thread`` (default): two threads in the flow's process; decoding happens in ffmpeg subprocesses, so
    two threads keep both cores of a laptop busy. ``dask``: a temporary local cluster of
    ``KEYEFLOW_DASK_WORKERS`` processes, or the existing cluster at ``KEYEFLOW_DASK_ADDRESS``. Its workers
    run the shard tasks, so they need this package and the same ``KEYEFLOW_*`` settings (a local cluster
    inherits them; a remote one must be given them), and they must reach the tables (object storage, or a
    shared disk). The cluster starts at the first submitted task, so flows that submit none never start one.
    """
    settings = get_settings()
    if settings.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=2)
    from prefect_dask import DaskTaskRunner  # imported here: it pulls in dask.distributed

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # Processes, not threads: each worker's Python work (probing, patchifying frames) gets its own core,
    # and a worker that runs out of memory is restarted by its nanny instead of taking the flow down.
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, "processes": True})


def _tasks_run_here() -> bool:
    """Whether submitted tasks run in this process (they do with the thread pool, and with no flow at all)."""
    context = FlowRunContext.get()
    return context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)


class ProgressTracker:
    """Counts finished items; shows them in the terminal and in Prefect.

    With the thread runner, shard tasks get the tracker itself (`for_tasks`) and count each item from
    their threads. A task in another process (Dask) cannot: the rich bar and the lock do not pickle, and a
    copy there would count for nobody. Those tasks get None and the flow counts each shard's items as the
    shard finishes (`results`): coarser, but the bar and the artifact still reach 100%.
    """

    def __init__(self, total: int, key: str, description: str):
        self.total = max(total, 1)
        self.done = 0
        self.tasks_run_here = _tasks_run_here()
        self._lock = threading.Lock()
        self._last_reported = -1.0
        self._artifact = create_progress_artifact(0.0, key=key, description=description)
        self._bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._task = self._bar.add_task(description, total=total)
        self._bar.start()

    def advance(self, num_items: int = 1) -> None:
        with self._lock:
            self.done += num_items
            self._bar.update(self._task, completed=self.done)
            percent = 100.0 * self.done / self.total
            # Each artifact update is an API call; a few per run is enough to watch.
            if percent - self._last_reported >= 5 or self.done == self.total:
                self._last_reported = percent
                update_progress_artifact(self._artifact, percent)

    def for_tasks(self) -> ProgressTracker | None:
        """What to hand a submitted shard task to count its items with."""
        return self if self.tasks_run_here else None

    def results(self, futures: Sequence[PrefectFuture], shards: Sequence[Sequence]) -> list:
        """The futures' results in submission order; counts each shard when it finishes if its task could
        not count its own items."""
        if not self.tasks_run_here:
            sizes = {id(f): len(shard) for f, shard in zip(futures, shards, strict=True)}
            for future in as_completed(list(futures)):
                self.advance(sizes[id(future)])
        return [f.result() for f in futures]

    def close(self) -> None:
        self._bar.stop()


@contextlib.contextmanager
def progress(total: int, key: str, description: str) -> Iterator[ProgressTracker]:
    tracker = ProgressTracker(total, key, description)
    try:
        yield tracker
    finally:
        tracker.close()


def _terminal_hides_info() -> bool:
    """Whether Prefect's console handler drops INFO records (`keyeflow` without -v sets it to WARNING; the
    Prefect UI gets them either way, through its API handler)."""
    level = os.environ.get("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "0").strip().upper()
    number = int(level) if level.isdigit() else logging.getLevelName(level)
    return isinstance(number, int) and number > logging.INFO


_terminal = Console(soft_wrap=True, highlight=False)


def report_step(output) -> None:
    """A finished (or skipped) training step: an INFO line in the run's log, a `stage-<name>` artifact, and,
    when the terminal hides INFO, the same line there too: the one line per stage a quiet terminal keeps."""
    verb = "trained" if output.trained else "unchanged, skipped"
    get_run_logger().info("%s: %s → %s (MLflow run %s)", output.name, verb, output.checkpoint, output.run_id)
    # One artifact per stage on the flow run: the Prefect UI lists what each stage did, where its output is.
    create_markdown_artifact(
        f"# {output.name}: {verb}\n\nCheckpoint `{output.checkpoint}`\n\nMLflow run `{output.run_id}`, step "
        f"key `{output.key}`",
        key=f"stage-{output.name}".lower().replace("_", "-")[:60],
        description=f"{output.name}: {verb}",
    )
    if _terminal_hides_info():
        mark = "[green]✓[/green]" if output.trained else "[dim]=[/dim]"
        _terminal.print(f"  {mark} {output.name}: {verb} (MLflow run {output.run_id})")


@contextlib.contextmanager
def lineage_run(name: str, params: dict, parent_run_id: str | None = None) -> Iterator[str]:
    """An MLflow run spanning a flow (the one a killed attempt left, reopened: `lineage.open_flow_run`);
    marked FAILED if the flow raises."""
    run_id = lineage.open_flow_run(name, params, parent_run_id)
    try:
        yield run_id
    except BaseException:
        lineage.end_run(run_id, failed=True)
        raise
    lineage.end_run(run_id)


def recipe_params(recipe, source: str, overrides) -> dict:
    """The flow run's MLflow params for its recipe: the resolved recipe and its hash (what the steps' cache
    keys are made of), and, when they differ from a built-in name alone, where it came from and the overrides
    (left out otherwise, so an unchanged recipe's run params stay as they were)."""
    params = {"recipe": recipe.to_dict(), "recipe_hash": recipe.config_hash()}
    if source != recipe.name or overrides:
        params["recipe_source"] = source
    if overrides:
        params["recipe_overrides"] = normalise_overrides(overrides)
    return params


def record_recipe(run_id: str, recipe, source: str, overrides) -> None:
    """The resolved recipe, whole, where a person looks: `recipe.json` on the flow's MLflow run (the params
    hold only its first 6,000 characters) and a `recipe` artifact on the Prefect flow run."""
    plain = to_plain(recipe)
    lineage.log_dict(run_id, plain, "recipe.json")
    changes = normalise_overrides(overrides)
    lines = [
        f"# recipe {recipe.name} (hash `{recipe.config_hash()}`)",
        "",
        f"From `{source}`" + (", with overrides:" if changes else ", no overrides."),
        *[f"- `{c}`" for c in changes],
        "",
        "```json",
        json.dumps(plain, indent=1, default=str),
        "```",
    ]
    create_markdown_artifact("\n".join(lines), key="recipe", description=f"resolved recipe {recipe.name}")


@task(cache_policy=NO_CACHE)
def current_ref(name: str) -> tables.TableRef:
    return tables.ref(name)


@task(cache_policy=NO_CACHE)
def record_outputs(
    run_id: str, refs: list[tables.TableRef], inputs: list[tables.TableRef] = (), metrics: dict | None = None
) -> None:
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


def max_failing_share(gate: str) -> float:
    """The share of rows a gate may quarantine and go on (``KEYEFLOW_GATE_MAX_FAILING_SHARE``, default 1%)."""
    return get_settings().gate_max_failing_share.get(gate, gates.DEFAULT_MAX_FAILING_SHARE)


def publish_gate(result: gates.GateResult, table: tables.TableRef, run_id: str) -> None:
    """Report a verdict everywhere a person looks (MLflow, Prefect, the gate_results table), quarantine
    the rows that failed row-level checks when the gate lets the batch go on, then stop the flow if it
    failed."""
    key = f"gate-{result.gate.replace('_', '-')}"
    lineage.log_dict(run_id, result.to_dict(), f"gates/{result.gate}.json")
    lineage.log_text(run_id, result.markdown(), f"gates/{result.gate}.md")
    lineage.set_tags(run_id, {f"keyeflow.gate.{result.gate}": "passed" if result.passed else "failed"})
    create_markdown_artifact(result.markdown(), key=key, description=f"{result.gate} @ {table}")
    quarantined = gates.quarantine_rows(result)
    if quarantined:
        # Before the verdict row: a crash in between leaves the rows quarantined and a rerun records it.
        tables.upsert("quarantine", quarantined)
        lineage.log_metrics(run_id, {f"gate_{result.gate}_quarantined": len(quarantined)})
        log_quarantined({q["uri"]: q["reason"] for q in quarantined})
    gates.record(result, table, run_id)
    if not result.passed:
        get_run_logger().error("gate %s failed: %s", result.gate, result.failures)
    result.raise_if_failed()


def publish_memory_plan(plans: list[memory_plan.StagePlan], what: str, run_id: str) -> None:
    """Publish the memory plan of every stage (a Prefect artifact, the flow run's `memory_plan.json`), then
    stop the flow, before anything trains, when a stage cannot run (`memory_plan.check_fits`)."""
    create_markdown_artifact(memory_plan.markdown(plans, what), key="memory-plan", description=what)
    lineage.log_dict(run_id, [p.to_dict() for p in plans], "memory_plan.json")
    memory_plan.check_fits(plans, what)
    sizes = ", ".join(f"{p.stage} {p.total / memory_plan.GIB:.1f} GiB" for p in plans)
    get_run_logger().info("%s: every stage fits per device (%s)", what, sizes)
