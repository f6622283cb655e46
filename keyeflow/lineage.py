"""The one module that talks to MLflow.

Every flow run and every training step is an MLflow run. A table a run reads or writes is recorded twice:
as an MLflow dataset on the run (`LanceTable`: name, source = Lance URI + version, digest, schema, row
count, read from the table's manifest without loading a row; the UI lists it under the run's Datasets, with
the context ``training``, ``evaluation``, ``input`` or ``output``: MLflow has no dataset outputs, so a table
a run wrote is a dataset with the context ``output``), and as a tag ``keyeflow.input.<table>`` /
``keyeflow.output.<table>`` holding ``uri@vN``, which the runs table can search
(``tags."keyeflow.output.videos" LIKE '%@v3'``) and `trace` follows. A parent link is
``keyeflow.parent_run_id`` plus MLflow's own ``mlflow.parentRunId`` so the UI nests the runs.

Every step's checkpoint is an MLflow logged model (`log_checkpoint_model`) output by its run, with the
checkpoints it started from as the run's model inputs: the UI shows the same chain `trace` walks. A
checkpoint is registered under its recipe's name (`register_checkpoint`), where the promotion gate moves the
``candidate`` and ``champion`` aliases and writes its verdict on the version (`record_promotion`).

All calls take an explicit run id: Prefect runs tasks on worker threads, where MLflow's "active run" of
the flow's thread is not visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Object, Property, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS

from keyeflow.config import get_settings
from keyeflow.datasets import tables
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
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before keyeflow set the kind
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    # A tracking server decides where artifacts go (its --artifacts-destination, proxied to every client);
    # with a local store they go under the data root, not ./mlruns of whatever directory the user ran from.
    location = None if settings.tracking_is_server else Path(settings.artifacts_uri).as_uri()
    try:
        return c.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(name).experiment_id  # created concurrently


# MLflow 3's UI opens an experiment by its kind: a GenAI experiment on the traces overview, a model-training
# one on the runs table and its charts. The kind is this experiment tag (the UI writes the same tag when a
# user picks the kind). MLflow 3.17's UI also has a global GenAI / Machine learning switch in its sidebar
# (GenAI until a user flips it, remembered by the browser); a link with `?workflowType=machine_learning`
# opens in the machine-learning view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


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


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int | None = None, model_id: str | None = None
) -> None:
    """`model_id`: the logged model the metrics measure (an evaluation), so the UI's model list shows them."""
    c = client()
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step or 0, model_id=model_id)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric, in step order."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def set_tags(run_id: str, values: dict[str, str]) -> None:
    c = client()
    for key, value in values.items():
        c.set_tag(run_id, key, value)


def log_input(run_id: str, table: TableRef, context: str = "input") -> None:
    """A table version the run read: a dataset with `context` (``training``, ``evaluation``, ``input``)."""
    log_table(run_id, table, context)
    set_tags(run_id, {INPUT_TAG + table.name: f"{table.uri}@v{table.version}"})


def log_output(run_id: str, table: TableRef) -> None:
    """A table version the run wrote: a dataset with the context ``output``."""
    log_table(run_id, table, "output")
    set_tags(run_id, {OUTPUT_TAG + table.name: f"{table.uri}@v{table.version}"})


# ------------------------------------------------------------------------------ Lance tables as datasets


class LanceSource(DatasetSource):
    """Where a table version lives: its Lance URI and version. Recorded in the run (``source_type`` "lance");
    `load` opens that version again. Built only from a `TableRef`, never resolved from a string, so it is
    not registered with MLflow's source resolvers."""

    def __init__(self, uri: str, version: int):
        self.uri = uri
        self.version = int(version)

    @staticmethod
    def _get_source_type() -> str:
        return "lance"

    def load(self):
        return tables.dataset(self.uri, version=self.version)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> LanceSource:
        raise NotImplementedError("a LanceSource is built from a TableRef")

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> LanceSource:
        return cls(source_dict["uri"], source_dict["version"])


