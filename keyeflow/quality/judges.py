"""Process-level judges for LongCoT (SPEC §4.3.1 steps 3 and 5): per-step scores for logical consistency,
factual accuracy and relevance, a redundancy score per response, and the 1–5 dynamic quality score.

One interface, :class:`Judge`, with two methods that take a batch of :class:`JudgeInput` (the question,
its reference, the kinds of media it shows, the reasoning steps and the final answer):

- ``assess(items) -> list[ProcessAssessment]``: one :class:`StepScores` per step (each dimension in
  [0, 1]) and a redundancy in [0, 1]; :meth:`ProcessAssessment.process_scores` aggregates the steps into
  the three numbers :func:`longcot_scoring.grade` takes (the minimum over steps: a chain is as sound as its
  weakest step, the same choice as the response confidence).
- ``score(items) -> list[QualityScore]``: 1 (answerable without the image) … 5 (strongly multimodal
  reasoning).

Two implementations:

:class:`RuleJudge` — deterministic heuristics that run anywhere. They are heuristics, not understanding:
they catch the flaws that leave a trace in the text and miss the rest (a wrong fact stated in words, a
step that is relevant but wrong). What each one does:

- *factual accuracy*: every arithmetic claim written as ``a op b [op c …] = d`` (``+ - * / × ÷ x ·``,
  decimals, negative numbers) is recomputed; a false one scores the step 0 ("5 × 3 = 12 is false: 15").
  ``d`` may be rounded to the digits it shows. Unit conversions and words are not checked.
- *logical consistency*: a step that states a final claim ("the answer is X", "final answer: X",
  "the result is X") whose value is not the response's final answer (by
  :func:`graders.answers_equivalent`), or a last step that concludes ("therefore", "thus", "so", "hence",
  "in total") with a number that is not the final answer's number (units compared, so "1 km" agrees
  with "1000 m"), scores 0.
- *relevance*: a step scores 0 when none of its content words or numbers appears in the question, in the
  final answer, or among the numbers of earlier steps (intermediate results); 1 otherwise. A step with no
  content word at all ("Let me think.") is neutral (1). Content words: 3+ letters, not a stop word or a
  generic reasoning word (think, step, answer, therefore, …).
- *redundancy*: the share of the reasoning's sentences (of 3+ words) that repeat an earlier sentence
  (the same normalised text, or word-3-gram Jaccard similarity above 0.8; "Step k:" markers are not
  compared); a step whose sentences are
  all repeats, or that is itself a near-copy of an earlier step, is marked ``redundant``.
- *quality score*: 1 when the question shows no image or video, or when the reference answer is written
  in the question text (answerable without looking); otherwise 2 + the number of steps that refer to
  visual content (words such as image, chart, bar, frame, colour names, left/right, a box), capped at 4,
  and 5 when at least three steps and at least half of them do.

:class:`ModelJudge` — asks a generator (our model in process, or any OpenAI-compatible server) for a JSON
verdict, greedy, one request per item. Replies are parsed leniently (code fences and prose around the
JSON are ignored; the first JSON object with the expected keys is taken; numbers may be strings) but
validated strictly (one entry per step, every value in [0, 1], a score an integer 1–5). An item whose reply
cannot be used, or whose request fails, gets a :class:`JudgeFailure` in its place, with the reason: never
a stand-in verdict (the rule judge's would look like the model's judgement and hide a broken judge). The
caller sets the item aside and counts it (:mod:`keyeflow.quality.errors`). The judge sees the text only
(the media kinds are named in the prompt), so any server works. A question that shows no media scores 1
without asking the model (nothing to look at), by the rule judge's ``score_one``.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from keyeflow.quality.graders import answers_equivalent, normalize_text
from keyeflow.quality.longcot_scoring import PROCESS_DIMENSIONS, text_similarity

if TYPE_CHECKING:
    from keyeflow.model.generation import Generator

RULE = "rule"
MODEL = "model"

# ============================================================================================ records


@dataclass(frozen=True)
class JudgeInput:
    """What a judge sees of one response."""

    question: str
    reference: str
    steps: tuple[str, ...]  # the reasoning steps, in order (longcot_scoring.split_steps of the <think> part)
    answer: str  # the final answer (graders.extract_answer)
    media: tuple[str, ...] = ()  # kinds of the media the question shows: "image", "video"


@dataclass(frozen=True)
class StepScores:
    logical_consistency: float
    factual_accuracy: float
    relevance: float
    redundant: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "logical_consistency": self.logical_consistency,
            "factual_accuracy": self.factual_accuracy,
            "relevance": self.relevance,
            "redundant": self.redundant,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ProcessAssessment:
    steps: tuple[StepScores, ...]
    redundancy: float
    judge: str  # "rule" or "model"
    notes: tuple[str, ...] = ()

    def process_scores(self) -> dict[str, float]:
        """Per dimension, the minimum over the steps; all 0 when there is no reasoning step at all."""
        if not self.steps:
            return {name: 0.0 for name in PROCESS_DIMENSIONS}
        return {name: min(getattr(s, name) for s in self.steps) for name in PROCESS_DIMENSIONS}

    def all_notes(self) -> list[str]:
        """The response's notes, then each step's, prefixed with its number."""
        out = list(self.notes)
        for k, step in enumerate(self.steps, start=1):
            out += [f"step {k}: {note}" for note in step.notes]
        return out


@dataclass(frozen=True)
class QualityScore:
    score: int  # 1..5
    judge: str
    reason: str


@dataclass(frozen=True)
class JudgeFailure:
    """A judge gave no usable verdict for one item: why (the request's error, or what is wrong with the
    reply)."""

    reason: str
    judge: str = MODEL


@runtime_checkable
class Judge(Protocol):
    name: str

    def assess(self, items: Sequence[JudgeInput]) -> list[ProcessAssessment | JudgeFailure]:
        """Per item, per-step process scores and the response's redundancy, or why there are none."""
        ...

    def score(self, items: Sequence[JudgeInput]) -> list[QualityScore | JudgeFailure]:
        """Per item, the 1–5 dynamic quality score, or why there is none."""
        ...


