"""LongCoT cold-start scoring (SPEC §4.3.1 steps 2–5): path confidence and selection, grades, repeats.

- Step 2, multi-path generation: every reasoning path is split into steps (:func:`split_steps`: blank
  lines, "Step k" markers, the ``<think>``/``<answer>`` tags); a step's confidence is the geometric-mean
  probability of its tokens, ``exp(mean log p)`` in [0, 1]; a response's confidence aggregates its steps
  (``LongCoTConfig.response_confidence``: ``"min"`` by default, since a chain is as sound as its weakest
  step and a mean would hide one shaky step among many sure ones; ``"mean"`` is the alternative).
  :func:`select_paths` keeps the correct paths, most confident first, drops near-duplicates (Jaccard
  similarity of word 3-grams above ``dedup_similarity``) and keeps at most ``max_paths_per_question``.
  Keye gives neither the formula nor the counts; these are the defaults chosen here.
- Step 3, two-level assessment: :func:`grade` turns the answer-level verdict (graders.answers_equivalent)
  and the process-level scores (logical consistency, factual accuracy, relevance, each in [0, 1]) into A,
  B or C.
- Step 4, human review: every B, and every "borderline A" whose redundancy lies in
  ``[redundancy_review, redundancy_max)``, is flagged ``needs_review``. An A whose redundancy reaches
  ``redundancy_max`` is graded B: excess redundancy is a process flaw, and B is reviewed anyway.
- Step 5, dynamic quality score 1–5: :func:`repeats_for_score` gives how many times a kept item appears in
  training (4–5 repeated); :func:`keep_probability` gives the share of items kept for scores 1–2 (used
  sparingly); :func:`training_repeats` combines the two for one item, deterministically from its id so
  that a rerun makes the same rows.

All functions are pure (no model, no prefect); the flow's tasks call them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from keyeflow.config import check_int, check_number, invalid, is_integer, is_number

PROCESS_DIMENSIONS = ("logical_consistency", "factual_accuracy", "relevance")
GRADES = ("A", "B", "C")


# ============================================================================================== config


@dataclass(frozen=True)
class LongCoTConfig:
    """Every threshold of LongCoT scoring; validated on construction (ValueError says which field)."""

    # Step 2: confidence and path selection.
    response_confidence: str = "min"  # "min" or "mean" of the step confidences
    max_paths_per_question: int = 4
    dedup_similarity: float = 0.8  # Jaccard of word 3-grams above this → near-duplicate, dropped
    # Step 3: a process score below this on any dimension makes the process flawed (grade B).
    min_process_score: float = 0.7
    # Step 4: redundancy in [0, 1]; A with redundancy in [redundancy_review, redundancy_max) is borderline
    # (reviewed), at or above redundancy_max it is graded B.
    redundancy_review: float = 0.3
    redundancy_max: float = 0.6
    # Step 5: per quality score 1..5, the repeat count of a kept item and the probability of keeping it.
    repeats_by_score: tuple[int, int, int, int, int] = (1, 1, 1, 2, 3)
    keep_probability_by_score: tuple[float, float, float, float, float] = (0.25, 0.5, 1.0, 1.0, 1.0)
    seed: int = 0  # salts the per-item keep draw

    def __post_init__(self) -> None:
        def fail(name: str, value: object, why: str) -> None:
            raise invalid("LongCoTConfig", name, value, why)

        if self.response_confidence not in ("min", "mean"):
            fail("response_confidence", self.response_confidence, "must be 'min' or 'mean'")
        for name, minimum in (("max_paths_per_question", 1), ("seed", 0)):
            object.__setattr__(
                self, name, check_int("LongCoTConfig", name, getattr(self, name), minimum=minimum)
            )
        for name in ("dedup_similarity", "min_process_score", "redundancy_review", "redundancy_max"):
            if not 0.0 <= check_number("LongCoTConfig", name, getattr(self, name)) <= 1.0:
                fail(name, getattr(self, name), "must be in [0, 1]")
        if self.redundancy_review >= self.redundancy_max:
            fail(
                "redundancy_review",
                self.redundancy_review,
                f"must be below redundancy_max ({self.redundancy_max})",
            )
        object.__setattr__(self, "repeats_by_score", tuple(self.repeats_by_score))
        object.__setattr__(self, "keep_probability_by_score", tuple(self.keep_probability_by_score))
        repeats, keeps = self.repeats_by_score, self.keep_probability_by_score
        if len(repeats) != 5 or not all(is_integer(r) and r >= 1 for r in repeats):
            fail("repeats_by_score", repeats, "must be five integers ≥ 1 (scores 1..5)")
        if len(keeps) != 5 or not all(is_number(p) and 0.0 < p <= 1.0 for p in keeps):
            fail("keep_probability_by_score", keeps, "must be five numbers in (0, 1]")
        # The recipe's intent: a higher quality score never weighs less in training.
        if any(a > b for a, b in itertools.pairwise(repeats)):
            fail("repeats_by_score", repeats, "must not decrease with the score")
        if any(a > b for a, b in itertools.pairwise(keeps)):
            fail("keep_probability_by_score", keeps, "must not decrease with the score")


# ========================================================================================= confidences

_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")
_MARKUP = re.compile(r"</?(?:think|answer)>")
_STEP_MARKER = re.compile(
    r"^[ \t]*(?:#+[ \t]*|[*_]{1,2}|[-*][ \t]+)?step[ \t]*\d+\b", re.IGNORECASE | re.MULTILINE
)


def split_steps(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the reasoning steps in ``text``, in order.

    Steps are separated by blank lines and by the ``<think>``/``</think>``/``<answer>``/``</answer>``
    tags (which belong to no step), and a line starting with a "Step k" marker ("Step 2:", "**Step 2**",
    "### Step 2") starts a new step even without a blank line. Spans are trimmed of surrounding
    whitespace; empty pieces are dropped.
    """
    separators = sorted(
        [(m.start(), m.end()) for m in _BLANK_LINES.finditer(text)]
        + [(m.start(), m.end()) for m in _MARKUP.finditer(text)]
    )
    cuts = sorted({m.start() for m in _STEP_MARKER.finditer(text)})
    pieces: list[tuple[int, int]] = []
    start = 0
    for sep_start, sep_end in [*separators, (len(text), len(text))]:
        if sep_start >= start:
            pieces.append((start, sep_start))
        start = max(start, sep_end)
    spans: list[tuple[int, int]] = []
    for piece_start, piece_end in pieces:
        bounds = [piece_start, *(c for c in cuts if piece_start < c < piece_end), piece_end]
        for a, b in itertools.pairwise(bounds):
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a < b:
                spans.append((a, b))
    return spans


