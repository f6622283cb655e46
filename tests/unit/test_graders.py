"""Answer-level graders and rule-based rewards on literal answers with known verdicts."""

from __future__ import annotations

import threading
import time

import pytest

from keyeflow.quality import graders
from keyeflow.quality.graders import (
    Verdict,
    answers_equivalent,
    counting_reward,
    extract_answer,
    format_problem,
    format_reward,
    grounding_iou,
    iou_reward,
    math_reward,
    multiple_choice_reward,
    normalize_text,
    parse_box,
    parse_choice,
    parse_count,
    parse_number_words,
)

# ----------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("<think>3 + 4 = 7</think><answer>7</answer>", "7"),
        ("<answer>first</answer> then <answer> second </answer>", "second"),
        ("<think>reasoning</think><answer>unclosed 9", "unclosed 9"),
        ("Adding them up.\nThe answer is 7.\nDone.", "7"),
        ("So the final answer is:\n\n**12**", "12"),
        ("Answer: (C)", "(C)"),
        ("Hence the answer is \\boxed{5}.", "5"),
        ("We get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
        ("first line\nlast line\n\n", "last line"),
        ("", ""),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


# ----------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("pred", "ref", "method"),
    [
        # fractions: unicode vulgar, slash, decimal, LaTeX, mixed numbers
        ("½", "0.5", "number"),
        ("0.5", "1/2", "number"),
        ("½", "1/2", "text"),  # NFKC + the fraction slash make these the same text
        ("\\frac{1}{2}", "0.5", "number"),
        ("\\dfrac12", "1/2", "number"),
        ("1½", "1.5", "number"),
        ("1 1/2", "3/2", "number"),
        # number notations
        ("1,000", "1000", "number"),
        ("1.5e3", "1500", "number"),
        ("1.5 × 10^3", "1500", "number"),
        ("2 \\times 10^{3}", "2000", "number"),
        ("three", "3", "number"),
        ("twenty-one", "21", "number"),
        ("$42$", "42", "text"),
        ("x = 5", "5", "number"),
        ("2^10", "1024", "number"),
        # closed forms and tolerance: π to 5 decimals is within rel_tol=1e-4
        ("3.14159", "π", "number"),
        ("3.14159", "\\pi", "number"),
        ("\\frac{\\sqrt{2}}{2}", "0.70711", "number"),
        ("2\\sqrt{2}", "\\sqrt{8}", "number"),
        ("\\sqrt[3]{8}", "2", "number"),
        # percentages: one-sided % accepted as ×1/100 or as an omitted label
        ("50%", "0.5", "percent"),
        ("0.5", "50%", "percent"),
        ("50", "50%", "percent"),
        ("50 percent", "50\\%", "percent"),
        # units
        ("1000 m", "1 km", "quantity"),
        ("1 km", "1000 m", "quantity"),
        ("100 cm", "1 meter", "quantity"),
        ("2.5 kilograms", "2500 g", "quantity"),
        ("1 mile", "1609.344 m", "quantity"),
        ("9.8 m/s^2", "980 cm/s^2", "quantity"),
        ("36 km/h", "10 m/s", "quantity"),
        ("2 m²", "20000 cm^2", "quantity"),
        ("1.5 h", "90 min", "quantity"),
        ("25 °C", "298.15 K", "quantity"),
        ("77 °F", "25 degrees Celsius", "quantity"),
        ("90°", "\\pi/2 rad", "quantity"),
        ("$5", "5 dollars", "quantity"),
        ("About 5 seconds", "5 s", "quantity"),
        ("1000", "1000 m", "quantity"),  # unit omitted: read in the reference's unit
        ("5 apples", "5", "quantity"),
        # formulas
        ("(x+1)^2", "x^2+2x+1", "formula"),
        ("x^2+2x+1", "(x+1)^2", "formula"),
        ("\\frac{x}{2}", "x/2", "formula"),
        ("2x", "x+x", "formula"),
        ("\\left(x+1\\right)\\cdot(x-1)", "x^2 - 1", "formula"),
        ("sin(x)^2 + cos(x)^2", "1", "formula"),
        ("\\sin^2 x + \\cos^2 x", "1", "formula"),
        ("e^{x^2}", "exp(x^2)", "formula"),
        ("y = 2x + 1", "2x - y + 1 = 0", "formula"),
        ("2y = 4x + 2", "y = 2x + 1", "formula"),
        ("∞", "\\infty", "formula"),
        # multiple choice
        ("(b) the red one", "B", "choice"),
        ("B", "(b) the red one", "choice"),
        ("Option B: the red one", "B", "choice"),
        ("B.", "(B)", "choice"),
        ("The answer is (C)", "C", "choice"),
        ("the red one", "(B) the red one", "choice"),
        # yes / no
        ("Yes", "true", "yes_no"),
        ("No, it is silent.", "no", "yes_no"),
        ("correct", "Yes", "yes_no"),
        # lists and text
        ("(1, 2)", "(1,2)", "sequence"),
        ("(0.5, 3)", "(1/2, three)", "sequence"),
        ("\\{1, 2\\}", "{2,1}", "sequence"),  # sets in any order
        ("3 kWh", "3000 Wh", "quantity"),
        ("The Eiffel Tower!", "eiffel tower", "text"),
        ("Ｐａｒｉｓ", "paris", "text"),  # full-width letters, NFKC
    ],
)
def test_equivalent_answers(pred, ref, method):
    verdict = answers_equivalent(pred, ref)
    assert verdict.equal, verdict
    assert verdict.method == method, verdict
    assert bool(verdict)


