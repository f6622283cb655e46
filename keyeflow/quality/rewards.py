"""Rewards for RL: verifiable answer rewards (GSPO), alignment rule rewards, and their weighted combination.

Every reward is a :class:`Reward`: a ``value`` in [0, 1] (1 = fully right) and a short ``reason`` for the
logs. The answer checks themselves live in :mod:`keyeflow.quality.graders` (the same ones LongCoT's
answer-level assessment uses); this module only picks the final answer, calls them and says why.

**Verifiable rewards** (SPEC §4, iterative general RL). The final answer (:func:`final_answer`) is
:func:`graders.extract_answer`: the last ``<answer>…</answer>``, else "the answer is …", else the last
``\\boxed{…}``, else the last line — the ``<think>…</think><answer>…</answer>`` format LongCoT writes —
read after an ``auto_think`` ``<analysis>`` block is dropped.

- ``math``: :func:`graders.answers_equivalent` (numbers, fractions, units, formulas, yes/no, text), so
  "½", "0.5" and "1/2" agree, and "1 km" agrees with "1000 m". Also the right check for short answers
  that are not maths; binary.
- ``choice``: the option letter; binary.
- ``count``: the last number of the answer, digits or words; binary.
- ``grounding``: box IoU with the reference. ``iou_continuous=False`` (default): 1 when IoU ≥
  ``iou_threshold`` (0.5, the usual detection cut and what LongCoT grades with), else 0.
  ``iou_continuous=True``: the IoU itself, a denser signal that still ranks a group's responses. The box
  is read from the ``<answer>`` block when there is one, else from the whole response (as
  :func:`graders.iou_reward` does); no readable box scores 0.

**Alignment rule rewards** (SPEC §4, alignment RL), each binary:

- format, per mode (:func:`mode_format_reward`): ``think`` and ``no_think`` are
  :func:`graders.format_problem` (``think``: one non-empty ``<think>`` then one non-empty ``<answer>``;
  ``no_think``: no reasoning, an empty ``<think></think>`` allowed). ``auto_think``: Keye's model decides
  for itself whether to reason. **UNSTATED** in SPEC (Keye-VL's preview report shows it): a leading
  non-empty ``<analysis>…</analysis>`` in which the model weighs the query, then a complete ``think`` or
  ``no_think`` response; the reason names the mode chosen. Whether the choice was *wise* is a judge's
  question, not a format rule. ``require_analysis=False`` accepts either mode without the analysis.
  An ``<analysis>`` block outside ``auto_think`` is a format error (a ``no_think`` answer must not start
  with one). The mode of an item comes from its prompt (:func:`prompt_mode`): ``/think`` or ``/no_think``
  at the end of the user text, nothing = ``auto_think`` (Keye's switches, SPEC §4).
- structure and hard instruction constraints (:class:`Constraint`, :func:`check_constraint`), all checked
  on what the user reads (:func:`response_body`: the response without its ``<analysis>``/``<think>``
  blocks, the content of its ``<answer>`` block when there is one): valid JSON (optionally with required
  keys), markdown headings and list items, Python code blocks that ``ast.parse``, word and sentence
  limits, keywords that must or must not appear, a closing phrase, an exact number of bullet points.
  The checks are deliberately language-light: a Chinese/Japanese character counts as one word,
  sentences end at ``. ! ?`` (followed by a space) or at ``。！？``, and keywords match case-insensitively,
  on word boundaries only where the keyword starts or ends with a Latin letter or digit.

**The rule reward of an item** (:func:`rule_reward`): the format check (when ``check_format``), the answer
check (when the item has a reference) and one check per constraint. **UNSTATED** (Keye gives no formula),
chosen here: the answer and constraint checks are averaged (equal weight: partial credit gives a denser
signal than all-or-nothing); the format check adds ``format_weight`` of the total,
``value = format_weight·format + (1 − format_weight)·mean(others)``; and with ``format_gates`` a response
in the wrong format scores 0 whatever it says, so a policy cannot collect answer reward while ignoring
the mode it was asked for. An item with no check at all has no rule reward (None).

**Combining** (:class:`RewardCombiner`): weights over the named components ``rule``, ``judge`` (a
generative judge: agreement with the reference, reasoning consistency, safety) and ``reward_model`` (for
items with no reference, SPEC §4). The judge and reward model are plain callables ``(item, response)``
returning a :class:`Reward`, a float in [0, 1], a ``(float, reason)`` pair, or None when they have
nothing to say about the item, so a flow can plug in an OpenAI-compatible judge without this module
knowing about servers. The combined value is the weighted mean over the components that apply (weights
renormalised); each component's own reward is kept in ``components`` for the logs. A component that fails
(a judge whose request failed or whose reply does not parse) raises
:class:`~keyeflow.quality.errors.ScoringError`, and so does the combiner, naming the component: the other
components' value is not a stand-in for the missing one (that would change the reward's meaning item by
item), so the caller sets the item aside and counts it.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from keyeflow.config import check_flag, check_int, check_number, invalid, is_number
from keyeflow.quality import graders
from keyeflow.quality.errors import ScoringError

TASKS = ("math", "choice", "count", "grounding")
MODES = graders.FORMAT_MODES  # ("think", "no_think", "auto_think")
COMPONENTS = ("rule", "judge", "reward_model")

# ============================================================================================ rewards


@dataclass(frozen=True)
class Reward:
    """A reward in [0, 1] and why; ``components`` holds the parts of a combined reward."""

    value: float
    reason: str
    components: Mapping[str, Reward] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real):
            raise TypeError(f"a reward value must be a number, got {self.value!r}")
        if not isinstance(self.reason, str):
            raise TypeError(f"a reward reason must be a string, got {self.reason!r}")
        if not (math.isfinite(self.value) and 0.0 <= self.value <= 1.0):
            raise ValueError(f"a reward value must be in [0, 1], got {self.value!r} ({self.reason})")
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))

    def __float__(self) -> float:
        return self.value


def _short(text: object, limit: int = 40) -> str:
    """A value as it goes into a reason: repr'd, cut to ``limit`` characters so logs stay one line."""
    s = str(text).replace("\n", " ")
    return repr(s if len(s) <= limit else s[: limit - 1] + "…")


