"""The `pretrain` flow with the tiny recipe on the sample data, the way a person would meet it: the real CLI
is SIGKILLed while stage 3 trains, the flow is rerun and finishes from the last completed stage, and a third
run with nothing changed trains nothing. Checked on the result: every stage an MLflow run nested under the
flow's run and chained to its inputs; stage 1 left ViT and LLM bit-identical; stage 3's config has rope theta
8e6 and the longer context; the fused weights are exactly the configured weighted average; `keyeflow lineage`
on the fused checkpoint reaches every source clip behind it, with gate verdicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lance
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.steps.stages import DONE
from keyeflow.training.engine import LATEST
from keyeflow.training.recipes import pretrain_recipe

KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")
RECIPE = pretrain_recipe("tiny")


@pytest.fixture(scope="module")
def data_home(tmp_path_factory, sample_corpus, media_dir, prefect_harness):
    """train_samples (with their media and gates) from the sample corpus, through the data flow."""
    from keyeflow.flows.data import build_train_samples

    home = tmp_path_factory.mktemp("pretrain") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        build_train_samples([str(sample_corpus["conversations"].parent)], str(media_dir))
        yield home


def weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def stage_dir(home: Path, name: str) -> Path | None:
    found = sorted((home / "checkpoints").glob(f"{name}-*"))
    return found[0] if found else None


def kill_during_stage_3(home: Path, tmp_path: Path) -> None:
    """Run `keyeflow pretrain`, which SIGKILLs itself at the kill point after stage 3's third step (stages 1
    and 2 train first in the same process: the arrival counts their steps too)."""
    arrival = RECIPE.stages[1].max_steps + RECIPE.stages[2].max_steps + 3
    env = {
        **os.environ,
        "KEYEFLOW_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "KEYEFLOW_KILL_POINT": f"stage.step@{arrival}",
    }
    done = subprocess.run(
        [KEYEFLOW, "pretrain"],
        check=False,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == -signal.SIGKILL and "keyeflow kill point stage.step" in stderr, stderr[-3000:]
    metrics = stage_dir(home, "pretrain-3-annealing-balanced") / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 3


@pytest.mark.slow
def test_pretrain_killed_then_rerun_then_unchanged(data_home, tmp_path, monkeypatch):
    from keyeflow.flows.pretrain import pretrain

    monkeypatch.setenv("KEYEFLOW_HOME", str(data_home))
    kill_during_stage_3(data_home, tmp_path)

    # ---- The kill: stages 1 and 2 finished; stage 3 has no done.json and only whole checkpoints registered.
    for name in ("pretrain-1-alignment", "pretrain-2-multitask"):
        assert (stage_dir(data_home, name) / DONE).is_file()
    killed = stage_dir(data_home, "pretrain-3-annealing-balanced")
    assert not (killed / DONE).exists()
    if (killed / LATEST).exists():  # checkpoint_every=2: the step-2 checkpoint may have been registered
        registered = killed / (killed / LATEST).read_text().strip()
        assert (registered / "model" / "model.safetensors").is_file() and (
            registered / "state.json"
        ).is_file()
    assert stage_dir(data_home, "pretrain-4-fusion") is None
    stage1_metrics = (stage_dir(data_home, "pretrain-1-alignment") / "metrics.jsonl").read_text()

    # ---- Rerun: continues from the last completed stage.
    result = pretrain("tiny")
    stages = result["stages"]
    assert [s["trained"] for s in stages.values()] == [False, False, False, True, True, True]
    assert (stage_dir(data_home, "pretrain-1-alignment") / "metrics.jsonl").read_text() == stage1_metrics
    resumed = json.loads((killed / DONE).read_text())
    assert resumed["run_id"] == json.loads((killed / "run.json").read_text())["run_id"]  # the same MLflow run
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == RECIPE.annealing.max_steps

    # ---- MLflow: one run per stage, nested under the flow's run, chained to the runs it started from.
    client = lineage.client()
    chain = {
        "pretrain-1-alignment": ["init"],
        "pretrain-2-multitask": ["pretrain-1-alignment"],
        "pretrain-3-annealing-balanced": ["pretrain-2-multitask"],
        "pretrain-3-annealing-video-rich": ["pretrain-2-multitask"],
        "pretrain-4-fusion": ["pretrain-3-annealing-balanced", "pretrain-3-annealing-video-rich"],
    }
    for name, upstream in chain.items():
        run = client.get_run(stages[name]["run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert run.data.tags["mlflow.parentRunId"]  # nested under a pretrain flow run
        assert run.data.tags[lineage.UPSTREAM_TAG].split(",") == [stages[u]["run_id"] for u in upstream]
        assert run.data.tags[lineage.CHECKPOINT_TAG] == stages[name]["checkpoint"]
        assert run.data.tags["keyeflow.gate.promotion"] == "passed"
        assert "eval/mcq_accuracy" in run.data.metrics
    assert client.get_run(result["run_id"]).data.tags[lineage.CHECKPOINT_TAG] == result["checkpoint"]
    registry = mlflow_entities(client, result)

    # ---- Stage 1 trained the projector only.
    init, stage1 = (
        weights(stages["init"]["checkpoint"]),
        weights(stages["pretrain-1-alignment"]["checkpoint"]),
    )
    assert init.keys() == stage1.keys()
    moved = {k for k in init if not torch.equal(init[k], stage1[k])}
    assert moved and all(k.startswith("projector.") for k in moved)

    # ---- Stage 3: rope theta reset to 8e6 and the longer context, in the saved config.
    for variant in ("balanced", "video-rich"):
        config = json.loads(
            (Path(stages[f"pretrain-3-annealing-{variant}"]["checkpoint"]) / "config.json").read_text()
        )["text_config"]
        assert config["rope_parameters"]["rope_theta"] == 8e6
        assert config["max_position_embeddings"] == RECIPE.annealing.max_length > RECIPE.stages[2].max_length
    stage2_config = json.loads(
        (Path(stages["pretrain-2-multitask"]["checkpoint"]) / "config.json").read_text()
    )
    assert stage2_config["text_config"]["rope_parameters"]["rope_theta"] == 1e6

    # ---- Stage 4: exactly the configured weighted average (float64 sum, cast back).
    w = RECIPE.fusion().weights
    a = weights(stages["pretrain-3-annealing-balanced"]["checkpoint"])
    b = weights(stages["pretrain-3-annealing-video-rich"]["checkpoint"])
    fused = weights(stages["pretrain-4-fusion"]["checkpoint"])
    assert w == (0.5, 0.5)
    for key, value in fused.items():
        expected = (w[0] * a[key].double() + w[1] * b[key].double()).to(value.dtype)
        assert torch.equal(value, expected), key
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the variants really differ

    # ---- Lineage of the fused checkpoint reaches every source clip of every mixture that fed it.
    out = CliRunner().invoke(app, ["lineage", result["checkpoint"], "--json"])
    assert out.exit_code == 0, out.output
    traced = json.loads(out.output)
    assert [s["name"] for s in traced["steps"]][:1] == ["pretrain-4-fusion"]
    assert {s["name"] for s in traced["steps"]} == set(stages) - {"init"} | {"pretrain-0-init"}
    assert {m["mixture_id"] for m in traced["mixtures"]} == set(result["mixtures"].values())
    assert traced["sources"]["videos"] == sorted(source_videos(data_home, set(result["mixtures"].values())))
    assert traced["sources"]["num_videos"] > 0 and traced["sources"]["num_images"] > 0
    for mixture in traced["mixtures"]:
        gates = {g["gate"]: g["passed"] for g in mixture["gates"]}
        assert gates.get("mixture") is True and gates.get("train_samples") is True
        if mixture["num_videos"]:
            assert gates.get("video_samples") is True
    text = CliRunner().invoke(
        app, ["lineage", result["run_id"]]
    )  # the flow's run id resolves to the same chain
    assert text.exit_code == 0 and "pretrain-1-alignment" in text.output and "all sources" in text.output

    # ---- A third run with nothing changed trains nothing and writes no checkpoint.
    before = sorted(p.name for p in (data_home / "checkpoints").rglob("*"))
    again = pretrain("tiny")
    assert not any(s["trained"] for s in again["stages"].values())
    assert again["checkpoint"] == result["checkpoint"]
    assert sorted(p.name for p in (data_home / "checkpoints").rglob("*")) == before
    assert mlflow_entities(client, again) == registry  # no second model, version or alias move


def mlflow_entities(client, result: dict) -> dict:
    """What the MLflow UI shows of the flow, read through the client: every step run has its tables as
    datasets (Lance URI + version, schema, row count) and one logged model, its checkpoint, whose model
    inputs are its upstream steps' models; the recipe's registered model has a version per step, each with
    the gate's verdict, and `champion` on the fused checkpoint. Returns the model ids and versions."""
    stages = result["stages"]
    experiment = client.get_run(result["run_id"]).info.experiment_id
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    models = {}
    for name, stage in stages.items():
        run = client.get_run(stage["run_id"])
        found = client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert len(found) == 1 and found[0].tags[lineage.CHECKPOINT_TAG] == stage["checkpoint"], name
        assert [m.model_id for m in run.outputs.model_outputs] == [found[0].model_id]
        models[name] = found[0].model_id
        datasets = {}
        for d in run.inputs.dataset_inputs:
            context = {t.key: t.value for t in d.tags}["mlflow.data.context"]
            datasets[(d.dataset.name, context)] = d.dataset
            source = json.loads(d.dataset.source)
            table = lance.dataset(source["uri"], version=source["version"])
            assert d.dataset.source_type == "lance"
            assert json.loads(d.dataset.profile)["num_rows"] == table.count_rows()
            columns = [c["name"] for c in json.loads(d.dataset.schema)["mlflow_colspec"]]
            assert columns == table.schema.names
        assert ("train_samples", "evaluation") in datasets, name
        if name not in ("init", "pretrain-4-fusion"):  # trained on a mixture
            assert ("mixtures", "training") in datasets, name
            assert "loss" in run.data.metrics  # one metric name in every stage: charts side by side
    for name, stage in stages.items():
        upstream = client.get_run(stage["run_id"]).data.tags[lineage.UPSTREAM_TAG].split(",")
        by_run = {s["run_id"]: models[n] for n, s in stages.items()}
        inputs = client.get_run(stage["run_id"]).inputs.model_inputs
        assert sorted(m.model_id for m in inputs) == sorted(by_run[r] for r in upstream if r)
    versions = client.search_model_versions(f"name = '{RECIPE.name}'")
    assert sorted(v.run_id for v in versions) == sorted(s["run_id"] for s in stages.values())
    assert all(
        v.tags[lineage.PROMOTION_TAG] == "passed" and "promotion gate passed" in v.description
        for v in versions
    )
    champion = client.get_model_version_by_alias(RECIPE.name, "champion")
    assert champion.run_id == result["final_run_id"]
    assert champion.tags[lineage.CHECKPOINT_TAG] == result["checkpoint"]
    assert set(client.get_registered_model(RECIPE.name).aliases) == {"champion"}
    return {
        "models": models,
        "versions": sorted(str(v.version) for v in versions),
        "champion": champion.version,
    }


def source_videos(home: Path, mixture_ids: set[str]) -> set[str]:
    """The video files behind the mixtures, read row by row in Python (not through the lineage SQL)."""
    tables = home / "tables"
    rows = lance.dataset(str(tables / "mixtures.lance")).to_table().to_pylist()
    used = {r["sample_id"] for r in rows if r["mixture_id"] in mixture_ids}
    media = {
        m
        for r in lance.dataset(str(tables / "train_samples.lance")).to_table().to_pylist()
        if r["sample_id"] in used
        for m in r["media_ids"]
    }
    return {
        r["uri"]
        for r in lance.dataset(str(tables / "video_samples.lance"))
        .to_table(columns=["sample_id", "uri"])
        .to_pylist()
        if r["sample_id"] in media
    }


def test_unknown_target_is_a_clear_error(home):
    out = CliRunner().invoke(app, ["lineage", "no-such-run-or-path"])
    assert out.exit_code == 2
    assert "neither an existing checkpoint path nor an MLflow run id" in out.output