# ============================================================================================ words


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


_STOP_WORDS = _word_set(
    """the and for are but not you all any can had her was one our out has his how its may new now old see
    two way who did get let put say she too use that this with from they have were been will what when
    where which their there then than them these those into onto also such only very more most much many
    some each both just over under after before about above below between while would could should shall
    does done doing being because since until upon within without again once here your yours ours itself
    whose whom why per via yes okay well like make makes made take takes took give gives gave need needs
    think thinks thought step steps answer answers question questions therefore thus hence so first
    second third next last finally final result results look looks find finds found know knows check
    checks compute computes computed calculate calculates calculated given means mean equal equals
    total totals value values number numbers get gets got let's now sure clearly simply just"""
)
_VISUAL_WORDS = _word_set(
    """image images picture pictures photo photos figure figures chart charts graph graphs plot plots
    diagram diagrams bar bars axis axes legend frame frames video videos clip clips scene scenes shot
    shots screenshot screen screens button buttons icon icons menu sidebar window windows page pages
    document documents title titles heading label labels row rows column columns table tables cell
    cells shape shapes circle circles square squares triangle triangles rectangle rectangles hexagon
    pentagon polygon line lines dot dots left right top bottom corner centre center middle colour
    colours color colors red green blue yellow black white orange purple grey gray pink brown lime
    shown shows visible seen appears appear displayed drawn depicted box boxes region pixel pixels
    coordinates background foreground"""
)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+(?:[.,]\d+)*")
_NUMBER_TOKEN = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def _number(token: str) -> str | None:
    """A canonical form of a number token ("1,000" → "1000", "0.50" → "0.5"); None if not a number."""
    if not _NUMBER_TOKEN.fullmatch(token):
        return None
    value = float(token.replace(",", ""))
    return f"{value:.10g}"