# ================================================================================ verifiable rewards


_ANALYSIS_BLOCK = re.compile(r"<analysis>.*?</analysis>", re.DOTALL)


def final_answer(response: str) -> str:
    """The final answer of a response: :func:`graders.extract_answer` after dropping ``auto_think``'s
    ``<analysis>`` block (whose last line would otherwise pass for the answer of a no-think reply)."""
    return graders.extract_answer(_ANALYSIS_BLOCK.sub("", response))


def math_answer_reward(
    response: str, reference: object, *, rel_tol: float = 1e-4, abs_tol: float = 1e-9
) -> Reward:
    """1 when the response's final answer is equivalent to ``reference`` (graders.answers_equivalent)."""
    answer = final_answer(response)
    verdict = graders.answers_equivalent(answer, reference, rel_tol=rel_tol, abs_tol=abs_tol)
    return Reward(float(verdict.equal), f"answer {_short(answer)}: {verdict.reason} ({verdict.method})")


def choice_reward(response: str, reference: str, options: Mapping[str, str] | None = None) -> Reward:
    """1 when the response's final answer picks option ``reference`` (graders.multiple_choice_reward);
    ``options`` (letter → text) lets an answer that repeats an option's text count as that option."""
    response = _ANALYSIS_BLOCK.sub("", response)
    value = graders.multiple_choice_reward(response, reference, options)
    answer = graders.extract_answer(response)
    picked = graders.parse_choice(answer)
    said = f"option {picked[0]}" if picked else f"answer {_short(answer)}"
    expected = graders.parse_choice(reference)[0]  # multiple_choice_reward has checked it parses
    return Reward(value, f"{said}, expected option {expected}")


