"""The Keye reward model (SPEC §4): a generative judge that reads (task definition, query, response A,
response B) and says which response is better, its prompt and strict output parser, the data to fine-tune it,
and a judge that serves as the `reward_model` component of `rewards.RewardCombiner`.

**Modes.** `no_think`: the verdict directly, one line `Verdict: A`, `Verdict: B` or `Verdict: tie` (after
the reference line when the prompt has a reference answer, below). `think`: a
`<think>` block scoring A and B on nine dimensions, one line each, `name: A=<score>, B=<score>` (integers from
`score_min` to `score_max`; other lines in the block are free reasoning), then `</think>` and the verdict
line:

    <think>
    credibility: A=8, B=6
    …                              (all nine dimensions, each exactly once)
    </think>
    Verdict: A

Every dimension is scored so that higher is better (a high `redundancy` score means little redundancy).

**Dimensions.** SPEC names four — credibility, correctness, redundancy, relevance — and leaves five UNSTATED;
ours (marked `source="ours"` in `DIMENSIONS`) are completeness, instruction_following, consistency,
readability and answer_form: what an answer can still get wrong when it is right, on topic and concise, each
chosen because the training targets can score it from a signal the response itself carries.

**Reference-guided judgement.** When the query has a reference answer (every verifiable item, every
LongCoT question, every pair built from them), the prompt shows it after the two responses (`Reference
answer:` and the answer on the next line), in training and when judging alike, for every recipe: SPEC lists
the judge's inputs as the query, the two responses and the task definition, and the reference is part of
what the task defines as right. Without it, the judge must solve the question itself (count the shapes, read
the chart) before it can compare, and a judge no better at the task than the policy can only learn a
position or a form. The output then starts with one line that restates the reference and says which
response gives it, `3 is Response A's answer.` (`Response B's`, `both responses'`, `neither response's`;
the target states what the task's rule check says of each response), then the verdict line; in think mode
that line opens the `<think>` block. Why the line: a verdict written straight after the prompt has to
compare two tokens at two places (the reference and a response's answer), a step the tiny model (2 layers of
64) did not learn: 1,400 steps of 64 such one-token pairs left its verdict at chance (0.49–0.51 training
accuracy), and the reward model trained in the flow gave one verdict whatever the order (held-out accuracy
exactly 0.5). Restating the reference first turns the comparison into a look-up, finding that answer among
the responses and writing the label next to it, which it learns on short text pairs (training accuracy 0.90
over steps 201–300 of 32 from a fresh model, over steps 101–200 from a pre-trained one;
`scripts/judge_learnability.py`). With the flow's own judge prompts (the picture, the instructions, ~390
tokens) it has not learned it yet: it writes one line and verdict whatever the pair (README, issue 16's
notes), though how surely it writes them depends on the pair, which `verdict_confidence` reads (below).
Queries without a reference (alignment prompts) are judged as before, one verdict line.

**Training data** (`build_reward_model_data`, from preference pairs):
- *order swap*: every pair gives two conversations, chosen as A (target `A`) and chosen as B (target `B`), so
  the verdict never correlates with the position and the model cannot learn a position bias;
- *think targets* score each dimension from signals at hand (UNSTATED; a real run uses judge- or
  human-labelled scores in their place), each a share in [0, 1] mapped onto the integer scale:
  - credibility: the share of the arithmetic claims the response states (`a <op> b = c`, chains included,
    `graders.arithmetic_claims`) that hold; a response stating none gets full marks (nothing checkable was
    found invented, so it is not marked down for having no sums);
  - correctness: the reference check (`rewards.answer_reward`) where the pair has a reference, else the
    pair's own score when it lies in [0, 1] (the scorer's judgement), else the middle of the scale;
  - redundancy: (1 − share of repeated word 3-grams) × √(shorter length / own length), lengths by
    `count_tokens` (words by default);
  - relevance: the share of the response's content words found in the query or the reference (1 for a bare
    answer with none);
  - completeness: a final answer is present and no `<think>`/`<answer>` block is left open;
  - instruction_following: the format of the thinking mode the query asks for (`rewards.mode_format_reward`,
    no `<analysis>` demanded);
  - consistency: for a response with `<think>` reasoning, 1 when its final answer (`rewards.final_answer`
    of the text outside the reasoning) is stated in the reasoning's last sentence, 0.5 when only earlier in
    it, 0 when nowhere or when there is no final answer (stated: the answer text as a whole word,
    case-insensitive, or for a numeric answer an equivalent number, `graders.answers_equivalent`); 1
    without reasoning (nothing to contradict);
  - readability: the share of the response's words (tags left out) that are readable: numbers, words with
    a vowel or in a non-Latin script, short units and acronyms, and such parts joined by the punctuation
    words carry (`readable_share`); token salad ("xqzt Ãĥ") scores low, no words 0;
  - answer_form: the final answer has the form of the reference: a box for a grounding task, a number when
    the reference reads as a number (`graders.reads_as_number`), words when it has letters; without a
    reference, 1 when there is a non-empty final answer.
  The verdict is always the pair's label: the dimension scores may disagree with it when the signals miss
  what made the chosen response better;
- *length debiasing* (`length_debias`): reward models learn "longer is better" when the preferred answer is
  usually the longer one, so pairs whose preferred answer is SHORTER are brought to at least
  `min_shorter_share` of the pair occurrences, by `oversample` (repeat those pairs, each at most `max_repeats`
  times in all: no data is lost) or `select` (drop pairs whose preferred answer is not shorter). Default share
  0.5 (UNSTATED): at parity, length alone says nothing about which answer wins. The report gives the shares
  before and after.

**The judge** (`RewardModelJudge`) asks any `Generator` (in process or an OpenAI-compatible server) greedily,
in both orders when `swap_orders` (a judge's position bias cancels in the average), and turns each verdict
into the response's preference value: 1 win, 0.5 tie (the model said `tie`), 0 loss; with
`verdict_confidence`, a win is worth the probability the model gave the tokens that name the winner (the
reference line's giver and the verdict letter: `Completion.token_logprobs`) and a loss one minus it, so a
judge that writes the same letter in both orders, its position bias outweighing what it read, still ranks
the pair by how much more surely it names the response in one order than the other (the bias cancels in the
average instead of hiding the judgement); in think mode blended with the weighted dimension scores,
`verdict_weight`·verdict + (1 − verdict_weight)·(½ + (S_response − S_other) / 2·range), S the
`dimension_weights`-weighted mean score. An output that does not parse, or a
request that fails, makes that order unusable with the reason, and a comparison with any unusable order has
no value (`Comparison.value` None, the problems per order): the orders are asked to cancel the judge's
position bias, and one order alone would bring it back. `reward` then raises `ScoringError` naming the query
and the cause: a failed judgement is never scored as a tie (a constant reward teaches the policy nothing and
hides a broken judge); the caller sets the item aside and counts it (`keyeflow.quality.errors`). Nothing a
generator returns crashes a batch of `compare`.

**Training** lives with the other trainers (`keyeflow.training.reward_model_trainer.train_reward_model`): the
conversations become `train_samples` rows and a mixture that uses each sample as many times as the debiasing
asked, trained by the stage trainer. Oversampling is expressed as mixture repeats, not as copies, because
`train_samples` keys a sample by its content (two identical copies would be one sample).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from keyeflow.config import check_flag, check_int, check_number, invalid
from keyeflow.quality.errors import ScoringError
from keyeflow.quality.graders import (
    answers_equivalent,
    arithmetic_claims,
    extract_answer,
    parse_box,
    parse_number_words,
    reads_as_number,
)
from keyeflow.quality.judges import content_terms
from keyeflow.quality.rewards import (
    TASKS,
    Reward,
    RewardItem,
    answer_reward,
    count_words,
    final_answer,
    mode_format_reward,
    prompt_mode,
)

if TYPE_CHECKING:
    from keyeflow.model.generation import Completion, Generator


# ========================================================================================== dimensions


@dataclass(frozen=True)
class Dimension:
    name: str
    definition: str  # one line, shown to the judge in think mode
    source: str  # "SPEC" (named by Keye) or "ours" (UNSTATED in SPEC, defined here)


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("credibility", "the claims it states hold (every calculation checks out); nothing is "
                             "invented", "SPEC"),
    Dimension("correctness", "the final answer is right", "SPEC"),
    Dimension("redundancy", "no repetition, padding or needless length (higher means less "
                            "redundant)", "SPEC"),
    Dimension("relevance", "stays on the query, with no digressions", "SPEC"),
    Dimension("completeness", "answers every part of the query and reaches a final answer", "ours"),
    Dimension("instruction_following", "obeys the task's explicit constraints: format, length, language, "
                                       "thinking mode", "ours"),
    Dimension("consistency", "the reasoning arrives at the final answer given (full marks without "
                             "reasoning)", "ours"),
    Dimension("readability", "written in real words and numbers, not garbled tokens", "ours"),
    Dimension("answer_form", "the final answer has the form asked for: a number, a box or words", "ours"),
)  # fmt: skip
DIMENSION_NAMES = tuple(d.name for d in DIMENSIONS)
MODES = ("think", "no_think")
VERDICTS = ("A", "B", "tie")
DEBIAS_METHODS = ("oversample", "select")
DEFAULT_TASK_DEFINITION = "Answer the user's query helpfully, correctly and concisely."
SYSTEM_PROMPT = (
    "You are a reward model. Given a task definition, a query and two responses, A and B, you judge "
    "which response better fulfils the task."
)


# ============================================================================================== config


@dataclass(frozen=True, kw_only=True)
class RewardModelConfig:
    """The reward model's output format and how its judgements and training data are debiased.

    `mode`: "think" or "no_think" (what the judge asks for). `score_min`/`score_max`: the integer scale of the
    dimension scores (1–10, UNSTATED). `dimension_weights`: name → weight ≥ 0 of the think-mode weighted score
    (missing names weigh 1). `verdict_weight`: the verdict's share of a think-mode value, the weighted score
    margin the rest (no_think uses the verdict alone). `swap_orders`: judge both A/B orders and average.
    `verdict_confidence`: weigh each verdict by the probability of the tokens that name the winner (module
    docstring, "The judge"); the tokens not taken are counted for the other response, so the value is the
    named side's probability, a lower bound of its share against the other side alone.
    `min_shorter_share`, `debias_method`, `max_repeats`: the length-debiasing pass (module docstring).
    `train_modes`: the modes its training data is written in (Keye's model answers in both; a model asked in
    one mode only learns that one's format faster, without the other's long targets).
    """

    mode: str = "think"
    train_modes: tuple[str, ...] = MODES
    score_min: int = 1
    score_max: int = 10
    dimension_weights: Mapping[str, float] = field(default_factory=dict)
    verdict_weight: float = 0.5
    swap_orders: bool = True
    verdict_confidence: bool = False
    min_shorter_share: float = 0.5
    debias_method: str = "oversample"
    max_repeats: int = 4

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise invalid("RewardModelConfig", name, getattr(self, name), why)

        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}")
        object.__setattr__(self, "train_modes", tuple(self.train_modes))
        if not self.train_modes or set(self.train_modes) - set(MODES) or self.mode not in self.train_modes:
            fail("train_modes", f"distinct modes from {MODES}, including the judging mode {self.mode!r}")
        for name, minimum in (("score_min", 0), ("score_max", None), ("max_repeats", 1)):
            object.__setattr__(
                self, name, check_int("RewardModelConfig", name, getattr(self, name), minimum=minimum)
            )
        if self.score_max <= self.score_min:
            fail("score_max", f"must be > score_min ({self.score_min})")
        if not isinstance(self.dimension_weights, Mapping):
            fail("dimension_weights", "must be a mapping of dimension name to weight")
        weights = {}
        for name, weight in self.dimension_weights.items():
            if name not in DIMENSION_NAMES:
                fail("dimension_weights", f"unknown dimension {name!r}; dimensions are {DIMENSION_NAMES}")
            weights[name] = check_number("RewardModelConfig", f"dimension_weights[{name!r}]", weight)
            if weights[name] < 0:
                fail("dimension_weights", f"weight of {name!r} must be >= 0")
        full = {name: weights.get(name, 1.0) for name in DIMENSION_NAMES}
        if not any(full.values()):
            fail("dimension_weights", "at least one weight must be > 0")
        object.__setattr__(self, "dimension_weights", MappingProxyType(full))
        if not 0.0 <= check_number("RewardModelConfig", "verdict_weight", self.verdict_weight) <= 1.0:
            fail("verdict_weight", "must be in [0, 1]")
        object.__setattr__(self, "verdict_weight", float(self.verdict_weight))
        check_flag("RewardModelConfig", "swap_orders", self.swap_orders)
        check_flag("RewardModelConfig", "verdict_confidence", self.verdict_confidence)
        if not 0.0 <= check_number("RewardModelConfig", "min_shorter_share", self.min_shorter_share) < 1.0:
            fail("min_shorter_share", "must be in [0, 1) (1 would leave no pair whose longer answer wins)")
        object.__setattr__(self, "min_shorter_share", float(self.min_shorter_share))
        if self.debias_method not in DEBIAS_METHODS:
            fail("debias_method", f"must be one of {DEBIAS_METHODS}")


# ============================================================================================== prompt

Query = str | Sequence[Mapping[str, Any]]


def _parts(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and "type" in p for p in content):
        return [dict(p) for p in content]
    raise ValueError(
        f"{where}: content must be a string or a list of typed parts, got {type(content).__name__}"
    )


def query_parts(query: Query) -> list[dict[str, Any]]:
    """The query as content parts: a string, a list of parts (text, image, video…: passed through as they
    are), or chat messages (one user message: its content; several: each as `[role]` and its content, in
    order)."""
    if isinstance(query, str):
        return _parts(query, "query")
    if not isinstance(query, Sequence) or not query:
        raise ValueError("query must be a string, a non-empty list of content parts or of chat messages")
    if all(isinstance(m, Mapping) and "role" in m for m in query):
        if len(query) == 1:
            return _parts(query[0].get("content"), "query message 0")
        out: list[dict[str, Any]] = []
        for k, message in enumerate(query):
            out.append({"type": "text", "text": f"{'' if k == 0 else chr(10)}[{message['role']}]\n"})
            out += _parts(message.get("content"), f"query message {k}")
        return out
    return _parts(query, "query")


def query_text(query: Query) -> str:
    """The text of the query, media left out."""
    return "".join(p.get("text", "") for p in query_parts(query) if p.get("type") == "text")


def _merge_text(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Adjacent text parts joined; a content of text alone becomes a plain string (what every server
    takes)."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "text" and merged and merged[-1].get("type") == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(dict(part))
    if all(p.get("type") == "text" for p in merged):
        return "".join(p["text"] for p in merged)
    return merged


def instructions(mode: str, config: RewardModelConfig | None = None, *, reference: bool = False) -> str:
    """What the judge is asked to write, per mode (the format the parser accepts); `reference`: the prompt
    shows a reference answer, and the output starts by restating it and saying which response gives it."""
    config = config or RewardModelConfig()
    verdict = "`Verdict: A`, `Verdict: B` or `Verdict: tie`"
    restate = (
        "the reference answer restated and which response gives it, one line written exactly as "
        "`<reference answer> is Response A's answer.` (or `Response B's`, `both responses'`, "
        "`neither response's`)"
    )
    if mode == "no_think":
        compare = f"Compare the two responses on {', '.join(DIMENSION_NAMES).replace('_', ' ')}. "
        if reference:
            return compare + f"Reply with exactly two lines: {restate}, then {verdict}."
        return compare + f"Reply with exactly one line: {verdict}."
    if mode != "think":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dims = "\n".join(f"- {d.name}: {d.definition}" for d in DIMENSIONS)
    return (
        ("" if not reference else f"Start the <think> block with {restate}. ")
        + f"First think inside <think> and </think>: score Response A and Response B on each dimension below "
        f"from {config.score_min} (worst) to {config.score_max} (best), one line per dimension written "
        f"exactly as `name: A=<score>, B=<score>`; other lines may hold your reasoning.\n{dims}\n"
        f"Then, after </think>, write exactly one line: {verdict}."
    )


def build_prompt(
    task_definition: str,
    query: Query,
    response_a: str,
    response_b: str,
    mode: str,
    config: RewardModelConfig | None = None,
    *,
    reference: object | None = None,
) -> list[dict[str, Any]]:
    """The chat asking the reward model to judge A against B: a system message, then one user message with the
    task definition, the query (its image/video parts kept as parts, in place), the instructions of `mode`,
    both responses, the reference answer when the query has one (`reference`: a reference-guided judgement,
    module docstring) and Keye's `/think` or `/no_think` switch. The instructions come before the material
    and the reference last, right before the judge's output restates it: what the judge must compare sits
    at the same short distance from where it writes, whatever the query's length."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(task_definition, str) or not task_definition.strip():
        raise ValueError("task_definition must be a non-empty string")
    for name, text in (("response_a", response_a), ("response_b", response_b)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")  # noqa: TRY004
    parts = [
        {"type": "text", "text": f"Task definition: {task_definition.strip()}\n\nQuery:\n"},
        *query_parts(query),
        {
            "type": "text",
            "text": f"\n\n{instructions(mode, config, reference=reference is not None)}\n\n"
            f"Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
            + ("" if reference is None else f"Reference answer:\n{reference_text(reference)}\n\n")
            + f"/{mode}",
        },
    ]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _merge_text(parts)}]


