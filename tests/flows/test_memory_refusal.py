"""A recipe that cannot train here is refused before anything trains: the pretrain flow's first step is the
memory plan, and `keyeflow plan` says the same from the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.training.memory_plan import InfeasibleRecipe

runner = CliRunner()


def test_pretrain_flow_refuses_keye_8b_before_stage_1(home, prefect_harness):
    from keyeflow.flows.pretrain import pretrain

    # In one process (the recipe has no launcher) stage 3's sequence-parallel group of 4 cannot form, and on
    # a CPU host stages 1-2 also outgrow its memory.
    with pytest.raises(InfeasibleRecipe, match="pretrain-3-annealing") as error:
        pretrain(recipe="keye-8b")
    assert "1 GPU(s) do not divide into sequence-parallel groups of 4" in str(error.value)
    assert not (home / "checkpoints").exists() or not any((home / "checkpoints").iterdir())
    runs = lineage.runs_with_tag("mlflow.runName", "pretrain")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    (home / "dl").mkdir()
    saved = lineage.client().download_artifacts(runs[0].info.run_id, "memory_plan.json", str(home / "dl"))
    plans = json.loads(Path(saved).read_text())
    assert [p["stage"] for p in plans] == [
        "pretrain-1-alignment",
        "pretrain-2-multitask",
        "pretrain-3-annealing",
    ]
    assert not plans[2]["fits"] and plans[2]["components_gib"]["parameters"] > 0


def test_plan_command_exit_codes_and_reasons():
    tiny = ["--recipe", "tiny", "--gpus-per-node", "1", "--gpu-memory-gib", "8", "--flow", "all"]
    fits = runner.invoke(app, ["plan", *tiny])
    assert fits.exit_code == 0, fits.output
    assert "every stage of tiny fits" in fits.output and "posttrain-gspo" in fits.output

    # issue 15's cluster: every pre-training stage of the 8B recipe fits, stage 3 at 131,072 tokens included
    cluster = ["--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gib", "80"]
    full = runner.invoke(app, ["plan", "--recipe", "keye-8b", *cluster])
    assert full.exit_code == 0, full.output
    assert "every stage of keye-8b fits" in full.output
    # its post-training is launched on the cluster too, GSPO's rollouts on a separate 1-node pool: it fits
    post = runner.invoke(app, ["plan", "--recipe", "keye-8b", "--flow", "posttrain", *cluster])
    assert post.exit_code == 0 and "every stage of keye-8b fits" in post.output, post.output
    assert "rollouts: separate rollout pool of 1 node(s)" in post.output
    # on one node of 8 it does not: the stages that cannot run are named, and each rollout placement refused
    one_node = runner.invoke(
        app, ["plan", "--recipe", "keye-8b", "--flow", "posttrain", *cluster[2:], "--nodes", "1"]
    )
    assert one_node.exit_code == 1
    assert "posttrain-1-sft does not fit" in one_node.output
    assert "refused: colocated in-process fp32 sampler" in one_node.output

    small = runner.invoke(
        app, ["plan", "--recipe", "keye-8b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "16"]
    )
    assert small.exit_code == 1
    assert "pretrain-1-alignment does not fit" in small.output and "largest: parameters" in small.output

    as_json = runner.invoke(app, ["plan", "--recipe", "keye-8b", *cluster, "--json"])
    plans = json.loads(as_json.stdout)
    assert [(p["stage"], p["tokens_per_gpu"], p["fits"]) for p in plans][2] == (
        "pretrain-3-annealing",
        32_768,
        True,
    )
    first = plans[0]
    assert first["stage"] == "pretrain-1-alignment" and first["fits"]
    assert first["total_gib"] == pytest.approx(sum(first["components_gib"].values()), abs=0.1)

    unknown = runner.invoke(app, ["plan", "--recipe", "keye-70b"])
    assert unknown.exit_code == 2 and "no such pretrain recipe" in unknown.output
