"""Progressive hint sampling against a deterministic policy: a plain function that solves an item only when
its prompt carries a hint of at least the item's level."""

from __future__ import annotations

import itertools
import re

import pytest

from keyeflow.quality.rewards import Reward, math_answer_reward
from keyeflow.training.hints import (
    HINT_LEVELS,
    HintConfig,
    HintRecord,
    hint_writer_prompt,
    hinted_prompt,
    item_hints,
    progressive_hint_sampling,
    unsolved_share_by_level,
)

NEVER = 99  # an item no hint level can make the policy solve

# item id → the weakest hint level that makes the policy solve it (0: solvable without a hint)
NEEDS = {"q0": 0, "q1": 1, "q2": 2, "q3": 3, "q4": 4, "q5": 5, "q-never": NEVER, "q0b": 0, "q3b": 3}
ANSWERS = {item_id: str(10 + k) for k, item_id in enumerate(NEEDS)}


def hint_text(item_id: str, level: int) -> str:
    return f"[{item_id} L{level}] look at it this way"


def make_items(with_hints: bool = True) -> list[dict]:
    return [
        {
            "id": item_id,
            "prompt": f"Question {item_id}: what is the value? /think",
            "reference": ANSWERS[item_id],
            **({"hints": {k: hint_text(item_id, k) for k in HINT_LEVELS}} if with_hints else {}),
        }
        for item_id in NEEDS
    ]


class Policy:
    """Deterministic fake policy. At the item's own level it gets one rollout in `n` right (so a level
    succeeds with pass rate 1/n); above it, every rollout; below it, none. Logs every call."""

    def __init__(self, needs: dict[str, int] = NEEDS, answers: dict[str, str] = ANSWERS):
        self.needs, self.answers = needs, answers
        self.calls: list[tuple[str, int, int]] = []  # (item id, hint level seen, n)

    def __call__(self, prompt, n):
        text = prompt if isinstance(prompt, str) else " ".join(p.get("text", "") for p in prompt)
        item_id = re.search(r"Question (\S+):", text).group(1)
        hint = re.search(r"Hint: \[(\S+) L(\d)\]", text)
        level = 0 if hint is None else int(hint.group(2))
        assert hint is None or hint.group(1) == item_id, "a hint of another item leaked into the prompt"
        self.calls.append((item_id, level, n))
        right = f"<think>worked it out</think><answer>{self.answers[item_id]}</answer>"
        wrong = "<think>guessing</think><answer>-1</answer>"
        need = self.needs[item_id]
        if level < need:
            return [wrong] * n
        if level == need and level > 0:
            return [right] + [wrong] * (n - 1)
        return [right] * n


def reward(item, response):
    return math_answer_reward(response, item["reference"])  # a Reward: its value is used


def test_recorded_levels_are_exactly_the_minimal_ones():
    policy = Policy()
    records = progressive_hint_sampling(make_items(), policy, reward, HintConfig(rollouts_per_level=4))
    assert [r.item_id for r in records] == list(NEEDS)
    by_id = {r.item_id: r for r in records}
    for item_id, need in NEEDS.items():
        expected = None if need == NEVER else need
        assert by_id[item_id].level == expected, item_id


def test_pass_rates_cover_exactly_the_levels_tried():
    records = {r.item_id: r for r in progressive_hint_sampling(make_items(), Policy(), reward)}
    assert records["q0"].pass_rates == {0: 1.0}
    assert records["q3"].pass_rates == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.25}
    assert records["q5"].pass_rates == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.25}
    assert records["q-never"].pass_rates == {k: 0.0 for k in range(6)}