# ============================================================================================== output


class RewardModelOutputError(ValueError):
    """The reward model's output does not follow the format of its mode; the message says what is wrong."""


@dataclass(frozen=True)
class Judgement:
    """A parsed output: the verdict, and in think mode every dimension's score for A and for B."""

    verdict: str  # "A", "B" or "tie"
    scores_a: Mapping[str, int] | None = None
    scores_b: Mapping[str, int] | None = None
    # A reference-guided judgement's first line, `<reference> is Response A's answer.` (`reference_line`), as
    # written; None when the output has none.
    reference_line: str | None = None
    # The probability the model gave the tokens that name the winner (`decisive_probability`); None when the
    # judge does not weigh verdicts (`RewardModelConfig.verdict_confidence`) or the verdict is a tie.
    confidence: float | None = None


# Who gives the reference answer → the words of the reference line.
REFERENCE_GIVERS = {
    "A": "Response A's",
    "B": "Response B's",
    "both": "both responses'",
    "neither": "neither response's",
}
_REFERENCE_LINE = re.compile(
    r"\S.* is (?:" + "|".join(re.escape(words) for words in REFERENCE_GIVERS.values()) + r") answer\."
)


def reference_text(reference: object) -> str:
    """The reference answer on one line, as the prompt shows it and the reference line restates it."""
    return " ".join(str(reference).split())


