"""The shipped alignment prompts: deterministic, each mode present, every constraint checkable by the
rules."""

from __future__ import annotations

import json

import pytest

from keyeflow.longcot.rl_items import alignment_prompts, reward_item
from keyeflow.quality.rewards import rule_reward


def test_alignment_prompts_are_deterministic_and_checkable():
    items = alignment_prompts(16)
    assert items == alignment_prompts(16) and len({i["id"] for i in items}) == 16
    assert {i["mode"] for i in items} == {"think", "no_think", "auto_think"}
    assert json.loads(json.dumps(items)) == items  # plain data: goes through Prefect and JSON unchanged
    for item in items:
        reward = rule_reward(reward_item(item), "Something unrelated.")
        assert reward is not None and 0.0 <= reward.value <= 1.0
    with pytest.raises(ValueError, match="num_items"):
        alignment_prompts(0)


def test_a_response_that_meets_the_constraints_scores_full_marks():
    item = next(i for i in alignment_prompts(16) if i["constraints"][0][0] == "json")
    good = '{"summary": "Rivers run to the sea.", "facts": ["they carry water"]}'
    assert rule_reward(reward_item(item), good).value == 1.0
    assert rule_reward(reward_item(item), "not json").value < 0.5
    words = next(i for i in alignment_prompts(16) if i["constraints"][0][0] == "max_words")
    assert rule_reward(reward_item(words), "Trains run on rails.").value == 1.0
    assert rule_reward(reward_item(words), " ".join(["word"] * 60)).value < 1.0
