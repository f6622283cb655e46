"""The Keye reward model on literal inputs: its nine dimensions and config, the prompt, the strict parser of
both output modes (well-formed and malformed outputs), the preference value of a judgement, the
length-debiasing pass and the order-swapped training conversations."""

from __future__ import annotations

import math
import re

import pytest

from keyeflow.quality.errors import ScoringError
from keyeflow.quality.reward_model import (
    DIMENSION_NAMES,
    DIMENSIONS,
    SYSTEM_PROMPT,
    ComparisonRequest,
    Judgement,
    RewardModelConfig,
    RewardModelJudge,
    RewardModelOutputError,
    answer_form,
    build_prompt,
    build_reward_model_data,
    claim_credibility,
    instructions,
    length_debias,
    parse_output,
    preference_value,
    query_parts,
    readable_share,
    reasoning_consistency,
    reference_givers,
    reference_line,
    render_output,
    signal_scores,
)
from keyeflow.quality.rewards import RewardItem, prompt_mode


def think_output(
    a: dict[str, int] | None = None, b: dict[str, int] | None = None, verdict: str = "A", extra: str = ""
) -> str:
    a = a or {}
    b = b or {}
    lines = [f"{n}: A={a.get(n, 7)}, B={b.get(n, 4)}" for n in DIMENSION_NAMES]
    return "<think>\n" + extra + "\n".join(lines) + f"\n</think>\nVerdict: {verdict}"


# ------------------------------------------------------------------------------------------ dimensions


def test_nine_dimensions_four_from_spec_five_ours_each_defined():
    assert len(DIMENSIONS) == 9 and len(set(DIMENSION_NAMES)) == 9
    assert [d.name for d in DIMENSIONS if d.source == "SPEC"] == [
        "credibility",
        "correctness",
        "redundancy",
        "relevance",
    ]
    assert {d.name for d in DIMENSIONS if d.source == "ours"} == {
        "completeness",
        "instruction_following",
        "consistency",
        "readability",
        "answer_form",
    }
    assert all(d.definition and "\n" not in d.definition for d in DIMENSIONS)


def test_config_is_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"RewardModelConfig.mode='auto'"):
        RewardModelConfig(mode="auto")
    with pytest.raises(ValueError, match=r"score_max=1: must be > score_min"):
        RewardModelConfig(score_min=1, score_max=1)
    with pytest.raises(ValueError, match=r"unknown dimension 'helpfulness'"):
        RewardModelConfig(dimension_weights={"helpfulness": 1.0})
    with pytest.raises(ValueError, match=r"at least one weight must be > 0"):
        RewardModelConfig(dimension_weights=dict.fromkeys(DIMENSION_NAMES, 0))
    with pytest.raises(ValueError, match=r"verdict_weight=1.5: must be in \[0, 1\]"):
        RewardModelConfig(verdict_weight=1.5)
    with pytest.raises(ValueError, match=r"min_shorter_share=1.0: must be in \[0, 1\)"):
        RewardModelConfig(min_shorter_share=1.0)
    with pytest.raises(ValueError, match=r"debias_method='drop'"):
        RewardModelConfig(debias_method="drop")
    with pytest.raises(ValueError, match=r"max_repeats=0: must be >= 1"):
        RewardModelConfig(max_repeats=0)
    weights = RewardModelConfig(dimension_weights={"correctness": 3}).dimension_weights
    assert weights["correctness"] == 3.0 and weights["readability"] == 1.0 and len(weights) == 9


# ---------------------------------------------------------------------------------------------- prompt