def reference_line(reference: object, giver: str) -> str:
    """The line a reference-guided judgement starts with: the reference answer restated, then which response
    gives it (`giver`: "A", "B", "both" or "neither")."""
    if giver not in REFERENCE_GIVERS:
        raise ValueError(f"giver must be one of {tuple(REFERENCE_GIVERS)}, got {giver!r}")
    return f"{reference_text(reference)} is {REFERENCE_GIVERS[giver]} answer."


_VERDICT = re.compile(r"verdict[ \t]*:[ \t]*(a|b|tie)", re.IGNORECASE)
_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>")
_NAMED_LINE = re.compile(r"([A-Za-z][A-Za-z _]*?)\s*:")
_SCORE_LINE = re.compile(r"[A-Za-z][A-Za-z _]*?\s*:\s*A\s*=\s*(-?\d+)\s*,\s*B\s*=\s*(-?\d+)")


def _short(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _verdict_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise RewardModelOutputError(
            "no verdict line (expected `Verdict: A`, `Verdict: B` or `Verdict: tie`)"
        )
    if len(lines) > 1:
        raise RewardModelOutputError(
            f"expected one verdict line, got {len(lines)} lines: {_short(text.strip())}"
        )
    m = _VERDICT.fullmatch(lines[0].strip())
    if m is None:
        raise RewardModelOutputError(
            f"expected `Verdict: A`, `Verdict: B` or `Verdict: tie`, got {_short(lines[0].strip())}"
        )
    value = m.group(1)
    return "tie" if value.lower() == "tie" else value.upper()


def parse_output(text: str, mode: str, config: RewardModelConfig | None = None) -> Judgement:
    """The reward model's output as a Judgement; RewardModelOutputError saying what is wrong otherwise (module
    docstring for the format). Whitespace around lines, the case of `Verdict`/`tie`, and, in no_think mode, an
    empty `<think></think>` prefix (chat templates pre-fill one) are tolerated; nothing else is."""
    config = config or RewardModelConfig()
    if not isinstance(text, str):
        raise RewardModelOutputError(f"output must be a string, got {type(text).__name__}")
    if mode == "no_think":
        rest = _EMPTY_THINK.sub("", text, count=1)
        if "<think>" in rest or "</think>" in rest:
            raise RewardModelOutputError("a <think> block in no_think mode")
        lines = [line.strip() for line in rest.strip().splitlines() if line.strip()]
        if len(lines) == 2 and _REFERENCE_LINE.fullmatch(lines[0]):
            return Judgement(_verdict_line(lines[1]), reference_line=lines[0])
        return Judgement(_verdict_line(rest))
    if mode != "think":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    stripped = text.strip()
    if not stripped.startswith("<think>"):
        raise RewardModelOutputError(f"think output must start with <think>, got {_short(stripped)}")
    if stripped.count("<think>") != 1 or stripped.count("</think>") != 1:
        raise RewardModelOutputError(
            f"expected one <think> and one </think>, got {stripped.count('<think>')} "
            f"and {stripped.count('</think>')}"
        )
    inner, after = stripped[len("<think>") :].split("</think>")
    verdict = _verdict_line(after)
    scores_a: dict[str, int] = {}
    scores_b: dict[str, int] = {}
    restated = next(
        (line.strip() for line in inner.splitlines() if _REFERENCE_LINE.fullmatch(line.strip())), None
    )
    # `inner` starts on the `<think>` line, so these numbers are the output's own line numbers.
    for number, raw in enumerate(inner.splitlines(), start=1):
        line = raw.strip().lstrip("-*• ").strip()
        named = _NAMED_LINE.match(line)
        name = named.group(1).strip().lower().replace(" ", "_") if named else None
        if name not in DIMENSION_NAMES:
            continue  # free reasoning
        m = _SCORE_LINE.fullmatch(line)
        if m is None:
            raise RewardModelOutputError(
                f"line {number}: {_short(line)} is not `{name}: A=<score>, B=<score>` with integer scores"
            )
        if name in scores_a:
            raise RewardModelOutputError(f"line {number}: {name} is scored twice")
        for side, value in (("A", int(m.group(1))), ("B", int(m.group(2)))):
            if not config.score_min <= value <= config.score_max:
                raise RewardModelOutputError(
                    f"line {number}: {name} {side}={value} is outside "
                    f"[{config.score_min}, {config.score_max}]"
                )
        scores_a[name], scores_b[name] = int(m.group(1)), int(m.group(2))
    missing = [name for name in DIMENSION_NAMES if name not in scores_a]
    if missing:
        raise RewardModelOutputError(f"no scores for {', '.join(missing)} in the <think> block")
    return Judgement(verdict, MappingProxyType(scores_a), MappingProxyType(scores_b), restated)


_GIVER = re.compile(
    r" is (" + "|".join(re.escape(words) for words in REFERENCE_GIVERS.values()) + r") answer\.$"
)


def decisive_probability(
    text: str, judgement: Judgement, tokens: Sequence[str], logprobs: Sequence[float]
) -> float:
    """The probability a model gave the tokens of `text` (its output, parsed as `judgement`) that name the
    winner: the verdict letter and, when the output has a reference line, the letter (or word) naming who
    gives the reference: the product over the distinct tokens that write them. `tokens`/`logprobs`: the
    output's tokens and their logprobs (`Completion.tokens`, `Completion.token_logprobs`). Raises
    RewardModelOutputError when they do not cover those characters (no logprobs, a text they do not spell)."""
    if "".join(tokens) != text or len(tokens) != len(logprobs):
        raise RewardModelOutputError(
            f"the output's tokens ({len(tokens)}, with {len(logprobs)} logprobs) do not spell its text"
        )
    verdicts = list(_VERDICT.finditer(text))
    if not verdicts:
        raise RewardModelOutputError("no verdict in the output to weigh")
    where = [verdicts[-1].start(1)]
    if judgement.reference_line is not None:
        line_at = text.find(judgement.reference_line)
        giver = _GIVER.search(judgement.reference_line)
        if line_at < 0 or giver is None:
            raise RewardModelOutputError(
                f"reference line {_short(judgement.reference_line)} is not in the output"
            )
        words = giver.group(1)
        where.append(line_at + giver.start(1) + (len("Response ") if words.startswith("Response ") else 0))
    starts, covering = 0, set()
    for k, token in enumerate(tokens):
        covering |= {k for c in where if starts <= c < starts + len(token)}
        starts += len(token)
    return math.exp(sum(logprobs[k] for k in covering))


def render_output(judgement: Judgement, mode: str) -> str:
    """The output text of a judgement (the training target): `parse_output(render_output(j, m), m) == j`."""
    if judgement.verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {judgement.verdict!r}")
    verdict = f"Verdict: {judgement.verdict}"
    restated = [judgement.reference_line] if judgement.reference_line is not None else []
    if restated and not _REFERENCE_LINE.fullmatch(restated[0]):
        raise ValueError(f"reference_line {restated[0]!r} is not `<reference> is Response A's answer.`")
    if mode == "no_think":
        return "\n".join([*restated, verdict])
    if mode != "think":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if judgement.scores_a is None or judgement.scores_b is None:
        raise ValueError("a think output needs scores for A and B")
    missing = [n for n in DIMENSION_NAMES if n not in judgement.scores_a or n not in judgement.scores_b]
    if missing:
        raise ValueError(f"a think output needs every dimension scored; missing {missing}")
    lines = [f"{n}: A={judgement.scores_a[n]}, B={judgement.scores_b[n]}" for n in DIMENSION_NAMES]
    return "<think>\n" + "\n".join([*restated, *lines]) + "\n</think>\n" + verdict


def weighted_score(scores: Mapping[str, int], config: RewardModelConfig) -> float:
    """The `dimension_weights`-weighted mean of one response's dimension scores."""
    weights = config.dimension_weights
    return sum(weights[n] * scores[n] for n in DIMENSION_NAMES) / sum(weights.values())


def preference_value(judgement: Judgement, position: str, config: RewardModelConfig) -> float:
    """How much the judgement prefers the response at `position` ("A" or "B") over the other, in [0, 1]."""
    if position not in ("A", "B"):
        raise ValueError(f"position must be 'A' or 'B', got {position!r}")
    verdict = 0.5 if judgement.verdict == "tie" else float(judgement.verdict == position)
    if judgement.confidence is not None and judgement.verdict != "tie":
        verdict = judgement.confidence if judgement.verdict == position else 1.0 - judgement.confidence
    if judgement.scores_a is None or judgement.scores_b is None or config.verdict_weight == 1.0:
        return verdict
    own, other = (
        (judgement.scores_a, judgement.scores_b)
        if position == "A"
        else (judgement.scores_b, judgement.scores_a)
    )
    span = config.score_max - config.score_min
    graded = 0.5 + (weighted_score(own, config) - weighted_score(other, config)) / (2 * span)
    return config.verdict_weight * verdict + (1 - config.verdict_weight) * graded


# ============================================================================================ debiasing


@dataclass(frozen=True)
class LengthDebiasReport:
    """Pair occurrences (repeats counted) whose preferred answer is shorter, before and after the pass."""

    method: str
    target_share: float
    num_before: int
    num_after: int
    num_shorter_before: int
    num_shorter_after: int
    num_added: int  # occurrences added by oversampling
    num_removed: int  # occurrences dropped by selection
    note: str

    @property
    def share_before(self) -> float:
        return self.num_shorter_before / self.num_before if self.num_before else 0.0

    @property
    def share_after(self) -> float:
        return self.num_shorter_after / self.num_after if self.num_after else 0.0

    @property
    def reached(self) -> bool:
        return self.share_after >= self.target_share - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_share": self.target_share,
            "num_before": self.num_before,
            "num_after": self.num_after,
            "num_shorter_before": self.num_shorter_before,
            "num_shorter_after": self.num_shorter_after,
            "share_before": self.share_before,
            "share_after": self.share_after,
            "num_added": self.num_added,
            "num_removed": self.num_removed,
            "reached": self.reached,
            "note": self.note,
        }


