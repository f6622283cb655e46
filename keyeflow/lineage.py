"""The one module that talks to MLflow.

Every flow run (and later every training stage) is an MLflow run. Inputs and outputs are recorded as
tags ``keyeflow.input.<table>`` / ``keyeflow.output.<table>`` holding ``uri@vN`` (MLflow has no resolver
for Lance sources, and a tag is what the UI can search: ``tags."keyeflow.output.videos" LIKE '%@v3'``),
and a parent link as ``keyeflow.parent_run_id`` plus MLflow's own ``mlflow.parentRunId`` so the UI nests
the runs. All calls take an explicit run id: Prefect runs tasks on worker threads, where MLflow's
"active run" of the flow's thread is not visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from keyeflow.config import get_settings
from keyeflow.datasets.tables import TableRef

INPUT_TAG = "keyeflow.input."
OUTPUT_TAG = "keyeflow.output."
PARENT_TAG = "keyeflow.parent_run_id"


_ready_stores: set[str] = set()


def client() -> MlflowClient:
    settings = get_settings()
    settings.root.mkdir(parents=True, exist_ok=True)
    uri = settings.mlflow_uri
    if uri in _ready_stores:
        return MlflowClient(tracking_uri=uri)
    with _store_lock(uri):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # opens the store: creates and migrates its schema if new
    _ready_stores.add(uri)
    return c


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Held while this process first opens the tracking store. MLflow creates and migrates a new SQLite
    store's schema when it opens it; two processes doing that at once (two `keyeflow` commands on one
    data root) fail ("duplicate column", "expected to match one row"), so the first open is serialised by
    an flock beside the database file. A tracking server migrates its own database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def experiment_id(name: str | None = None) -> str:
    settings = get_settings()
    name = name or settings.experiment
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A tracking server decides where artifacts go (its --artifacts-destination, proxied to every client);
    # with a local store they go under the data root, not ./mlruns of whatever directory the user ran from.
    location = None if settings.tracking_is_server else Path(settings.artifacts_uri).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(name).experiment_id  # created concurrently


def start_run(
    name: str,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a run and return its id; close it with :func:`end_run`."""
    all_tags = {"keyeflow.kind": name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id(), run_name=name, tags=all_tags)
    if params:
        log_params(run.info.run_id, params)
    return run.info.run_id


def end_run(run_id: str, failed: bool = False) -> None:
    client().set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_params(run_id: str, params: dict[str, Any]) -> None:
    c = client()
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        c.log_param(run_id, key, text[:6000])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    c = client()
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step or 0)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric, in step order."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def set_tags(run_id: str, values: dict[str, str]) -> None:
    c = client()
    for key, value in values.items():
        c.set_tag(run_id, key, value)


def log_input(run_id: str, table: TableRef) -> None:
    set_tags(run_id, {INPUT_TAG + table.name: f"{table.uri}@v{table.version}"})


def log_output(run_id: str, table: TableRef) -> None:
    set_tags(run_id, {OUTPUT_TAG + table.name: f"{table.uri}@v{table.version}"})


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_file(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def run_tags(run_id: str) -> dict[str, str]:
    return dict(client().get_run(run_id).data.tags)


def parse_table_tag(value: str) -> tuple[str, int]:
    uri, _, version = value.rpartition("@v")
    return uri, int(version)


def reopen_run(run_id: str) -> None:
    """Mark a run RUNNING again: a step resumed after a kill logs into the run it started."""
    client().update_run(run_id, status="RUNNING")


# ------------------------------------------------------------------------------------ flow runs that resume

RESUME_KEY_TAG = "keyeflow.resume_key"
OWNER_TAG = "keyeflow.owner"


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc), so a pid the kernel reused for
    another process is not taken for the one that died; "" where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()
    return "" if fields[0] == "Z" else fields[19]  # a zombie has exited: it counts as dead