class LanceTable(Dataset):
    """A pinned Lance table version as an MLflow dataset: schema, row count and digest come from the
    version's manifest (schema, fragments, their data and deletion files), so logging a table of any size
    reads no rows. The digest changes exactly when the data does: Lance names every data file it writes
    uniquely, so the same URI and version with other files (a table deleted and rebuilt) digests apart."""

    def __init__(self, table: TableRef):
        lance_dataset = tables.dataset(table.uri, version=table.version)
        self._arrow_schema = lance_dataset.schema
        fragments = lance_dataset.get_fragments()
        self._num_rows = lance_dataset.count_rows()
        self._files = sorted(
            [d.path for f in fragments for d in f.data_files()]
            + [str(f.metadata.deletion_file) for f in fragments if f.metadata.deletion_file is not None]
        )
        self._num_fragments = len(fragments)
        super().__init__(LanceSource(table.uri, table.version), name=table.name)

    def _compute_digest(self) -> str:
        text = json.dumps(
            [self.source.uri, self.source.version, self._arrow_schema.to_string(), self._files],
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def profile(self) -> dict[str, int]:
        return {
            "num_rows": self._num_rows,
            "num_fragments": self._num_fragments,
            "version": self.source.version,
        }

    @property
    def schema(self) -> Schema:
        return Schema(
            [ColSpec(_column_type(f.type), f.name, required=not f.nullable) for f in self._arrow_schema]
        )

    def to_dict(self) -> dict[str, str]:
        return {
            **super().to_dict(),
            "schema": json.dumps({"mlflow_colspec": self.schema.to_dict()}),
            "profile": json.dumps(self.profile),
        }


def _column_type(arrow_type: pa.DataType):
    """The MLflow type of an Arrow column type (what the UI's schema view shows)."""
    t = pa.types
    if t.is_boolean(arrow_type):
        return DataType.boolean
    if t.is_int8(arrow_type) or t.is_int16(arrow_type) or t.is_int32(arrow_type):
        return DataType.integer
    if t.is_uint8(arrow_type) or t.is_uint16(arrow_type):
        return DataType.integer
    if t.is_integer(arrow_type):
        return DataType.long
    if t.is_float16(arrow_type) or t.is_float32(arrow_type):
        return DataType.float
    if t.is_floating(arrow_type):
        return DataType.double
    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return DataType.string
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or t.is_fixed_size_binary(arrow_type):
        return DataType.binary
    if t.is_timestamp(arrow_type) or t.is_date(arrow_type):
        return DataType.datetime
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_fixed_size_list(arrow_type):
        return Array(_column_type(arrow_type.value_type))
    if t.is_struct(arrow_type):
        return Object([Property(f.name, _column_type(f.type), required=not f.nullable) for f in arrow_type])
    if t.is_map(arrow_type) and t.is_string(arrow_type.key_type):
        return Map(_column_type(arrow_type.item_type))
    return AnyType()


def log_table(run_id: str, table: TableRef, context: str) -> None:
    """The table version as a dataset of the run; logging it again is a no-op (MLflow keys a run's dataset
    inputs on name and digest)."""
    dataset = LanceTable(table)
    client().log_inputs(
        run_id,
        datasets=[
            DatasetInput(DatasetEntity(**dataset.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        ],
    )


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
        log_input(self.run_id, table, context="training")

    def set_checkpoint(self, path: Path) -> None:
        set_tags(self.run_id, {CHECKPOINT_TAG: str(path)})


# ------------------------------------------------------------------------------ checkpoints as models

MODEL_TYPE = "keyeflow-checkpoint"
# Weights stay where the step wrote them: the checkpoint directory is the model every later step, `serve` and
# `export` load, on the data root's storage already, and a copy in the artifact store would double every
# stage's size (16 GB a stage for keye-8b) for nothing the UI can show. The logged model holds the rest of
# the directory (config, tokenizer and processor files: what a reader inspects) and `checkpoint.json`, the
# directory's path and the name and size of every file in it.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MAX_COPIED_BYTES = 16 * 2**20
CANDIDATE, CHAMPION = "candidate", "champion"
PROMOTION_TAG = "keyeflow.gate.promotion"
MODEL_ID_TAG = "keyeflow.model_id"


def checkpoint_model(run_id: str) -> Any | None:
    """The logged model a step's run produced (`log_checkpoint_model`), or None."""
    c = client()
    models = c.search_logged_models(
        [c.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{_checked_id(run_id)}'"
    )
    return models[0] if models else None


def _checked_id(value: str) -> str:
    """A run id, model name or version as it goes into a filter string: MLflow's ids are hex and keyeflow's
    names letters, digits, '-', '_' and '.'; anything else is refused rather than quoted."""
    if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
        raise ValueError(f"{value!r} cannot name an MLflow run or model")
    return value


def log_checkpoint_model(run_id: str, name: str, checkpoint: str | Path) -> str:
    """Record `checkpoint` (a model directory) as the logged model `name` output by step run `run_id`, with
    the models of the runs it started from (its ``keyeflow.upstream_run_ids``, what `trace` follows) as the
    run's model inputs; returns its model id. Done once per run: a rerun (the step resumed after a kill)
    finds the model and completes it."""
    c = client()
    checkpoint = Path(checkpoint)
    model = checkpoint_model(run_id)
    if model is not None and str(model.status) == "READY":
        return model.model_id
    if model is None:
        model = c.create_logged_model(
            c.get_run(run_id).info.experiment_id,
            name=name,
            source_run_id=run_id,
            tags={CHECKPOINT_TAG: str(checkpoint)},
            model_type=MODEL_TYPE,
        )
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory() as staging:
        for path in files:
            if path.suffix not in WEIGHT_SUFFIXES and path.stat().st_size <= MAX_COPIED_BYTES:
                target = Path(staging) / path.relative_to(checkpoint)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        pointer = {
            "checkpoint": str(checkpoint),
            "files": [
                {"path": str(p.relative_to(checkpoint)), "size_bytes": p.stat().st_size} for p in files
            ],
        }
        (Path(staging) / "checkpoint.json").write_text(json.dumps(pointer, indent=2) + "\n")
        c.log_model_artifacts(model.model_id, staging)
    run = c.get_run(run_id)
    have = {m.model_id for m in run.inputs.model_inputs or []}
    upstream_run_ids = [r for r in run.data.tags.get(UPSTREAM_TAG, "").split(",") if r]
    upstream = [m.model_id for r in upstream_run_ids if (m := checkpoint_model(r)) is not None]
    if missing := [m for m in upstream if m not in have]:
        c.log_inputs(run_id, models=[LoggedModelInput(m) for m in missing])
    if model.model_id not in {m.model_id for m in run.outputs.model_outputs or []}:
        c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    c.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def register_checkpoint(model_name: str, run_id: str) -> str:
    """Register the logged model of step run `run_id` as a version of the registered model `model_name`
    (created if new) and point the ``candidate`` alias at it; returns the version. Once per run: a rerun
    gets the version registered before, and its aliases are left as the gate last set them."""
    c = client()
    model = checkpoint_model(run_id)
    if model is None:  # a step that finished before checkpoints were logged models gets its model now
        run = c.get_run(run_id)
        if CHECKPOINT_TAG not in run.data.tags:
            raise LookupError(f"run {run_id} logged no checkpoint model to register")
        log_checkpoint_model(run_id, run.info.run_name, run.data.tags[CHECKPOINT_TAG])
        model = checkpoint_model(run_id)
    try:
        c.create_registered_model(model_name, description="keyeflow checkpoints of the recipe " + model_name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = c.search_model_versions(
        f"name = '{_checked_id(model_name)}' and run_id = '{_checked_id(run_id)}'"
    )
    if found:
        return str(found[0].version)
    # The source is the model's artifact location, not `models:/<id>`: MLflow's SQL registry resolves that
    # URI through the process's global tracking URI, which keyeflow never sets (it names its store per call).
    # So the link back from the model to its versions is written here, in the tag MLflow's own
    # `register_model` writes and the UI reads.
    version = str(
        c.create_model_version(
            model_name,
            source=model.artifact_location,
            run_id=run_id,
            tags={
                CHECKPOINT_TAG: model.tags.get(CHECKPOINT_TAG, ""),
                MODEL_ID_TAG: model.model_id,
                "keyeflow.step": model.name,
            },
            model_id=model.model_id,
            await_creation_for=0,
        ).version
    )
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    c.set_logged_model_tags(
        model.model_id,
        {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, {"name": model_name, "version": version}])},
    )
    c.set_registered_model_alias(model_name, CANDIDATE, version)
    return version


def record_promotion(model_name: str, version: str | int, passed: bool, verdict: str) -> None:
    """The promotion gate's verdict on a registered version: a tag, the version's description, the same
    tag on its logged model; a version that passed becomes the ``champion`` (and stops being the
    ``candidate``), one that failed stays the ``candidate`` beside the champion it did not replace."""
    c, version = client(), str(version)
    status = "passed" if passed else "failed"
    c.set_model_version_tag(model_name, version, PROMOTION_TAG, status)
    c.update_model_version(model_name, version, description=verdict)
    model_id = c.get_model_version(model_name, version).tags.get(MODEL_ID_TAG)
    if model_id:
        c.set_logged_model_tags(model_id, {PROMOTION_TAG: status})
    if not passed:
        return
    c.set_registered_model_alias(model_name, CHAMPION, version)
    if str(c.get_registered_model(model_name).aliases.get(CANDIDATE)) == version:
        c.delete_registered_model_alias(model_name, CANDIDATE)


def model_version(model_name: str, alias: str) -> Any:
    """The registered version an alias points at."""
    return client().get_model_version_by_alias(model_name, alias)


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
    model_ids = [m.model_id for m in run.outputs.model_outputs or []]
    return {
        "name": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
        "checkpoint": tags.get(CHECKPOINT_TAG), "upstream_run_ids": upstream, "mixture": mixture,
        "promotion": tags.get("keyeflow.gate.promotion"),
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("eval/")},
        "parent_run_id": tags.get(PARENT_TAG),
        "model": _model_summary(model_ids[0]) if model_ids else None,
    }  # fmt: skip


def _model_summary(model_id: str) -> dict[str, Any]:
    """A step's logged model as the UI shows it: its id, its registered versions and their aliases."""
    c = client()
    versions = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    registered = []
    for v in versions:
        aliases = c.get_registered_model(v["name"]).aliases
        named = sorted(a for a, version in aliases.items() if str(version) == str(v["version"]))
        registered.append({"name": v["name"], "version": str(v["version"]), "aliases": named})
    return {"model_id": model_id, "registered": registered}


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