def _check_pair(pair: object, k: int) -> None:
    if not isinstance(pair, Mapping):
        raise ValueError(f"pair {k} must be a mapping with messages, chosen and rejected")  # noqa: TRY004
    for key in ("chosen", "rejected"):
        if not isinstance(pair.get(key), str) or not pair[key].strip():
            raise ValueError(f"pair {k}: {key} must be a non-empty string")
    if "messages" not in pair:
        raise ValueError(f"pair {k}: no messages (the query)")
    repeats = pair.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"pair {k}: repeats={repeats!r} must be an integer >= 1")


def shorter_preferred(pair: Mapping[str, Any], count_tokens: Callable[[str], int] = count_words) -> bool:
    """Whether the preferred (chosen) answer is strictly shorter than the rejected one."""
    return count_tokens(pair["chosen"]) < count_tokens(pair["rejected"])


def length_debias(
    pairs: Sequence[Mapping[str, Any]],
    config: RewardModelConfig | None = None,
    *,
    seed: int = 0,
    count_tokens: Callable[[str], int] = count_words,
) -> tuple[list[dict[str, Any]], LengthDebiasReport]:
    """Bring the pairs whose preferred answer is shorter to at least `config.min_shorter_share` of the pair
    occurrences (module docstring). Returns copies of the kept pairs, each with `repeats` (the input's, 1 when
    absent, raised by oversampling), and the report. Which pairs are repeated or dropped is seeded."""
    config = config or RewardModelConfig()
    for k, pair in enumerate(pairs):
        _check_pair(pair, k)
    out = [{**pair, "repeats": int(pair.get("repeats", 1))} for pair in pairs]
    is_shorter = [shorter_preferred(p, count_tokens) for p in out]
    total = sum(p["repeats"] for p in out)
    shorter = sum(p["repeats"] for p, s in zip(out, is_shorter) if s)
    target, method = config.min_shorter_share, config.debias_method
    rng = random.Random(f"keyeflow-length-debias:{seed}")

    def report(kept: list[dict[str, Any]], added: int, removed: int, note: str) -> LengthDebiasReport:
        after_shorter = sum(p["repeats"] for p in kept if shorter_preferred(p, count_tokens))
        return LengthDebiasReport(
            method,
            target,
            total,
            sum(p["repeats"] for p in kept),
            shorter,
            after_shorter,
            added,
            removed,
            note,
        )

    if total == 0 or shorter >= target * total:
        return out, report(out, 0, 0, "share already reached: nothing changed")
    if shorter == 0:
        return out, report(
            out,
            0,
            0,
            "no pair prefers the shorter answer: nothing to oversample or select (collect such pairs)",
        )
    if method == "oversample":
        # k more occurrences of shorter-preferred pairs: (shorter + k) / (total + k) >= target.
        needed = math.ceil((target * total - shorter) / (1 - target) - 1e-9)
        candidates = [i for i, s in enumerate(is_shorter) if s]
        rng.shuffle(candidates)
        added = 0
        while added < needed:
            grew = False
            for i in candidates:  # round-robin: every candidate gets one more before any gets two
                if added == needed:
                    break
                if out[i]["repeats"] < config.max_repeats:
                    out[i]["repeats"] += 1
                    added += 1
                    grew = True
            if not grew:
                break
        note = f"repeated shorter-preferred pairs {added} more times"
        if added < needed:
            note += (
                f"; {needed - added} more were needed but every such pair is at "
                f"max_repeats={config.max_repeats}"
            )
        return out, report(out, added, 0, note)
    # select: keep every shorter-preferred pair and as many others as the share allows.
    allowed = math.floor(shorter * (1 - target) / target + 1e-9)
    others = [i for i, s in enumerate(is_shorter) if not s]
    rng.shuffle(others)
    dropped: set[int] = set()
    kept_others = 0
    for i in others:
        if kept_others + out[i]["repeats"] <= allowed:
            kept_others += out[i]["repeats"]
        else:
            dropped.add(i)
    kept = [p for i, p in enumerate(out) if i not in dropped]
    removed = sum(out[i]["repeats"] for i in dropped)
    return kept, report(
        kept, 0, removed, f"dropped {len(dropped)} pairs whose preferred answer is not shorter"
    )