def test_prompt_for_a_text_query_is_one_string_ending_with_the_mode_switch():
    messages = build_prompt("Solve the sum.", "What is 2+2?", "4", "5", "no_think")
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1] == {
        "role": "user",
        "content": (
            "Task definition: Solve the sum.\n\nQuery:\nWhat is 2+2?\n\n"
            "Compare the two responses on credibility, correctness, redundancy, relevance, completeness, "
            "instruction following, consistency, readability, answer form. Reply with exactly one line: "
            "`Verdict: A`, `Verdict: B` or `Verdict: tie`.\n\nResponse A:\n4\n\nResponse B:\n5\n\n/no_think"
        ),
    }
    think = build_prompt("Solve the sum.", "What is 2+2?", "4", "5", "think")[1]["content"]
    assert think.endswith("\n\n/think") and prompt_mode(think) == "think"
    assert all(f"- {d.name}: {d.definition}" in think for d in DIMENSIONS)
    assert "from 1 (worst) to 10 (best)" in think and "`name: A=<score>, B=<score>`" in think
    assert "from 0 (worst) to 5 (best)" in instructions("think", RewardModelConfig(score_min=0, score_max=5))


def test_prompt_keeps_media_parts_in_place_and_flattens_a_chat_query():
    image = {"type": "image", "image": "chart.png"}
    query = [{"role": "user", "content": [image, {"type": "text", "text": "Which bar is tallest?"}]}]
    content = build_prompt("Read the chart.", query, "The red one.", "Blue.", "think")[1]["content"]
    assert content[0] == {"type": "text", "text": "Task definition: Read the chart.\n\nQuery:\n"}
    assert content[1] == image
    assert content[2]["text"].startswith("Which bar is tallest?\n\nFirst think inside <think>")
    assert content[2]["text"].endswith("\n\nResponse A:\nThe red one.\n\nResponse B:\nBlue.\n\n/think")
    assert prompt_mode(content) == "think"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert query_parts(chat) == [
        {"type": "text", "text": "[system]\n"},
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "\n[user]\n"},
        {"type": "text", "text": "Hi?"},
    ]
    with pytest.raises(ValueError, match="mode must be one of"):
        build_prompt("t", "q", "a", "b", "auto_think")
    with pytest.raises(ValueError, match="task_definition must be a non-empty string"):
        build_prompt(" ", "q", "a", "b", "think")
    with pytest.raises(ValueError, match="query must be"):
        build_prompt("t", [], "a", "b", "think")


# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("text", "verdict"), [
    ("Verdict: A", "A"), ("Verdict: B\n", "B"), ("  verdict:tie  ", "tie"), ("Verdict: TIE", "tie"),
    ("<think>\n</think>\nVerdict: B", "B"),  # an empty think block pre-filled by a chat template
])  # fmt: skip
def test_no_think_verdicts_parse(text, verdict):
    assert parse_output(text, "no_think") == Judgement(verdict)


@pytest.mark.parametrize(("text", "problem"), [
    ("", "no verdict line"),
    ("A", "expected `Verdict: A`, `Verdict: B` or `Verdict: tie`, got 'A'"),
    ("Verdict: C", "got 'Verdict: C'"),
    ("The verdict: A", "got 'The verdict: A'"),
    ("Verdict: A\nVerdict: B", "expected one verdict line, got 2 lines"),
    ("Verdict: A because it is right", "got 'Verdict: A because it is right'"),
    ("<think>A is right.</think>\nVerdict: A", "a <think> block in no_think mode"),
])  # fmt: skip
def test_malformed_no_think_outputs_say_what_is_wrong(text, problem):
    with pytest.raises(RewardModelOutputError, match=re.escape(problem)):
        parse_output(text, "no_think")


def test_think_output_parses_scores_and_verdict_with_free_reasoning_lines():
    text = think_output(
        {"correctness": 10},
        {"correctness": 1},
        "B",
        extra="A gives the right sum; B does not.\n- but B is shorter\n",
    )
    judgement = parse_output(
        "\n  " + text.replace("answer_form: A=7, B=4", "  - Answer Form :A = 7 ,B= 4") + "\n", "think"
    )
    assert judgement.verdict == "B"
    assert judgement.scores_a["correctness"] == 10 and judgement.scores_b["correctness"] == 1
    assert judgement.scores_a["answer_form"] == 7 and judgement.scores_b["answer_form"] == 4
    assert set(judgement.scores_a) == set(DIMENSION_NAMES)


