"""Lineage the way MLflow users look for it, on a real Lance table and a real MLflow store: a table version is
a dataset of the run (Lance URI + version, digest, schema, row count) read from the manifest without loading a
row; a checkpoint is a logged model output by its run, with its upstream checkpoints as model inputs; the
promotion gate moves the `candidate` and `champion` aliases of the registered model and writes its verdict."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import tables


def write_table(name: str, rows: dict) -> tables.TableRef:
    written = tables.write_dataset(pa.table(rows), tables.table_uri(name), mode="overwrite")
    return tables.TableRef(name, written.uri, written.version)


def inputs(run_id: str) -> list[tuple[str, str, dict, dict, dict, str]]:
    """(name, digest, source, profile, schema, context) of each dataset input of a run."""
    run = lineage.client().get_run(run_id)
    return [
        (
            d.dataset.name,
            d.dataset.digest,
            json.loads(d.dataset.source),
            json.loads(d.dataset.profile),
            json.loads(d.dataset.schema),
            {t.key: t.value for t in d.tags}["mlflow.data.context"],
        )
        for d in run.inputs.dataset_inputs
    ]


def test_a_table_version_is_a_dataset_of_the_run_without_reading_a_row(home):
    first = write_table("samples", {"sample_id": ["a", "b", "c"], "media_ids": [["m"], [], ["m", "n"]]})
    second = write_table("samples", {"sample_id": ["a", "b"], "media_ids": [["m"], []]})

    def no_reading(*args, **kwargs):
        raise AssertionError("logging a dataset read the table's rows")

    run_id = lineage.start_run("step")
    with pytest.MonkeyPatch.context() as reading:
        for method in ("to_table", "to_batches", "scanner", "take", "head"):
            reading.setattr(lance.LanceDataset, method, no_reading)
        lineage.log_input(run_id, first, context="training")
        lineage.log_input(run_id, first, context="training")  # logged again: still one dataset
        lineage.log_output(run_id, second)

    logged = inputs(run_id)
    assert [(name, context) for name, _, _, _, _, context in logged] == [
        ("samples", "training"),
        ("samples", "output"),
    ]
    (_, digest1, source1, profile1, schema1, _), (_, digest2, source2, profile2, _, _) = logged
    assert source1 == {"uri": first.uri, "version": first.version}
    assert source2 == {"uri": second.uri, "version": second.version} and second.version > first.version
    assert profile1["num_rows"] == 3 and profile2["num_rows"] == 2
    assert schema1["mlflow_colspec"] == [
        {"type": "string", "name": "sample_id", "required": False},
        {"type": "array", "items": {"type": "string"}, "name": "media_ids", "required": False},
    ]
    assert digest1 != digest2 and len(digest1) == 8
    assert lineage.LanceTable(first).digest == digest1  # the same version digests the same
    assert (
        lineage.client().get_run(run_id).data.tags["keyeflow.input.samples"]
        == f"{first.uri}@v{first.version}"
    )
    assert lineage.LanceSource.from_dict(source1).load().count_rows() == 3  # the source opens that version


def checkpoint(root: Path, name: str) -> Path:
    model = root / name / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"name": name}))
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    return model


def test_checkpoints_are_logged_models_chained_and_the_gate_moves_the_aliases(home, tmp_path):
    c = lineage.client()
    runs, models = {}, {}
    for name, upstream in (("stage-1", []), ("stage-2", ["stage-1"]), ("stage-3", ["stage-2"])):
        tags = {lineage.UPSTREAM_TAG: ",".join(runs[u] for u in upstream)}
        runs[name] = lineage.start_run(name, tags=tags)
        models[name] = lineage.log_checkpoint_model(runs[name], name, checkpoint(tmp_path, name))
        # A step resumed after a kill logs its model again: the same one, nothing added to the run.
        assert lineage.log_checkpoint_model(runs[name], name, tmp_path / name / "model") == models[name]

    run2 = c.get_run(runs["stage-2"])
    assert [m.model_id for m in run2.outputs.model_outputs] == [models["stage-2"]]
    assert [m.model_id for m in run2.inputs.model_inputs] == [models["stage-1"]]
    model = c.get_logged_model(models["stage-2"])
    assert str(model.status) == "READY" and model.source_run_id == runs["stage-2"]
    assert model.tags[lineage.CHECKPOINT_TAG] == str(tmp_path / "stage-2" / "model")
    stored = Path(model.artifact_location.removeprefix("file://"))
    assert sorted(p.name for p in stored.iterdir()) == [
        "checkpoint.json",
        "config.json",
    ]  # weights not copied
    pointer = json.loads((stored / "checkpoint.json").read_text())
    assert pointer["checkpoint"] == str(tmp_path / "stage-2" / "model")
    assert {"path": "model.safetensors", "size_bytes": 4096} in pointer["files"]

    # stage-1 passes and becomes the champion; stage-2 fails and stays the candidate; stage-3 passes.
    for name, passed in (("stage-1", True), ("stage-2", False), ("stage-3", True)):
        version = lineage.register_checkpoint("recipe-x", runs[name])
        assert lineage.register_checkpoint("recipe-x", runs[name]) == version  # once per run
        assert str(lineage.model_version("recipe-x", "candidate").version) == version
        lineage.record_promotion("recipe-x", version, passed, f"{name}: {'passed' if passed else 'FAILED'}")
        if name == "stage-2":
            assert lineage.model_version("recipe-x", "candidate").run_id == runs["stage-2"]
            assert lineage.model_version("recipe-x", "champion").run_id == runs["stage-1"]
    registered = c.get_registered_model("recipe-x")
    assert set(registered.aliases) == {"champion"}  # stage-3 took `candidate` from stage-2, then passed
    champion = lineage.model_version("recipe-x", "champion")
    assert champion.run_id == runs["stage-3"] and champion.description == "stage-3: passed"
    assert champion.tags[lineage.CHECKPOINT_TAG] == str(tmp_path / "stage-3" / "model")
    verdicts = {v.run_id: v.tags[lineage.PROMOTION_TAG] for v in c.search_model_versions("name = 'recipe-x'")}
    assert verdicts == {runs["stage-1"]: "passed", runs["stage-2"]: "failed", runs["stage-3"]: "passed"}
    assert c.get_logged_model(models["stage-2"]).tags[lineage.PROMOTION_TAG] == "failed"
    assert json.loads(c.get_logged_model(models["stage-3"]).tags["mlflow.modelVersions"]) == [
        {"name": "recipe-x", "version": str(champion.version)}
    ]

    # `keyeflow lineage` walks the chain the UI shows: the same runs, their models, versions and aliases.
    chain = lineage.trace(runs["stage-3"])
    assert [(step["name"], step["model"]["model_id"]) for step in chain["steps"]] == [
        (name, models[name]) for name in ("stage-3", "stage-2", "stage-1")
    ]
    assert chain["steps"][0]["model"]["registered"] == [
        {"name": "recipe-x", "version": str(champion.version), "aliases": ["champion"]}
    ]
    text = CliRunner().invoke(app, ["lineage", runs["stage-3"]])
    assert text.exit_code == 0, text.output
    assert f"logged model {models['stage-3']} = recipe-x v{champion.version} (champion)" in text.output


def test_the_experiment_opens_on_its_runs(home):
    lineage.start_run("anything")
    experiment = lineage.client().get_experiment_by_name(lineage.get_settings().experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_without_a_model_cannot_be_registered(home):
    with pytest.raises(LookupError, match="logged no checkpoint model"):
        lineage.register_checkpoint("recipe-x", lineage.start_run("no-model"))
