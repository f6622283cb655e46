"""A GSPO round of the posttrain tasks launched as a distributed job (`keyeflow.steps.posttrain_job`): 2 gloo
ranks under torchrun, the policy sharded by FSDP2, the reward rebuilt by name in every rank, against the
same round in the flow's process (unsharded): same rewards and losses step by step, the same parameters,
the round's metrics on its MLflow run, its hint records in `rl_hint_levels` and its checkpoint as in
process; the MPO stage launched the same way trains the in-process stage's losses and parameters. A
sharded round without a launch is refused before it trains."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from prefect import flow
from weights_match import assert_same_updates

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.longcot.generate import ensure_tiny_model
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.steps.stages import StageOutput
from keyeflow.tasks import posttrain as t
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.losses import GSPOConfig
from keyeflow.training.posttrain_recipe import posttrain_recipe

TESTS = Path(__file__).resolve().parents[1]
# tests/posttrain_job.py's reward, imported by every rank: it varies between a random policy's completions.
REWARD = {"name": "function", "function": "posttrain_job:letter_share"}
ITEMS = [
    {"id": f"q{k}", "messages": [{"role": "user", "content": f"Name a colour, number {k}."}]}
    for k in range(2)
]
LR = 1e-3


def config(fsdp: bool) -> GSPOStageConfig:
    return GSPOStageConfig(
        prompts_per_step=2, group_size=2, max_new_tokens=6, learning_rate=LR, max_steps=2,
        checkpoint_every=2, hints=None, seed=3, gspo=GSPOConfig(epsilon_low=0.2, epsilon_high=0.2), fsdp=fsdp,
    )  # fmt: skip


@pytest.mark.slow  # two ranks under torchrun beside an in-process round (~40 s)
def start_policy(tmp_path) -> StageOutput:
    """The tiny policy as a step with a real MLflow run and its checkpoint logged as a model, as
    `start_from` leaves it: the rounds log it as their model input and register their checkpoints."""
    checkpoint = str(ensure_tiny_model(tmp_path / "tiny"))
    run_id = lineage.start_run("policy")
    lineage.log_checkpoint_model(run_id, "policy", checkpoint)
    return StageOutput("policy", checkpoint, run_id, "init-key", False)


def test_a_gspo_round_launched_on_two_sharded_ranks_trains_as_in_process(home, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    init = start_policy(tmp_path)
    name = "posttrain-5-gspo-round-1"

    @flow
    def rounds() -> tuple[StageOutput, StageOutput]:
        launched = t.gspo(
            config(True), name, init, ITEMS, None,
            launch=LaunchConfig(launcher="torchrun", nproc_per_node=2), reward=REWARD,
        )  # fmt: skip
        in_process = t.gspo(config(False), name, init, ITEMS, None, reward=REWARD)
        return launched, in_process

    launched, in_process = rounds()
    assert launched.trained and in_process.trained and launched.key != in_process.key
    out = {s: Path(s.checkpoint).parents[1] for s in (launched, in_process)}
    assert (out[launched] / "launch-spec.json").is_file()  # it ran as a job …
    assert not (out[in_process] / "launch-spec.json").exists()  # … the other in process

    # The same rollouts and rewards, the same updates, step by step.
    def history(stage: StageOutput) -> list[dict]:
        return [json.loads(line) for line in (out[stage] / "metrics.jsonl").read_text().splitlines()]

    one, two = history(in_process), history(launched)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert [b[k] for k in ("reward_mean", "num_active_responses")] == [
            a[k] for k in ("reward_mean", "num_active_responses")
        ]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    assert all(m["num_active_responses"] > 0 for m in two)  # the groups carried signal: it trained

    # The round's record, as in process: metrics on its MLflow run, hint rows, the checkpoint's state.
    for stage in (launched, in_process):
        assert [step for step, _ in lineage.metric_history(stage.run_id, "reward_mean")] == [1, 2]
        rows = tables.open_table("rl_hint_levels").to_table(columns=["run_id", "step"]).to_pylist()
        assert sorted(r["step"] for r in rows if r["run_id"] == stage.run_id) == [1, 1, 2, 2]
        state = json.loads((Path(stage.checkpoint).parent / "state.json").read_text())
        assert state["step"] == 2 and state["kind"] == "gspo"

    want = load_keye_checkpoint(in_process.checkpoint).state_dict()
    got = load_keye_checkpoint(launched.checkpoint).state_dict()
    start = load_keye_checkpoint(init.checkpoint).state_dict()
    assert got.keys() == want.keys()
    # The policy moved: text prompts train every tensor of the language model, none of the ViT's.
    moved = [k for k in got if not torch.equal(got[k], start[k])]
    assert moved == [k for k in got if not k.startswith(("vision.", "projector."))]
    assert_same_updates(got, want, lr=LR, atol=LR / 100, rtol=1e-5)


@pytest.mark.slow  # two ranks under torchrun beside an in-process stage (~40 s)
def test_mpo_launched_on_two_sharded_ranks_trains_as_in_process(home, tmp_path):
    init = start_policy(tmp_path)
    pairs = [
        {"pair_id": f"p{k}", "messages": [{"role": "user", "content": f"What is {k}+{k}?"}],
         "chosen": f"It is {2 * k}.", "rejected": f"Maybe {2 * k + 1}?"}
        for k in range(4)
    ]  # fmt: skip
    mpo = MPOStageConfig(learning_rate=LR, max_steps=2, pairs_per_step=2, max_length=128, checkpoint_every=2)
    base = posttrain_recipe("tiny")
    launched_recipe = dataclasses.replace(
        base,
        mpo=dataclasses.replace(mpo, fsdp=True),
        launch=LaunchConfig(launcher="torchrun", nproc_per_node=2),
    )

    @flow
    def stages() -> tuple[StageOutput, StageOutput]:
        launched = t.mpo(launched_recipe, init, pairs, "parent-run")
        return launched, t.mpo(dataclasses.replace(base, mpo=mpo), init, pairs, "parent-run")

    launched, in_process = stages()
    out = {s: Path(s.checkpoint).parents[1] for s in (launched, in_process)}
    assert (out[launched] / "launch-spec.json").is_file() and not (
        out[in_process] / "launch-spec.json"
    ).exists()
    one, two = (
        json.loads((Path(s.checkpoint).parent / "state.json").read_text()) for s in (in_process, launched)
    )
    assert one["step"] == two["step"] == 2
    assert [m["loss"] for m in history_of(launched)] == pytest.approx(
        [m["loss"] for m in history_of(in_process)], rel=1e-4
    )
    want = load_keye_checkpoint(in_process.checkpoint).state_dict()
    got = load_keye_checkpoint(launched.checkpoint).state_dict()
    start = load_keye_checkpoint(init.checkpoint).state_dict()
    assert any(not torch.equal(got[k], start[k]) for k in got)
    assert_same_updates(got, want, lr=LR, atol=LR / 100, rtol=1e-5)


def history_of(stage: StageOutput) -> list[dict]:
    return [
        json.loads(line)
        for line in (Path(stage.checkpoint).parents[1] / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_sharded_round_without_a_launch_is_refused(home, tmp_path):
    init = start_policy(tmp_path)

    @flow
    def sharded_in_process() -> StageOutput:
        return t.gspo(config(True), "posttrain-5-gspo-round-1", init, ITEMS, None, reward=REWARD)

    with pytest.raises(ValueError, match=r"GSPO with fsdp=True is trained by launched ranks .* never in"):
        sharded_in_process()