@pytest.mark.parametrize(("text", "problem"), [
    ("Verdict: A", "think output must start with <think>"),
    ("I think A.\n" + think_output(), "think output must start with <think>"),
    (think_output() + "\n<think>more</think>", "expected one <think> and one </think>, got 2 and 2"),
    (think_output().replace("</think>", ""), "expected one <think> and one </think>, got 1 and 0"),
    (think_output().replace("answer_form: A=7, B=4\n", ""), "no scores for answer_form in the <think> block"),
    (think_output().replace("consistency: A=7, B=4", "consistency: A=7, B=4\nconsistency: A=1, B=1"),
     "line 9: consistency is scored twice"),
    (think_output().replace("relevance: A=7", "relevance: A=11"),
     r"line 5: relevance A=11 is outside \[1, 10\]"),
    (think_output().replace("relevance: A=7", "relevance: A=7.5"),
     "line 5: 'relevance: A=7.5, B=4' is not `relevance: A=<score>, B=<score>`"),
    (think_output().replace("relevance: A=7, B=4", "relevance: good for both"),
     "line 5: 'relevance: good for both' is not"),
    (think_output(verdict="maybe A"),
     "expected `Verdict: A`, `Verdict: B` or `Verdict: tie`, got 'Verdict: maybe A'"),
    (think_output() + "\nI am sure.", "expected one verdict line, got 2 lines"),
    (think_output().split("</think>")[0] + "</think>", "no verdict line"),
])  # fmt: skip
def test_malformed_think_outputs_say_what_is_wrong(text, problem):
    with pytest.raises(RewardModelOutputError, match=problem):
        parse_output(text, "think")


def test_render_and_parse_round_trip_in_both_modes():
    judgement = Judgement("tie", dict.fromkeys(DIMENSION_NAMES, 3), dict.fromkeys(DIMENSION_NAMES, 9))
    assert parse_output(render_output(judgement, "think"), "think") == judgement
    assert render_output(Judgement("B"), "no_think") == "Verdict: B"
    assert parse_output("Verdict: B", "no_think") == Judgement("B")
    assert render_output(judgement, "think").splitlines()[:2] == ["<think>", "credibility: A=3, B=9"]
    with pytest.raises(ValueError, match="needs scores for A and B"):
        render_output(Judgement("A"), "think")
    with pytest.raises(ValueError, match="verdict must be one of"):
        render_output(Judgement("C"), "no_think")


def test_preference_value_of_a_judgement_from_either_position():
    config = RewardModelConfig(verdict_weight=0.5)
    assert preference_value(Judgement("A"), "A", config) == 1.0
    assert preference_value(Judgement("A"), "B", config) == 0.0
    assert preference_value(Judgement("tie"), "B", config) == 0.5
    # think: 0.5 · verdict + 0.5 · (0.5 + (S_own − S_other) / (2 · 9)), S the weighted mean score
    judgement = parse_output(think_output({"correctness": 10}, {"correctness": 1}, "A"), "think")
    s_a, s_b = (7 * 8 + 10) / 9, (4 * 8 + 1) / 9
    assert preference_value(judgement, "A", config) == pytest.approx(0.5 + 0.5 * (0.5 + (s_a - s_b) / 18))
    assert preference_value(judgement, "B", config) == pytest.approx(0.5 * (0.5 + (s_b - s_a) / 18))
    only_correctness = RewardModelConfig(
        verdict_weight=0.0,
        dimension_weights={n: (1.0 if n == "correctness" else 0.0) for n in DIMENSION_NAMES},
    )
    assert preference_value(judgement, "A", only_correctness) == pytest.approx(0.5 + 9 / 18)


# ------------------------------------------------------------------------------------------- debiasing


def pair(chosen_words: int, rejected_words: int, name: str = "p", **extra) -> dict:
    return {
        "pair_id": name,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": " ".join(["paris"] * chosen_words),
        "rejected": " ".join(["lyon"] * rejected_words),
        **extra,
    }