def test_training_prompt_carries_the_minimal_hint():
    items = make_items()
    records = {r.item_id: r for r in progressive_hint_sampling(items, Policy(), reward)}
    prompts = {item["id"]: item["prompt"] for item in items}

    assert records["q0"].training_prompt == prompts["q0"] and records["q0"].hint is None
    for item_id in ("q1", "q2", "q3", "q4", "q5", "q3b"):
        r = records[item_id]
        assert r.hint == hint_text(item_id, r.level)
        assert r.training_prompt == hinted_prompt(prompts[item_id], r.hint, r.level)
        assert r.training_prompt == prompts[item_id].removesuffix(" /think") + f"\n\nHint: {r.hint} /think"
        others = [k for k in HINT_LEVELS if k != r.level]
        assert not any(hint_text(item_id, k) in r.training_prompt for k in others)
    never = records["q-never"]
    assert never.level is None and never.training_prompt is None and never.hint is None
    assert never.responses == () and never.rewards == ()


def test_record_keeps_the_rollouts_and_rewards_of_the_chosen_level():
    r = {r.item_id: r for r in progressive_hint_sampling(make_items(), Policy(), reward)}["q2"]
    assert len(r.responses) == 4 and r.rewards == (1.0, 0.0, 0.0, 0.0)
    assert f"<answer>{ANSWERS['q2']}</answer>" in r.responses[0]


def test_rollouts_go_level_by_level_and_stop_at_the_first_success():
    policy = Policy()
    progressive_hint_sampling(make_items(), policy, reward, HintConfig(rollouts_per_level=3))
    assert all(n == 3 for _, _, n in policy.calls)
    levels = [level for _, level, _ in policy.calls]
    assert levels == sorted(levels)  # all of level 0, then the L1 retries, …
    per_item = {item_id: [lvl for i, lvl, _ in policy.calls if i == item_id] for item_id in NEEDS}
    for item_id, need in NEEDS.items():
        assert per_item[item_id] == list(range(min(need, 5) + 1)), item_id


def test_max_level_caps_the_hints_tried():
    policy = Policy()
    records = {
        r.item_id: r for r in progressive_hint_sampling(make_items(), policy, reward, HintConfig(max_level=3))
    }
    assert records["q3"].level == 3 and records["q4"].level is None and records["q5"].level is None
    assert set(records["q4"].pass_rates) == {0, 1, 2, 3}
    assert max(level for _, level, _ in policy.calls) == 3


def test_success_threshold_decides_what_counts_as_solved():
    items = [{"id": "a", "prompt": "Question a: box it /think", "hints": {k: f"h{k}" for k in HINT_LEVELS}}]

    def echo(prompt, n):
        return ["hinted" if "Hint:" in prompt else "plain"] * n

    def partial(item, response):  # a continuous reward: 0.4 without a hint, 0.6 with any hint
        return 0.6 if response == "hinted" else 0.4

    assert progressive_hint_sampling(items, echo, partial, HintConfig(success_threshold=0.5))[0].level == 1
    assert progressive_hint_sampling(items, echo, partial, HintConfig(success_threshold=0.3))[0].level == 0
    assert progressive_hint_sampling(items, echo, partial, HintConfig(success_threshold=0.7))[0].level is None


def test_hint_writer_fills_only_the_levels_reached():
    written = []

    def writer(item, level):
        written.append((item["id"], level))
        return hint_text(item["id"], level)

    items = make_items(with_hints=False)
    items[2]["hints"] = {"L1": hint_text("q2", 1)}  # a given hint is used, never rewritten
    records = {r.item_id: r for r in progressive_hint_sampling(items, Policy(), reward, hint_writer=writer)}
    assert ("q0", 1) not in written and ("q0b", 1) not in written  # solved unhinted: no hint written
    assert [lvl for i, lvl in written if i == "q2"] == [2]
    assert [lvl for i, lvl in written if i == "q3"] == [1, 2, 3]
    assert [lvl for i, lvl in written if i == "q-never"] == [1, 2, 3, 4, 5]
    assert records["q3"].level == 3 and records["q3"].hints == {k: hint_text("q3", k) for k in (1, 2, 3)}
    assert records["q0"].hints == {}
    assert records["q2"].hints == {1: hint_text("q2", 1), 2: hint_text("q2", 2)}