def content_terms(text: str) -> set[str]:
    """Lower-cased content words (3+ letters, no stop/reasoning words) and canonical numbers of ``text``."""
    terms = set()
    for token in _WORD.findall(text.casefold()):
        number = _number(token)
        if number is not None:
            terms.add(number)
        elif len(token) >= 3 and token not in _STOP_WORDS:
            terms.add(token.removesuffix("'s"))
    return terms


def _numbers(text: str) -> set[str]:
    return {n for n in (_number(t) for t in _NUMBER_TOKEN.findall(text)) if n is not None}


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


# ====================================================================================== rule heuristics

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUM = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_OP = r"[-+*/×÷x·]"
_EQUATION = re.compile(rf"(?<![\w.])({_NUM}(?:\s*{_OP}\s*{_NUM})+)\s*=\s*({_NUM})(?![.,]?\d)")


def _evaluate(expression: str) -> float | None:
    """The value of a plain arithmetic expression (numbers and + - * /), None if it is not one."""
    expr = expression.replace("×", "*").replace("÷", "/").replace("·", "*").replace(",", "")
    expr = re.sub(r"(?<=\d)\s*x\s*(?=-?\d)", "*", expr)
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not plain arithmetic")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def arithmetic_errors(text: str) -> list[str]:
    """Every false ``a op b = c`` claim in ``text``, described ("5 × 3 = 12 is false: 15")."""
    errors = []
    for m in _EQUATION.finditer(text):
        left, right = m.group(1), m.group(2)
        value = _evaluate(left)
        if value is None:
            continue
        claimed = float(right.replace(",", ""))
        digits = len(right.split(".")[1]) if "." in right else 0
        if math.isclose(value, claimed, rel_tol=1e-9, abs_tol=1e-9):
            continue
        if digits and math.isclose(round(value, digits), claimed, abs_tol=10.0 ** -(digits + 3)):
            continue  # rounded to the digits shown
        if not digits and abs(value - claimed) < 0.5 and abs(value) >= 10:
            continue  # a rounded whole number ("1000 / 3 = 333")
        errors.append(f"{m.group(0).strip()} is false: {value:.10g}")
    return errors


_FINAL_CLAIM = re.compile(
    r"(?:\bfinal answer\b|\bthe answer\b|\banswer\b|\bthe result\b)\s*(?:is|=|:)\s*"
    r"(.+?)\s*(?=[.;!](?:\s|$)|\n|$)",
    re.IGNORECASE,
)
_VAGUE = _word_set("clear obvious simple easy below above shown following given unknown")
_CONCLUSION = re.compile(r"\b(?:therefore|thus|hence|so|in total|altogether)\b", re.IGNORECASE)
_QUANTITY = re.compile(rf"({_NUM}(?:\s*/\s*{_NUM})?)(\s*(?:%|[A-Za-z°]+(?:/[A-Za-z]+)?))?")


def _answers_agree(claim: str, answer: str) -> bool:
    return bool(answers_equivalent(claim.strip(" *"), answer, rel_tol=1e-3))


def _is_value(claim: str, answer: str) -> bool:
    """Whether a stated claim reads as a value to compare with the answer, not a phrase ("in the chart")."""
    if re.search(r"\d", claim):
        return bool(re.search(r"\d", answer))
    words = claim.casefold().strip(" *").split()
    return (
        1 <= len(words) <= 2 and words[0] not in _STOP_WORDS | _VAGUE and words[0] not in ("in", "on", "at")
    )