def token_ranges(
    token_offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token index ranges ``[first, last + 1)`` of each character span, given each token's char offsets.

    ``token_offsets`` are a tokenizer's ``offset_mapping`` for the response text. A token belongs to the
    span it overlaps most (a token such as ``"\\n\\nStep"`` straddles two spans); tokens overlapping no
    span (the blank lines between steps, the tags) belong to none. A span with no token gets an empty
    range at the position where its tokens would be.
    """
    assigned: list[list[int]] = [[] for _ in spans]
    for index, (tok_start, tok_end) in enumerate(token_offsets):
        best, best_overlap = None, 0
        for k, (span_start, span_end) in enumerate(spans):
            overlap = min(tok_end, span_end) - max(tok_start, span_start)
            if overlap > best_overlap:
                best, best_overlap = k, overlap
        if best is not None:
            assigned[best].append(index)
    ranges, cursor = [], 0
    for indices in assigned:
        if indices:
            ranges.append((indices[0], indices[-1] + 1))
            cursor = indices[-1] + 1
        else:
            ranges.append((cursor, cursor))
    return ranges


def step_confidences(
    token_logprobs: Sequence[float], step_boundaries: Sequence[tuple[int, int]]
) -> list[float]:
    """Per step, ``exp(mean log p)`` of its tokens: the geometric-mean token probability, in [0, 1].

    ``step_boundaries`` are token index ranges ``[start, end)`` (from :func:`token_ranges`). Log
    probabilities must be ≤ 0 (up to float error) or -inf; a step without tokens is an error.
    """
    for i, lp in enumerate(token_logprobs):
        if math.isnan(lp) or lp > 1e-6:
            raise ValueError(f"token {i}: log probability must be ≤ 0, got {lp}")
    out = []
    for k, (start, end) in enumerate(step_boundaries):
        if not 0 <= start < end <= len(token_logprobs):
            raise ValueError(
                f"step {k}: token range [{start}, {end}) is empty or outside 0..{len(token_logprobs)}"
            )
        mean = math.fsum(token_logprobs[start:end]) / (end - start)
        out.append(min(1.0, math.exp(mean)))
    return out


def response_confidence(step_confs: Sequence[float], how: str = "min") -> float:
    """A response's confidence from its steps' confidences: their minimum (default) or their mean."""
    if not step_confs:
        raise ValueError("a response needs at least one step")
    if how == "min":
        return min(step_confs)
    if how == "mean":
        return math.fsum(step_confs) / len(step_confs)
    raise ValueError(f"how must be 'min' or 'mean', got {how!r}")


@dataclass(frozen=True)
class PathConfidence:
    step_spans: tuple[tuple[int, int], ...]  # character spans in the response text
    step_confidences: tuple[float, ...]
    response: float


def path_confidence(
    text: str,
    token_logprobs: Sequence[float],
    token_offsets: Sequence[tuple[int, int]],
    config: LongCoTConfig | None = None,
) -> PathConfidence:
    """Steps, their confidences and the response confidence of one generated path.

    ``token_logprobs[i]`` is the sampled token's log probability and ``token_offsets[i]`` its character
    span in ``text``. Steps that no token covers are left out.
    """
    config = config or LongCoTConfig()
    if len(token_logprobs) != len(token_offsets):
        raise ValueError(f"{len(token_logprobs)} log probabilities but {len(token_offsets)} token offsets")
    spans = split_steps(text)
    ranges = token_ranges(token_offsets, spans)
    kept = [(span, r) for span, r in zip(spans, ranges) if r[1] > r[0]]
    if not kept:
        raise ValueError("no step of the response is covered by a token")
    confs = step_confidences(token_logprobs, [r for _, r in kept])
    return PathConfidence(
        tuple(span for span, _ in kept), tuple(confs), response_confidence(confs, config.response_confidence)
    )


# ====================================================================================== path selection


@dataclass(frozen=True)
class ReasoningPath:
    """One generated path: ``correct`` is its answer-level verdict against the reference
    (``graders.answers_equivalent(graders.extract_answer(text), reference).equal``)."""

    question_id: str
    text: str
    correct: bool
    confidence: float  # response confidence in [0, 1]


@dataclass
class PathSelection:
    kept: list[ReasoningPath] = field(default_factory=list)
    dropped: list[tuple[ReasoningPath, str]] = field(default_factory=list)  # with the reason


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def text_similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word 3-grams of two texts (case, Unicode forms ignored); 1 if both empty."""
    sa, sb = _shingles(a), _shingles(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def select_paths(paths: Sequence[ReasoningPath], config: LongCoTConfig | None = None) -> PathSelection:
    """Keep, per question, the correct paths, most confident first, without near-duplicates, at most k.

    Within a question, paths are considered by descending confidence (ties keep their input order); a
    path is dropped if its answer is wrong, if its similarity to an already kept path exceeds
    ``dedup_similarity``, or once ``max_paths_per_question`` are kept. Every drop carries its reason.
    Kept paths are returned grouped by question (questions in first-seen order), most confident first.
    """
    config = config or LongCoTConfig()
    by_question: dict[str, list[tuple[int, ReasoningPath]]] = {}
    for index, path in enumerate(paths):
        if not 0.0 <= path.confidence <= 1.0:
            raise ValueError(f"path {index}: confidence must be in [0, 1], got {path.confidence}")
        by_question.setdefault(path.question_id, []).append((index, path))
    selection = PathSelection()
    for group in by_question.values():
        kept: list[ReasoningPath] = []
        for _, path in sorted(group, key=lambda item: (-item[1].confidence, item[0])):
            if not path.correct:
                selection.dropped.append((path, "answer wrong"))
                continue
            similarity = max((text_similarity(path.text, k.text) for k in kept), default=0.0)
            if similarity > config.dedup_similarity:
                reason = (
                    f"near-duplicate of a kept path (similarity {similarity:.2f} > {config.dedup_similarity})"
                )
                selection.dropped.append((path, reason))
            elif len(kept) >= config.max_paths_per_question:
                selection.dropped.append(
                    (path, f"over the limit of {config.max_paths_per_question} per question")
                )
            else:
                kept.append(path)
        selection.kept.extend(kept)
    return selection


# ============================================================================================== grading


@dataclass(frozen=True)
class GradeResult:
    grade: str  # "A", "B" or "C"
    needs_review: bool
    reasons: tuple[str, ...]

    @property
    def kept(self) -> bool:
        """C is discarded; A and B go on (B after human streamlining)."""
        return self.grade != "C"


def grade(
    answer_ok: bool, process_scores: dict[str, float], redundancy: float, config: LongCoTConfig | None = None
) -> GradeResult:
    """Two-level grade of one path.

    - C: the answer is wrong (dropped; the reasons also list any process failure).
    - B: the answer is right but a process score is below ``min_process_score``, or the redundancy is
      ≥ ``redundancy_max``; always ``needs_review``.
    - A: the answer is right and the process sound; ``needs_review`` when the redundancy lies in
      ``[redundancy_review, redundancy_max)`` (borderline A).

    ``process_scores`` must hold exactly logical_consistency, factual_accuracy and relevance, each in
    [0, 1]; ``redundancy`` is in [0, 1] (higher is more redundant).
    """
    config = config or LongCoTConfig()
    if set(process_scores) != set(PROCESS_DIMENSIONS):
        raise ValueError(
            f"process_scores must have exactly {PROCESS_DIMENSIONS}, got {sorted(process_scores)}"
        )
    for name, value in process_scores.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"process score {name} must be in [0, 1], got {value}")
    if not 0.0 <= redundancy <= 1.0:
        raise ValueError(f"redundancy must be in [0, 1], got {redundancy}")

    flaws = [
        f"{name} {process_scores[name]:g} < {config.min_process_score:g}"
        for name in PROCESS_DIMENSIONS
        if process_scores[name] < config.min_process_score
    ]
    if redundancy >= config.redundancy_max:
        flaws.append(f"redundancy {redundancy:g} ≥ {config.redundancy_max:g}")
    if not answer_ok:
        return GradeResult("C", False, ("answer wrong", *flaws))
    if flaws:
        return GradeResult("B", True, ("process flawed", *flaws))
    if redundancy >= config.redundancy_review:
        band = f"[{config.redundancy_review:g}, {config.redundancy_max:g})"
        return GradeResult("A", True, (f"borderline: redundancy {redundancy:g} in {band}",))
    return GradeResult("A", False, ())


# ========================================================================================= repetition


def _check_score(score: int) -> int:
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        raise ValueError(f"quality score must be an integer 1..5, got {score!r}")
    return score


def repeats_for_score(score: int, config: LongCoTConfig | None = None) -> int:
    """How many times a kept item with this quality score appears in training (default 1,1,1,2,3)."""
    return (config or LongCoTConfig()).repeats_by_score[_check_score(score) - 1]


def keep_probability(score: int, config: LongCoTConfig | None = None) -> float:
    """The share of items with this quality score that are used at all (default 0.25, 0.5, 1, 1, 1)."""
    return (config or LongCoTConfig()).keep_probability_by_score[_check_score(score) - 1]


def training_repeats(item_id: str, score: int, config: LongCoTConfig | None = None) -> int:
    """Copies of one item in the training mixture: 0 when its keep draw fails, else its repeat count.

    The draw is a hash of ``(seed, item_id)`` mapped to [0, 1), so the same item gets the same answer on
    every rerun and on every worker; the expected count is ``keep_probability · repeats_for_score``.
    """
    config = config or LongCoTConfig()
    digest = hashlib.sha256(f"{config.seed}\x00{item_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return repeats_for_score(score, config) if draw < keep_probability(score, config) else 0