# ============================================================================================ training data


def _repeated_share(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one (0: no repetition)."""
    words = re.findall(r"\w+", text.casefold())
    grams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _blocks_closed(text: str) -> bool:
    return all(text.count(f"<{tag}>") == text.count(f"</{tag}>") for tag in ("think", "answer"))


def claim_credibility(response: str) -> float:
    """The share of the arithmetic claims stated in `response` that hold (`graders.arithmetic_claims`);
    1 when it states none: nothing checkable was found invented."""
    claims = arithmetic_claims(response)
    return sum(holds for _, holds in claims) / len(claims) if claims else 1.0


_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_NUMBER_MENTION = re.compile(r"[+-]?\d+(?:[.,]\d+)*(?:\s*/\s*\d+)?%?|[A-Za-z]+(?:-[A-Za-z]+)*")
_MAX_NUMBER_MENTIONS = 20  # the last ones of a sentence or reasoning; each is one equivalence check


def _reasoning_and_rest(response: str) -> tuple[str, str]:
    """The text of `response`'s `<think>` blocks and the rest; an unclosed `<think>` makes everything after
    it reasoning (which then reaches no answer outside itself)."""
    reasoning = "\n".join(_THINK_BLOCK.findall(response))
    rest = _THINK_BLOCK.sub("\n", response)
    if "<think>" in rest:
        rest, _, tail = rest.partition("<think>")
        reasoning += "\n" + tail
    return reasoning.strip(), rest


def _mentions(text: str, answer: str) -> bool:
    """Whether `text` states `answer`: the answer's text as a whole word (case-insensitive), or, for a
    numeric answer, a number in `text` equivalent to it ("0.5" for "1/2", "three" for "3")."""
    pattern = rf"(?<![\w.]){re.escape(answer.casefold())}(?!\w|[.,]\d)"
    if re.search(pattern, text.casefold()):
        return True
    if not reads_as_number(answer):
        return False
    mentions = [
        token
        for token in _NUMBER_MENTION.findall(text)
        if not token[-1].isalpha() or parse_number_words(token) is not None
    ][-_MAX_NUMBER_MENTIONS:]
    return any(answers_equivalent(number, answer).equal for number in mentions)


def reasoning_consistency(response: str) -> float:
    """Whether the reasoning of `response` arrives at the final answer it gives: 1 when the final answer
    (`rewards.final_answer` of the text outside `<think>`) is stated in the last sentence of the reasoning,
    0.5 when only elsewhere in it, 0 when nowhere (or there is no final answer); 1 for a response without
    reasoning (nothing to contradict)."""
    reasoning, rest = _reasoning_and_rest(response)
    if not reasoning:
        return 1.0
    answer = final_answer(rest).strip()
    if not answer:
        return 0.0
    sentences = [s for s in _SENTENCE_BREAK.split(reasoning) if s.strip()]
    if _mentions(sentences[-1], answer):
        return 1.0
    return 0.5 if _mentions(reasoning, answer) else 0.0


_TAG = re.compile(r"</?(?:think|answer|analysis)>|<\|[a-z_]+\|>")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD_SEPARATORS = re.compile(r"[-'’./:@_+=×*^,;!?&#~|(){}\[\]<>\"]+")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_VOWELS = frozenset("aeiouyàáâäåæèéêëìíîïòóôöøùúûüýÿœāēīōūąęěůőű")  # not ã/õ: "Ã" opens mojibake


def _is_latin(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("LATIN")


def _readable_piece(piece: str) -> bool:
    if not piece or piece.isdigit():
        return True
    if piece.isalpha():
        if any(ch in _VOWELS for ch in piece.casefold()) or not all(_is_latin(ch) for ch in piece):
            return True
        # vowel-less Latin: units and short forms ("km", "s" of "it's"), acronyms ("HTML"); not "xqzt", "Ãĥ"
        return piece.isascii() and (len(piece) <= 2 or (piece.isupper() and len(piece) <= 5))
    if piece.isalnum():  # letters with digits: "10km", "2nd", "H2O", "mp4"
        runs = _LETTER_RUN.findall(piece)
        if runs == [piece]:  # numerals `\d` does not match ("½", "Ⅻ", "x½"): number-like, and no split left
            return True
        return all(_readable_piece(run) for run in runs)
    return False  # another symbol inside a word


def _strip_symbols(token: str) -> str:
    start, end = 0, len(token)
    while start < end and unicodedata.category(token[start])[0] in "PS":
        start += 1
    while end > start and unicodedata.category(token[end - 1])[0] in "PS":
        end -= 1
    return token[start:end]


def readable_share(text: str) -> float:
    """The share of the words of `text` (whitespace-separated tokens with a letter or digit, tags such as
    `<think>` left out) that are readable: each part between the punctuation a word may carry ("e.g.",
    "don't", "km/h", "2+2=4") is a number, letters with a vowel (aeiouy, accented forms included), non-Latin
    letters, a vowel-less unit or acronym (at most 2 letters, or 5 capitals), or letters and digits mixed
    whose letter runs are each readable. LaTeX command names are notation and are left out. 0 with no
    word."""
    readable = total = 0
    for token in _TAG.sub(" ", text).split():
        core = _strip_symbols(_LATEX_COMMAND.sub("", token))
        if not any(ch.isalnum() for ch in core):
            continue
        total += 1
        readable += all(_readable_piece(piece) for piece in _WORD_SEPARATORS.split(core))
    return readable / total if total else 0.0


def _form(text: str, grounding: bool) -> str:
    """What an answer is: "box", "number", "words", "other" (symbols only) or "none" (empty)."""
    if not text:
        return "none"
    if grounding:
        try:
            parse_box(text)
            return "box"
        except (ValueError, TypeError):
            pass
    if reads_as_number(text):
        return "number"
    return "words" if any(ch.isalpha() for ch in text) else "other"


def answer_form(response: str, reference: object, task: str) -> float:
    """Whether the final answer of `response` (read outside its reasoning) has the form of `reference`: a
    box (four numbers) for a grounding task, a number when the reference reads as one
    (`graders.reads_as_number`), words when it has letters; without a reference (None), whether there is a
    non-empty final answer."""
    answer = final_answer(_reasoning_and_rest(response)[1]).strip()
    if reference is None:
        return float(bool(answer))
    expected = "box" if task == "grounding" else _form(str(reference).strip(), grounding=False)
    return float(_form(answer, grounding=task == "grounding") == expected)


def signal_scores(
    pair: Mapping[str, Any],
    response: str,
    other: str,
    config: RewardModelConfig | None = None,
    *,
    count_tokens: Callable[[str], int] = count_words,
) -> dict[str, int]:
    """Dimension scores of `response` (one side of `pair`, `other` the other side) from the signals described
    in the module docstring, on the config's integer scale."""
    config = config or RewardModelConfig()
    query = pair["messages"]
    reference = pair.get("reference")
    if reference is not None:
        correctness = reference_check(pair, response)
    else:
        side = "chosen_score" if response == pair["chosen"] else "rejected_score"
        scores = (pair.get("chosen_score"), pair.get("rejected_score"))
        in_unit = all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1 for s in scores)
        correctness = float(pair[side]) if in_unit else 0.5
    own_length, other_length = max(count_tokens(response), 1), max(count_tokens(other), 1)
    redundancy = (1 - _repeated_share(response)) * math.sqrt(min(own_length, other_length) / own_length)
    terms = content_terms(response)
    context = content_terms(query_text(query) + " " + ("" if reference is None else str(reference)))
    relevance = len(terms & context) / len(terms) if terms else 1.0
    completeness = float(bool(extract_answer(response).strip()) and _blocks_closed(response))
    mode = prompt_mode(query_parts(query))  # the /think or /no_think switch the query ends with, if any
    instruction = mode_format_reward(response, mode, require_analysis=False).value
    units = {
        "credibility": claim_credibility(response),
        "correctness": correctness,
        "redundancy": redundancy,
        "relevance": relevance,
        "completeness": completeness,
        "instruction_following": instruction,
        "consistency": reasoning_consistency(response),
        "readability": readable_share(response),
        "answer_form": answer_form(response, reference, pair.get("task") or "math"),
    }
    span = config.score_max - config.score_min
    return {
        name: config.score_min + round(min(max(units[name], 0.0), 1.0) * span) for name in DIMENSION_NAMES
    }