@pytest.mark.parametrize(
    ("pred", "ref", "reason"),
    [
        ("0.5", "0.6", "numbers differ: 0.5 vs 0.6"),
        ("3.14", "π", "numbers differ: 3.14 vs 3.141592654"),  # relative gap 5e-4 > rel_tol
        ("0.333", "1/3", "numbers differ"),
        ("-5", "5", "numbers differ: -5 vs 5"),
        ("1 km", "1 kg", "units differ in dimension: length vs mass"),
        ("5 s", "5 m", "units differ in dimension: time vs length"),
        ("10 m/s", "10 m", "units differ in dimension: speed vs length"),
        ("1 km", "900 m", "quantities differ: 1 km vs 900 m"),
        ("5 apples", "5 oranges", "labels differ: 'apple' vs 'orange'"),
        ("0.6", "50%", "numbers differ"),
        ("50%", "5 m", "units differ"),
        ("x-5", "x+5", "formulas differ"),
        ("x^2", "y^2", "formulas differ"),
        ("(x+1)^2", "x^2+1", "formulas differ"),
        ("y = 2x + 1", "y = 2x", "equations differ"),
        ("x = 5", "x^2 = 25", "equations differ"),
        ("A", "B", "options differ: A vs B"),
        ("(c) the blue one", "(b) the red one", "options differ: C vs B"),
        ("a cat", "A", "no option letter"),
        ("the blue one", "(B) the red one", "no option letter"),
        ("yes", "no", "yes vs no"),
        ("maybe", "yes", "expected yes/no"),
        ("(1, 2)", "[1, 2]", "brackets differ"),
        ("(2, 1)", "(1, 2)", "item 1 differs: numbers differ: 2 vs 1"),
        ("(1, 2, 3)", "(1, 2)", "different number of items: 3 vs 2"),
        ("{1, 3}", "{1, 2}", "set item '3' not in the reference"),
        ("Paris", "London", "texts differ: 'paris' vs 'london'"),
        ("5!", "5", "texts differ"),
        ("", "5", "empty prediction"),
        # a number followed by an article only (sampled by the tiny policy) is a bare number, not a crash
        ("5 the", "6", "numbers differ: 5 vs 6"),
        ("6", "5 an", "numbers differ: 6 vs 5"),
    ],
)
def test_different_answers_say_why(pred, ref, reason):
    verdict = answers_equivalent(pred, ref)
    assert not verdict.equal, verdict
    assert reason in verdict.reason, verdict