def contradictions(step: str, answer: str, is_last: bool) -> list[str]:
    """Why ``step`` contradicts the final ``answer`` (empty when it does not, or cannot be told)."""
    if not answer.strip():
        return []
    found = []
    for m in _FINAL_CLAIM.finditer(step):
        claim = m.group(1).strip(" *")
        if claim and _is_value(claim, answer) and not _answers_agree(claim, answer):
            found.append(f"states the answer is {claim!r} but the final answer is {answer!r}")
    if found or not is_last:
        return found
    answer_numbers = _numbers(answer)
    if not answer_numbers:
        return []
    last_sentence = (sentences(step) or [""])[-1]
    if not _CONCLUSION.search(last_sentence):
        return []
    quantities = list(_QUANTITY.finditer(last_sentence))
    if not quantities:
        return []
    last = quantities[-1].group(0).strip()
    if _answers_agree(last, answer) or _answers_agree(quantities[-1].group(1), answer):
        return []
    return [f"concludes {last!r} but the final answer is {answer!r}"]


_STEP_MARKER = re.compile(r"^\s*(?:#+\s*|[*_]{1,2})?step\s*\d+\s*(?:[*_]{1,2})?\s*[:.)-]?\s*", re.IGNORECASE)


def _redundancy(steps: Sequence[str]) -> tuple[float, list[bool]]:
    """(share of repeated sentences, per step: is it a repeat). "Step k:" markers are not compared."""
    steps = [_STEP_MARKER.sub("", step) for step in steps]
    seen: list[str] = []
    normalised_seen: set[str] = set()
    total = repeated = 0
    step_flags = []
    for k, step in enumerate(steps):
        step_total = step_repeated = 0
        for sentence in sentences(step):
            if len(sentence.split()) < 3:
                continue
            total += 1
            step_total += 1
            norm = normalize_text(sentence)
            if norm in normalised_seen or any(text_similarity(sentence, s) > 0.8 for s in seen):
                repeated += 1
                step_repeated += 1
            normalised_seen.add(norm)
            seen.append(sentence)
        copies_earlier = any(text_similarity(step, earlier) > 0.8 for earlier in steps[:k])
        step_flags.append(copies_earlier or (step_total > 0 and step_repeated == step_total))
    return (repeated / total if total else 0.0), step_flags


def _visual(step: str) -> bool:
    if "<|box_start|>" in step or re.search(r"\[\[\s*\d", step):
        return True
    return bool(set(re.findall(r"[a-z]+", step.casefold())) & _VISUAL_WORDS)


def _in_text(needle: str, haystack: str) -> bool:
    needle, haystack = normalize_text(needle), normalize_text(haystack)
    return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


class RuleJudge:
    """Deterministic heuristics (module docstring); no model, no randomness."""

    name = RULE

    def assess(self, items: Sequence[JudgeInput]) -> list[ProcessAssessment]:
        return [self.assess_one(item) for item in items]

    def assess_one(self, item: JudgeInput, judge: str = RULE, notes: Sequence[str] = ()) -> ProcessAssessment:
        steps = list(item.steps)
        notes = list(notes)
        if not steps:
            notes.append("no reasoning steps")
        redundancy, redundant = _redundancy(steps)
        context = content_terms(item.question) | content_terms(item.answer)
        earlier_numbers: set[str] = set()
        scored = []
        for k, step in enumerate(steps):
            step_notes = []
            errors = arithmetic_errors(step)
            step_notes += errors
            clashes = contradictions(step, item.answer, is_last=k == len(steps) - 1)
            step_notes += clashes
            terms = content_terms(step)
            if not terms or terms & (context | earlier_numbers):  # nothing to judge, or on topic
                relevance = 1.0
            else:
                relevance = 0.0
                step_notes.append("shares no word or number with the question, the answer or earlier results")
            if redundant[k]:
                step_notes.append("repeats earlier content")
            scored.append(
                StepScores(
                    0.0 if clashes else 1.0,
                    0.0 if errors else 1.0,
                    relevance,
                    redundant[k],
                    tuple(step_notes),
                )
            )
            earlier_numbers |= _numbers(step)
        return ProcessAssessment(tuple(scored), round(redundancy, 6), judge, tuple(notes))

    def score(self, items: Sequence[JudgeInput]) -> list[QualityScore]:
        return [self.score_one(item) for item in items]

    def score_one(self, item: JudgeInput, judge: str = RULE) -> QualityScore:
        if not item.media:
            return QualityScore(1, judge, "no image or video: answerable from the text")
        if _in_text(item.reference, item.question):
            return QualityScore(1, judge, f"the answer {item.reference!r} is written in the question")
        visual = sum(_visual(step) for step in item.steps)
        if visual >= 3 and visual * 2 >= len(item.steps):
            score = 5
        else:
            score = 2 + min(visual, 2)
        return QualityScore(score, judge, f"{visual} of {len(item.steps)} steps refer to the visual content")