@dataclass(frozen=True)
class RewardDataReport:
    num_pairs: int  # pairs given
    num_conversations: int  # distinct conversations built
    num_occurrences: int  # conversations counting repeats (what training sees)
    verdicts: Mapping[str, int]  # target verdict → occurrences (equal A and B: no position bias)
    length_debias: LengthDebiasReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_pairs": self.num_pairs,
            "num_conversations": self.num_conversations,
            "num_occurrences": self.num_occurrences,
            "verdicts": dict(self.verdicts),
            "length_debias": self.length_debias.to_dict(),
        }


def reference_check(pair: Mapping[str, Any], response: str) -> float:
    """The rule check of the pair's task (`rewards.answer_reward`) of `response` against the pair's reference
    answer, in [0, 1]."""
    task = pair.get("task") or "math"
    if task not in TASKS:
        raise ValueError(f"pair task {task!r} must be one of {TASKS}")
    return answer_reward(response, pair["reference"], task, options=pair.get("options")).value


def reference_givers(pair: Mapping[str, Any]) -> dict[str, str]:
    """Per order ("chosen_a", "chosen_b"), which response gives the pair's reference answer ("A", "B", "both",
    "neither"), by the rule check of its task (`reference_check` = 1): the fact a reference-guided target's
    first line states."""
    gives = {side: reference_check(pair, pair[side]) >= 1.0 for side in ("chosen", "rejected")}

    def giver(a: bool, b: bool) -> str:
        return "both" if a and b else "A" if a else "B" if b else "neither"

    return {
        "chosen_a": giver(gives["chosen"], gives["rejected"]),
        "chosen_b": giver(gives["rejected"], gives["chosen"]),
    }


