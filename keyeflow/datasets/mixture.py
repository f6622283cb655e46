"""Pre-training data mixtures: which samples a stage trains on, balanced by modality in TOKENS.

Keye-VL-1.5's annealing stage trains on 24% video, 50% image and 26% text tokens (SPEC §3). A mixture is
built from the ``train_samples`` table pinned at one Lance version and written to ``mixtures``: one row
per (mixture, sample) with how many times the sample is used (``repeats``) and its position in the
epoch's shuffled order. ``keyeflow sql`` can confirm the shares a mixture reached
(:func:`reached_shares_sql`), and :func:`keyeflow.quality.gates.check_mixture` stops training when they
drift.

The algorithm (row-level work in DuckDB over the pinned Lance table; only per-source arithmetic in Python):

1. **Exclude, with a reason** (first that applies): ``quarantined`` (its ``source_uri`` is in the
   quarantine table), ``modality_not_in_mixture`` (no positive target share), ``task_not_in_stage``
   (e.g. stage 1 takes captions only), ``no_tokens``, ``over_length`` (longer than the stage's context,
   ``max_sample_tokens``), ``source_weight_zero``. Counts and tokens per reason are in the report.
2. **Plan quotas.** ``N`` = ``total_tokens`` or, by default, the largest mixture the data can give
   under the repeat cap: ``min_m(cap · available_m / share_m)``. Modality quota ``q_m = share_m · N``.
   Within a modality, sources share ``q_m`` in proportion to their weights; a source that cannot supply
   its weighted part (even repeated up to the cap) gives all it has and the rest is spread over the
   other sources by weight (water-filling), so the modality quota, the thing the recipe fixes, holds.
3. **Select.** Each source's quota is ``k`` full passes over its samples plus a remainder ``r``. Samples
   get a seeded pseudo-random rank (``md5(seed:sample_id)``); a running token sum per (modality,
   source) over that rank gives each sample's progress through its source's remainder, and the partial
   pass of the whole modality is one prefix of all its sources' samples ordered by that progress (so
   each source stops at about the same fraction of its remainder). The prefix boundary takes or leaves
   the boundary sample, whichever lands closer to the modality's quota: a modality misses its quota
   by at most half of one sample. A sample is used ``k`` or ``k + 1`` times, never more than the cap,
   and no source is used beyond ``cap × its tokens``.
4. **Order.** A seeded shuffle over every row (``md5(seed:order:sample_id)``) gives ``order``;
   rows come back sorted by it.

Same seed and inputs ⇒ identical rows; the ``mixture_id`` hashes the stage, the config (incl. seed) and
the input table versions, so a new ``train_samples`` version makes a new mixture next to the old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from keyeflow.config import check_flag, check_int, check_number, config_hash, invalid
from keyeflow.datasets import sql, tables
from keyeflow.faults import kill_point

log = logging.getLogger(__name__)

MODALITIES = ("video", "image", "text")
SHARE_SUM_TOLERANCE = 1e-9

# Stage contexts (SPEC §3): 8K for alignment and multi-task pre-training, 128K for annealing.
STAGE_CONTEXT = {1: 8_192, 2: 8_192, 3: 131_072}

# Why a sample is not in a mixture, in the order the reasons are tested (a sample gets the first).
QUARANTINED = "quarantined"
HELD_OUT = "held_out"
MODALITY_NOT_IN_MIXTURE = "modality_not_in_mixture"
TASK_NOT_IN_STAGE = "task_not_in_stage"
NO_TOKENS = "no_tokens"
OVER_LENGTH = "over_length"
SOURCE_WEIGHT_ZERO = "source_weight_zero"
EXCLUSION_REASONS = (
    QUARANTINED,
    HELD_OUT,
    MODALITY_NOT_IN_MIXTURE,
    TASK_NOT_IN_STAGE,
    NO_TOKENS,
    OVER_LENGTH,
    SOURCE_WEIGHT_ZERO,
)

# Tasks of the train_samples rows post-training adds (LongCoT and rejection-sampled conversations, RL
# items' answers, reward-model judgements): pre-training mixtures that take "every task" leave them out.
RL_ANSWER_TASK = "rl-answer"  # RL items' reference answers, written for SFT (keyeflow.steps.posttrain)
POSTTRAIN_TASKS = ("longcot", "reward_model", RL_ANSWER_TASK)

# Relative slack when comparing float quotas with integer token counts.
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """How one pre-training stage mixes its data. Validated on construction."""

    stage: int
    target_shares: dict[str, float]  # modality → share of TOKENS; sums to 1
    max_sample_tokens: int  # the stage's context length: longer samples are excluded (and counted)
    source_weights: dict[str, float] = field(
        default_factory=dict
    )  # source → weight in its modality (default 1)
    tasks: tuple[str, ...] | None = None  # tasks the stage takes; None = every task
    # Cap on uses of one sample per epoch. A fractional cap (2.5) lets a source be used 2.5 times over:
    # every sample 2 times and some 3 times. Only used with upsample=True.
    max_repeats: float = 1
    # When the target cannot be reached with each sample used once: False → raise MixtureShortfall;
    # True → repeat the short modality's data up to max_repeats, and if that is still not enough,
    # build the best mixture under the cap and report the shares reached (the mixture gate then fails).
    upsample: bool = False
    total_tokens: int | None = None  # mixture size in tokens; None = the largest the data gives under the cap
    tolerance_pp: float = 0.5  # allowed |reached − target| share per modality, percentage points
    seed: int = 0
    # Samples kept out of training for evaluation: those whose sample-id hash falls in the first
    # `holdout_per_mille` of 1000 buckets (`heldout_sql`). A hash of the id alone, not of the seed or stage,
    # so every stage and every annealing variant holds out the same samples and no stage trains on another's
    # evaluation data.
    holdout_per_mille: int = 0
    # What the mixture is called in the `mixtures` table (stage3-balanced, a variant's name): a label for
    # SQL users, not part of its identity (config_hash and mixture_id leave it out: equal configs are one
    # mixture, whose rows keep the name they were first written under).
    name: str = ""

    def __post_init__(self) -> None:
        def fail(name: str, value: Any, why: str) -> None:
            raise invalid("MixtureConfig", name, value, why)

        for name, minimum in (("stage", 1), ("max_sample_tokens", 1), ("seed", 0), ("holdout_per_mille", 0)):
            object.__setattr__(
                self, name, check_int("MixtureConfig", name, getattr(self, name), minimum=minimum)
            )
        if self.holdout_per_mille >= 1000:
            fail(
                "holdout_per_mille",
                self.holdout_per_mille,
                "must be < 1000 (1000 would hold out every sample)",
            )
        if self.total_tokens is not None:
            object.__setattr__(
                self, "total_tokens", check_int("MixtureConfig", "total_tokens", self.total_tokens, minimum=1)
            )

        if not isinstance(self.target_shares, dict) or not self.target_shares:
            fail("target_shares", self.target_shares, f"must be a non-empty dict over {MODALITIES}")
        shares = {}
        for modality, share in sorted(self.target_shares.items()):
            if modality not in MODALITIES:
                fail(
                    "target_shares", self.target_shares, f"unknown modality {modality!r}; valid: {MODALITIES}"
                )
            share = check_number("MixtureConfig", f"target_shares[{modality!r}]", share)
            if share < 0:
                fail("target_shares", self.target_shares, f"share of {modality!r} must be >= 0")
            shares[modality] = share
        total = sum(shares.values())
        if abs(total - 1.0) > SHARE_SUM_TOLERANCE:
            fail("target_shares", self.target_shares, f"shares must sum to 1 (they sum to {total!r})")
        object.__setattr__(self, "target_shares", shares)

        if not isinstance(self.source_weights, dict):
            fail("source_weights", self.source_weights, "must be a dict source → weight")
        weights = {}
        for source, weight in sorted(self.source_weights.items()):
            if not isinstance(source, str) or not source:
                fail("source_weights", self.source_weights, "source names must be non-empty strings")
            weight = check_number("MixtureConfig", f"source_weights[{source!r}]", weight)
            if weight < 0:
                fail("source_weights", self.source_weights, f"weight of {source!r} must be >= 0")
            weights[source] = weight
        object.__setattr__(self, "source_weights", weights)

        if self.tasks is not None:
            if isinstance(self.tasks, str) or not all(isinstance(t, str) and t for t in self.tasks):
                fail("tasks", self.tasks, "must be None or a sequence of task names")
            if not self.tasks:
                fail("tasks", self.tasks, "an empty task list would exclude everything; use None for all")
            object.__setattr__(self, "tasks", tuple(sorted(set(self.tasks))))

        check_flag("MixtureConfig", "upsample", self.upsample)
        max_repeats = check_number("MixtureConfig", "max_repeats", self.max_repeats)
        if max_repeats < 1:
            fail("max_repeats", self.max_repeats, "must be >= 1 (1 = every sample used at most once)")
        if max_repeats != 1 and not self.upsample:
            fail(
                "max_repeats",
                self.max_repeats,
                "only applies with upsample=True (upsample=False uses every sample at most once)",
            )
        # Keep integral caps integers so that 2 and 2.0 hash alike and read naturally.
        object.__setattr__(self, "max_repeats", int(max_repeats) if max_repeats.is_integer() else max_repeats)

        tolerance = check_number("MixtureConfig", "tolerance_pp", self.tolerance_pp)
        if not 0 < tolerance <= 100:
            fail("tolerance_pp", self.tolerance_pp, "must be in (0, 100] percentage points")
        object.__setattr__(self, "tolerance_pp", tolerance)

    @property
    def targeted_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if self.target_shares.get(m, 0.0) > 0)

    @property
    def repeat_cap(self) -> float:
        """Passes over the data a source may be used for (1 unless upsampling)."""
        return self.max_repeats if self.upsample else 1

    @property
    def sample_repeat_cap(self) -> int:
        """Most uses of one sample: the pass cap rounded up."""
        return math.ceil(self.repeat_cap - _EPS)

    def weight(self, source: str) -> float:
        return self.source_weights.get(source, 1.0)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks) if self.tasks is not None else None
        return out

    def config_hash(self) -> str:
        return config_hash({k: v for k, v in self.to_dict().items() if k != "name"}, compact=True)


# Stage 2's mixture is UNSTATED in the paper (SPEC §3 lists its tasks, not shares). We pick
# video 0.2 / image 0.6 / text 0.2: image tasks (captioning, OCR, grounding, VQA, interleaved) are the
# stage's substance, with enough video and text to keep both skills alive before annealing.
STAGE_SHARES = {
    1: {"image": 1.0},
    2: {"video": 0.2, "image": 0.6, "text": 0.2},
    3: {"video": 0.24, "image": 0.50, "text": 0.26},
}
STAGE_TASKS: dict[int, tuple[str, ...] | None] = {
    1: ("caption",),  # alignment trains the projector on image–text pairs only
    2: ("caption", "ocr", "grounding", "vqa", "interleaved", "text"),
    3: None,  # annealing: every curated task, long video/text and large images
}

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(MixtureConfig))


def stage_mixture(stage: int, **overrides: Any) -> MixtureConfig:
    """The recipe's mixture for pre-training stage 1, 2 or 3, with some fields replaced."""
    if stage not in STAGE_SHARES:
        raise ValueError(
            f"no data mixture for stage {stage!r}: stages 1–3 train on data "
            "(stage 4 is fusion: weight averaging of stage-3 checkpoints)"
        )
    unknown = sorted(set(overrides) - set(_FIELD_NAMES) | ({"stage"} & set(overrides)))
    if unknown:
        valid = [name for name in _FIELD_NAMES if name != "stage"]
        raise ValueError(f"unknown or fixed MixtureConfig override(s) {unknown}; valid: {valid}")
    base = {
        "stage": stage,
        "target_shares": dict(STAGE_SHARES[stage]),
        "tasks": STAGE_TASKS[stage],
        "max_sample_tokens": STAGE_CONTEXT[stage],
        "name": f"stage{stage}",
    }
    return MixtureConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class ModalityReport:
    modality: str
    target_share: float
    available_tokens: int  # eligible tokens (after exclusions), one pass
    available_samples: int
    quota_tokens: float  # target_share × total_tokens
    reached_tokens: int  # sum(num_tokens × repeats)
    reached_share: float
    samples_used: int
    uses: int  # sum(repeats)
    max_repeats: int  # most uses of one sample
    passes: float  # reached_tokens / available_tokens