def count_reward(response: str, reference: object) -> Reward:
    """1 when the count in the response's final answer equals ``reference`` (graders.counting_reward)."""
    response = _ANALYSIS_BLOCK.sub("", response)
    value = graders.counting_reward(response, reference)
    counted = graders.parse_count(graders.extract_answer(response))
    said = "no count in the answer" if counted is None else f"counted {counted}"
    return Reward(value, f"{said}, expected {graders.parse_count(reference)}")


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def grounding_reward(
    response: str, reference: object, *, threshold: float = 0.5, continuous: bool = False
) -> Reward:
    """Box IoU of the response's answer with ``reference``: thresholded to 0/1 at ``threshold``, or the
    IoU itself when ``continuous``. The box is the first one in the last ``<answer>`` block, else in the
    whole response (graders.iou_reward's reading); no readable box scores 0. A bad reference raises."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ref = graders.parse_box(reference)
    response = _ANALYSIS_BLOCK.sub("", response)
    blocks = _ANSWER_BLOCK.findall(response)
    try:
        pred = graders.parse_box(blocks[-1] if blocks else response)
    except ValueError as exc:
        return Reward(0.0, f"no box in the answer: {exc}")
    iou = graders.grounding_iou(pred, ref)
    if continuous:
        return Reward(iou, f"IoU {iou:.3f}")
    passed = iou >= threshold
    return Reward(float(passed), f"IoU {iou:.3f} {'≥' if passed else '<'} {threshold}")


def answer_reward(
    response: str,
    reference: object,
    task: str = "math",
    *,
    options: Mapping[str, str] | None = None,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-9,
    iou_threshold: float = 0.5,
    iou_continuous: bool = False,
) -> Reward:
    """The verifiable reward of ``task`` (one of :data:`TASKS`) for one response."""
    if task == "math":
        return math_answer_reward(response, reference, rel_tol=rel_tol, abs_tol=abs_tol)
    if task == "choice":
        return choice_reward(response, str(reference), options)
    if task == "count":
        return count_reward(response, reference)
    if task == "grounding":
        return grounding_reward(response, reference, threshold=iou_threshold, continuous=iou_continuous)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ============================================================================================= format

_MODE_SWITCH = re.compile(r"/(no_)?think\s*$")
_ANALYSIS = re.compile(r"^\s*<analysis>(.*?)</analysis>", re.DOTALL)


def _last_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a prompt: itself, or the last text part of a multimodal content list."""
    if isinstance(prompt, str):
        return prompt
    texts = [p.get("text", "") for p in prompt if isinstance(p, Mapping) and p.get("type") == "text"]
    return texts[-1] if texts else ""


