"""The one module that talks to MLflow.

Every flow run (and later every training stage) is an MLflow run. Inputs and outputs are recorded as
tags ``keyeflow.input.<table>`` / ``keyeflow.output.<table>`` holding ``uri@vN`` (MLflow has no resolver
for Lance sources, and a tag is what the UI can search: ``tags."keyeflow.output.videos" LIKE '%@v3'``),
and a parent link as ``keyeflow.parent_run_id`` plus MLflow's own ``mlflow.parentRunId`` so the UI nests
the runs. All calls take an explicit run id: Prefect runs tasks on worker threads, where MLflow's
"active run" of the flow's thread is not visible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from keyeflow.config import get_settings
from keyeflow.datasets.tables import TableRef

INPUT_TAG = "keyeflow.input."
OUTPUT_TAG = "keyeflow.output."
PARENT_TAG = "keyeflow.parent_run_id"


def client() -> MlflowClient:
    settings = get_settings()
    settings.root.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=settings.mlflow_uri)


def experiment_id(name: str | None = None) -> str:
    settings = get_settings()
    name = name or settings.experiment
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # Artifacts under the data root, not ./mlruns of whatever directory the user ran from.
        return c.create_experiment(name, artifact_location=Path(settings.artifacts_uri).as_uri())
    except mlflow.exceptions.MlflowException:
        return c.get_experiment_by_name(name).experiment_id  # created concurrently


def start_run(name: str, params: dict[str, Any] | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
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