# ========================================================================================= model judge

ASSESS_PROMPT = """You grade the reasoning of a response to a question, step by step.

Question: {question}
{media}Reference answer: {reference}
Reasoning steps:
{steps}
Final answer: {answer}

For every step give three scores in [0, 1]: logical_consistency (follows from the earlier steps and agrees
with the final answer), factual_accuracy (every stated fact and calculation is right) and relevance (it
helps answer the question). Give one redundancy score in [0, 1] for the whole response (0: nothing
repeated, 1: mostly repetition). Reply with JSON only, one entry per step, in order:
{{"steps": [{{"step": 1, "logical_consistency": 1.0, "factual_accuracy": 1.0, "relevance": 1.0}}], "redundancy": 0.0}}"""  # noqa: E501

SCORE_PROMPT = """Rate how much answering this question needs its {media_kinds}, from 1 to 5.
1: answerable without looking at it; 2: it helps a little; 3: needed for one fact; 4: needed for several
steps; 5: strongly multimodal reasoning throughout.

Question: {question}
Reasoning steps:
{steps}
Final answer: {answer}

Reply with JSON only: {{"score": 3}}"""

_ALIASES = {
    "logical_consistency": ("logical_consistency", "logic", "logical", "consistency"),
    "factual_accuracy": ("factual_accuracy", "factual", "accuracy", "facts"),
    "relevance": ("relevance", "relevant"),
}


def _json_objects(text: str) -> list[object]:
    """Every JSON value that starts at a ``{`` of ``text`` (code fences and prose around are ignored)."""
    decoder = json.JSONDecoder()
    found = []
    for m in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        found.append(value)
    return found


# An unusable reply is a ValueError whatever is wrong with it (a wrong type included): callers catch one
# exception and record the item as failed.
def _unit_number(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} is a boolean, not a number")  # noqa: TRY004
    try:
        number = float(value)  # numbers, or numbers written as strings
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f"{what} = {number:g} is outside [0, 1]")
    return number


def parse_assessment(reply: str, num_steps: int) -> ProcessAssessment:
    """A model's JSON verdict as a :class:`ProcessAssessment`; ValueError saying why it cannot be used."""
    candidates = [v for v in _json_objects(reply) if isinstance(v, dict) and "steps" in v]
    if not candidates:
        raise ValueError(f"no JSON object with 'steps' in the reply ({reply[:80]!r})")
    verdict = candidates[0]
    steps = verdict["steps"]
    if not isinstance(steps, list):
        raise ValueError("'steps' is not a list")  # noqa: TRY004
    if len(steps) != num_steps:
        raise ValueError(f"{len(steps)} step verdicts for {num_steps} steps")
    scored = []
    for k, entry in enumerate(steps, start=1):
        if not isinstance(entry, dict):
            raise ValueError(f"step {k}: not an object")  # noqa: TRY004
        values = {}
        for name, aliases in _ALIASES.items():
            key = next((a for a in aliases if a in entry), None)
            if key is None:
                raise ValueError(f"step {k}: no {name}")
            values[name] = _unit_number(entry[key], f"step {k} {name}")
        scored.append(StepScores(**values))
    if "redundancy" not in verdict:
        raise ValueError("no redundancy")
    redundancy = _unit_number(verdict["redundancy"], "redundancy")
    return ProcessAssessment(tuple(scored), redundancy, MODEL)