@dataclass(frozen=True)
class SourceReport:
    modality: str
    source: str
    weight: float
    available_tokens: int
    available_samples: int
    quota_tokens: float  # after water-filling
    weighted_quota_tokens: float  # what the weights alone ask for
    reached_tokens: int
    samples_used: int
    passes: float


@dataclass(frozen=True)
class Exclusion:
    reason: str
    modality: str
    num_samples: int
    num_tokens: int


@dataclass(frozen=True)
class Shortfall:
    """A modality whose quota exceeds what its data gives under the repeat cap."""

    modality: str
    quota_tokens: float
    available_tokens: int
    usable_tokens: float  # available × repeat cap
    missing_tokens: float
    passes_needed: float  # quota / available (inf when nothing is available)


@dataclass
class MixtureReport:
    mixture_id: str
    stage: int
    config_hash: str
    seed: int
    train_samples_version: int
    quarantine_version: int | None
    total_tokens: int  # the target size N
    max_total_tokens: int  # the largest mixture the data gives under the cap
    reached_tokens: int
    num_rows: int
    tolerance_pp: float
    repeat_cap: float
    modalities: list[ModalityReport]
    sources: list[SourceReport]
    excluded: list[Exclusion]
    shortfalls: list[Shortfall] = field(default_factory=list)  # only with upsample=True

    @property
    def within_tolerance(self) -> bool:
        return all(
            abs(m.reached_share - m.target_share) * 100 <= self.tolerance_pp + 1e-12 for m in self.modalities
        )

    @property
    def excluded_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.excluded:
            counts[e.reason] = counts.get(e.reason, 0) + e.num_samples
        return counts

    def modality(self, name: str) -> ModalityReport:
        for m in self.modalities:
            if m.modality == name:
                return m
        raise KeyError(
            f"modality {name!r} is not in this mixture; it has {[m.modality for m in self.modalities]}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["within_tolerance"] = self.within_tolerance
        out["excluded_counts"] = self.excluded_counts
        return out

    def markdown(self) -> str:
        verdict = "within" if self.within_tolerance else "OUTSIDE"
        lines = [
            f"## Mixture `{self.mixture_id}` (stage {self.stage}, seed {self.seed})",
            "",
            (
                f"{self.reached_tokens:,} tokens in {self.num_rows:,} samples "
                f"(target {self.total_tokens:,}); "
                f"shares {verdict} ±{self.tolerance_pp} pp; repeat cap {self.repeat_cap}."
            ),
            "",
            (
                "| modality | available | target | quota | reached | reached share | samples | uses "
                "| max repeats |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in self.modalities:
            lines.append(
                f"| {m.modality} | {m.available_tokens:,} | {m.target_share:.2%} | {m.quota_tokens:,.0f} | "
                f"{m.reached_tokens:,} | {m.reached_share:.2%} | {m.samples_used:,} | {m.uses:,} "
                f"| {m.max_repeats} |"
            )
        if self.excluded:
            lines += ["", "| excluded because | modality | samples | tokens |", "|---|---|---|---|"]
            lines += [
                f"| {e.reason} | {e.modality} | {e.num_samples:,} | {e.num_tokens:,} |" for e in self.excluded
            ]
        for s in self.shortfalls:
            lines.append(f"\nShort of {s.modality}: {s.missing_tokens:,.0f} tokens under the cap.")
        return "\n".join(lines)


class MixtureShortfall(ValueError):
    """The data cannot reach the target shares within the repeat cap."""

    def __init__(self, message: str, shortfalls: list[Shortfall]):
        super().__init__(message)
        self.shortfalls = shortfalls


@dataclass(frozen=True)
class MixtureResult:
    mixture: tables.TableRef  # the mixtures table at the version holding this mixture's rows
    mixture_id: str
    report: MixtureReport | None  # None for a fixed mixture (its repeats were given, nothing was balanced)


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SourcePlan:
    modality: str
    source: str
    weight: float
    available_tokens: int
    available_samples: int
    weighted_quota: float
    quota: float
    full_passes: int  # every sample of the source is used this many times …
    remainder: float  # … and a prefix of about this many tokens once more
    cap_tokens: float  # repeat cap × available: the source never goes past this


@dataclass(frozen=True)
class Plan:
    total_tokens: float
    max_total_tokens: float
    quotas: dict[str, float]  # modality → tokens (after any upsample best-effort cut)
    remainders: dict[str, float]  # modality → tokens the partial pass must supply
    sources: list[SourcePlan]
    shortfalls: list[Shortfall]


def _water_fill(quota: float, sources: list[tuple[str, float, float]]) -> dict[str, float]:
    """Split ``quota`` over (name, weight, cap) in proportion to weight, no source above its cap."""
    out: dict[str, float] = {}
    remaining, weight_left = quota, sum(w for _, w, _ in sources)
    pending = sorted(sources, key=lambda s: (s[2] / s[1], s[0]))
    for i, (name, weight, cap) in enumerate(pending):
        fair = remaining * weight / weight_left
        if cap <= fair:
            out[name] = cap
            remaining -= cap
            weight_left -= weight
            continue
        for other, w, _ in pending[i:]:  # every later source has room for its fair part
            out[other] = remaining * w / weight_left
        break
    return out


def _fmt(tokens: float) -> str:
    return f"{tokens:,.0f}"


def plan_quotas(
    available: Iterable[tuple[str, str, int, int]],
    config: MixtureConfig,
    excluded: list[Exclusion] | None = None,
) -> Plan:
    """Token quotas per modality and source from the eligible (modality, source, tokens, samples).

    Raises :class:`MixtureShortfall` for a targeted modality with no tokens, and, unless upsampling,
    for one whose quota exceeds its tokens.
    """
    cap = float(config.repeat_cap)
    by_modality: dict[str, list[tuple[str, int, int]]] = {m: [] for m in config.targeted_modalities}
    for modality, source, tokens, samples in available:
        if modality in by_modality and tokens > 0:
            by_modality[modality].append((source, int(tokens), int(samples)))
    avail = {m: sum(t for _, t, _ in rows) for m, rows in by_modality.items()}
    shares = {m: config.target_shares[m] for m in config.targeted_modalities}

    empty = [m for m in shares if avail[m] == 0]
    if empty:
        why = ""
        if excluded:
            lost = [e for e in excluded if e.modality in empty]
            if lost:
                why = (
                    " (excluded: " + ", ".join(f"{e.num_samples} {e.modality} {e.reason}" for e in lost) + ")"
                )
        raise MixtureShortfall(
            f"stage {config.stage} mixture: no eligible {' / '.join(empty)} tokens{why} but the target "
            f"share is {', '.join(f'{m} {shares[m]:.1%}' for m in empty)}. Fix: add {' / '.join(empty)} "
            f"data to train_samples or set the share to 0.",
            [Shortfall(m, math.inf, 0, 0.0, math.inf, math.inf) for m in empty],
        )

    max_total = min(cap * avail[m] / shares[m] for m in shares)
    total = float(config.total_tokens) if config.total_tokens is not None else max_total
    quotas, shortfalls = {}, []
    for m, share in shares.items():
        quota = share * total
        usable = cap * avail[m]
        if quota > usable * (1 + _EPS):
            shortfalls.append(Shortfall(m, quota, avail[m], usable, quota - usable, quota / avail[m]))
            quota = usable
        quotas[m] = min(quota, usable)
    if shortfalls and not config.upsample:
        parts = []
        for s in shortfalls:
            parts.append(
                f"{s.modality} is short by {_fmt(s.missing_tokens)} tokens (quota "
                f"{shares[s.modality]:.1%} × {_fmt(total)} = {_fmt(s.quota_tokens)}; "
                f"{_fmt(s.available_tokens)} eligible, each sample used at most once)"
            )
        need = max(s.passes_needed for s in shortfalls)
        raise MixtureShortfall(
            f"stage {config.stage} mixture: " + "; ".join(parts) + ". Fix: upsample=True with "
            f"max_repeats >= {math.ceil(need - _EPS)} ({need:.2f} passes over the "
            f"{' / '.join(s.modality for s in shortfalls)} data are needed), or total_tokens <= "
            f"{math.floor(max_total):,}, or more {' / '.join(s.modality for s in shortfalls)} data.",
            shortfalls,
        )
    if shortfalls:
        log.warning(
            "mixture stage %s: %s short under max_repeats=%s; shares will miss the target",
            config.stage,
            ", ".join(f"{s.modality} by {_fmt(s.missing_tokens)} tokens" for s in shortfalls),
            config.max_repeats,
        )

    plans, remainders = [], {}
    for m, rows in by_modality.items():
        weighted = {s: config.weight(s) for s, _, _ in rows}
        weight_sum = sum(weighted.values())
        filled = _water_fill(quotas[m], [(s, weighted[s], cap * t) for s, t, _ in rows])
        remainders[m] = 0.0
        for source, tokens, samples in sorted(rows):
            quota = filled[source]
            full = min(math.floor(quota / tokens + _EPS), math.floor(cap + _EPS))
            remainder = max(quota - full * tokens, 0.0)
            if remainder < _EPS * tokens:
                remainder = 0.0
            remainders[m] += remainder
            plans.append(
                SourcePlan(
                    m,
                    source,
                    weighted[source],
                    tokens,
                    samples,
                    quotas[m] * weighted[source] / weight_sum,
                    quota,
                    full,
                    remainder,
                    cap * tokens,
                )
            )
    return Plan(total, max_total, quotas, remainders, plans, shortfalls)


# ---------------------------------------------------------------------------------------------- DuckDB


def _lit(value: str) -> str:
    # Only for SQL text that people read and run themselves in `keyeflow sql` (classify_sql,
    # reached_shares_sql), which takes no parameters, and for constants of the code; quoted the SQL way (a
    # quote doubled). What keyeflow runs with a data or config value in it binds the value as a parameter
    # (classify_query) or an Arrow filter instead.
    return "'" + str(value).replace("'", "''") + "'"


def _sql_value(value) -> str:
    """A string or a list of strings as SQL text (a quoted literal, a list literal)."""
    if isinstance(value, list):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    return _lit(value)


def mixture_id(config: MixtureConfig, eligible_digest: str) -> str:
    """The mixture's identity: the config and the CONTENT of the rows it may choose from (their ids,
    modalities, sources and token counts; a sample id is itself a content hash). Not the table versions: rows
    appended to train_samples or quarantine that this config excludes (post-training's own rows, an unrelated
    quarantined file) change a version but not the mixture, and must not make every stage downstream train
    again."""
    payload = {
        "stage": config.stage,
        "config": config.config_hash(),
        "seed": config.seed,
        "eligible": eligible_digest,
    }
    return config_hash(payload, compact=True)


class _Bound:
    """Values of a query kept out of its text: each becomes a DuckDB named parameter ``$pN``."""

    def __init__(self):
        self.params: dict[str, object] = {}

    def __call__(self, value) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return "$" + name


def _classify(config: MixtureConfig, with_quarantine: bool, value: Callable[[object], str]) -> str:
    # `value` renders each config value into the query: a bound parameter (what keyeflow runs) or a quoted
    # literal (the text people run in `keyeflow sql`).
    reasons = []
    if with_quarantine:
        reasons.append(f"when q.uri is not null then {value(QUARANTINED)}")
    if config.holdout_per_mille:
        reasons.append(f"when {_held_out('s.sample_id', config.holdout_per_mille)} then {value(HELD_OUT)}")
    modalities = value(list(config.targeted_modalities))
    reasons.append(
        f"when s.modality is null or not list_contains({modalities}, s.modality) "
        f"then {value(MODALITY_NOT_IN_MIXTURE)}"
    )
    if config.tasks is not None:
        reasons.append(
            f"when s.task is null or not list_contains({value(list(config.tasks))}, s.task) "
            f"then {value(TASK_NOT_IN_STAGE)}"
        )
    else:  # "every task" of pre-training never means the rows post-training writes to the same table
        reasons.append(
            f"when list_contains({value(list(POSTTRAIN_TASKS))}, s.task) then {value(TASK_NOT_IN_STAGE)}"
        )
    reasons.append(f"when s.num_tokens is null or s.num_tokens <= 0 then {value(NO_TOKENS)}")
    reasons.append(f"when s.num_tokens > {int(config.max_sample_tokens)} then {value(OVER_LENGTH)}")
    zero = [s for s, w in config.source_weights.items() if w == 0]
    if zero:
        reasons.append(f"when list_contains({value(zero)}, s.source) then {value(SOURCE_WEIGHT_ZERO)}")
    join = (
        "left join (select distinct uri from quarantine where uri is not null) q on s.source_uri = q.uri"
        if with_quarantine
        else ""
    )
    return f"""
        select s.sample_id, s.modality, coalesce(s.source, '') as source, s.num_tokens,
               case {" ".join(reasons)} end as reason
        from train_samples s {join}
    """


def classify_query(config: MixtureConfig, with_quarantine: bool = True) -> tuple[str, dict[str, object]]:
    """:func:`classify_sql` as keyeflow runs it: the config's values (modalities, tasks, source names) bound
    as parameters, never formatted into the text."""
    bound = _Bound()
    return _classify(config, with_quarantine, bound), bound.params


def classify_sql(config: MixtureConfig, with_quarantine: bool = True) -> str:
    """Every train_samples row with the reason it is left out of this config's mixture (NULL = eligible).

    What ``keyeflow sql`` users run to see what a mixture dropped and why, e.g.
    ``select reason, modality, count(*) from (<this>) where reason is not null group by all``.
    """
    return _classify(config, with_quarantine, _sql_value)


def _key(prefix: str, column: str) -> str:
    # md5(prefix || id), first 8 digest bytes read little-endian: stable across DuckDB versions and
    # machines, and cheap (md5_number's low 64 bits; the *_upper/_lower helpers are several times slower).
    return f"(md5_number({_lit(prefix)} || {column}) & 18446744073709551615::UHUGEINT)::UBIGINT"


def _held_out(column: str, per_mille: int) -> str:
    return f"{_key('holdout:', column)} % 1000 < {per_mille}"


def heldout_sql(per_mille: int, max_tokens: int, per_modality: int) -> str:
    """The held-out evaluation samples of every mixture built with `holdout_per_mille=per_mille`: per modality
    the first `per_modality` of them (in hash order) that fit `max_tokens`, quarantined sources left out.
    Needs views `train_samples` and `quarantine`."""
    return f"""
        select sample_id, modality from (
            select s.sample_id, s.modality,
                   row_number() over (partition by s.modality
                                      order by {_key("holdout-order:", "s.sample_id")}, s.sample_id) as n
            from train_samples s
            where {_held_out("s.sample_id", per_mille)} and s.num_tokens > 0 and s.num_tokens <= {max_tokens}
              and s.source_uri not in (select uri from quarantine where uri is not null)
        ) where n <= {per_modality}
        order by modality, n
    """


def heldout_sample_ids(
    samples: tables.TableRef,
    quarantine: tables.TableRef,
    per_mille: int,
    max_tokens: int,
    per_modality: int,
    root: str | None = None,
) -> dict[str, list[str]]:
    """`heldout_sql` over the pinned tables: modality → sample ids (modalities with none are absent)."""
    if per_mille <= 0:
        raise ValueError(f"holdout_per_mille={per_mille}: no samples are held out, nothing to evaluate on")
    con = sql.connect(root, {samples.name: samples.version, quarantine.name: quarantine.version})
    try:
        con.register("train_samples", tables.dataset(samples.uri, version=samples.version))
        con.register("quarantine", tables.dataset(quarantine.uri, version=quarantine.version))
        rows = con.sql(heldout_sql(per_mille, max_tokens, per_modality)).fetchall()
    finally:
        con.close()
    out: dict[str, list[str]] = {}
    for sample_id, modality in rows:
        out.setdefault(modality, []).append(sample_id)
    return out


def _select_sql(config: MixtureConfig, samples_version: int) -> str:
    # The mixture id is bound as the parameter $mixture_id.
    # ranked: running tokens per (modality, source) in the seeded order. One unpartitioned window over
    # (modality, source, key) minus the tokens of the earlier (modality, source) groups gives the same
    # sum as a partitioned window and sorts faster. progress: where the sample falls in its source's
    # partial pass (midpoint / remainder, so sources interleave by the fraction of their remainder done);
    # mcum: running tokens of the modality's partial pass in that order. The partial pass takes every
    # sample up to the modality's remainder plus the boundary sample when that lands closer.
    seed = config.seed
    return f"""
        with ranked as (
            select c.sample_id, c.modality, c.source, c.num_tokens,
                   p.full_passes, p.remainder, p.available, p.cap_tokens,
                   sum(c.num_tokens) over (
                       order by c.modality, c.source, {_key(f"{seed}:", "c.sample_id")}, c.sample_id
                       rows between unbounded preceding and current row) - p.token_offset as cum
            from classified c join plan p on c.modality = p.modality and c.source = p.source
            where c.reason is null
        ),
        partial as (
            select sample_id, modality, num_tokens, (cum - num_tokens / 2.0) / remainder as progress
            from ranked
            where remainder > 0 and full_passes * available + cum <= cap_tokens
        ),
        merged as (
            select p.sample_id, p.num_tokens, mp.remainder,
                   sum(p.num_tokens) over (
                       partition by p.modality order by p.progress, p.sample_id
                       rows between unbounded preceding and current row) as mcum
            from partial p join modality_plan mp on p.modality = mp.modality
        ),
        chosen as (
            select sample_id from merged
            where mcum <= remainder
               or (mcum - num_tokens < remainder and mcum - remainder < remainder - (mcum - num_tokens))
        ),
        used as (
            select r.sample_id, r.modality, r.source, r.num_tokens,
                   r.full_passes + (c.sample_id is not null)::integer as repeats
            from ranked r left join chosen c on r.sample_id = c.sample_id
        )
        select $mixture_id || '/' || sample_id as mixture_row_id,
               $mixture_id as mixture_id,
               cast({config.stage} as integer) as stage,
               sample_id, modality, source, cast(num_tokens as bigint) as num_tokens,
               cast(repeats as integer) as repeats,
               cast(row_number() over (order by {_key(f"{seed}:order:", "sample_id")}, sample_id) - 1
                    as bigint) as "order",
               cast({samples_version} as bigint) as train_samples_version
        from used
        where repeats > 0
    """


@dataclass
class Selection:
    """The rows of a mixture (not yet written) and its report."""

    rows: pa.Table
    report: MixtureReport
    plan: Plan


def compute_mixture(
    samples: tables.TableRef,
    config: MixtureConfig,
    quarantine: tables.TableRef | None = None,
    root: str | None = None,
) -> Selection:
    """Choose a mixture's rows in DuckDB over ``samples`` pinned at its version; writes nothing."""
    versions = {samples.name: samples.version}
    if quarantine is not None:
        versions[quarantine.name] = quarantine.version
    con = sql.connect(root, versions)
    try:
        # The refs are the truth (a ref may point outside the root): bind the views to exactly them.
        con.register("train_samples", tables.dataset(samples.uri, version=samples.version))
        if quarantine is not None:
            con.register("quarantine", tables.dataset(quarantine.uri, version=quarantine.version))
        text, params = classify_query(config, quarantine is not None)
        con.execute("create or replace temp table classified as " + text, params)
        digest = con.sql("""
            select coalesce(md5(string_agg(sample_id || ':' || modality || ':' || source || ':' || num_tokens,
                                           ',' order by sample_id)), '')
            from classified where reason is null
        """).fetchall()[0][0]
        mid = mixture_id(config, digest)
        groups = con.sql("""
            select reason, coalesce(modality, '') as modality, source,
                   count(*) as n, coalesce(sum(num_tokens), 0) as tokens
            from classified group by all order by all
        """).fetchall()
        excluded = _exclusions(groups)
        available = [(m, s, int(t), int(n)) for reason, m, s, n, t in groups if reason is None]
        plan = plan_quotas(available, config, excluded)

        con.register(
            "plan_sources",
            pa.Table.from_pylist(
                [
                    {
                        "modality": p.modality,
                        "source": p.source,
                        "full_passes": p.full_passes,
                        "remainder": p.remainder,
                        "available": p.available_tokens,
                        "cap_tokens": p.cap_tokens,
                    }
                    for p in plan.sources
                ]
            ),
        )
        # Tokens of the (modality, source) groups before each one, in DuckDB's own sort order.
        con.execute("""
            create or replace temp table plan as
            select *, sum(available) over (order by modality, source
                                           rows between unbounded preceding and current row) - available
                      as token_offset
            from plan_sources
        """)
        con.register(
            "modality_plan",
            pa.Table.from_pylist([{"modality": m, "remainder": r} for m, r in plan.remainders.items()]),
        )
        # Sorted by "order" so the mixture is stored (and read back by the loader) in epoch order.
        rows = con.sql(
            _select_sql(config, samples.version) + ' order by "order"', params={"mixture_id": mid}
        ).to_arrow_table()
        con.register("selected", rows)
        reached = con.sql("""
            select modality, source, sum(num_tokens * repeats) as tokens, count(*) as n,
                   sum(repeats) as uses, max(repeats) as max_repeats
            from selected group by all
        """).fetchall()
    finally:
        con.close()
    report = _report(mid, config, samples, quarantine, plan, excluded, reached, rows.num_rows)
    return Selection(rows, report, plan)


def _exclusions(groups: list[tuple]) -> list[Exclusion]:
    totals: dict[tuple[str, str], list[int]] = {}
    for reason, modality, _source, n, tokens in groups:
        if reason is None:
            continue
        entry = totals.setdefault((reason, modality), [0, 0])
        entry[0] += int(n)
        entry[1] += int(tokens)
    order = {r: i for i, r in enumerate(EXCLUSION_REASONS)}
    return [
        Exclusion(reason, modality, n, t)
        for (reason, modality), (n, t) in sorted(totals.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
    ]


def _report(
    mid: str,
    config: MixtureConfig,
    samples: tables.TableRef,
    quarantine: tables.TableRef | None,
    plan: Plan,
    excluded: list[Exclusion],
    reached: list[tuple],
    num_rows: int,
) -> MixtureReport:
    by_source = {(m, s): (int(t), int(n), int(u), int(x)) for m, s, t, n, u, x in reached}
    total_reached = sum(v[0] for v in by_source.values())
    sources, modalities = [], []
    for p in plan.sources:
        tokens, n, _, _ = by_source.get((p.modality, p.source), (0, 0, 0, 0))
        sources.append(
            SourceReport(
                p.modality,
                p.source,
                p.weight,
                p.available_tokens,
                p.available_samples,
                p.quota,
                p.weighted_quota,
                tokens,
                n,
                tokens / p.available_tokens,
            )
        )
    for m in config.targeted_modalities:
        rows = [v for (mm, _), v in by_source.items() if mm == m]
        tokens = sum(r[0] for r in rows)
        avail = sum(p.available_tokens for p in plan.sources if p.modality == m)
        modalities.append(
            ModalityReport(
                modality=m,
                target_share=config.target_shares[m],
                available_tokens=avail,
                available_samples=sum(p.available_samples for p in plan.sources if p.modality == m),
                quota_tokens=config.target_shares[m] * plan.total_tokens,
                reached_tokens=tokens,
                reached_share=tokens / total_reached if total_reached else 0.0,
                samples_used=sum(r[1] for r in rows),
                uses=sum(r[2] for r in rows),
                max_repeats=max((r[3] for r in rows), default=0),
                passes=tokens / avail if avail else 0.0,
            )
        )
    return MixtureReport(
        mixture_id=mid,
        stage=config.stage,
        config_hash=config.config_hash(),
        seed=config.seed,
        train_samples_version=samples.version,
        quarantine_version=quarantine.version if quarantine is not None else None,
        total_tokens=round(plan.total_tokens),
        max_total_tokens=math.floor(plan.max_total_tokens + _EPS),
        reached_tokens=total_reached,
        num_rows=num_rows,
        tolerance_pp=config.tolerance_pp,
        repeat_cap=config.repeat_cap,
        modalities=modalities,
        sources=sources,
        excluded=excluded,
        shortfalls=list(plan.shortfalls),
    )


# ---------------------------------------------------------------------------------------------- entry points


def build_mixture(
    samples: tables.TableRef,
    config: MixtureConfig,
    quarantine: tables.TableRef | None = None,
    root: str | None = None,
) -> MixtureResult:
    """Build a stage's mixture from ``train_samples`` at its pinned version and write it to ``mixtures``.

    Idempotent: the same inputs and config give the same ``mixture_id`` and rows, and a rerun writes
    nothing. Raises :class:`MixtureShortfall` when the data cannot reach the target (see MixtureConfig).
    """
    selection = compute_mixture(samples, config, quarantine, root)
    report = selection.report
    if _has_rows("mixtures", report.mixture_id, root):
        log.info("mixture %s already written; nothing to do", report.mixture_id)
        ds = tables.open_table("mixtures", root=root)
        version = ds.version
    else:
        rows = selection.rows.append_column(
            "created_at", pa.array([tables.now()] * selection.rows.num_rows, tables.TIMESTAMP)
        ).append_column("name", pa.array([config.name or f"stage{config.stage}"] * selection.rows.num_rows))
        kill_point("mixture.before_commit")  # the selection computed; none of the mixture's rows written
        version = tables.upsert(
            "mixtures", rows.select(tables.SCHEMAS["mixtures"].names).cast(tables.SCHEMAS["mixtures"]), root
        )
        kill_point("mixture.committed")  # the mixture's rows written; its report, gate and MLflow outputs not
        ds = tables.open_table("mixtures", version=version, root=root)
    log.info(
        "mixture %s: %s",
        report.mixture_id,
        ", ".join(
            f"{m.modality} {m.reached_share:.2%} (target {m.target_share:.2%})" for m in report.modalities
        ),
    )
    return MixtureResult(tables.TableRef("mixtures", ds.uri, version), report.mixture_id, report)


def fixed_mixture(
    samples: tables.TableRef,
    repeats: Mapping[str, int],
    *,
    name: str,
    stage: int,
    seed: int = 0,
    root: str | None = None,
) -> MixtureResult:
    """A mixture whose uses per sample are given, not balanced: post-training sets (SFT after the difficulty
    filter, LongCoT with its score-derived repeats, a domain expert's subset) go to the trainer through the
    same `mixtures` table and loader as pre-training. The id hashes the name, stage, seed, train_samples
    version and every (sample, repeats), so the same set is the same mixture (a rerun writes nothing). Not the
    train_samples version: a sample id names its content (a content hash), so the same ids are the same data
    whatever else was appended to the table since; the rows keep the version they were first read at."""
    if not repeats:
        raise ValueError(f"mixture {name!r}: no samples")
    bad = {s: r for s, r in repeats.items() if isinstance(r, bool) or not isinstance(r, int) or r < 1}
    if bad:
        raise ValueError(
            f"mixture {name!r}: repeats must be integers >= 1, got {dict(list(bad.items())[:5])}"
        )
    payload = json.dumps(
        {"name": name, "stage": stage, "seed": seed, "repeats": sorted(repeats.items())},
        separators=(",", ":"),
    )
    mid = hashlib.sha256(payload.encode()).hexdigest()[:16]
    ids = sorted(repeats)
    found = {
        r["sample_id"]: r
        for r in tables.dataset(samples.uri, version=samples.version)
        .to_table(
            columns=["sample_id", "modality", "source", "num_tokens"], filter=pc.field("sample_id").isin(ids)
        )
        .to_pylist()
    }
    missing = [s for s in ids if s not in found]
    if missing:
        raise KeyError(f"mixture {name!r}: train_samples@v{samples.version} has no rows {missing[:5]}")
    order = sorted(ids, key=lambda s: hashlib.sha256(f"{seed}:order:{s}".encode()).digest())
    now = tables.now()
    rows = [
        {
            "mixture_row_id": f"{mid}/{s}",
            "mixture_id": mid,
            "stage": stage,
            "sample_id": s,
            "modality": found[s]["modality"],
            "source": found[s]["source"] or "",
            "num_tokens": found[s]["num_tokens"],
            "repeats": repeats[s],
            "order": position,
            "train_samples_version": samples.version,
            "created_at": now,
            "name": name,
        }
        for position, s in enumerate(order)
    ]
    if not tables.existing_keys("mixtures", [rows[0]["mixture_row_id"]], root):
        tables.upsert("mixtures", rows, root)
    return MixtureResult(mixture=tables.ref("mixtures", root), mixture_id=mid, report=None)


def _has_rows(name: str, mixture_id_: str, root: str | None) -> bool:
    if not tables.exists(name, root):
        return False
    ds = tables.open_table(name, root=root)
    return ds.count_rows(filter=pc.field("mixture_id") == mixture_id_) > 0


def reached_shares_sql(mixture_id_: str) -> str:
    """SQL (for ``keyeflow sql``) giving each modality's tokens and share in one mixture."""
    return (
        "select modality, cast(sum(num_tokens * repeats) as bigint) as tokens, count(*) as samples, "
        "cast(sum(repeats) as bigint) as uses, "
        "cast(sum(num_tokens * repeats) as double) / sum(sum(num_tokens * repeats)) over () as share "
        f"from mixtures where mixture_id = {_lit(mixture_id_)} group by modality order by modality"
    )