def prompt_mode(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The output mode a prompt asks for: ``/think`` or ``/no_think`` at the end of its (last) user text
    switches mode (Keye, SPEC §4); a prompt with neither leaves the choice to the model: ``auto_think``."""
    m = _MODE_SWITCH.search(_last_text(prompt))
    if m is None:
        return "auto_think"
    return "no_think" if m.group(1) else "think"


def format_problem(response: str, mode: str, *, require_analysis: bool = True) -> str | None:
    """Why ``response`` breaks the output format of ``mode``; None when it is well formed (module doc)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto_think":
        if "<analysis>" in response or "</analysis>" in response:
            return f"an <analysis> block in {mode} mode"
        return graders.format_problem(response, mode)
    m = _ANALYSIS.match(response)
    if m is None:
        if require_analysis:
            return "auto_think must open with <analysis>…</analysis>"
        rest = response
    else:
        if not m.group(1).strip():
            return "empty <analysis> block"
        rest = response[m.end() :]
    if "<analysis>" in rest or "</analysis>" in rest:
        return "more than one <analysis> block, or an unclosed one"
    return graders.format_problem(rest, "auto_think")


def chosen_mode(response: str) -> str:
    """``think`` or ``no_think``: which mode an ``auto_think`` response went on in after its analysis
    (``think`` when it holds a well-formed reasoning block)."""
    rest = _ANALYSIS.sub("", response, count=1)
    return "think" if graders.format_problem(rest, "think") is None else "no_think"


def mode_format_reward(response: str, mode: str, *, require_analysis: bool = True) -> Reward:
    """1 when ``response`` follows the output format of ``mode``; the reason says what is wrong."""
    problem = format_problem(response, mode, require_analysis=require_analysis)
    if problem is not None:
        return Reward(0.0, f"{mode} format: {problem}")
    if mode == "auto_think":
        return Reward(1.0, f"auto_think format, chose {chosen_mode(response)}")
    return Reward(1.0, f"{mode} format")


# ====================================================================================== response body

_REASONING_BLOCK = re.compile(r"<(analysis|think)>.*?</\1>", re.DOTALL)


def response_body(response: str) -> str:
    """What the user reads of a response: without its ``<analysis>`` and ``<think>`` blocks (an unclosed
    one hides everything after it), the content of its last ``<answer>`` block when it has one."""
    body = _REASONING_BLOCK.sub("", response)
    for tag in ("<analysis>", "<think>"):
        if tag in body:
            body = body.split(tag, 1)[0]
    blocks = _ANSWER_BLOCK.findall(body)
    if blocks:
        return blocks[-1].strip()
    return body.replace("<answer>", "").replace("</answer>", "").strip()


# ========================================================================================== structure

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
_WHOLE_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_reward(response: str, required_keys: Sequence[str] = ()) -> Reward:
    """1 when the body is one valid JSON value (strict: no NaN/Infinity; one surrounding ```json fence is
    allowed, models add it by habit) and, when ``required_keys`` are given, an object holding them all."""
    body = response_body(response)
    if m := _WHOLE_FENCE.match(body):
        body = m.group(1)
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return Reward(0.0, f"invalid JSON: {str(exc)[:60]}")
    if required_keys:
        if not isinstance(value, dict):
            return Reward(0.0, f"JSON is a {type(value).__name__}, keys {list(required_keys)} need an object")
        missing = [k for k in required_keys if k not in value]
        if missing:
            return Reward(0.0, f"JSON object lacks keys {missing}")
    return Reward(1.0, "valid JSON" + (f" with keys {list(required_keys)}" if required_keys else ""))


def _outside_fences(text: str) -> list[str]:
    """The lines of ``text`` that are not inside a fenced code block (a ``#`` comment is no heading)."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$")
_BULLET = re.compile(r"^[ \t]*[-*+•][ \t]+\S")
_NUMBERED = re.compile(r"^[ \t]*\d{1,9}[.)][ \t]+\S")
_RULE_LINE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$")  # a thematic break, not a list item


def _heading_key(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(":：").strip()


def markdown_headings(text: str) -> list[str]:
    """The ATX headings (``# Title`` … ``###### Title``) of ``text``, outside code fences."""
    return [m.group(1) for line in _outside_fences(text) if (m := _HEADING.match(line))]


def bullet_points(text: str) -> list[str]:
    """The unordered list items (lines opening with ``-``, ``*``, ``+`` or ``•`` and a space), outside code
    fences; ``**bold**`` and ``---`` rules are not items."""
    return [ln for ln in _outside_fences(text) if _BULLET.match(ln) and not _RULE_LINE.match(ln)]


def list_items(text: str) -> list[str]:
    """Bullet points and numbered items (``1.`` / ``1)``), outside code fences."""
    return [
        ln
        for ln in _outside_fences(text)
        if (_BULLET.match(ln) and not _RULE_LINE.match(ln)) or _NUMBERED.match(ln)
    ]


def markdown_reward(response: str, headings: Sequence[str] = (), min_list_items: int = 0) -> Reward:
    """1 when the body has every heading in ``headings`` (text compared case- and space-insensitively, a
    trailing colon ignored, any level) and at least ``min_list_items`` list items."""
    body = response_body(response)
    have = {_heading_key(h) for h in markdown_headings(body)}
    missing = [h for h in headings if _heading_key(h) not in have]
    num_items = len(list_items(body))
    problems = []
    if missing:
        problems.append(f"missing headings {missing}")
    if num_items < min_list_items:
        problems.append(f"{num_items} list items < {min_list_items}")
    if problems:
        return Reward(0.0, "markdown: " + "; ".join(problems))
    return Reward(1.0, f"markdown: {len(headings)} headings, {num_items} list items")


_PYTHON_LANGS = {"python", "py", "python3", "py3"}


def python_code_reward(response: str) -> Reward:
    """1 when the body has fenced Python code and every such block parses (``ast.parse``: syntax only,
    nothing runs). Blocks labelled python/py count; when none is labelled, unlabelled blocks do."""
    blocks = [(lang.casefold(), code) for lang, code in _FENCE.findall(response_body(response))]
    code_blocks = [c for lang, c in blocks if lang in _PYTHON_LANGS] or [c for lang, c in blocks if not lang]
    if not code_blocks:
        return Reward(0.0, "no Python code block")
    for k, code in enumerate(code_blocks, start=1):
        try:
            ast.parse(textwrap.dedent(code))  # a fence inside a list item indents its code
        except SyntaxError as exc:
            return Reward(0.0, f"code block {k} does not parse: {exc.msg} (line {exc.lineno})")
        except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
            return Reward(0.0, f"code block {k} does not parse: {type(exc).__name__}")
    return Reward(1.0, f"{len(code_blocks)} Python code block(s) parse")


# ========================================================================================= constraints

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ALNUM = rf"(?:(?![{_CJK}])[^\W_])+"
_WORD = re.compile(rf"[{_CJK}]|{_ALNUM}(?:(?:['’-]|(?<=\d)[.,](?=\d)){_ALNUM})*")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def count_words(text: str) -> int:
    """Words: runs of letters and digits (``don't``, ``well-known`` and ``3.5`` are one); a Chinese or
    Japanese character is a word by itself (those scripts put no spaces between words)."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentences: pieces ending at ``.``, ``!`` or ``?`` followed by whitespace (so "3.5" stays whole) or
    at ``。！？``, that hold a letter or digit. "e.g. this" counts two: a simple rule, not a parser."""
    return sum(1 for piece in _SENTENCE_SPLIT.split(text.strip()) if re.search(r"[^\W_]", piece))


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    # Word boundaries only where the keyword has a Latin letter or digit at its edge: "cat" must not match
    # "category", but a Chinese keyword sits between other characters with no boundary at all.
    pattern = re.escape(keyword.casefold())
    if re.match(r"[A-Za-z0-9]", keyword):
        pattern = r"(?<![A-Za-z0-9])" + pattern
    if re.search(r"[A-Za-z0-9]$", keyword):
        pattern += r"(?![A-Za-z0-9])"
    return re.compile(pattern)


def keywords_present(text: str, keywords: Sequence[str]) -> list[str]:
    """The ``keywords`` that appear in ``text`` (case-insensitive; see :func:`_keyword_pattern`)."""
    folded = text.casefold()
    return [k for k in keywords if _keyword_pattern(k).search(folded)]


@dataclass(frozen=True)
class Constraint:
    """One structure or hard instruction constraint on the body of a response, checked by
    :func:`check_constraint`. ``kind`` and what ``value`` holds:

    - ``min_words`` / ``max_words`` / ``min_sentences`` / ``max_sentences``: an integer ≥ 0 (inclusive);
    - ``num_bullets``: the exact number of bullet points (integer ≥ 0);
    - ``min_list_items``: at least this many markdown list items, bulleted or numbered (integer ≥ 1);
    - ``include_keywords`` / ``exclude_keywords``: non-empty strings, all must / none may appear;
    - ``ends_with``: a phrase the body must end with (case and spacing ignored);
    - ``json``: required top-level keys (may be empty: any valid JSON);
    - ``markdown_headings``: headings that must be present;
    - ``python_code``: None (fenced Python that parses).
    """

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        expected = _CONSTRAINT_VALUES.get(self.kind)
        if expected is None:
            raise invalid("Constraint", "kind", self.kind, f"must be one of {sorted(_CONSTRAINT_VALUES)}")
        owner = f"Constraint({self.kind!r})"
        if expected == "int":
            minimum = 1 if self.kind == "min_list_items" else 0
            object.__setattr__(self, "value", check_int(owner, "value", self.value, minimum=minimum))
        elif expected == "text":
            if not isinstance(self.value, str) or not self.value.strip():
                raise invalid(owner, "value", self.value, "must be a non-empty string")
        elif expected in ("texts", "keys"):
            if isinstance(self.value, str) or not isinstance(self.value, Sequence):
                raise invalid(owner, "value", self.value, "must be a list of strings")
            values = tuple(self.value)
            if not all(isinstance(v, str) and v.strip() for v in values):
                raise invalid(owner, "value", self.value, "every entry must be a non-empty string")
            if expected == "texts" and not values:
                raise invalid(owner, "value", self.value, "needs at least one entry")
            object.__setattr__(self, "value", values)
        elif self.value is not None:
            raise invalid(owner, "value", self.value, "takes no value (None)")


_CONSTRAINT_VALUES = {
    "min_words": "int", "max_words": "int", "min_sentences": "int", "max_sentences": "int",
    "num_bullets": "int", "min_list_items": "int", "include_keywords": "texts", "exclude_keywords": "texts",
    "ends_with": "text", "json": "keys", "markdown_headings": "texts", "python_code": "none",
}  # fmt: skip


def _bound(what: str, have: int, limit: int, at_least: bool) -> Reward:
    ok = have >= limit if at_least else have <= limit
    sign = (">=" if at_least else "<=") if ok else ("<" if at_least else ">")
    return Reward(float(ok), f"{have} {what} {sign} {limit}")


def check_constraint(response: str, constraint: Constraint) -> Reward:
    """1 when the body of ``response`` meets ``constraint``, else 0, and why."""
    kind, value = constraint.kind, constraint.value
    if kind == "json":
        return json_reward(response, value)
    if kind == "markdown_headings":
        return markdown_reward(response, headings=value)
    if kind == "min_list_items":
        return markdown_reward(response, min_list_items=value)
    if kind == "python_code":
        return python_code_reward(response)
    body = response_body(response)
    if kind in ("min_words", "max_words"):
        return _bound("words", count_words(body), value, kind == "min_words")
    if kind in ("min_sentences", "max_sentences"):
        return _bound("sentences", count_sentences(body), value, kind == "min_sentences")
    if kind == "num_bullets":
        num = len(bullet_points(body))
        return Reward(float(num == value), f"{num} bullet points, {'as' if num == value else 'not the'} "
                                           f"{value} asked")  # fmt: skip
    if kind == "include_keywords":
        present = keywords_present(body, value)
        missing = [k for k in value if k not in present]
        return Reward(
            float(not missing), f"missing keywords {missing}" if missing else "all keywords present"
        )
    if kind == "exclude_keywords":
        found = keywords_present(body, value)
        return Reward(
            float(not found), f"forbidden keywords present {found}" if found else "no forbidden keyword"
        )
    # ends_with: compared without case and with runs of whitespace as one space
    tail, phrase = " ".join(body.casefold().split()), " ".join(value.casefold().split())
    ok = tail.endswith(phrase)
    return Reward(float(ok), f"ends with {_short(value)}" if ok else f"does not end with {_short(value)}")


# ============================================================================================== items


@dataclass(frozen=True)
class RewardItem:
    """What the rewards know of one RL item.

    ``reference``: the reference answer (None when the item has none: the reward model's case).
    ``task``: how the reference is checked (:data:`TASKS`). ``mode``: the output format asked for; None
    reads it from the prompt (:func:`prompt_mode`). ``options``: letter → option text for ``choice``.
    ``constraints``: structure and instruction constraints on the response.
    """

    prompt: str | Sequence[Mapping[str, Any]]
    reference: object = None
    task: str = "math"
    mode: str | None = None
    options: Mapping[str, str] | None = None
    constraints: tuple[Constraint, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise invalid("RewardItem", "task", self.task, f"must be one of {TASKS}")
        if self.mode is not None and self.mode not in MODES:
            raise invalid("RewardItem", "mode", self.mode, f"must be one of {MODES} or None")
        constraints = tuple(self.constraints)
        if not all(isinstance(c, Constraint) for c in constraints):
            raise invalid("RewardItem", "constraints", self.constraints, "must be Constraint objects")
        object.__setattr__(self, "constraints", constraints)

    @property
    def output_mode(self) -> str:
        return self.mode if self.mode is not None else prompt_mode(self.prompt)


# ============================================================================================= config


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How rewards are computed and combined (module docstring; the UNSTATED choices are marked there).

    ``weights``: component name (:data:`COMPONENTS`) → weight ≥ 0; a component with weight 0 is never
    called. ``check_format``: the rule reward checks the mode's format. ``format_weight``: its share of
    the rule reward when other checks apply. ``format_gates``: a wrong format zeroes the rule reward.
    ``require_analysis``: ``auto_think`` needs its ``<analysis>`` block. ``rel_tol``/``abs_tol``: numeric
    answer tolerance. ``iou_threshold``/``iou_continuous``: grounding reward. ``reward_model_only_without_
    reference``: call the reward model only for items with no reference (SPEC §4: "model-based, for items
    with no reference"); False calls it for every item.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"rule": 1.0})
    check_format: bool = True
    format_weight: float = 0.1
    format_gates: bool = True
    require_analysis: bool = True
    rel_tol: float = 1e-4
    abs_tol: float = 1e-9
    iou_threshold: float = 0.5
    iou_continuous: bool = False
    reward_model_only_without_reference: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise invalid("RewardConfig", name, getattr(self, name), why)

        if not isinstance(self.weights, Mapping) or not self.weights:
            fail("weights", "must be a non-empty mapping of component name to weight")
        for name, weight in self.weights.items():
            if name not in COMPONENTS:
                fail("weights", f"unknown component {name!r}; components are {COMPONENTS}")
            if not (is_number(weight) and weight >= 0):
                fail("weights", f"weight of {name!r} must be a finite number >= 0")
        if not any(w > 0 for w in self.weights.values()):
            fail("weights", "at least one weight must be > 0")
        object.__setattr__(self, "weights", MappingProxyType({k: float(v) for k, v in self.weights.items()}))
        for name in (
            "check_format",
            "format_gates",
            "require_analysis",
            "iou_continuous",
            "reward_model_only_without_reference",
        ):
            check_flag("RewardConfig", name, getattr(self, name))
        # Numbers are kept as given (they are only compared with).
        if not 0.0 <= check_number("RewardConfig", "format_weight", self.format_weight) < 1.0:
            fail("format_weight", "must be in [0, 1): the answer and constraint checks need a share")
        if not 0.0 < check_number("RewardConfig", "iou_threshold", self.iou_threshold) <= 1.0:
            fail("iou_threshold", "must be in (0, 1]")
        for name in ("rel_tol", "abs_tol"):
            check_number("RewardConfig", name, getattr(self, name), minimum=0)


# ======================================================================================= rule reward


def rule_reward(item: RewardItem, response: str, config: RewardConfig | None = None) -> Reward | None:
    """The rule-based reward of ``response`` to ``item`` (module docstring), None when nothing applies."""
    config = config or RewardConfig()
    parts: dict[str, Reward] = {}
    if item.reference is not None:
        parts["answer"] = answer_reward(
            response,
            item.reference,
            item.task,
            options=item.options,
            rel_tol=config.rel_tol,
            abs_tol=config.abs_tol,
            iou_threshold=config.iou_threshold,
            iou_continuous=config.iou_continuous,
        )
    for k, constraint in enumerate(item.constraints):
        name = constraint.kind if constraint.kind not in parts else f"{constraint.kind}#{k}"
        parts[name] = check_constraint(response, constraint)
    fmt = (
        mode_format_reward(response, item.output_mode, require_analysis=config.require_analysis)
        if config.check_format
        else None
    )
    if fmt is None and not parts:
        return None
    components = ({"format": fmt} if fmt is not None else {}) | parts
    reasons = "; ".join(f"{name}: {r.reason}" for name, r in components.items())
    if fmt is not None and fmt.value == 0.0 and config.format_gates:
        return Reward(0.0, f"format gate: {fmt.reason}", components)
    if not parts:
        return Reward(fmt.value, reasons, components)
    checks = sum(r.value for r in parts.values()) / len(parts)
    value = checks if fmt is None else config.format_weight * fmt.value + (1 - config.format_weight) * checks
    return Reward(min(1.0, value), reasons, components)


# ========================================================================================== combiner

Scorer = Callable[[RewardItem, str], "Reward | float | tuple[float, str] | None"]


def _as_reward(name: str, out: object) -> Reward | None:
    """A component's output as a Reward (None = the component has nothing to say about this item)."""
    if out is None or isinstance(out, Reward):
        return out
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], str):  # (value, reason)
        value, reason = out
    else:
        value, reason = out, f"{name} score"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} returned {out!r}: expected a Reward, a number in [0, 1], a (number, reason) pair or None"
        )
    try:
        return Reward(float(value), reason)
    except ValueError as exc:
        raise ValueError(f"{name} returned an invalid reward: {exc}") from None


