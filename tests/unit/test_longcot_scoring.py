"""LongCoT scoring on literal inputs: step confidences, path selection, grades, repeats."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from keyeflow.quality.longcot_scoring import (
    GradeResult,
    LongCoTConfig,
    ReasoningPath,
    grade,
    keep_probability,
    path_confidence,
    repeats_for_score,
    response_confidence,
    select_paths,
    split_steps,
    step_confidences,
    text_similarity,
    token_ranges,
    training_repeats,
)

LOG_HALF = math.log(0.5)

# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    config = LongCoTConfig()
    assert config.response_confidence == "min"
    assert config.repeats_by_score == (1, 1, 1, 2, 3)
    with pytest.raises(ValueError, match="response_confidence"):
        LongCoTConfig(response_confidence="max")
    with pytest.raises(ValueError, match="redundancy_review"):
        LongCoTConfig(redundancy_review=0.7, redundancy_max=0.6)
    with pytest.raises(ValueError, match="dedup_similarity"):
        LongCoTConfig(dedup_similarity=1.5)
    with pytest.raises(ValueError, match="max_paths_per_question"):
        LongCoTConfig(max_paths_per_question=0)
    with pytest.raises(ValueError, match="five integers"):
        LongCoTConfig(repeats_by_score=(1, 1, 2))
    with pytest.raises(ValueError, match="must not decrease"):
        LongCoTConfig(repeats_by_score=(3, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        LongCoTConfig(keep_probability_by_score=(0.0, 0.5, 1.0, 1.0, 1.0))
    with pytest.raises(AttributeError):
        config.min_process_score = 0.1  # frozen


# ----------------------------------------------------------------------------------------- confidences


def test_step_confidence_is_the_geometric_mean_probability():
    assert step_confidences([LOG_HALF, LOG_HALF], [(0, 2)]) == pytest.approx([0.5])
    # p = 0.25 and 1.0: geometric mean 0.5 (the arithmetic mean would be 0.625).
    assert step_confidences([math.log(0.25), 0.0], [(0, 2)]) == pytest.approx([0.5])
    logprobs = [LOG_HALF, LOG_HALF, math.log(0.9), math.log(0.1), math.log(0.1)]
    assert step_confidences(logprobs, [(0, 2), (2, 3), (3, 5)]) == pytest.approx([0.5, 0.9, 0.1])
    assert step_confidences([-math.inf, 0.0], [(0, 2)]) == [0.0]


def test_step_confidence_rejects_bad_input():
    with pytest.raises(ValueError, match="log probability"):
        step_confidences([0.5], [(0, 1)])
    with pytest.raises(ValueError, match="log probability"):
        step_confidences([math.nan], [(0, 1)])
    with pytest.raises(ValueError, match="empty or outside"):
        step_confidences([LOG_HALF], [(1, 1)])
    with pytest.raises(ValueError, match="empty or outside"):
        step_confidences([LOG_HALF], [(0, 2)])


def test_response_confidence_min_or_mean():
    assert response_confidence([0.9, 0.5, 0.7]) == 0.5
    assert response_confidence([0.9, 0.5, 0.7], "mean") == pytest.approx(0.7)
    with pytest.raises(ValueError):
        response_confidence([])
    with pytest.raises(ValueError):
        response_confidence([0.5], "max")


def test_split_steps_on_blank_lines_step_markers_and_tags():
    text = (
        "<think>Step 1: read the chart.\nStep 2: add 3 and 4.\n\nSo the total is 7.\n"
        "It checks out.</think>\n<answer>7</answer>"
    )
    steps = [text[a:b] for a, b in split_steps(text)]
    assert steps == [
        "Step 1: read the chart.",
        "Step 2: add 3 and 4.",
        "So the total is 7.\nIt checks out.",  # one paragraph, no marker: one step
        "7",
    ]
    markers = "**Step 1** x\n### Step 2 y\n- step 3 z"
    assert [markers[a:b] for a, b in split_steps(markers)] == [
        "**Step 1** x",
        "### Step 2 y",
        "- step 3 z",
    ]
    assert split_steps("  \n\n ") == []
    assert split_steps("one step") == [(0, 8)]


def test_token_ranges_assign_each_token_to_the_step_it_overlaps_most():
    text = "ab cd\n\nef"
    spans = split_steps(text)
    assert spans == [(0, 5), (7, 9)]
    # tokens: "ab", " cd", "\n\ne" (straddles: 2 chars of gap, 1 of step 2), "f"
    offsets = [(0, 2), (2, 5), (5, 8), (8, 9)]
    assert token_ranges(offsets, spans) == [(0, 2), (2, 4)]
    # a span no token covers gets an empty range
    assert token_ranges([(0, 2)], [(0, 2), (5, 6)]) == [(0, 1), (1, 1)]


def test_path_confidence_from_literal_tokens():
    text = "<think>Step 1: half.\nStep 2: sure.</think><answer>7</answer>"
    offsets = [(m.start(), m.end()) for m in re.finditer(r"<[^>]+>|[^\s<]+|\s+", text)]
    tokens = [text[a:b] for a, b in offsets]
    probs = {"half.": 0.25, "sure.": 1.0, "7": 0.8}
    logprobs = [math.log(probs.get(tok, 1.0)) for tok in tokens]
    result = path_confidence(text, logprobs, offsets)
    assert [text[a:b] for a, b in result.step_spans] == ["Step 1: half.", "Step 2: sure.", "7"]
    # step 1 is "Step", " ", "1:", " ", "half." → (0.25)^(1/5)
    assert result.step_confidences == pytest.approx([0.25**0.2, 1.0, 0.8])
    assert result.response == pytest.approx(0.25**0.2)  # min
    mean = path_confidence(text, logprobs, offsets, LongCoTConfig(response_confidence="mean"))
    assert mean.response == pytest.approx((0.25**0.2 + 1.0 + 0.8) / 3)
    with pytest.raises(ValueError, match="token offsets"):
        path_confidence(text, logprobs[:-1], offsets)


def test_path_confidence_with_the_shipped_tokenizer_offsets():
    from keyeflow.model.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = (
        "<think>Step 1: read the chart.\nStep 2: add 3 and 4.\n\nSo the total is 7.</think><answer>7</answer>"
    )
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    logprobs = [LOG_HALF] * len(offsets)
    result = path_confidence(text, logprobs, offsets)
    assert [text[a:b] for a, b in result.step_spans] == [
        "Step 1: read the chart.",
        "Step 2: add 3 and 4.",
        "So the total is 7.",
        "7",
    ]
    assert result.step_confidences == pytest.approx([0.5] * 4)


# ------------------------------------------------------------------------------------------- selection


def _path(qid: str, text: str, correct: bool = True, confidence: float = 0.5) -> ReasoningPath:
    return ReasoningPath(qid, text, correct, confidence)


def test_text_similarity_is_jaccard_of_word_trigrams():
    assert text_similarity("a b c d", "a b c d") == 1.0
    # trigrams {abc, bcd} vs {abc, bce}: 1 shared of 3
    assert text_similarity("a b c d", "a b c e") == pytest.approx(1 / 3)
    assert text_similarity("A, B  c", "a b C!") == 1.0  # case and punctuation ignored
    assert text_similarity("", "") == 1.0
    assert text_similarity("x y", "z") == 0.0


def test_select_paths_keeps_correct_confident_diverse_paths_up_to_k():
    base = "first add the two numbers then divide the sum by two to get the mean value"
    paths = [
        _path("q1", base, confidence=0.6),
        _path("q1", base + " here", confidence=0.9),  # near-duplicate of the more confident one below
        _path("q1", base.replace("first", "initially"), confidence=0.95),
        _path("q1", "count the apples in the picture one by one", correct=False, confidence=0.99),
        _path("q1", "the mean is the total over the count so compute both", confidence=0.7),
        _path("q1", "use the formula for the average of two values directly", confidence=0.3),
        _path("q2", "a different question entirely", confidence=0.4),
    ]
    selection = select_paths(paths, LongCoTConfig(max_paths_per_question=2, dedup_similarity=0.5))
    assert [p.confidence for p in selection.kept] == [0.95, 0.7, 0.4]
    reasons = {p.confidence: r for p, r in selection.dropped}
    assert reasons[0.99] == "answer wrong"
    assert reasons[0.9].startswith("near-duplicate of a kept path (similarity")
    assert reasons[0.6].startswith("near-duplicate")
    assert reasons[0.3] == "over the limit of 2 per question"
    assert len(selection.kept) + len(selection.dropped) == len(paths)


def test_select_paths_ties_keep_input_order_and_rejects_bad_confidence():
    paths = [_path("q", "alpha beta gamma"), _path("q", "delta epsilon zeta")]
    assert select_paths(paths).kept == paths
    with pytest.raises(ValueError, match="confidence"):
        select_paths([_path("q", "x", confidence=1.5)])


# --------------------------------------------------------------------------------------------- grading

GOOD = {"logical_consistency": 0.9, "factual_accuracy": 0.95, "relevance": 0.8}


@pytest.mark.parametrize(
    ("answer_ok", "scores", "redundancy", "grade_", "review"),
    [
        (True, GOOD, 0.1, "A", False),  # clean A
        (True, GOOD, 0.3, "A", True),  # borderline A: redundancy_review ≤ r < redundancy_max
        (True, GOOD, 0.59, "A", True),
        (True, GOOD, 0.6, "B", True),  # too redundant: a process flaw
        (True, {**GOOD, "factual_accuracy": 0.5}, 0.1, "B", True),
        (True, {**GOOD, "relevance": 0.7}, 0.1, "A", False),  # threshold itself passes
        (False, GOOD, 0.1, "C", False),
        (False, {**GOOD, "logical_consistency": 0.2}, 0.9, "C", False),
    ],
)
def test_grade_table(answer_ok, scores, redundancy, grade_, review):
    result = grade(answer_ok, scores, redundancy)
    assert (result.grade, result.needs_review) == (grade_, review)
    assert result.kept == (grade_ != "C")


def test_grade_reasons():
    assert grade(True, GOOD, 0.0) == GradeResult("A", False, ())
    flawed = grade(True, {**GOOD, "factual_accuracy": 0.5}, 0.65)
    assert flawed.reasons == ("process flawed", "factual_accuracy 0.5 < 0.7", "redundancy 0.65 ≥ 0.6")
    assert grade(True, GOOD, 0.4).reasons == ("borderline: redundancy 0.4 in [0.3, 0.6)",)
    wrong = grade(False, {**GOOD, "relevance": 0.1}, 0.0)
    assert wrong.reasons == ("answer wrong", "relevance 0.1 < 0.7")
    strict = LongCoTConfig(min_process_score=0.92)
    assert grade(True, GOOD, 0.0, strict).grade == "B"


def test_grade_rejects_bad_scores():
    with pytest.raises(ValueError, match="exactly"):
        grade(True, {"logical_consistency": 1.0}, 0.0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        grade(True, {**GOOD, "relevance": 1.2}, 0.0)
    with pytest.raises(ValueError, match="redundancy"):
        grade(True, GOOD, -0.1)


# ------------------------------------------------------------------------------------------ repetition


def test_repeats_and_keep_probability_by_score():
    assert [repeats_for_score(s) for s in range(1, 6)] == [1, 1, 1, 2, 3]
    assert [keep_probability(s) for s in range(1, 6)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    config = LongCoTConfig(repeats_by_score=(1, 1, 2, 4, 8))
    assert repeats_for_score(5, config) == 8
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="1..5"):
            repeats_for_score(bad)


def test_training_repeats_are_deterministic_and_sparse_for_low_scores():
    assert training_repeats("item-7", 5) == 3
    assert training_repeats("item-7", 4) == 2
    ids = [f"item-{i}" for i in range(2000)]
    low = Counter(training_repeats(i, 1) for i in ids)
    assert set(low) == {0, 1}
    assert low[1] / len(ids) == pytest.approx(0.25, abs=0.04)
    assert [training_repeats(i, 2) for i in ids] == [training_repeats(i, 2) for i in ids]  # rerun
    other_seed = LongCoTConfig(seed=1)
    assert [training_repeats(i, 1) for i in ids] != [training_repeats(i, 1, other_seed) for i in ids]