def test_length_debias_oversamples_pairs_whose_preferred_answer_is_shorter():
    pairs = [pair(1, 5, "short"), pair(5, 1, "long1"), pair(6, 2, "long2"), pair(3, 3, "equal")]
    kept, report = length_debias(pairs, RewardModelConfig(min_shorter_share=0.5), seed=0)
    # 1 of 4 before; (1 + k) / (4 + k) >= 0.5 needs k = 2 more uses of the one shorter-preferred pair
    assert (report.num_before, report.num_shorter_before, report.share_before) == (4, 1, 0.25)
    assert (report.num_after, report.num_shorter_after, report.share_after) == (6, 3, 0.5)
    assert report.num_added == 2 and report.num_removed == 0 and report.reached
    assert [p["repeats"] for p in kept] == [3, 1, 1, 1] and [p["pair_id"] for p in kept] == [
        "short",
        "long1",
        "long2",
        "equal",
    ]
    assert report.to_dict()["share_after"] == 0.5
    assert "repeats" not in pairs[0]  # the input is not modified


def test_length_debias_oversampling_stops_at_max_repeats_and_says_so():
    pairs = [pair(1, 5, "short")] + [pair(5, 1, f"long{k}") for k in range(9)]
    kept, report = length_debias(pairs, RewardModelConfig(min_shorter_share=0.5, max_repeats=3))
    assert kept[0]["repeats"] == 3 and report.num_added == 2
    assert report.share_after == pytest.approx(3 / 12) and not report.reached
    assert "6 more were needed but every such pair is at max_repeats=3" in report.note


def test_length_debias_by_selection_drops_pairs_whose_preferred_answer_is_longer():
    pairs = [pair(1, 5, "short1"), pair(2, 4, "short2")] + [pair(5, 1, f"long{k}") for k in range(6)]
    config = RewardModelConfig(min_shorter_share=0.4, debias_method="select")
    kept, report = length_debias(pairs, config, seed=3)
    # 2 shorter-preferred; 2 / (2 + m) >= 0.4 allows m = 3 others: 3 of the 6 are dropped
    assert report.num_removed == 3 and report.num_after == 5 and report.share_after == pytest.approx(0.4)
    assert sum(p["pair_id"].startswith("short") for p in kept) == 2
    again, _ = length_debias(pairs, config, seed=3)
    assert [p["pair_id"] for p in again] == [p["pair_id"] for p in kept]  # seeded


def test_length_debias_leaves_data_alone_when_share_is_reached_or_unreachable():
    balanced = [pair(1, 5), pair(5, 1)]
    kept, report = length_debias(balanced, RewardModelConfig(min_shorter_share=0.5))
    assert report.share_before == report.share_after == 0.5 and "already reached" in report.note
    assert [p["repeats"] for p in kept] == [1, 1]
    kept, report = length_debias([pair(5, 1), pair(2, 2)], RewardModelConfig())
    assert (
        report.share_after == 0.0
        and not report.reached
        and "no pair prefers the shorter answer" in report.note
    )
    with pytest.raises(ValueError, match="pair 0: chosen must be a non-empty string"):
        length_debias([{"messages": [], "chosen": "", "rejected": "x"}])


# ------------------------------------------------------------------------------------------ training data


def test_the_reference_answer_follows_the_responses_and_the_target_restates_it_in_training_and_judging():
    """Reference-guided judgement: a pair with a reference shows it to the judge after both responses in both
    orders and its target starts with the line saying which response gives it (by the rule check); a pair
    without one is unchanged; the judge shows a request's reference the same way."""
    plain = build_prompt("Solve the sum.", "What is 2+2?", "4", "5", "no_think")[1]["content"]
    guided = build_prompt("Solve the sum.", "What is 2+2?", "4", "5", "no_think", reference=4)[1]["content"]
    assert "Reference answer" not in plain and "restated" not in plain
    assert guided.endswith("Response A:\n4\n\nResponse B:\n5\n\nReference answer:\n4\n\n/no_think")
    assert (
        "Reply with exactly two lines" in guided and "`<reference answer> is Response A's answer.`" in guided
    )
    conversations, _ = build_reward_model_data(
        [pair(1, 1, "ref", reference="paris"), pair(1, 1, "none")], RewardModelConfig(), modes=("no_think",)
    )
    for c in conversations:
        shown = "\n\nReference answer:\nparis\n\n/no_think" in c["messages"][1]["content"]
        assert shown == (c["pair_id"] == "ref")
        target = c["messages"][-1]["content"]
        if c["pair_id"] == "ref":  # chosen "paris" gives the reference, rejected "lyon" does not
            line = reference_line("paris", "A" if c["order"] == "chosen_a" else "B")
            assert line == f"paris is Response {c['verdict']}'s answer."
            assert target == f"{line}\nVerdict: {c['verdict']}"
            assert parse_output(target, "no_think") == Judgement(c["verdict"], reference_line=line)
        else:
            assert target == f"Verdict: {c['verdict']}"

    prompts = []

    class Recorder:  # a generator that records its prompts and always answers A
        def generate(self, conversations, **_):
            prompts.extend(conversations)
            return [[type("C", (), {"text": "Verdict: A"})()] for _ in conversations]

    judge = RewardModelJudge(Recorder(), RewardModelConfig(mode="no_think"))
    (comparison,) = judge.compare([ComparisonRequest("What is 2+2?", "4", "5", reference="4")])
    assert comparison.value == 0.5  # A in both orders: a position, not a preference
    assert all(p[1]["content"].endswith("\n\nReference answer:\n4\n\n/no_think") for p in prompts)
    assert len(prompts) == 2