def test_missing_hints_without_writer_fail_before_any_rollout():
    policy = Policy()
    items = make_items()
    del items[4]["hints"][5]
    with pytest.raises(ValueError, match=r"'q4' has no hint for levels \[5\]"):
        progressive_hint_sampling(items, policy, reward)
    assert policy.calls == []
    # hints above max_level are not needed
    assert progressive_hint_sampling(items, policy, reward, HintConfig(max_level=4))[4].level == 4


def test_bad_writer_output_and_bad_policy_output_are_errors():
    items = make_items(with_hints=False)[1:2]
    with pytest.raises(ValueError, match="hint_writer returned no L1 hint"):
        progressive_hint_sampling(items, Policy(), reward, hint_writer=lambda item, level: "  ")
    with pytest.raises(ValueError, match="must return 4 strings"):
        progressive_hint_sampling(make_items()[:1], lambda prompt, n: ["x"] * (n - 1), reward)
    with pytest.raises(ValueError, match="reward_fn returned"):
        progressive_hint_sampling(make_items()[:1], Policy(), lambda item, response: "good")
    with pytest.raises(ValueError, match=r"not a number in \[0, 1\]"):
        progressive_hint_sampling(make_items()[:1], Policy(), lambda item, response: 10.0)


def test_items_are_validated():
    with pytest.raises(ValueError, match="unique"):
        progressive_hint_sampling(make_items()[:1] * 2, Policy(), reward)
    with pytest.raises(ValueError, match="'id'"):
        progressive_hint_sampling([{"prompt": "x"}], Policy(), reward)
    with pytest.raises(ValueError, match="'prompt'"):
        progressive_hint_sampling([{"id": "a", "prompt": ""}], Policy(), reward)


def test_multimodal_prompt_gets_the_hint_in_its_last_text_part():
    prompt = [
        {"type": "image", "image": "/data/cat.png"},
        {"type": "text", "text": "Question m: how many? /no_think"},
    ]
    items = [
        {"id": "m", "prompt": prompt, "reference": "3", "hints": {k: hint_text("m", k) for k in HINT_LEVELS}}
    ]
    record = progressive_hint_sampling(items, Policy({"m": 2}, {"m": "3"}), reward)[0]
    assert record.level == 2
    assert record.training_prompt == [
        {"type": "image", "image": "/data/cat.png"},
        {"type": "text", "text": f"Question m: how many?\n\nHint: {hint_text('m', 2)} /no_think"},
    ]
    assert prompt[1]["text"] == "Question m: how many? /no_think"  # the item itself is not modified


def test_hinted_prompt_placement_and_template():
    assert hinted_prompt("Solve x.", "use algebra", 2) == "Solve x.\n\nHint: use algebra"
    assert hinted_prompt("Solve x. /no_think", "use algebra", 2) == "Solve x.\n\nHint: use algebra /no_think"
    assert (
        hinted_prompt("Solve x./think", "h", 1, " (L{level} hint: {hint})") == "Solve x. (L1 hint: h)/think"
    )
    assert hinted_prompt([{"type": "image", "image": "a.png"}], "h", 1) == [
        {"type": "image", "image": "a.png"},
        {"type": "text", "text": "Hint: h"},
    ]


def test_item_hints_accept_json_style_keys():
    assert item_hints({"id": "a", "hints": {"L1": "x", "2": "y", 3: "z"}}) == {1: "x", 2: "y", 3: "z"}
    assert item_hints({"id": "a"}) == {}
    for bad in ({"L6": "x"}, {0: "x"}, {"one": "x"}, {True: "x"}, {1: ""}, {"1": "x", "L1": "y"}):
        with pytest.raises(ValueError):
            item_hints({"id": "a", "hints": bad})
    with pytest.raises(TypeError):
        item_hints({"id": "a", "hints": ["x"]})


