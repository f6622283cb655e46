"""RL rewards on literal responses with known rewards: verifiable answers, formats, structure, constraints,
the rule reward of an item and the weighted combination."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keyeflow.quality.rewards import (
    Constraint,
    Reward,
    RewardCombiner,
    RewardConfig,
    RewardItem,
    answer_reward,
    bullet_points,
    check_constraint,
    choice_reward,
    count_reward,
    count_sentences,
    count_words,
    final_answer,
    format_problem,
    grounding_reward,
    json_reward,
    markdown_reward,
    math_answer_reward,
    mode_format_reward,
    prompt_mode,
    python_code_reward,
    response_body,
    rule_reward,
)


def think(answer: str, reasoning: str = "Work it out.") -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


# ------------------------------------------------------------------------------------------ Reward


def test_reward_is_a_value_in_unit_range_with_a_reason():
    r = Reward(1, "ok")
    assert r.value == 1.0 and isinstance(r.value, float) and float(r) == 1.0 and r.components == {}
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Reward(bad, "x")
    with pytest.raises(TypeError):
        Reward(True, "a bool is not a reward")
    with pytest.raises(TypeError):
        Reward("1", "a string is not a reward")


# ------------------------------------------------------------------------------- verifiable rewards


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        (think("½"), "0.5"),
        (think("0.5"), "1/2"),
        (think("1/2"), "½"),
        (think("\\frac{1}{2}"), "0.5"),
        ("So the answer is \\boxed{1/2}.", "0.5"),  # a boxed answer with no tags
        (think("1 km"), "1000 m"),
        (think("1000 m"), "1 km"),
        (think("x^2 + 2x + 1"), "(x+1)^2"),
    ],
)
def test_math_answer_equivalences_earn_the_reward(response, reference):
    r = math_answer_reward(response, reference)
    assert r.value == 1.0, r.reason


@pytest.mark.parametrize(
    ("response", "reference", "why"),
    [
        (think("0.4"), "1/2", "numbers differ"),
        (think("1 kg"), "1000 m", "dimension"),
        (think("1 m"), "1 km", ""),
        (think(""), "1/2", "empty prediction"),
    ],
)
def test_wrong_math_answers_earn_nothing_and_say_why(response, reference, why):
    r = math_answer_reward(response, reference)
    assert r.value == 0.0
    assert why in r.reason


def test_the_answer_block_wins_over_reasoning_that_mentions_other_numbers():
    assert math_answer_reward(think("7", "the answer is 5? no: 3 + 4 = 7"), "7").value == 1.0
    assert math_answer_reward(think("5", "3 + 4 = 7"), "7").value == 0.0


def test_final_answer_skips_the_auto_think_analysis():
    assert final_answer("<analysis>Easy: the answer is 5? No thinking needed.</analysis>4") == "4"
    assert final_answer("<analysis>hard</analysis>" + think("\\boxed{7}")) == "7"
    assert math_answer_reward("<analysis>easy, answer: 9</analysis>4", "4").value == 1.0
    assert choice_reward("<analysis>A or B? easy</analysis>B", "B").value == 1.0
    assert count_reward("<analysis>maybe 2</analysis>3", 3).value == 1.0
    assert grounding_reward("<analysis>[0,0,1,1]?</analysis>[0, 0, 10, 20]", [0, 0, 10, 20]).value == 1.0


def test_choice_reward():
    assert choice_reward(think("(B) the red one"), "B").value == 1.0
    r = choice_reward(think("C"), "B")
    assert r.value == 0.0 and r.reason == "option C, expected option B"
    assert choice_reward(think("the red one"), "B", {"A": "the blue one", "B": "the red one"}).value == 1.0
    with pytest.raises(ValueError, match="not an option letter"):
        choice_reward(think("B"), "the red one")


def test_count_reward():
    assert count_reward(think("There are three cats."), 3).value == 1.0
    assert count_reward(think("1,000"), "1000").value == 1.0
    r = count_reward(think("4"), 3)
    assert r.value == 0.0 and r.reason == "counted 4, expected 3"
    assert count_reward(think("several"), 3).reason.startswith("no count")


def test_grounding_reward_threshold_and_continuous():
    # [0,0,10,10] inside [0,0,10,20]: IoU = 100 / 200 = 0.5
    response, ref = think("[0, 0, 10, 10]"), [0, 0, 10, 20]
    assert grounding_reward(response, ref).value == 1.0  # 0.5 >= 0.5
    assert grounding_reward(response, ref, threshold=0.6).value == 0.0
    cont = grounding_reward(response, ref, continuous=True)
    assert cont.value == pytest.approx(0.5) and "IoU 0.500" in cont.reason
    tokens = think("<|box_start|>[[0,0,10,20]]<|box_end|>")
    assert grounding_reward(tokens, "[0, 0, 10, 20]", continuous=True).value == 1.0
    assert grounding_reward(think("somewhere on the left"), ref).value == 0.0
    with pytest.raises(ValueError):
        grounding_reward(response, ref, threshold=0.0)
    with pytest.raises(ValueError):
        grounding_reward(response, "no box here")


def test_answer_reward_dispatches_on_task():
    assert answer_reward(think("0.5"), "1/2", "math").value == 1.0
    assert answer_reward(think("B"), "B", "choice").value == 1.0
    assert answer_reward(think("three"), 3, "count").value == 1.0
    assert answer_reward(think("[0,0,10,10]"), [0, 0, 10, 20], "grounding", iou_continuous=True).value == 0.5
    with pytest.raises(ValueError, match="task"):
        answer_reward(think("1"), "1", "ocr")


# ------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("prompt", "mode"),
    [
        ("What is 2 + 2? /think", "think"),
        ("What is 2 + 2? /no_think", "no_think"),
        ("What is 2 + 2?/no_think  ", "no_think"),
        ("What is 2 + 2?", "auto_think"),
        ("Explain /think mode to me.", "auto_think"),  # a switch counts only at the very end
        (
            [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Count the cats. /no_think"}],
            "no_think",
        ),
    ],
)
def test_prompt_mode(prompt, mode):
    assert prompt_mode(prompt) == mode


@pytest.mark.parametrize(
    ("response", "mode", "value"),
    [
        (think("4"), "think", 1.0),
        ("4", "think", 0.0),  # no tags
        ("<think></think><answer>4</answer>", "think", 0.0),  # empty reasoning
        ("<think>2 + 2</think>", "think", 0.0),  # no answer block
        ("Sure! " + think("4"), "think", 0.0),  # text outside the blocks
        ("4", "no_think", 1.0),
        ("<think></think>4", "no_think", 1.0),  # empty think, pre-filled by the chat template
        ("<think>\n\n</think>\n<answer>4</answer>", "no_think", 1.0),
        (think("4"), "no_think", 0.0),  # reasoning in no_think mode
        ("<think></think>", "no_think", 0.0),  # no answer at all
        ("<analysis>An easy sum, no thinking needed.</analysis>4", "auto_think", 1.0),
        ("<analysis>Several steps: think.</analysis>" + think("4"), "auto_think", 1.0),
        (think("4"), "auto_think", 0.0),  # no analysis
        ("<analysis> </analysis>4", "auto_think", 0.0),  # empty analysis
        ("<analysis>easy</analysis><analysis>again</analysis>4", "auto_think", 0.0),
        ("<analysis>easy</analysis>4", "no_think", 0.0),  # analysis belongs to auto_think only
        ("<analysis>easy</analysis>" + think("4"), "think", 0.0),
    ],
)
def test_mode_format_reward(response, mode, value):
    r = mode_format_reward(response, mode)
    assert r.value == value, r.reason


def test_auto_think_reports_the_mode_chosen_and_can_drop_the_analysis():
    assert mode_format_reward("<analysis>easy</analysis>4", "auto_think").reason.endswith("chose no_think")
    assert mode_format_reward("<analysis>hard</analysis>" + think("4"), "auto_think").reason.endswith(
        "chose think"
    )
    assert format_problem(think("4"), "auto_think", require_analysis=False) is None
    assert format_problem("4", "auto_think", require_analysis=False) is None
    with pytest.raises(ValueError, match="mode"):
        mode_format_reward("4", "fast")


# ---------------------------------------------------------------------------------------- structure


def test_response_body_is_what_the_user_reads():
    assert response_body(think("the answer")) == "the answer"
    assert response_body("<analysis>easy</analysis>plain answer") == "plain answer"
    assert response_body("<think></think>\nplain") == "plain"
    assert response_body("<think>never closed, all reasoning") == ""


@pytest.mark.parametrize(
    ("response", "keys", "value"),
    [
        ('{"name": "Ada", "age": 36}', (), 1.0),
        ("[1, 2, 3]", (), 1.0),
        (think('{"name": "Ada"}'), ("name",), 1.0),
        ('```json\n{"name": "Ada"}\n```', ("name",), 1.0),  # one surrounding fence is allowed
        ('{"name": "Ada"}', ("name", "age"), 0.0),  # a required key is missing
        ("[1, 2]", ("name",), 0.0),  # keys need an object
        ("{'name': 'Ada'}", (), 0.0),  # single quotes are Python, not JSON
        ('{"name": "Ada",}', (), 0.0),  # trailing comma
        ('{"x": NaN}', (), 0.0),  # NaN is not JSON
        ('Here it is: {"name": "Ada"}', (), 0.0),  # prose around it
        ("", (), 0.0),
    ],
)
def test_json_reward(response, keys, value):
    r = json_reward(response, keys)
    assert r.value == value, r.reason


MARKDOWN = """# Summary
Short intro.