def test_the_reference_line_says_both_or_neither_when_the_rule_check_says_so_and_parses_strictly():
    both = dict(pair(1, 1, "both", reference="paris"), rejected="Paris")  # the same answer, other case
    neither = dict(pair(1, 1, "neither", reference="nice"))
    assert reference_givers(both) == {"chosen_a": "both", "chosen_b": "both"}
    assert reference_givers(neither) == {"chosen_a": "neither", "chosen_b": "neither"}
    assert reference_givers(pair(1, 1, reference="paris")) == {"chosen_a": "A", "chosen_b": "B"}
    conversations, _ = build_reward_model_data([neither], RewardModelConfig(), modes=("think",))
    for c in conversations:
        judgement = parse_output(c["messages"][-1]["content"], "think")
        assert judgement.reference_line == "nice is neither response's answer."
        assert c["messages"][-1]["content"].startswith("<think>\nnice is neither response's answer.\n")
    # no_think: one verdict line, or the reference line then the verdict line; nothing else passes
    assert parse_output("12 apples is both responses' answer.\nVerdict: tie", "no_think") == Judgement(
        "tie", reference_line="12 apples is both responses' answer."
    )
    for text in ("4 is Response C's answer.\nVerdict: A", "I think A.\nVerdict: A", "Verdict: A\nVerdict: A"):
        with pytest.raises(RewardModelOutputError):
            parse_output(text, "no_think")
    with pytest.raises(ValueError, match="giver"):
        reference_line("4", "C")
    with pytest.raises(ValueError, match="reference_line"):
        render_output(Judgement("A", reference_line="A wins."), "no_think")


def test_training_data_has_both_orders_with_swapped_verdicts_and_scores():
    pairs = [pair(1, 4, "p0", reference="Paris", chosen_score=1.0, rejected_score=0.0), pair(4, 1, "p1")]
    conversations, report = build_reward_model_data(pairs, RewardModelConfig(min_shorter_share=0.0))
    assert len(conversations) == 2 * 2 * 2  # pairs × modes × orders
    assert len({c["conversation_id"] for c in conversations}) == len(conversations)
    assert dict(report.verdicts) == {"A": 4, "B": 4}  # as many A as B targets: no position to learn
    by_key = {(c["pair_id"], c["mode"], c["order"]): c for c in conversations}
    for mode in ("think", "no_think"):
        first, second = by_key[("p0", mode, "chosen_a")], by_key[("p0", mode, "chosen_b")]
        assert (first["verdict"], second["verdict"]) == ("A", "B")
        assert "Response A:\nparis\n\nResponse B:\nlyon lyon lyon lyon" in first["messages"][1]["content"]
        assert "Response A:\nlyon lyon lyon lyon\n\nResponse B:\nparis" in second["messages"][1]["content"]
        assert first["messages"][1]["content"].endswith(f"/{mode}")
        target_a = parse_output(first["messages"][-1]["content"], mode)
        target_b = parse_output(second["messages"][-1]["content"], mode)
        assert (target_a.verdict, target_b.verdict) == ("A", "B")
        if mode == "think":
            assert target_a.scores_a == target_b.scores_b and target_a.scores_b == target_b.scores_a
            assert target_a.scores_a["correctness"] == 10 and target_a.scores_b["correctness"] == 1
        assert first["messages"][-1]["role"] == "assistant"
    assert report.num_occurrences == 8 and report.length_debias.share_before == 0.5


