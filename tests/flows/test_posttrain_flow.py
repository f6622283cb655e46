"""The `posttrain` flow with the tiny recipe (every stage for a few steps, one GSPO round) on the sample
data under Prefect's harness: conversations and media through the data flow, the LongCoT table through the
LongCoT flow (the teacher is the synthetic teacher, a real process), then every post-training stage from a
random tiny start checkpoint. Checked: each stage is an MLflow run in the final checkpoint's lineage, expert
merging is exactly the configured task arithmetic, the SFT difficulty filter, pair sources and hint records
are where a person looks for them, and a rerun with nothing changed trains nothing. The held-out learning
signals and the RL gate are tested in tests/unit/test_heldout.py and tests/flows/test_posttrain_tasks.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import sql
from keyeflow.synthetic import synthetic_teacher as teacher_server
from keyeflow.training.posttrain_recipe import posttrain_recipe

STAGES = [
    "posttrain-0-start",
    "posttrain-1-sft",
    "posttrain-1-sft-anneal",
    "posttrain-2-reward-model",
    "posttrain-3-mpo",
    "posttrain-4-longcot-sft",
    "posttrain-4-expert-math",
    "posttrain-4-expert-merge",
    "posttrain-5-gspo-round-1",
    "posttrain-6-alignment-rl",
]


@pytest.fixture(scope="module")
def data_home(tmp_path_factory, sample_corpus, media_dir, prefect_harness):
    """train_samples from the sample corpus and the LongCoT tables from the synthetic teacher."""
    from keyeflow.flows.data import build_train_samples
    from keyeflow.flows.longcot import longcot
    from keyeflow.model.config import tiny
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.synthetic.longcot_questions import generate_longcot_questions

    root = tmp_path_factory.mktemp("posttrain")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        build_train_samples([str(sample_corpus["conversations"].parent)], str(media_dir))
        questions = generate_longcot_questions(media_dir / "longcot-posttrain", media_dir / "images")
        settings = teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS)
        with teacher_server.start_server(settings, root / "teacher") as (url, _):
            longcot(
                [str(questions["dir"])],
                str(media_dir),
                review="auto_approve",
                generation={"backend": "openai", "base_url": url, "model": teacher_server.MODEL, "n": 4},
            )
        torch.manual_seed(0)
        KeyeForConditionalGeneration(tiny()).save_pretrained(root / "start")
        yield home, root / "start"


@pytest.mark.slow
def test_posttrain_flow_runs_every_stage_into_the_lineage(data_home, monkeypatch):
    from keyeflow.flows.posttrain import posttrain

    home, start = data_home
    monkeypatch.setenv("KEYEFLOW_HOME", str(home))
    result = posttrain(str(start))
    stages = result["stages"]
    assert all(s["trained"] for s in stages.values())

    # ---- Every stage is an MLflow run in the chain of the final checkpoint.
    out = CliRunner().invoke(app, ["lineage", result["checkpoint"], "--json"])
    assert out.exit_code == 0, out.output
    chain = json.loads(out.output)
    assert chain["steps"][0]["name"] == "posttrain-6-alignment-rl"
    assert sorted({s["name"] for s in chain["steps"]}) == sorted(STAGES)
    assert all(s["status"] == "FINISHED" for s in chain["steps"])
    client = lineage.client()
    for step in chain["steps"]:
        assert client.get_run(step["run_id"]).data.tags["mlflow.parentRunId"]  # nested under the flow's run
    # ---- The same chain as MLflow models: a logged model per step, the final one the recipe's champion.
    assert all(step["model"] and step["model"]["model_id"].startswith("m-") for step in chain["steps"])
    name = posttrain_recipe("tiny").name
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == result["final_run_id"]
    assert champion.tags[lineage.CHECKPOINT_TAG] == result["checkpoint"]
    assert chain["steps"][0]["model"]["registered"][0]["aliases"] == ["champion"]
    # ---- Every step that read tables has them as MLflow datasets: the SFT-style stages their mixtures, MPO
    # the LongCoT paths and questions its pairs came from, the GSPO rounds the questions their items came
    # from (and the hint levels they wrote). Read no table: the start, the expert merge (two checkpoints)
    # and alignment RL (its prompts are generated).
    datasets = {}
    for step in chain["steps"]:
        run = client.get_run(step["run_id"])
        datasets[step["name"]] = {
            (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in run.inputs.dataset_inputs
        }
        assert all(d.dataset.source_type == "lance" for d in run.inputs.dataset_inputs), step["name"]
    read = {name for name, found in datasets.items() if any(c != "output" for _, c in found)}
    no_tables = {"posttrain-0-start", "posttrain-4-expert-merge", "posttrain-6-alignment-rl"}
    assert set(datasets) - read == no_tables
    assert {("longcot_paths", "training"), ("longcot_questions", "training")} <= datasets["posttrain-3-mpo"]
    rounds = [name for name in datasets if name.startswith("posttrain-5-gspo-round-")]
    assert rounds and all(("longcot_questions", "training") in datasets[n] for n in rounds)
    assert any(("rl_hint_levels", "output") in datasets[n] for n in rounds)
    # the SFT, LongCoT and reward-model stages trained on mixtures whose sources lineage reaches
    assert {m["stage"] for m in chain["mixtures"]} == {5}
    assert chain["sources"]["num_texts"] > 0

    # ---- Expert merging: cold start + w·(expert − cold start), exactly (float64, cast back).
    recipe = posttrain_recipe("tiny")
    merged_run = client.get_run(stages["expert_merge"]["run_id"])
    inputs = json.loads(merged_run.data.params["inputs"])
    base = load_file(str(Path(merged_run.data.params["base"]) / "model.safetensors"))
    expert = load_file(str(Path(inputs[0]) / "model.safetensors"))
    merged = load_file(str(Path(stages["expert_merge"]["checkpoint"]) / "model.safetensors"))
    w = recipe.expert_weight
    for key, value in merged.items():
        expected = (base[key].double() + w * (expert[key].double() - base[key].double())).to(value.dtype)
        assert torch.equal(value, expected), key

    # ---- What a person looks at: filter report, pair sources, hints per GSPO step, metrics.
    flow_run = client.get_run(result["run_id"])
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"sft_difficulty_filter.json", "preference_pairs.json"} <= artifacts
    assert flow_run.data.metrics["sft_candidates"] >= flow_run.data.metrics["sft_kept"] > 0
    pairs = json.loads(Path(client.download_artifacts(result["run_id"], "preference_pairs.json")).read_text())
    assert pairs["teacher"] > 0  # kept LongCoT paths over wrong ones of the same question
    gspo = client.get_run(stages["gspo_round_1"]["run_id"])
    assert "reward_mean" in gspo.data.metrics
    assert {a.path for a in client.list_artifacts(gspo.info.run_id)} >= {"hints"}
    assert {f"num_hint_level_{k}" for k in range(6)} <= set(gspo.data.metrics)
    # The hint level every GSPO step trained each item on, as `keyeflow sql` reads it.
    levels = sql.query(
        "select stage, run_id, count(*) as n from rl_hint_levels group by stage, run_id order by stage"
    )
    assert "posttrain-5-gspo-round-1" in set(levels.stage)
    assert gspo.info.run_id in set(levels.run_id) and all(levels.n > 0)
    mpo = client.get_run(stages["mpo"]["run_id"])
    assert {"loss", "dpo", "bco", "sft"} <= set(mpo.data.metrics)

    # ---- Nothing changed: nothing trains again.
    again = posttrain(str(start))
    assert [k for k, s in again["stages"].items() if s["trained"]] == []
    assert again["checkpoint"] == result["checkpoint"]
