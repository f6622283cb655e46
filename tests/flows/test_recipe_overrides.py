"""`keyeflow pretrain --recipe my_recipe.yaml --set …` trains with the file's and the overrides' values; the
resolved recipe is on the flow's MLflow run and in every step's cache key: the same command again trains
nothing, a changed override re-runs exactly the steps it changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.training.recipe_source import load_pretrain_recipe

# Two steps a stage (the tiny recipe's four halved), margins that let any tiny stage through: this test is
# about where the settings come from, tests/flows/test_pretrain_flow.py about the gates.
RECIPE_FILE = """\
base: tiny
name: tiny-short
stage1: {max_steps: 2, checkpoint_every: 2}
stage2: {max_steps: 2, checkpoint_every: 2, learning_rate: 1e-3}
stage3: {max_steps: 2, checkpoint_every: 2}
evaluation: {loss_margin: 10.0, accuracy_margin: 1.0}
"""
STAGE2_LR = 3e-4  # from --set, over the file's 1e-3


@pytest.fixture(scope="module")
def data_home(tmp_path_factory, sample_corpus, media_dir):
    from keyeflow.flows.data import build_train_samples

    home = tmp_path_factory.mktemp("recipes") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        build_train_samples([str(sample_corpus["conversations"].parent)], str(media_dir))
        yield home


def _pretrain(recipe: Path, *overrides: str) -> None:
    args = ["pretrain", "--recipe", str(recipe)]
    for item in overrides:
        args += ["--set", item]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output


def _stage_dirs(home: Path) -> set[tuple[str, Path]]:
    """(step name, its directory) of every step run so far."""
    return {
        (json.loads((d / "run.json").read_text())["name"], d)
        for d in (home / "checkpoints").iterdir()
        if (d / "run.json").is_file()
    }


def _metrics(step_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (step_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_recipe_file_and_set_train_with_the_overrides_and_key_the_cache(data_home, tmp_path, monkeypatch):
    monkeypatch.setenv("KEYEFLOW_HOME", str(data_home))
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(RECIPE_FILE)
    resolved = load_pretrain_recipe(str(recipe), [f"stage2.learning_rate={STAGE2_LR}"])
    assert resolved.stages[2].learning_rate == STAGE2_LR

    _pretrain(recipe, f"stage2.learning_rate={STAGE2_LR}")
    first = dict(_stage_dirs(data_home))
    assert len(first) == len(_stage_dirs(data_home))  # one directory per step
    assert set(first) >= {
        "pretrain-1-alignment",
        "pretrain-2-multitask",
        "pretrain-3-annealing-balanced",
        "pretrain-3-annealing-video-rich",
        "pretrain-4-fusion",
    }
    # ---- Stage 2 trained with the override: the optimizer's learning rate at every step, its run's params.
    steps = _metrics(first["pretrain-2-multitask"])
    assert len(steps) == 2  # the file's max_steps
    assert [s["lr"] for s in steps] == pytest.approx([resolved.stages[2].lr_at(i) for i in range(2)])
    assert steps[0]["lr"] == pytest.approx(STAGE2_LR)  # warm-up 1: the first step is at the peak
    client = lineage.client()
    stage2_run = json.loads((first["pretrain-2-multitask"] / "run.json").read_text())["run_id"]
    assert json.loads(client.get_run(stage2_run).data.params["stage"])["learning_rate"] == STAGE2_LR
    stage1 = _metrics(first["pretrain-1-alignment"])
    assert stage1[0]["lr"] == pytest.approx(resolved.stages[1].learning_rate)  # the file's, not changed

    # ---- The flow's MLflow run holds the resolved recipe, where it came from and the overrides.
    flow_run = client.get_run(client.get_run(stage2_run).data.tags["mlflow.parentRunId"])
    params = flow_run.data.params
    assert params["recipe_source"] == str(recipe)
    assert json.loads(params["recipe_overrides"]) == [f"stage2.learning_rate={STAGE2_LR}"]
    assert params["recipe_hash"] == resolved.config_hash()
    logged = client.download_artifacts(flow_run.info.run_id, "recipe.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["stages"]["2"]["learning_rate"] == STAGE2_LR

    # ---- The same command again: every step's key is the same, nothing trains.
    done = {name: (d / "done.json").stat().st_mtime_ns for name, d in first.items()}
    _pretrain(recipe, f"stage2.learning_rate={STAGE2_LR}")
    assert dict(_stage_dirs(data_home)) == first
    assert {name: (d / "done.json").stat().st_mtime_ns for name, d in first.items()} == done

    # ---- A changed override re-runs the step it changes and nothing upstream: a fusion weight.
    _pretrain(recipe, f"stage2.learning_rate={STAGE2_LR}", "variants.video-rich.weight=3")
    new = {name for name, d in _stage_dirs(data_home) if d not in first.values()}
    assert new == {"pretrain-4-fusion"}
    assert {name: (d / "done.json").stat().st_mtime_ns for name, d in first.items()} == done