def test_tolerances_are_parameters():
    assert answers_equivalent("3.14", "π", rel_tol=1e-3).equal
    assert not answers_equivalent("100.5", "100", rel_tol=1e-4).equal
    assert answers_equivalent("100.5", "100", rel_tol=1e-2).equal
    assert answers_equivalent("1e-12", "0", abs_tol=1e-9).equal
    assert not answers_equivalent("1e-6", "0", abs_tol=1e-9).equal


@pytest.mark.parametrize("pathological", ["9^9^9^9", "10^10^10", "(10^1000)^1000", "2^99999999", "x" * 500])
def test_pathological_formulas_are_refused_quickly(pathological):
    start = time.perf_counter()
    verdict = answers_equivalent(pathological, "1")
    assert not verdict.equal
    assert time.perf_counter() - start < 2.0


def test_formula_check_gives_up_after_the_timeout(monkeypatch):
    # Stand in for a comparison sympy never finishes: the caller gets its verdict after timeout_s.
    monkeypatch.setattr(graders, "_compare_formula_trees", lambda *args: time.sleep(5))
    start = time.perf_counter()
    verdict = answers_equivalent("(x+1)^3", "x^3+3x^2+3x+1", timeout_s=0.2)
    assert verdict == Verdict(False, "formula check timed out after 0.2 s", "formula")
    assert time.perf_counter() - start < 1.0


def test_works_off_the_main_thread():
    # Prefect runs tasks in worker threads, where SIGALRM-based timeouts would not work.
    out: list[Verdict] = []
    worker = threading.Thread(target=lambda: out.append(answers_equivalent("(x+1)^2", "x^2+2x+1")))
    worker.start()
    worker.join()
    assert out[0].equal


def test_normalize_text_keeps_operators_and_numbers():
    assert normalize_text("The  Eiffel\u00a0Tower.") == "eiffel tower"
    assert normalize_text("1,000.5") == "1,000.5"
    assert normalize_text("x-5") != normalize_text("x+5")
    assert normalize_text("a + b") == "a + b"  # no article removal inside formulas


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("B", ("B", "")),
        ("(b)", ("B", "")),
        ("B.", ("B", "")),
        ("(b) the red one", ("B", "the red one")),
        ("Option B: red", ("B", "red")),
        ("The answer is (C).", ("C", "")),
        ("D) 16 cm", ("D", "16 cm")),
        ("a cat", None),
        ("The answer is a cat", None),
        ("K", None),  # letters A–J only
    ],
)
def test_parse_choice(text, choice):
    assert parse_choice(text) == choice


# ---------------------------------------------------------------------------------------------- rewards


def test_math_reward_reads_the_final_answer():
    assert math_reward("<think>2·½ = 1</think><answer>\\boxed{1}</answer>", "1.0") == 1.0
    assert math_reward("The answer is 1000 m.", "1 km") == 1.0
    assert math_reward("The answer is 1 kg.", "1 km") == 0.0


def test_multiple_choice_reward():
    assert multiple_choice_reward("<think>…</think><answer>(b) the red one</answer>", "B") == 1.0
    assert multiple_choice_reward("The answer is C.", "B") == 0.0
    options = {"A": "the blue one", "B": "the red one"}
    assert multiple_choice_reward("<answer>The red one</answer>", "B", options) == 1.0
    assert multiple_choice_reward("<answer>the green one</answer>", "B", options) == 0.0
    with pytest.raises(ValueError, match="not an option letter"):
        multiple_choice_reward("B", "red")


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("3", 3),
        ("three", 3),
        ("There are three apples.", 3),
        ("twenty-one", 21),
        ("one hundred and five", 105),
        ("1,234", 1234),
        ("3 cats and 2 dogs, 5 in total", 5),
        ("none", 0),
        (7, 7),
        ("3.5", None),
        ("-2", None),
        ("no idea", None),
    ],
)
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_number_words():
    assert parse_number_words("Three") == 3
    assert parse_number_words("two thousand and twenty-four") == 2024
    assert parse_number_words("three apples") is None