class RewardCombiner:
    """``combiner(item, response) -> Reward``: the weighted mean of the components that apply.

    ``judge`` and ``reward_model`` are callables ``(item, response)`` (see :data:`Scorer`); a component
    with a weight > 0 must be given. Raises ValueError when no component applies to an item (with the
    default weights: an item with no reference, no constraints and format checking switched off): a
    reward of 0 for "could not score" would teach the policy something false. A component that raises
    ScoringError makes the combiner raise ScoringError naming it (module docstring).
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        *,
        judge: Scorer | None = None,
        reward_model: Scorer | None = None,
    ):
        self.config = config or RewardConfig()
        self.scorers: dict[str, Scorer] = {
            "rule": lambda item, response: rule_reward(item, response, self.config)
        }
        for name, scorer in (("judge", judge), ("reward_model", reward_model)):
            if scorer is not None:
                if not callable(scorer):
                    raise ValueError(
                        f"{name} must be a callable (item, response), got {type(scorer).__name__}"
                    )
                self.scorers[name] = scorer
            elif self.config.weights.get(name, 0.0) > 0:
                raise ValueError(
                    f"RewardConfig gives {name!r} weight {self.config.weights[name]} "
                    f"but no {name} callable was passed"
                )

    def __call__(self, item: RewardItem, response: str) -> Reward:
        parts: dict[str, Reward] = {}
        for name, weight in self.config.weights.items():
            if weight == 0.0:
                continue
            if (
                name == "reward_model"
                and self.config.reward_model_only_without_reference
                and item.reference is not None
            ):
                continue
            try:
                out = self.scorers[name](item, response)
            except ScoringError as error:
                raise ScoringError(f"{name}: {error}") from error
            reward = _as_reward(name, out)
            if reward is not None:
                parts[name] = reward
        if not parts:
            raise ValueError(
                "no reward component applies to this item "
                f"(weights {dict(self.config.weights)}, reference {item.reference!r})"
            )
        total = sum(self.config.weights[name] for name in parts)
        value = sum(self.config.weights[name] * r.value for name, r in parts.items()) / total
        reason = " | ".join(f"{name} {r.value:.2f}: {r.reason}" for name, r in parts.items())
        return Reward(min(1.0, max(0.0, value)), reason, parts)
