"""What a launched MPO/GSPO job is rebuilt from (`keyeflow.steps.posttrain_job`): stage configs from their
dicts, rewards from their names, and keye-8b's GSPO layout as the planner chose it, with the rollout server's
URL a setting the user must make (refused, naming the variable, while unset)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from keyeflow.steps import posttrain_job
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig, RolloutServerConfig
from keyeflow.training.posttrain_recipe import RECIPES, ROLLOUT_URL_ENV, posttrain_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_stage_configs_come_back_from_their_dicts(name):
    recipe = posttrain_recipe(name)
    for gspo in (recipe.gspo, recipe.alignment):
        again = GSPOStageConfig.from_dict(json.loads(json.dumps(gspo.to_dict())))
        assert again == gspo and again.config_hash() == gspo.config_hash()
    assert MPOStageConfig.from_dict(json.loads(json.dumps(recipe.mpo.to_dict()))) == recipe.mpo
    with pytest.raises(ValueError, match=r"unknown GSPOStageConfig field\(s\) \['typo'\]"):
        GSPOStageConfig.from_dict({**recipe.gspo.to_dict(), "typo": 1})


def test_a_rollout_url_from_the_environment_is_refused_while_unset(monkeypatch):
    server = RolloutServerConfig(url_env="MY_ROLLOUT_URL")
    monkeypatch.delenv("MY_ROLLOUT_URL", raising=False)
    with pytest.raises(ValueError, match="set MY_ROLLOUT_URL to the rollout server's API root.*it is unset"):
        server.resolved_url()
    monkeypatch.setenv("MY_ROLLOUT_URL", "localhost:8000")
    with pytest.raises(ValueError, match="it is 'localhost:8000'"):
        server.resolved_url()
    monkeypatch.setenv("MY_ROLLOUT_URL", "http://rollout-node:8000/v1")
    assert server.resolved_url() == "http://rollout-node:8000/v1"
    with pytest.raises(ValueError, match="url_env"):
        RolloutServerConfig(url="http://a/v1", url_env="MY_ROLLOUT_URL")
    # A config that names its URL keeps the dict (and hash) it had before url_env existed.
    named = GSPOStageConfig(rollout_server=RolloutServerConfig(url="http://a/v1"), hints=None)
    assert "url_env" not in named.to_dict()["rollout_server"]


def test_rewards_are_rebuilt_by_name():
    assert posttrain_job.reward_from_spec({"name": "verifiable"}) is posttrain_job.verifiable_reward
    function = posttrain_job.reward_from_spec({"name": "function", "function": "json:dumps"})
    assert function is json.dumps
    with pytest.raises(ValueError, match="'module:attribute'"):
        posttrain_job.reward_from_spec({"name": "function", "function": "json.dumps"})
    with pytest.raises(ValueError, match="no GSPO reward named 'mystery'"):
        posttrain_job.reward_from_spec({"name": "mystery"})
    recipe = posttrain_recipe("keye-8b")
    spec = posttrain_job.alignment_reward_spec(
        recipe.alignment_rewards, recipe.reward_model, judge="/j", reward_model="/rm", baseline={"q": "a"}
    )
    again = json.loads(json.dumps(spec))  # what a rank reads from the job's spec file
    assert again["name"] == "alignment" and again["baseline"] == {"q": "a"}
    assert type(recipe.alignment_rewards)(**again["settings"]) == recipe.alignment_rewards
    assert type(recipe.reward_model)(**again["reward_model_config"]) == recipe.reward_model


def test_keye_8b_gspo_stages_take_the_planners_layout_and_a_recipe_that_does_not_is_refused():
    from keyeflow.training.memory_plan import Cluster, plan_posttrain
    from keyeflow.training.recipes import pretrain_recipe

    recipe = posttrain_recipe("keye-8b")
    for gspo in (recipe.gspo, recipe.alignment):
        assert gspo.fsdp and gspo.rollout_server.url_env == ROLLOUT_URL_ENV == "KEYEFLOW_ROLLOUT_URL"
        assert gspo.rollout_server.url is None and gspo.rollout_server.sync_dtype == "bf16"
    assert (recipe.gspo_launch.num_nodes, recipe.launch.num_nodes) == (3, 4)  # the 4th node samples
    model, cluster = pretrain_recipe("keye-8b").model_config(), Cluster(4, 8, 80)
    assert all(p.fits for p in plan_posttrain(recipe, model, cluster))

    on_all_nodes = plan_posttrain(dataclasses.replace(recipe, rl_launch=None), model, cluster)
    problems = [pr for p in on_all_nodes if p.stage == "posttrain-gspo" for pr in p.problems]
    assert problems == [
        (
            "the chosen layout trains the policy on 3 node(s) beside a rollout pool of 1; the recipe "
            "launches GSPO on 4 (set rl_launch)"
        )
    ]
    own_server = dataclasses.replace(recipe, gspo=dataclasses.replace(recipe.gspo, rollout_server=None))
    problems = [
        pr
        for p in plan_posttrain(own_server, model, cluster)
        if p.stage == "posttrain-gspo"
        for pr in p.problems
    ]
    assert len(problems) == 1 and "must name that server (url or url_env)" in problems[0]
