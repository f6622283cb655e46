"""`keyeflow run` end to end from an empty home (data flows → pretrain → LongCoT with the synthetic teacher →
posttrain from pre-training's checkpoint with the `tiny-learn` recipe, named explicitly), asserting what
post-training learned on the held-out task items no stage trained on, not only that stages finished (issue
16's must-show):

- SFT: the held-out reference-response loss fell;
- MPO's held-out preference accuracy after training and the reward model's held-out accuracy (both A/B orders
  asked, a pair decided only when both are usable) are above 0.5, and the reward model gave a usable verdict
  on every held-out pair;
- GSPO: the held-out pass rate after the last round is above the rate before RL by more than the paired 95%
  interval's half-width; every logged RL step had rewards that differ (standard deviation > 0); at least one
  item was solved only with a hint; the pass-rate filter kept items with real pass rates strictly between 0
  and 1; rejection sampling replaced at least one cold-start response;
- the RL promotion gate: a round that ruins the policy (a learning rate of 1) is refused and the flow stops
  before alignment RL.

With that recipe the whole run took 5 min 2 s to 5 min 31 s on an idle 2-core machine (2026-12-08, session
8). Its signals sit close to their bounds and no run has shown them all at once (README, "What is not
exercised here"): of 10 runs in sessions 7 and 8, two stopped in rejection sampling on the reward model's
malformed judgements (it trains on 32 teacher pairs since, not 4), GSPO's gain went beyond its interval in 4
of the 8 that finished, and the reward model beat 0.5 beyond its interval in 1 (weighed verdicts), hence the
strict xfail below. So it runs only when asked, about 6 minutes: `KEYEFLOW_LEARNING_TEST=1 pytest
tests/flows/test_keyeflow_run.py`."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import sql
from keyeflow.training.posttrain_recipe import posttrain_recipe

# The recipe sized for every learning signal to show (`keyeflow run` defaults to `tiny`, minutes).
RUN_POSTTRAIN_RECIPE = "tiny-learn"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KEYEFLOW_LEARNING_TEST") != "1",
        reason="about 6 min on 2 cores and not yet reliable: set KEYEFLOW_LEARNING_TEST=1 to run the "
        "learning demo end to end",
    ),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness):
    home = tmp_path_factory.mktemp("demo") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        result = CliRunner().invoke(app, ["run", "--posttrain-recipe", RUN_POSTTRAIN_RECIPE])
        assert result.exit_code == 0, result.output
        (post,) = lineage.runs_with_tag("keyeflow.kind", "posttrain", "attributes.status = 'FINISHED'")
        yield home, " ".join(result.output.split()), post


def _children(parent_run_id: str) -> dict[str, list]:
    runs = lineage.client().search_runs(
        [lineage.client().get_run(parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags["mlflow.runName"], []).append(run)
    return out


def test_sft_and_mpo_learned_on_held_out_items(demo):
    _, output, post = demo
    assert post.data.params["recipe_hash"] == posttrain_recipe(RUN_POSTTRAIN_RECIPE).config_hash()
    m = post.data.metrics
    assert m["sft_heldout_loss_after"] < m["sft_heldout_loss_before"] / 2
    assert m["heldout_pairs"] >= 40
    assert m["reward_model_heldout_failed"] == 0
    assert m["mpo_heldout_preference_accuracy_after"] > 0.5
    assert "what post-training learned" in output
    assert "MPO: held-out preference accuracy" in output and "reward model: held-out accuracy" in output


def test_gspo_raised_the_held_out_pass_rate_beyond_its_interval(demo):
    _, output, post = demo
    m = post.data.metrics
    assert m["heldout_pass_rate_gain"] > m["heldout_pass_rate_gain_half_width"] > 0
    history = lineage.metric_history(post.info.run_id, "heldout_pass_rate")
    rounds = posttrain_recipe(RUN_POSTTRAIN_RECIPE).rounds
    assert history[0][0] == 0 and len(history) == rounds + 1  # before RL, then after every round
    assert history[-1][1] > history[0][1]
    assert "more than the interval's half-width" in output
    # What a person looks at: the chart of the pass rate over RL steps on the flow's run.
    assert "heldout_pass_rate.png" in {a.path for a in lineage.client().list_artifacts(post.info.run_id)}


def test_every_rl_step_had_signal_hints_solved_items_and_rejection_replaced_some(demo):
    _, output, post = demo
    recipe = posttrain_recipe(RUN_POSTTRAIN_RECIPE)
    children = _children(post.info.run_id)
    for n in range(1, recipe.rounds + 1):
        (run,) = children[f"posttrain-5-gspo-round-{n}"]
        stds = lineage.metric_history(run.info.run_id, "reward_std")
        assert len(stds) == recipe.gspo.max_steps and all(v > 0 for _, v in stds), stds
    hinted = sql.query("select count(*) as n from rl_hint_levels where level >= 1 and stage like '%gspo%'")
    assert int(hinted.n[0]) >= 1
    solved = [int(n) for n in re.findall(r"\((\d+) solved only with a hint\)", output)]
    assert len(solved) == recipe.rounds and sum(solved) >= 1
    kept = re.search(r"pass-rate filter kept (\d+) items", output)
    assert kept and int(kept.group(1)) >= recipe.gspo.prompts_per_step


def test_rejection_sampling_replaced_cold_start_responses(demo):
    _, output, post = demo
    recipe = posttrain_recipe(RUN_POSTTRAIN_RECIPE)
    replaced = [int(n) for n in re.findall(r"rejection sampling replaced (\d+) cold-start", output)]
    assert len(replaced) == recipe.rounds - 1 and sum(replaced) >= 1
    assert sum(v for k, v in post.data.metrics.items() if k.startswith("rejection_round_")) >= 1


@pytest.mark.xfail(
    strict=True,
    reason="issue 16 open: the tiny reward model does not tell a pair's two A/B orders apart on the flow's "
    "judge prompts (greedy: one verdict for both, 0.49-0.50; weighed by its probability: 0.454-0.639 over "
    "eight runs, above 0.5 beyond the interval in one); strict: this fails loudly once the judge learns",
)
def test_the_reward_model_beats_chance_on_held_out_pairs(demo):
    _, _, post = demo
    assert post.data.metrics["reward_model_heldout_accuracy"] > 0.5


def test_a_round_that_ruins_the_policy_is_refused_and_the_flow_stops(demo, monkeypatch):
    from keyeflow.flows.posttrain import posttrain
    from keyeflow.tasks.common import PromotionBlocked
    from keyeflow.training import posttrain_recipe as recipes

    home, _, _ = demo
    monkeypatch.setenv("KEYEFLOW_HOME", str(home))

    def ruinous():  # the run's recipe with a GSPO learning rate that wrecks the weights in its first steps
        learn = recipes.posttrain_recipe(RUN_POSTTRAIN_RECIPE)
        # Same name, so every stage before GSPO is the run's own, reused: only the GSPO round trains.
        return dataclasses.replace(learn, gspo=dataclasses.replace(learn.gspo, learning_rate=1.0))

    monkeypatch.setitem(recipes.RECIPES, "ruinous-rl", ruinous)
    heldout = str(Path(home) / "samples" / "tasks" / "heldout")
    with pytest.raises(PromotionBlocked, match="held-out pass rate fell by"):
        posttrain("latest-pretrain", "ruinous-rl", heldout=[heldout], source_root=str(Path(home) / "samples"))
    runs = lineage.runs_with_tag("keyeflow.kind", "posttrain")
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1
    children = _children(failed[0].info.run_id)
    assert "posttrain-5-gspo-round-1" in children
    assert "posttrain-6-alignment-rl" not in children and "posttrain-5-gspo-round-2" not in children
    assert heldout in failed[0].data.params["heldout"]
