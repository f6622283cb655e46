"""Post-training tasks that decide whether a run goes on, under Prefect's harness with a real tiny model: the
pass-rate filter stops a GSPO round that would have nothing to learn from (it used to fall back to every item
with a warning), and the RL gate stops the flow at a significant regression of the held-out pass rate."""

from __future__ import annotations

import pytest
from prefect import flow

from keyeflow import lineage
from keyeflow.longcot.generate import ensure_tiny_model
from keyeflow.steps.stages import StageOutput
from keyeflow.tasks import posttrain as t
from keyeflow.tasks.common import PromotionBlocked
from keyeflow.training.heldout import PassRates, estimate
from keyeflow.training.posttrain_recipe import posttrain_recipe


def test_the_pass_rate_filter_stops_a_round_with_nothing_to_learn_from(home, tmp_path, prefect_harness):
    policy = StageOutput("policy", str(ensure_tiny_model(tmp_path / "tiny")), "run", "key", False)
    # A random tiny model never writes these answers: every item's pass rate is 0.
    items = [
        {"id": f"q{k}", "messages": [{"role": "user", "content": f"Say the code word {k}. /no_think"}],
         "reference": f"zebra-{k}-quartz", "task": "math", "mode": "no_think", "constraints": []}
        for k in range(3)
    ]  # fmt: skip
    config = posttrain_recipe("tiny").gspo

    @flow
    def round_two():
        return t.pass_rate_filter(policy, items, config, 2)

    with pytest.raises(
        ValueError, match=r"0 of 3 items have a pass rate strictly between 0 and 1, fewer than"
    ):
        round_two()


def test_the_rl_gate_stops_at_a_significant_regression_and_passes_a_gain(home, tmp_path, prefect_harness):
    recipe = posttrain_recipe("tiny")
    ids = [f"i{k}" for k in range(recipe.heldout.min_items)]
    before = {i: 0.5 for i in ids}
    worse = {i: 0.25 for i in ids}
    better = {i: 0.75 for i in ids}

    def candidate_step(name: str, attempt: int) -> StageOutput:
        """A GSPO round's run with its checkpoint logged as a model, as `cached_step` leaves it."""
        run_id = lineage.start_run(name)
        checkpoint = tmp_path / f"{name}-{attempt}" / "model"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
        lineage.log_checkpoint_model(run_id, name, checkpoint)
        return StageOutput(name, str(checkpoint), run_id, "key", True)

    candidate = candidate_step("posttrain-5-gspo-round-1", 1)

    def rates(values: dict) -> dict:
        return PassRates(values, estimate(list(values.values()))).to_dict()

    @flow
    def gate(after: dict):
        return t.rl_gate(rates(before), after, recipe, candidate)

    assert "0.500 → 0.750" in gate(rates(better))["reason"]
    champion = lineage.model_version(recipe.name, "champion")  # the gate's verdict, in the Model Registry
    assert champion.run_id == candidate.run_id and champion.tags[lineage.PROMOTION_TAG] == "passed"
    candidate = candidate_step("posttrain-5-gspo-round-1", 2)  # the round trained again, to a regression
    with pytest.raises(PromotionBlocked, match="posttrain-5-gspo-round-1 .* is not promoted: held-out pass"):
        gate(rates(worse))
    refused = lineage.model_version(recipe.name, "candidate")
    assert refused.run_id == candidate.run_id and refused.tags[lineage.PROMOTION_TAG] == "failed"
    assert "RL promotion gate FAILED" in refused.description
    assert lineage.model_version(recipe.name, "champion").run_id == champion.run_id  # not replaced