def test_counting_reward():
    assert counting_reward("<answer>three</answer>", 3) == 1.0
    assert counting_reward("I count them one by one.\nThe answer is 4.", "4") == 1.0
    assert counting_reward("<answer>5</answer>", "four") == 0.0
    with pytest.raises(ValueError, match="not a count"):
        counting_reward("3", "many")


# -------------------------------------------------------------------------------------------- grounding


def test_grounding_iou_of_literal_boxes():
    # 100×100 boxes overlapping by half: intersection 5000, union 15000.
    assert grounding_iou("<|box_start|>[[0,0,100,100]]<|box_end|>", [50, 0, 150, 100]) == pytest.approx(1 / 3)
    assert grounding_iou([[10, 10, 20, 20]], (10, 10, 20, 20)) == 1.0
    assert grounding_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    # A box inside another: 25 / 100.
    assert grounding_iou("[0, 0, 10, 10]", "[[0, 0, 5, 5]]") == pytest.approx(0.25)
    assert grounding_iou([5, 5, 5, 9], [5, 5, 5, 9]) == 0.0  # zero area


def test_parse_box():
    text = "the cup <|box_start|>[[12, 30, 400, 999]]<|box_end|> and <|box_start|>[[0,0,1,1]]<|box_end|>"
    assert parse_box(text) == (12, 30, 400, 999)  # the first box
    assert parse_box("(1.5, 2, 3, 4)") == (1.5, 2, 3, 4)  # plain lists may be pixels
    with pytest.raises(ValueError, match="not an integer in"):
        parse_box("<|box_start|>[[0,0,1000,10]]<|box_end|>")
    with pytest.raises(ValueError, match="not an integer in"):
        parse_box("<|box_start|>[[0,0,10.5,10]]<|box_end|>")
    with pytest.raises(ValueError, match="x2 < x1"):
        parse_box([10, 0, 5, 5])
    with pytest.raises(ValueError, match="no box"):
        parse_box("somewhere on the left")
    with pytest.raises(ValueError, match="four coordinates"):
        parse_box([1, 2, 3])


def test_iou_reward():
    ref = "<|box_start|>[[0,0,100,200]]<|box_end|>"
    inside = "<think>the cup is at the top</think><answer><|box_start|>[[0,0,100,100]]<|box_end|></answer>"
    assert iou_reward(inside, ref) == 1.0  # IoU 0.5 ≥ 0.5
    assert iou_reward(inside, ref, threshold=0.6) == 0.0
    assert iou_reward("<answer>no box here</answer>", ref) == 0.0
    assert iou_reward("<answer><|box_start|>[[0,0,2000,10]]<|box_end|></answer>", ref) == 0.0
    with pytest.raises(ValueError):
        iou_reward(inside, "not a box")


# ----------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("text", "mode", "reward"),
    [
        ("<think>3 + 4 = 7</think><answer>7</answer>", "think", 1.0),
        ("<think>\nreason\n</think>\n\n<answer>7</answer>\n", "think", 1.0),
        ("<think></think><answer>7</answer>", "think", 0.0),  # empty reasoning
        ("<think>r</think><answer> </answer>", "think", 0.0),  # empty answer
        ("<think>r</think>7", "think", 0.0),  # answer not in tags
        ("<answer>7</answer>", "think", 0.0),
        ("<think>a</think><think>b</think><answer>7</answer>", "think", 0.0),
        ("<think>r</think><answer>7</answer><answer>8</answer>", "think", 0.0),
        ("Sure: <think>r</think><answer>7</answer>", "think", 0.0),
        ("7", "no_think", 1.0),
        ("<answer>7</answer>", "no_think", 1.0),
        ("<think></think>7", "no_think", 1.0),  # empty pre-filled think block
        ("<think>\n\n</think>\n<answer>7</answer>", "no_think", 1.0),
        ("<think>r</think><answer>7</answer>", "no_think", 0.0),
        ("<think></think>", "no_think", 0.0),
        ("<answer>7", "no_think", 0.0),
        ("<think>r</think><answer>7</answer>", "auto_think", 1.0),
        ("7", "auto_think", 1.0),
        ("<think>r</think>7", "auto_think", 0.0),
    ],
)
def test_format_reward(text, mode, reward):
    assert format_reward(text, mode) == reward
    assert (format_problem(text, mode) is None) == (reward == 1.0)