def test_training_data_carries_the_debiasing_repeats_and_one_mode_when_asked():
    pairs = [pair(1, 5, "short"), pair(5, 1, "long1"), pair(6, 2, "long2")]
    conversations, report = build_reward_model_data(
        pairs, RewardModelConfig(min_shorter_share=0.5), modes=("no_think",)
    )
    assert {c["mode"] for c in conversations} == {"no_think"}
    assert {c["pair_id"]: c["repeats"] for c in conversations} == {"short": 2, "long1": 1, "long2": 1}
    assert report.length_debias.share_after == 0.5 and report.num_occurrences == 2 * 4
    assert all(c["shorter_preferred"] == (c["pair_id"] == "short") for c in conversations)
    with pytest.raises(ValueError, match="modes="):
        build_reward_model_data(pairs, modes=("auto_think",))


def test_signal_scores_follow_the_documented_signals():
    base = {
        "messages": [{"role": "user", "content": "What is 6 times 7? /think"}],
        "reference": "42",
        "task": "math",
        "chosen": "<think>6 times 7 is 42.</think><answer>42</answer>",
        "rejected": "41",
    }
    good = signal_scores(base, base["chosen"], base["rejected"])
    bad = signal_scores(base, base["rejected"], base["chosen"])
    assert good["correctness"] == 10 and bad["correctness"] == 1
    assert good["credibility"] == bad["credibility"] == 10  # no arithmetic claim stated: nothing invented
    assert (
        good["instruction_following"] == 10 and bad["instruction_following"] == 1
    )  # /think asks for <think>
    # the reasoning ends on its answer / no reasoning; all words readable; a number for a number reference
    assert good["consistency"] == bad["consistency"] == 10
    assert good["readability"] == bad["readability"] == 10
    assert good["answer_form"] == bad["answer_form"] == 10
    repetitive = "the answer is 42 the answer is 42 the answer is 42"
    assert (
        signal_scores(base, repetitive, "42")["redundancy"]
        < signal_scores(base, "The answer is 42.", "42")["redundancy"]
    )
    assert signal_scores(base, "Bananas grow in tropical climates.", "42")["relevance"] == 1
    assert signal_scores(base, "<think>unfinished", "42")["completeness"] == 1
    no_reference = {**base, "reference": None, "chosen_score": 0.8, "rejected_score": 0.2}
    assert signal_scores(no_reference, base["chosen"], base["rejected"])["correctness"] == 1 + round(0.8 * 9)


MATH = {
    "messages": [{"role": "user", "content": "What is 6 times 7? /think"}],
    "reference": "42",
    "task": "math",
}


def scores(response: str, pair: dict | None = None, other: str = "42") -> dict[str, int]:
    pair = {**(pair or MATH), "chosen": response, "rejected": other}
    return signal_scores(pair, response, other)


def test_credibility_is_the_share_of_stated_arithmetic_that_holds():
    right = scores("<think>2 + 2 = 4 and 6 × 7 = 42.</think><answer>42</answer>")
    wrong = scores("<think>2 + 2 = 5 and 6 × 7 = 42.</think><answer>42</answer>")
    assert right["credibility"] == 10 and wrong["credibility"] == 1 + round(
        0.5 * 9
    )  # one of two claims holds
    assert right["correctness"] == wrong["correctness"] == 10  # the final answer is right in both
    assert {n: v for n, v in right.items() if n != "credibility"} == {
        n: v for n, v in wrong.items() if n != "credibility"
    }
    assert claim_credibility("6 × 7 = 48, 48 - 6 = 42") == 0.5
    assert claim_credibility("no sums here") == 1.0  # nothing checkable: nothing found invented