def build_reward_model_data(
    pairs: Sequence[Mapping[str, Any]],
    config: RewardModelConfig | None = None,
    *,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    count_tokens: Callable[[str], int] = count_words,
    task_definition: str = DEFAULT_TASK_DEFINITION,
) -> tuple[list[dict], RewardDataReport]:
    """Reward-model conversations (prompt → target verdict) from preference pairs (`messages`, `chosen`,
    `rejected`; optional `pair_id`, `reference`, `task`, `options`, `chosen_score`, `rejected_score`,
    `task_definition`, `repeats`), after the length-debiasing pass; both A/B orders for every pair and mode.

    A conversation: `conversation_id` (unique), `pair_id`, `mode`, `order` ("chosen_a" / "chosen_b"),
    `verdict`, `repeats` (its pair's, after debiasing), `shorter_preferred`, and `messages` (the judge prompt
    plus the target as the assistant turn)."""
    config = config or RewardModelConfig()
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes={modes!r}: a non-empty list of distinct modes from {MODES}")
    debiased, debias_report = length_debias(pairs, config, seed=seed, count_tokens=count_tokens)
    conversations: list[dict] = []
    verdicts = {"A": 0, "B": 0}
    for k, pair in enumerate(debiased):
        pair_id = str(pair.get("pair_id") or pair.get("item_id") or k)
        definition = pair.get("task_definition") or task_definition
        chosen, rejected = pair["chosen"], pair["rejected"]
        givers = reference_givers(pair) if pair.get("reference") is not None else None
        scores = None
        if "think" in modes:
            scores = (
                signal_scores(pair, chosen, rejected, config, count_tokens=count_tokens),
                signal_scores(pair, rejected, chosen, config, count_tokens=count_tokens),
            )
        for mode in modes:
            for order, (a, b), verdict in (
                ("chosen_a", (chosen, rejected), "A"),
                ("chosen_b", (rejected, chosen), "B"),
            ):
                restated = None if givers is None else reference_line(pair["reference"], givers[order])
                judgement = Judgement(verdict, reference_line=restated)
                if mode == "think":
                    first, second = scores if verdict == "A" else scores[::-1]
                    judgement = Judgement(verdict, first, second, restated)
                messages = build_prompt(
                    definition, pair["messages"], a, b, mode, config, reference=pair.get("reference")
                )
                messages.append({"role": "assistant", "content": render_output(judgement, mode)})
                conversations.append({
                    "conversation_id": f"{k}:{pair_id}:{mode}:{order}", "pair_id": pair_id, "mode": mode,
                    "order": order, "verdict": verdict, "repeats": pair["repeats"],
                    "shorter_preferred": shorter_preferred(pair, count_tokens), "messages": messages,
                })  # fmt: skip
                verdicts[verdict] += pair["repeats"]
    report = RewardDataReport(
        len(pairs),
        len(conversations),
        sum(c["repeats"] for c in conversations),
        MappingProxyType(verdicts),
        debias_report,
    )
    return conversations, report