def test_format_problem_says_why_and_rejects_unknown_modes():
    assert format_problem("<think></think><answer>7</answer>", "think") == "empty <think> block"
    assert "no_think" in format_problem("<think>r</think><answer>7</answer>", "no_think")
    with pytest.raises(ValueError, match="mode must be one of"):
        format_reward("7", "fast")


# ----------------------------------------------------------------------------------------- arithmetic claims


@pytest.mark.parametrize(
    ("text", "claims"),
    [
        ("6 × 7 = 42, and 2 + 2 = 5.", [("6 × 7 = 42", True), ("2 + 2 = 5", False)]),
        ("So 2 + 3 + 1 = 6 apples", [("2 + 3 + 1 = 6", True)]),
        ("2 + 3 × 4 = 14", [("2 + 3 × 4 = 14", True)]),  # × binds tighter
        ("2 + 3 * 4 = 20", [("2 + 3 * 4 = 20", False)]),
        ("3x5=15, 12 ÷ 4 = 3, 9 − 2 = 7, -2 - 3 = -5", [("3x5=15", True), ("12 ÷ 4 = 3", True),
                                                         ("9 − 2 = 7", True), ("-2 - 3 = -5", True)]),
        ("$3 \\times 4 = 12$", [("3 \\times 4 = 12", True)]),
        ("**2 + 2 = 4**", [("2 + 2 = 4", True)]),
        ("0.1 + 0.2 = 0.3", [("0.1 + 0.2 = 0.3", True)]),  # exact, not floating point
        ("10 / 3 = 3.33 but 10 / 3 = 3 is wrong", [("10 / 3 = 3.33", True), ("10 / 3 = 3", False)]),
        ("5 / 0 = 0", [("5 / 0 = 0", False)]),
        ("3 × 4 = 12 + 2 = 15", [("12 + 2 = 15", False)]),  # a running chain: the checkable step
        ("x = 2 + 2 = 4", [("2 + 2 = 4", True)]),
        ("6 × 7 = 48 xqzt, 6 × 7 = 42 x 1", [("6 × 7 = 48", False)]),  # "x 1" continues, "xqzt" does not
        # not checkable: a variable, power, bracket, unit or thousands separator attached
        ("x^2 + 3 = 7, 2x + 3 = 7, (2 + 3) × 4 = 20, 2 + 3 = 5x, 1,000 + 1 = 1,001, 1 + 1 = 2 = 3", []),
        ("x = 5; 2024-01-15; no sums here", []),
        ("", []),
        ("xqzt Ãĥ = + × ÷ 9" * 3, []),
    ],
)  # fmt: skip
def test_arithmetic_claims_are_found_and_evaluated(text, claims):
    assert graders.arithmetic_claims(text) == claims


def test_arithmetic_claims_never_raise_on_odd_text():
    assert graders.arithmetic_claims(None) == [] and graders.arithmetic_claims(42) == []
    huge = "9" * 5000  # past Python's int-from-string limit: no claim, no error
    assert graders.arithmetic_claims(f"{huge} × {huge} = 1 and 1 + 1 = 2") == [("1 + 1 = 2", True)]
    odd = "".join(chr(c) for c in range(0x20, 0x2200, 7)) + "1 + = 2 ++ 3 = = 5 // 0 = . -- 1"
    assert isinstance(graders.arithmetic_claims(odd), list)


@pytest.mark.parametrize(
    ("text", "number"),
    [("42", True), ("forty-two", True), ("x = 5", True), ("5 apples", True), ("1/2", True),
     ("Paris", False), ("B", False), ("(1, 2)", False), ("", False)],
)  # fmt: skip
def test_reads_as_number(text, number):
    assert graders.reads_as_number(text) is number