def test_consistency_falls_when_the_answer_is_not_where_the_reasoning_ends():
    ends_on_it = "<think>6 times 7 is 42.</think><answer>42</answer>"
    moves_on = "<think>6 times 7 is 42. Then I checked the table.</think><answer>42</answer>"
    contradicts = "<think>6 times 7 is 41.</think><answer>42</answer>"
    values = [scores(r)["consistency"] for r in (ends_on_it, moves_on, contradicts, "42")]
    assert values == [10, 1 + round(0.5 * 9), 1, 10]  # no reasoning: nothing to contradict
    assert len({scores(r)["correctness"] for r in (ends_on_it, moves_on, contradicts)}) == 1
    # equivalent numbers count as the answer; an unfinished reasoning reaches none
    assert reasoning_consistency("<think>Half of it, 0.5.</think><answer>1/2</answer>") == 1.0
    assert reasoning_consistency("<think>There are three apples.</think><answer>3</answer>") == 1.0
    assert reasoning_consistency("<think>The answer is 42 for sure.</think>\nAnswer: 4") == 0.0
    assert reasoning_consistency("<think>6 times 7 is") == 0.0


def test_readability_falls_with_token_salad():
    clear = scores("<think>Six sevens make forty-two.</think><answer>42</answer>")
    salad = scores("<think>xqzt Ãĥ vbnm ĠĊ qwrtp</think><answer>42</answer>")
    assert clear["readability"] == 10 and salad["readability"] == 1 + round(1 / 6 * 9)  # only "42" reads
    assert clear["correctness"] == salad["correctness"] == 10
    assert readable_share("Il a répondu à 3.5 km/h (e.g. HTML, H2O, 2nd); c'est 中文, Привет.") == 1.0
    assert readable_share("$\\frac{1}{2} + \\sqrt{2} = 0.5 + 1.414$") == 1.0  # LaTeX commands are notation
    assert readable_share("The answer is xqzt") == 0.75
    assert readable_share("<think></think> ... !!") == 0.0  # no words
    # numerals that are not digits (a sample's "½ cup", "Ⅻ") are read as numbers, not split forever
    assert readable_share("½ cup, Ⅻ xqzt") == 0.75


def test_answer_form_falls_when_the_answer_has_another_form_than_the_reference():
    assert scores("<answer>42</answer>")["answer_form"] == 10
    assert scores("<answer>forty-two</answer>")["answer_form"] == 10  # number words are a number
    assert scores("<answer>Paris</answer>")["answer_form"] == 1  # words for a numeric reference
    assert answer_form("<answer>Paris</answer>", "Paris", "math") == 1.0
    assert answer_form("<answer>7</answer>", "Paris", "math") == 0.0
    assert answer_form("<answer>B</answer>", "B", "choice") == 1.0
    assert answer_form("<answer>[12, 20, 30, 41]</answer>", [10, 20, 30, 40], "grounding") == 1.0
    assert answer_form("<answer>the red car</answer>", [10, 20, 30, 40], "grounding") == 0.0
    assert answer_form("<answer>7</answer>", [10, 20, 30, 40], "grounding") == 0.0
    assert answer_form("Paris.", None, "math") == 1.0  # no reference: any final answer
    assert answer_form("<think>still thinking", None, "math") == 0.0


def test_no_dimension_is_constant_over_varied_pairs():
    france = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "reference": None,
              "chosen_score": 0.9, "rejected_score": 0.1}  # fmt: skip
    pairs = [
        {**MATH, "chosen": "<think>6 × 7 = 42, so 42.</think><answer>42</answer>", "rejected": "41"},
        {**MATH, "chosen": "<think>6 × 7 = 42.</think><answer>42</answer>",
         "rejected": "<think>6 × 7 = 48 xqzt Ãĥ vbnm qwrtp zzkx</think><answer>Paris</answer>"},
        {**MATH, "chosen": "<think>Six sevens.</think><answer>42</answer>",
         "rejected": "<think>" + "the answer is 42 " * 8},
        {**france, "chosen": "Paris is the capital of France.",
         "rejected": "Bananas grow in tropical climates."},
    ]  # fmt: skip
    seen = {name: set() for name in DIMENSION_NAMES}
    for p in pairs:
        for response, other in ((p["chosen"], p["rejected"]), (p["rejected"], p["chosen"])):
            for name, value in signal_scores(p, response, other).items():
                seen[name].add(value)
    assert {name: len(values) >= 2 for name, values in seen.items()} == dict.fromkeys(DIMENSION_NAMES, True)