## Steps:
1. Open the file.
2. Edit it.
- a side note
* another note

```python
# not a heading
- not a list item
```
---
**bold is no bullet**
"""


def test_markdown_headings_lists_and_bullets():
    assert markdown_reward(MARKDOWN, ["summary", "Steps"], min_list_items=4).value == 1.0
    r = markdown_reward(MARKDOWN, ["Summary", "Results", "not a heading"])
    assert r.value == 0.0 and "Results" in r.reason and "not a heading" in r.reason
    assert markdown_reward(MARKDOWN, min_list_items=5).value == 0.0
    assert bullet_points(MARKDOWN) == ["- a side note", "* another note"]


@pytest.mark.parametrize(
    ("response", "value"),
    [
        ("```python\ndef f(x):\n    return x + 1\n```", 1.0),
        ("Two blocks:\n```py\nx = 1\n```\nand\n```python\nprint(x)\n```", 1.0),
        ("```\nimport os\n```", 1.0),  # unlabelled counts when nothing is labelled python
        ("1. Do this:\n   ```python\n   y = 2\n   ```", 1.0),  # indented inside a list item
        ("```python\ndef f(x)\n    return x\n```", 0.0),  # missing colon
        ("```python\nx = 1\n```\n```python\nif x:\nprint(x)\n```", 0.0),  # second block bad
        ("def f(x): return x", 0.0),  # no fenced block
        ("```js\nlet x = 1;\n```", 0.0),  # only other languages
    ],
)
def test_python_code_reward(response, value):
    r = python_code_reward(response)
    assert r.value == value, r.reason


def test_python_code_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    python_code_reward(f"```python\nopen({str(marker)!r}, 'w').write('x')\n```")
    assert not marker.exists()


# -------------------------------------------------------------------------------------- constraints


def test_word_and_sentence_counts():
    assert count_words("Hello, don't stop: a well-known 3.5 km run.") == 8
    assert count_words("你好世界") == 4  # one word per character
    assert count_words("") == 0
    assert count_sentences("It is 3.5 m long. Really? Yes! Done") == 4
    assert count_sentences("好。对！") == 2
    assert count_sentences("   ") == 0


@pytest.mark.parametrize(
    ("response", "constraint", "value"),
    [
        ("one two three", Constraint("max_words", 3), 1.0),
        ("one two three four", Constraint("max_words", 3), 0.0),
        (
            think("one two three", "many many words of reasoning are not counted"),
            Constraint("max_words", 3),
            1.0,
        ),
        ("one two", Constraint("min_words", 3), 0.0),
        ("First. Second. Third.", Constraint("max_sentences", 2), 0.0),
        ("First. Second.", Constraint("min_sentences", 2), 1.0),
        ("A cat and a dog.", Constraint("include_keywords", ["Cat", "dog"]), 1.0),
        ("The category is fine.", Constraint("include_keywords", ["cat"]), 0.0),  # whole words only
        ("我喜欢猫。", Constraint("include_keywords", ["猫"]), 1.0),
        ("This is simply fine.", Constraint("exclude_keywords", ["simple"]), 1.0),
        ("This is Simple.", Constraint("exclude_keywords", ["simple"]), 0.0),
        ("Hope that helps.\nAny other questions?  ", Constraint("ends_with", "any other questions?"), 1.0),
        ("Any other questions? No.", Constraint("ends_with", "Any other questions?"), 0.0),
        ("- a\n- b\n- c", Constraint("num_bullets", 3), 1.0),
        ("- a\n- b", Constraint("num_bullets", 3), 0.0),
        ("1. a\n2. b\n- c", Constraint("num_bullets", 3), 0.0),  # numbered items are no bullets
        ("1. a\n2. b\n- c", Constraint("min_list_items", 3), 1.0),
        ('{"a": 1}', Constraint("json", ["a"]), 1.0),
        ("# Intro\ntext", Constraint("markdown_headings", ["Intro", "Outro"]), 0.0),
        ("```python\nx = 1\n```", Constraint("python_code"), 1.0),
    ],
)
def test_check_constraint(response, constraint, value):
    r = check_constraint(response, constraint)
    assert r.value == value, r.reason


def test_constraint_reasons_say_what_failed():
    assert check_constraint("one two three four", Constraint("max_words", 3)).reason == "4 words > 3"
    assert (
        check_constraint("x", Constraint("include_keywords", ["cat", "x"])).reason
        == "missing keywords ['cat']"
    )
    assert "['simple']" in check_constraint("simple", Constraint("exclude_keywords", ["simple"])).reason


@pytest.mark.parametrize(
    ("kind", "value", "match"),
    [
        ("max_chars", 3, "kind"),
        ("max_words", -1, ">= 0"),
        ("max_words", 2.5, "integer"),
        ("max_words", True, "integer"),
        ("min_list_items", 0, ">= 1"),
        ("include_keywords", "cat", "list"),
        ("include_keywords", [], "at least one"),
        ("include_keywords", ["cat", ""], "non-empty"),
        ("ends_with", "  ", "non-empty"),
        ("python_code", 1, "no value"),
    ],
)
def test_constraint_is_validated_on_construction(kind, value, match):
    with pytest.raises(ValueError, match=match):
        Constraint(kind, value)


def test_constraint_lists_become_tuples():
    assert Constraint("json", ["a", "b"]).value == ("a", "b")
    assert Constraint("json", []).value == ()


# ------------------------------------------------------------------------------------- rule reward


def test_rule_reward_gates_on_format_and_weights_it():
    item = RewardItem(prompt="What is 1/2 as a decimal? /think", reference="0.5")
    right = rule_reward(item, think("0.5"))
    assert right.value == 1.0 and set(right.components) == {"format", "answer"}
    wrong = rule_reward(item, think("0.4"))
    assert wrong.value == pytest.approx(0.1)  # format_weight · 1 + 0.9 · 0
    unformatted = rule_reward(item, "0.5")  # right answer, but /think asked for reasoning
    assert unformatted.value == 0.0 and unformatted.reason.startswith("format gate")
    ungated = rule_reward(item, "0.5", RewardConfig(format_gates=False))
    assert ungated.value == pytest.approx(0.9)


def test_rule_reward_averages_answer_and_constraints():
    item = RewardItem(
        prompt="List three fruits as bullets, no apples. /no_think",
        constraints=(
            Constraint("num_bullets", 3),
            Constraint("exclude_keywords", ["apple"]),
            Constraint("max_words", 5),
        ),
    )
    r = rule_reward(item, "- pear\n- apple\n- plum")
    # format 1; constraints: bullets 1, keywords 0, words 1 → 0.1 + 0.9 · 2/3
    assert r.value == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert set(r.components) == {"format", "num_bullets", "exclude_keywords", "max_words"}
    assert "forbidden keywords present ['apple']" in r.reason


def test_rule_reward_repeated_constraint_kinds_keep_both():
    item = RewardItem(
        prompt="x /no_think",
        constraints=(Constraint("include_keywords", ["a"]), Constraint("include_keywords", ["b"])),
    )
    assert set(rule_reward(item, "a b").components) == {"format", "include_keywords", "include_keywords#1"}


def test_rule_reward_mode_and_tasks():
    grounding = RewardItem(prompt="Where is the cat? /think", reference=[0, 0, 10, 20], task="grounding")
    assert rule_reward(
        grounding, think("[0, 0, 10, 10]"), RewardConfig(iou_continuous=True)
    ).value == pytest.approx(0.1 + 0.9 * 0.5)
    explicit = RewardItem(prompt="no switch here", reference="4", mode="no_think")
    assert rule_reward(explicit, "4").value == 1.0
    auto = RewardItem(prompt="What is 2 + 2?", reference="4")  # no switch: auto_think
    assert rule_reward(auto, "<analysis>easy</analysis>4").value == 1.0
    assert rule_reward(auto, "4").value == 0.0
    assert rule_reward(auto, "4", RewardConfig(require_analysis=False)).value == 1.0


def test_rule_reward_without_any_check_is_none_and_format_only_items_score_format():
    item = RewardItem(prompt="Write a haiku. /no_think")
    assert rule_reward(item, "An old silent pond", RewardConfig(check_format=False)) is None
    assert rule_reward(item, "An old silent pond").value == 1.0
    assert rule_reward(item, think("pond")).value == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "ocr"}, "task"),
        ({"mode": "fast"}, "mode"),
        ({"constraints": ("max_words",)}, "Constraint"),
    ],
)
def test_reward_item_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardItem(prompt="x", **kwargs)


# ---------------------------------------------------------------------------------------- combiner


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": {}}, "non-empty"),
        ({"weights": {"rule": 0.0}}, "at least one"),
        ({"weights": {"rule": -1.0}}, ">= 0"),
        ({"weights": {"rule": math.nan}}, "finite"),
        ({"weights": {"vibes": 1.0}}, "unknown component"),
        ({"format_weight": 1.0}, r"\[0, 1\)"),
        ({"format_weight": -0.1}, r"\[0, 1\)"),
        ({"iou_threshold": 0.0}, r"\(0, 1\]"),
        ({"rel_tol": -1e-3}, ">= 0"),
        ({"format_gates": 1}, "True or False"),
    ],
)
def test_reward_config_is_validated_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=rf"RewardConfig\.\w+=.*{match}"):
        RewardConfig(**kwargs)


def test_reward_config_weights_are_frozen():
    config = RewardConfig(weights={"rule": 2, "judge": 1})
    assert dict(config.weights) == {"rule": 2.0, "judge": 1.0}
    with pytest.raises(TypeError):
        config.weights["rule"] = 5.0  # type: ignore[index]


def test_combiner_weights_components_and_keeps_their_reasons():
    seen = []

    def judge(item, response):
        seen.append((item.reference, response))
        return 0.5, "half agrees with the reference"

    config = RewardConfig(weights={"rule": 3.0, "judge": 1.0})
    combine = RewardCombiner(config, judge=judge)
    item = RewardItem(prompt="1/2 as a decimal? /think", reference="0.5")
    r = combine(item, think("0.5"))
    assert r.value == pytest.approx((3 * 1.0 + 1 * 0.5) / 4)
    assert set(r.components) == {"rule", "judge"}
    assert r.components["judge"].reason == "half agrees with the reference"
    assert "rule 1.00" in r.reason and "judge 0.50" in r.reason
    assert seen == [("0.5", think("0.5"))]


def test_reward_model_scores_only_items_without_reference_by_default():
    calls = []

    def reward_model(item, response):
        calls.append(response)
        return Reward(0.8, "preferred")

    config = RewardConfig(weights={"rule": 1.0, "reward_model": 1.0})
    combine = RewardCombiner(config, reward_model=reward_model)
    with_ref = combine(RewardItem(prompt="2 + 2? /no_think", reference="4"), "4")
    assert with_ref.value == 1.0 and "reward_model" not in with_ref.components and calls == []
    open_ended = combine(RewardItem(prompt="Write a poem. /no_think"), "Roses")
    assert open_ended.value == pytest.approx((1.0 + 0.8) / 2) and calls == ["Roses"]
    always = RewardCombiner(
        RewardConfig(weights={"rule": 1.0, "reward_model": 1.0}, reward_model_only_without_reference=False),
        reward_model=reward_model,
    )
    assert always(RewardItem(prompt="2 + 2? /no_think", reference="4"), "4").value == pytest.approx(0.9)


def test_components_that_return_none_are_left_out_and_weights_renormalise():
    combine = RewardCombiner(RewardConfig(weights={"rule": 1.0, "judge": 9.0}), judge=lambda item, r: None)
    r = combine(RewardItem(prompt="2 + 2? /no_think", reference="4"), "5")
    assert r.value == pytest.approx(0.1) and set(r.components) == {"rule"}


def test_zero_weight_components_are_never_called():
    def judge(item, response):
        raise AssertionError("a weight-0 judge must not be called")

    combine = RewardCombiner(RewardConfig(weights={"rule": 1.0, "judge": 0.0}), judge=judge)
    assert combine(RewardItem(prompt="x /no_think", reference="4"), "4").value == 1.0


def test_combiner_accepts_numpy_scores_and_rejects_bad_ones():
    item = RewardItem(prompt="x /no_think")
    ok = RewardCombiner(RewardConfig(weights={"judge": 1.0}), judge=lambda i, r: np.float32(0.25))
    assert ok(item, "y").value == pytest.approx(0.25)
    out_of_range = RewardCombiner(RewardConfig(weights={"judge": 1.0}), judge=lambda i, r: 7)
    with pytest.raises(ValueError, match="judge returned an invalid reward"):
        out_of_range(item, "y")
    wrong_type = RewardCombiner(RewardConfig(weights={"judge": 1.0}), judge=lambda i, r: "good")
    with pytest.raises(TypeError, match="judge returned 'good'"):
        wrong_type(item, "y")


def test_combiner_needs_a_callable_for_every_weighted_component_and_something_to_score():
    with pytest.raises(ValueError, match="no judge callable"):
        RewardCombiner(RewardConfig(weights={"rule": 1.0, "judge": 1.0}))
    with pytest.raises(ValueError, match="callable"):
        RewardCombiner(RewardConfig(weights={"judge": 1.0}), judge="http://judge")  # type: ignore[arg-type]
    rule_only = RewardCombiner(RewardConfig(check_format=False))
    with pytest.raises(ValueError, match="no reward component applies"):
        rule_only(RewardItem(prompt="Write a poem."), "Roses")