def process_owner() -> str:
    """This process, as a run's owner: host, pid and start time."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def owner_is_dead(owner: str) -> bool:
    """Whether the process that owns a run has certainly ended. A process on another host cannot be
    checked from here: it counts as alive, so its run is never taken over."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid, ticks = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return _start_ticks(pid) != ticks


def resume_key(name: str, params: dict[str, Any] | None, parent_run_id: str | None) -> str:
    """What makes two flow runs the same attempt: the flow, its parameters and its parent run."""
    text = json.dumps([name, params or {}, parent_run_id], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def open_flow_run(name: str, params: dict[str, Any] | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run of a flow: the run a killed attempt of the same flow left behind, reopened, else a new
    one. So a crash and its rerun leave one run, as an uninterrupted run does, not a RUNNING orphan beside
    a FINISHED twin.

    A top-level run is taken over only while it is RUNNING and its owner process has certainly died (same
    host, pid gone or reused). A subflow run is taken over when its parent was (the same key names the
    parent) and another process opened it: a subflow that finished before the kill is finished again by the
    rerun, not duplicated. Two processes that look for the same dead run at once are serialised by the
    store's lock (a local store; a tracking server's clients are not)."""
    key = resume_key(name, params, parent_run_id)
    me = process_owner()
    client()  # opens the store first: that takes the same lock
    with _store_lock(get_settings().mlflow_uri):
        for run in runs_with_tag(RESUME_KEY_TAG, key):
            owner = run.data.tags.get(OWNER_TAG, "")
            if owner == me:
                continue
            if parent_run_id or (run.info.status == "RUNNING" and owner_is_dead(owner)):
                reopen_run(run.info.run_id)
                set_tags(run.info.run_id, {OWNER_TAG: me})
                return run.info.run_id
        return start_run(name, params, parent_run_id, tags={RESUME_KEY_TAG: key, OWNER_TAG: me})


# ---------------------------------------------------------------------------------------------- tracing

CHECKPOINT_TAG = "keyeflow.checkpoint"
UPSTREAM_TAG = "keyeflow.upstream_run_ids"


class RunSink:
    """A training loop's metrics sink (`keyeflow.training.engine.MetricsSink`) writing to one MLflow run:
    training code is handed one of these and never imports this module."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.run_id, dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.run_id, dict(metrics), step=step)

    def log_input(self, table: TableRef) -> None:
        log_input(self.run_id, table)

    def set_checkpoint(self, path: Path) -> None:
        set_tags(self.run_id, {CHECKPOINT_TAG: str(path)})


def _search(filter_string: str) -> list:
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(experiments, filter_string=filter_string, order_by=["attributes.start_time DESC"])


def tag_filter(key: str, value: str) -> str:
    """An MLflow filter clause matching runs whose tag ``key`` may equal ``value``: the one place a data
    value enters a filter string (MLflow takes no parameters there).

    MLflow strips a literal's outer quotes and unescapes nothing, so a value is written between the quote
    character it does not contain. A value holding both quote characters or a backslash (which the filter
    lexer reads as an escape) cannot be written at all; it becomes a LIKE pattern with ``_`` (any one
    character) in their places, which matches a superset: :func:`runs_with_tag` keeps the exact matches."""
    if "`" in key:
        raise ValueError(f"tag key {key!r} holds a backtick")
    if "\\" not in value:
        for quote in ("'", '"'):
            if quote not in value:
                return f"tags.`{key}` = {quote}{value}{quote}"
    pattern = "".join("_" if ch in "'\"\\" else ch for ch in value)
    return f"tags.`{key}` LIKE '{pattern}'"


def runs_with_tag(key: str, value: str, *conditions: str) -> list:
    """Runs (newest first) whose tag ``key`` is exactly ``value``, and that meet the constant
    ``conditions``."""
    runs = _search(" and ".join([tag_filter(key, value), *conditions]))
    return [r for r in runs if r.data.tags.get(key) == value]


def resolve_run(target: str) -> str:
    """A run id, or the run that produced a checkpoint directory (the model dir, its step dir or the stage's
    output dir). A flow run that ends in a checkpoint (`keyeflow.final_run_id`) resolves to that step's
    run."""
    path = Path(target).expanduser()
    if path.exists():
        resolved = path.resolve()
        for candidate in (resolved, resolved / "model"):
            runs = runs_with_tag(CHECKPOINT_TAG, str(candidate))
            if runs:  # the newest may be a flow run that ended on this (skipped) step: follow it to the step
                return runs[0].data.tags.get("keyeflow.final_run_id", runs[0].info.run_id)
        for candidate in (resolved, resolved.parent, resolved.parent.parent):
            runs = runs_with_tag("keyeflow.out_dir", str(candidate))
            if runs:
                return runs[0].info.run_id
        raise LookupError(f"no MLflow run in {get_settings().mlflow_uri} produced the checkpoint {resolved}")
    try:
        run = client().get_run(target)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(
            f"{target!r} is neither an existing checkpoint path nor an MLflow run id in "
            f"{get_settings().mlflow_uri}"
        ) from exc
    return run.data.tags.get("keyeflow.final_run_id", run.info.run_id)


def _step(run) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    mixture = None
    if INPUT_TAG + "mixtures" in tags and "mixture_id" in params:
        uri, version = parse_table_tag(tags[INPUT_TAG + "mixtures"])
        mixture = {"uri": uri, "version": version, "mixture_id": params["mixture_id"]}
    upstream = [r for r in tags.get(UPSTREAM_TAG, "").split(",") if r]
    return {
        "name": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
        "checkpoint": tags.get(CHECKPOINT_TAG), "upstream_run_ids": upstream, "mixture": mixture,
        "promotion": tags.get("keyeflow.gate.promotion"),
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("eval/")},
        "parent_run_id": tags.get(PARENT_TAG),
    }  # fmt: skip