class SureOfA:
    """A reference-guided judge that writes `<reference> is Response A's answer.` and `Verdict: A` for every
    prompt (its position bias), more surely when Response A's answer is the reference: the probability of its
    giver token is `sure` then and `unsure` otherwise; the verdict letter, a copy of the giver, has 0.9."""

    def __init__(self, sure: float = 0.7, unsure: float = 0.55, spell_text: bool = True):
        self.sure, self.unsure, self.spell_text = sure, unsure, spell_text

    def generate(self, conversations, **kwargs):
        from keyeflow.model.generation import Completion

        assert kwargs["logprobs"] is True  # a weighed verdict needs the tokens' logprobs
        out = []
        for conversation in conversations:
            prompt = conversation[-1]["content"]
            reference = prompt.split("Reference answer:\n")[1].split("\n")[0]
            a = prompt.split("Response A:\n")[1].split("\n")[0]
            tokens = [reference, " is", " Response", " A", "'s", " answer", ".\n", "Verdict", ":", " A"]
            giver = self.sure if a == reference else self.unsure
            logprobs = [0.0, 0.0, 0.0, math.log(giver), 0.0, 0.0, 0.0, 0.0, 0.0, math.log(0.9)]
            text = "".join(tokens)
            if not self.spell_text:
                tokens = tokens[:-1]  # a token (and its logprob) missing: they no longer spell the text
                logprobs = logprobs[:-1]
            offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
            out.append([Completion(text, logprobs, tokens, offsets, "stop")])
        return out


def test_a_weighed_verdict_ranks_a_pair_its_judge_names_the_same_letter_for_in_both_orders():
    """With `verdict_confidence`, the same letter written in both orders still ranks the pair by how surely
    the judge wrote it in each: value = ½ (p(chosen as A) + 1 − p(chosen as B)), p the product of the giver's
    and the verdict letter's probabilities. Without it, the value is the tie a position bias gives."""
    request = ComparisonRequest("How many shapes?", "4", "5", reference="4")
    weighed = RewardModelJudge(SureOfA(), RewardModelConfig(mode="no_think", verdict_confidence=True))
    (comparison,) = weighed.compare([request])
    assert comparison.value == pytest.approx(0.5 * (0.7 * 0.9 + 1 - 0.55 * 0.9))
    assert [j.confidence for j in comparison.judgements] == pytest.approx([0.63, 0.495])
    assert "verdict A (p=0.630)" in comparison.reason
    # the response the judge is less sure of loses, in the other direction
    (reverse,) = weighed.compare([ComparisonRequest("How many shapes?", "5", "4", reference="4")])
    assert reverse.value == pytest.approx(1 - comparison.value)

    class Letters(SureOfA):  # the same outputs for a judge that does not weigh (no logprobs asked)
        def generate(self, conversations, **kwargs):
            return super().generate(conversations, **dict(kwargs, logprobs=True))

    (plain,) = RewardModelJudge(Letters(), RewardModelConfig(mode="no_think")).compare([request])
    assert plain.value == 0.5 and all(j.confidence is None for j in plain.judgements)


def test_a_weighed_verdict_whose_tokens_do_not_spell_the_output_is_a_failed_judgement():
    judge = RewardModelJudge(
        SureOfA(spell_text=False), RewardModelConfig(mode="no_think", verdict_confidence=True)
    )
    (comparison,) = judge.compare([ComparisonRequest("How many shapes?", "4", "5", reference="4")])
    assert comparison.value is None
    assert "do not spell its text" in comparison.reason
    with pytest.raises(ScoringError, match="do not spell its text"):
        judge.reward(RewardItem("How many shapes?", reference="4"), "4")