def parse_score(reply: str) -> int:
    """A model's 1–5 quality score (``{"score": n}``); ValueError saying why it cannot be used."""
    candidates = [v for v in _json_objects(reply) if isinstance(v, dict) and "score" in v]
    if not candidates:
        raise ValueError(f"no JSON object with 'score' in the reply ({reply[:80]!r})")
    raw = candidates[0]["score"]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"score is not a number: {raw!r}") from None
    if isinstance(raw, bool) or value != int(value) or not 1 <= value <= 5:
        raise ValueError(f"score {raw!r} is not an integer from 1 to 5")
    return int(value)


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:200]


def _numbered(steps: Sequence[str]) -> str:
    return "\n".join(f"[{k}] {step}" for k, step in enumerate(steps, start=1)) or "(none)"


@dataclass
class ModelJudge:
    """A judge that asks ``generator`` (module docstring); an item whose reply is unusable, or whose request
    failed, gets a :class:`JudgeFailure`. ``rules`` scores the questions that show no media (no model
    needed)."""

    generator: Generator
    max_new_tokens: int = 256
    seed: int = 0
    rules: RuleJudge = field(default_factory=RuleJudge)
    name: str = MODEL

    def _ask(self, prompts: list[str]) -> list[str | Exception]:
        """Per prompt, the reply or the error its request failed with (that item fails; the others keep
        their replies)."""
        from keyeflow.model.generation import BatchGenerationError

        batch = [[{"role": "user", "content": p}] for p in prompts]
        try:
            out = self.generator.generate(
                batch,
                n=1,
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
                seed=self.seed,
                logprobs=False,
            )
        except BatchGenerationError as error:
            return [r if isinstance(r, Exception) else r[0].text for r in error.results]
        except (RuntimeError, ValueError, OSError) as error:  # a server error, a prompt too long, …
            return [error] * len(prompts)
        return [group[0].text for group in out]

    def assess(self, items: Sequence[JudgeInput]) -> list[ProcessAssessment | JudgeFailure]:
        if not items:
            return []
        prompts = [
            ASSESS_PROMPT.format(
                question=item.question, reference=item.reference, steps=_numbered(item.steps),
                answer=item.answer,
                media=f"(The question shows: {', '.join(item.media)}.)\n" if item.media else "",
            )
            for item in items
        ]  # fmt: skip
        replies = self._ask(prompts)
        out: list[ProcessAssessment | JudgeFailure] = []
        for item, reply in zip(items, replies):
            if isinstance(reply, Exception):
                out.append(JudgeFailure(f"model judge request failed ({_failure(reply)})"))
                continue
            try:
                out.append(parse_assessment(reply, len(item.steps)))
            except ValueError as error:
                out.append(JudgeFailure(f"model judge reply unusable ({error})"))
        return out

    def score(self, items: Sequence[JudgeInput]) -> list[QualityScore | JudgeFailure]:
        if not items:
            return []
        out: list[QualityScore | JudgeFailure | None] = [None] * len(items)
        asked = [k for k, item in enumerate(items) if item.media]
        for k, item in enumerate(items):
            if not item.media:  # nothing to look at: no model needed to say so
                out[k] = self.rules.score_one(item)
        prompts = [
            SCORE_PROMPT.format(media_kinds=" and ".join(items[k].media), question=items[k].question,
                                steps=_numbered(items[k].steps), answer=items[k].answer)
            for k in asked
        ]  # fmt: skip
        replies = self._ask(prompts) if prompts else []
        for j, k in enumerate(asked):
            if isinstance(replies[j], Exception):
                out[k] = JudgeFailure(f"model judge request failed ({_failure(replies[j])})")
                continue
            try:
                out[k] = QualityScore(parse_score(replies[j]), MODEL, "model judge")
            except ValueError as error:
                out[k] = JudgeFailure(f"model judge reply unusable ({error})")
        return [s for s in out if s is not None]