def trace(target: str) -> dict[str, Any]:
    """The chain behind a checkpoint (or run id): every step run down to the first, each mixture it trained
    on, and for each mixture its table versions, source media and gate verdicts (`datasets.provenance`)."""
    from keyeflow.datasets.provenance import mixture_provenance

    start = resolve_run(target)
    steps, order, queue = {}, [], [start]
    while queue:
        run_id = queue.pop(0)
        if run_id in steps:
            continue
        step = _step(client().get_run(run_id))
        steps[run_id] = step
        order.append(run_id)
        queue.extend(step["upstream_run_ids"])
    mixtures, seen = [], set()
    for run_id in order:
        m = steps[run_id]["mixture"]
        if m and m["mixture_id"] not in seen:
            seen.add(m["mixture_id"])
            mixtures.append(mixture_provenance(TableRef("mixtures", m["uri"], m["version"]), m["mixture_id"]))
    videos = sorted({v for m in mixtures for v in m["videos"]})
    images = sorted({i for m in mixtures for i in m["images"]})
    texts = {t for m in mixtures for t in m["texts"]}
    return {
        "target": target, "run_id": start, "checkpoint": steps[start]["checkpoint"],
        "steps": [steps[r] for r in order], "mixtures": mixtures,
        "sources": {"num_videos": len(videos), "num_images": len(images),
                    "num_texts": len(texts), "videos": videos, "images": images},
        "gates_passed": all(g["passed"] for m in mixtures for g in m["gates"] if g["gate"] is not None),
    }  # fmt: skip


def latest_checkpoint(kind: str) -> str:
    """The checkpoint the newest finished `kind` flow run (e.g. "pretrain") ended with."""
    runs = runs_with_tag("keyeflow.kind", kind, "attributes.status = 'FINISHED'")
    for run in runs:
        if CHECKPOINT_TAG in run.data.tags:
            return run.data.tags[CHECKPOINT_TAG]
    raise LookupError(
        f"no finished {kind!r} run with a checkpoint in {get_settings().mlflow_uri}; run it first"
    )