def test_unsolved_share_by_level():
    records = [HintRecord(str(i), level, {}, None, None) for i, level in enumerate([0, 0, 1, 3, None])]
    assert unsolved_share_by_level(records) == {0: 0.6, 1: 0.4, 2: 0.4, 3: 0.2, 4: 0.2, 5: 0.2}
    assert unsolved_share_by_level(records, max_level=2) == {0: 0.6, 1: 0.4, 2: 0.4}
    assert unsolved_share_by_level([]) == {}


def test_unsolved_share_of_a_sampling_run():
    records = progressive_hint_sampling(make_items(), Policy(), reward)
    shares = unsolved_share_by_level(records)
    n = len(NEEDS)
    assert shares == {0: 7 / n, 1: 6 / n, 2: 5 / n, 3: 3 / n, 4: 2 / n, 5: 1 / n}


def test_hint_writer_prompt_names_the_level():
    text = hint_writer_prompt("What is 2 + 2?", 3, reference="4")
    assert "level-3 hint" in text and HINT_LEVELS[3] in text and "What is 2 + 2?" in text and "4" in text
    assert "unless the level is a complete solution" in hint_writer_prompt("q", 5)
    with pytest.raises(ValueError):
        hint_writer_prompt("q", 6)


def test_levels_follow_the_spec_order():
    assert list(HINT_LEVELS) == [1, 2, 3, 4, 5]
    for level, word in zip(
        HINT_LEVELS, ("concept", "strategy", "formula", "first concrete step", "complete")
    ):
        assert word in HINT_LEVELS[level]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rollouts_per_level": 0}, ">= 1"),
        ({"rollouts_per_level": 2.0}, "integer"),
        ({"max_level": 0}, ">= 1"),
        ({"max_level": 6}, "<= 5"),
        ({"success_threshold": 0.0}, r"\(0, 1\]"),
        ({"success_threshold": 1.5}, r"\(0, 1\]"),
        ({"success_threshold": float("nan")}, "number"),
        ({"hint_template": "Hint:"}, "{hint}"),
        ({"hint_template": "{hint} {other}"}, "only"),
    ],
)
def test_hint_config_is_validated_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=rf"HintConfig\.\w+=.*{match}"):
        HintConfig(**kwargs)


def test_reward_objects_and_floats_both_work_as_reward_fn_output():
    items = make_items()[:2]

    def as_float(item, response):
        return math_answer_reward(response, item["reference"]).value

    def as_reward(item, response):
        return Reward(as_float(item, response), "same value, as a Reward")

    a = progressive_hint_sampling(items, Policy(), as_float)
    b = progressive_hint_sampling(items, Policy(), as_reward)
    assert a == b and [r.level for r in a] == [0, 1]


def test_a_batched_policy_gets_each_level_in_one_call_and_the_same_records():
    one_by_one = progressive_hint_sampling(make_items(), Policy(), reward)
    policy = Policy()
    batches: list[list[str]] = []  # the item ids of each call

    def rollout_batch(items, prompts, n):
        batches.append([item["id"] for item in items])
        return [policy(prompt, n) for prompt in prompts]

    batched = progressive_hint_sampling(make_items(), None, reward, rollout_batch_fn=rollout_batch)
    assert batched == one_by_one
    # One call per level, each with exactly the items still unsolved, in item order.
    assert batches[0] == [item["id"] for item in make_items()]
    for before, after in itertools.pairwise(batches):
        assert after and set(after) < set(before) and after == [i for i in before if i in after]
    assert [(i, level) for i, level, _ in policy.calls] == [
        (i, level) for level, ids in enumerate(batches) for i in ids
    ]
    with pytest.raises(ValueError, match="exactly one"):
        progressive_hint_sampling(make_items(), Policy(), reward, rollout_batch_fn=rollout_batch)