# ================================================================================================ judge


@dataclass(frozen=True)
class ComparisonRequest:
    """Judge `response` against `competitor` (a reference answer or another response) for `query`;
    `reference`: the query's reference answer, shown to the judge when there is one."""

    query: Query
    response: str
    competitor: str
    task_definition: str | None = None
    reference: object | None = None


@dataclass(frozen=True)
class Comparison:
    """The judge's preference for the response over its competitor: `value` in [0, 1] (None when an order
    asked gave no usable verdict), why, and per order asked (response as A, then as B) the judgement or the
    problem."""

    value: float | None
    reason: str
    judgements: tuple[Judgement | None, ...]
    problems: tuple[str | None, ...]


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:200]


class RewardModelJudge:
    """A reward model behind any `Generator` (module docstring). `task_definition`: what the judge is told the
    task is when a request names none. `baseline(item) -> str | None`: a competing response for `reward` when
    the item has no reference (e.g. the SFT model's answer); without either, `reward` has nothing to compare
    with and returns None. `max_new_tokens`: default 48 for no_think, 512 for think."""

    def __init__(
        self,
        generator: Generator,
        config: RewardModelConfig | None = None,
        *,
        task_definition: str = DEFAULT_TASK_DEFINITION,
        baseline: Callable[[RewardItem], str | None] | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
    ):
        if not hasattr(generator, "generate"):
            raise ValueError(f"generator must have a generate method, got {type(generator).__name__}")
        self.generator = generator
        self.config = config or RewardModelConfig()
        if not isinstance(task_definition, str) or not task_definition.strip():
            raise ValueError("task_definition must be a non-empty string")
        self.task_definition = task_definition
        self.baseline = baseline
        # no_think: the reference line (the reference restated, a few words) and the verdict line.
        self.max_new_tokens = max_new_tokens or (512 if self.config.mode == "think" else 48)
        self.seed = seed

    def __repr__(self) -> str:
        return f"RewardModelJudge({self.generator!r}, mode={self.config.mode!r})"

    def _ask(self, conversations: list[list[dict]]) -> list[Completion | Exception]:
        """Per conversation, the output (with its tokens' logprobs when `verdict_confidence`) or the error its
        request failed with."""
        from keyeflow.model.generation import BatchGenerationError

        try:
            out = self.generator.generate(
                conversations,
                n=1,
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
                seed=self.seed,
                logprobs=self.config.verdict_confidence,
            )
        except BatchGenerationError as error:
            return [r if isinstance(r, Exception) else r[0] for r in error.results]
        except ValueError as error:
            # A backend that refuses one conversation before sending any (a server given internal media
            # parts) refuses the whole batch: ask one at a time so only that one fails.
            if len(conversations) > 1:
                return [self._ask([c])[0] for c in conversations]
            return [error]
        except (RuntimeError, OSError, KeyError) as error:  # a server down or erroring after its retries
            return [error] * len(conversations)
        return [group[0] for group in out]

    def compare(self, requests: Sequence[ComparisonRequest]) -> list[Comparison]:
        """Judge every request (both orders when `swap_orders`), in one generator call."""
        mode = self.config.mode
        positions = ("A", "B") if self.config.swap_orders else ("A",)
        prompts: list[list[dict]] = []
        refused: dict[int, ValueError] = {}  # request index → why its prompt could not be built
        for k, request in enumerate(requests):
            definition = request.task_definition or self.task_definition
            try:
                built = [
                    build_prompt(
                        definition,
                        request.query,
                        *(
                            (request.response, request.competitor)
                            if position == "A"
                            else (request.competitor, request.response)
                        ),
                        mode,
                        self.config,
                        reference=request.reference,
                    )
                    for position in positions
                ]
            except ValueError as error:  # a malformed query or response fails its own request only
                refused[k] = error
                continue
            prompts += built
        asked = iter(self._ask(prompts) if prompts else [])
        outputs = [
            refused[k] if k in refused else next(asked) for k in range(len(requests)) for _ in positions
        ]
        results = []
        for k in range(len(requests)):
            judgements: list[Judgement | None] = []
            problems: list[str | None] = []
            values, notes = [], []
            for j, position in enumerate(positions):
                output = outputs[k * len(positions) + j]
                where = f"response as {position}"
                if isinstance(output, Exception):
                    judgements.append(None)
                    problems.append(f"request failed ({_failure(output)})")
                    notes.append(f"{where}: {problems[-1]}")
                    continue
                try:
                    judgement = parse_output(output.text, mode, self.config)
                    if self.config.verdict_confidence and judgement.verdict != "tie":
                        judgement = dataclasses.replace(
                            judgement,
                            confidence=decisive_probability(
                                output.text, judgement, output.tokens, output.token_logprobs
                            ),
                        )
                except RewardModelOutputError as error:
                    judgements.append(None)
                    problems.append(f"unusable output: {error}")
                    notes.append(f"{where}: {problems[-1]}")
                    continue
                value = preference_value(judgement, position, self.config)
                judgements.append(judgement)
                problems.append(None)
                values.append(value)
                sure = "" if judgement.confidence is None else f" (p={judgement.confidence:.3f})"
                notes.append(f"{where}: verdict {judgement.verdict}{sure} → {value:.2f}")
            # Every order asked must be usable: one order alone carries the position bias the swap cancels.
            value = sum(values) / len(values) if values and len(values) == len(positions) else None
            summary = f"{value:.2f}" if value is not None else "no usable verdict"
            results.append(
                Comparison(
                    value, f"reward model {summary} ({'; '.join(notes)})", tuple(judgements), tuple(problems)
                )
            )
        return results

    def reward(self, item: RewardItem, response: str) -> Reward | None:
        """`RewardCombiner`'s reward_model callable: the preference for `response` over the item's reference
        (or the baseline's response), in [0, 1], with the reason; None when there is nothing to compare with.
        Raises ScoringError (naming the query and every order's problem) when the judgement failed."""
        competitor = (
            item.reference
            if item.reference is not None
            else (self.baseline(item) if self.baseline is not None else None)
        )
        if competitor is None:
            return None
        (comparison,) = self.compare(
            [ComparisonRequest(item.prompt, response, str(competitor), reference=item.reference)]
        )
        if comparison.value is None:
            try:
                named = _short(query_text(item.prompt))
            except ValueError:  # the malformed query that made the comparison fail
                named = _short(repr(item.prompt))
            raise ScoringError(f"reward model: query {named}: {comparison.reason}")
        return Reward(min(1.0, max(0.0, comparison.value)), comparison.reason)

    __call__ = reward
