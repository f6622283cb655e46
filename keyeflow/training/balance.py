"""What a sample costs to train on, packing samples into sequences, and spreading the work evenly.

Keye-VL-1.5 balances load dynamically (SPEC §5): estimate each sample's cost, sort descending, give each
to the group with the lowest load so far. The paper does not give its cost formula. A text-only proxy
is public: ``24576·L + L²`` per sequence of ``L`` tokens for a 7B model. Video breaks that proxy:
each frame also goes through the vision encoder, and a Slow frame (full detail) costs far more there
than a Fast one. This module counts both, from numbers that are in the tables before any pixel is read.

Units. The proxy is the FLOPs of one transformer layer of width ``d`` divided by ``4·d``: a layer
spends ``24·d²`` FLOPs per token on its matrices (QKV and output ``8·d²``, a 4×-wide MLP ``16·d²``)
and ``4·d·L`` per token on attention over a sequence of ``L`` (``QKᵀ`` and ``AV``), so
``24·d²·L + 4·d·L² = 4·d·(6·d·L + L²)`` and ``6·4096 = 24576``. One cost unit is therefore
``4·d_llm`` FLOPs in each LLM layer. Attention is counted per SAMPLE: a pack is several samples
separated by a block-diagonal (varlen) mask, so a pack of ``L₁ + L₂`` tokens costs ``… + L₁² + L₂²``,
not ``(L₁ + L₂)²``. Forward and backward scale every term alike, so the ratio is the same for training.

Vision. The encoder attends within one image or frame at a time ("grid" of ``P`` 14-px patches; four
patches merge into one LLM token afterwards), so a grid costs ``a·P + b·P²`` where, per encoder layer,
``a`` counts the matrices (``8·d_v² + 4·d_v·mlp_v`` FLOPs per patch) and ``b`` the attention
(``4·d_v``), summed over the encoder's layers and divided by the LLM's cost unit
(:meth:`CostModel.from_model_sizes`). For SigLIP-400M (27 layers, width 1152, MLP 4304) against the
8B LLM (Qwen3-8B: 36 layers, width 4096) that gives ``a ≈ 1394`` and ``b ≈ 0.211``: a patch costs about
5.7% of an LLM token's matrices, so an image's encoder work is about 23% of what its tokens then cost
in the LLM's matrices (4 patches per token), before attention. Slow and fast frames are separate
grids of different sizes and are counted separately. A stage that freezes the encoder skips its
backward pass: scale ``vit_linear`` and ``vit_quadratic`` by 1/3 there.

Packing (:func:`pack`) is best-fit decreasing: samples sorted longest first (costlier first among equal
lengths) go into the open sequence with the least room that still fits them (the cheapest such
sequence on a tie), or a new one. Best fit has first fit's worst-case bound (11/9·OPT + 6/9) and opened
exactly as many sequences as first fit on the benchmark mixes (benchmarks/bench_balance.py); it leaves
the tightest holes filled and, with the cost tie-break, spreads filler over the cheaper sequences. A
sample is never split.

Balancing (:func:`balance`) is greedy LPT (Graham 1969): items by cost descending, each to the group
with the smallest load so far (lowest index on a tie). Its makespan is within ``4/3 − 1/(3m)`` of the
optimum for ``m`` groups, and within one item's cost of the mean load. It is used twice by the loader:
packs across data-parallel ranks, then each rank's packs across its micro-batches.

Everything here is pure numpy and deterministic: every rank computes the same plan from the same numbers.
"""

from __future__ import annotations

import bisect
import heapq
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from keyeflow.config import check_int, invalid

# Architectures the default coefficients are derived from (public configs).
# SigLIP-400M (siglip-so400m-patch14-384), Keye-VL-1.5's vision encoder.
SIGLIP_400M = {"layers": 27, "hidden": 1152, "mlp": 4304}
# Keye-VL-1.5-8B's language model (Qwen3-8B). Only its width and depth enter: the proxy's 24576 = 6·4096.
LLM_8B = {"layers": 36, "hidden": 4096}

GRID_KINDS = ("image", "slow", "fast")


@dataclass(frozen=True)
class VisionGrid:
    """``count`` images or frames of ``patches`` ViT patches each (``grid_h·grid_w``)."""

    patches: int
    count: int = 1
    kind: str = "image"  # "image", "slow" (a Slow frame) or "fast" (a Fast frame): for reports only

    def __post_init__(self) -> None:
        for name in ("patches", "count"):
            object.__setattr__(self, name, check_int("VisionGrid", name, getattr(self, name), minimum=0))
        if self.kind not in GRID_KINDS:
            raise invalid("VisionGrid", "kind", self.kind, f"must be one of {GRID_KINDS}")


@dataclass(frozen=True)
class SampleCost:
    """A sample's make-up, as far as compute goes: its LLM tokens and the grids its encoder sees."""

    num_tokens: int  # L: every LLM token of the sample (text + vision)
    grids: tuple[VisionGrid, ...] = ()
    sample_id: str = ""  # named in errors

    def __post_init__(self) -> None:
        num_tokens = check_int("SampleCost", "num_tokens", self.num_tokens)
        if num_tokens < 1:  # said with the sample's id: it comes from a table row, not from a setting
            raise ValueError(f"sample {self.sample_id!r}: num_tokens={num_tokens} must be >= 1")
        object.__setattr__(self, "num_tokens", num_tokens)
        object.__setattr__(self, "grids", tuple(self.grids))

    @classmethod
    def video(
        cls,
        num_tokens: int,
        *,
        num_slow: int,
        slow_patches: int,
        num_fast: int,
        fast_patches: int,
        sample_id: str = "",
    ) -> SampleCost:
        """A Slow-Fast video: ``num_slow`` frames of ``slow_patches`` and ``num_fast`` of ``fast_patches``."""
        return cls(
            num_tokens,
            (VisionGrid(slow_patches, num_slow, "slow"), VisionGrid(fast_patches, num_fast, "fast")),
            sample_id,
        )


def vit_coefficients(
    *, vit_layers: int, vit_hidden: int, vit_mlp: int, llm_layers: int, llm_hidden: int
) -> tuple[float, float]:
    """(a, b) of the encoder's ``a·P + b·P²`` per grid, in the LLM proxy's units (``4·d_llm`` FLOPs per
    layer).

    Per encoder layer and patch: matrices ``2·(4·d_v² + 2·d_v·mlp_v)`` FLOPs (QKV+O, a two-matrix MLP),
    attention ``4·d_v·P`` (QKᵀ and AV). Summed over the encoder's layers, divided by the LLM's cost
    unit summed over its layers, ``4·d_llm·layers_llm``.
    """
    unit = 4.0 * llm_hidden * llm_layers
    linear = vit_layers * 2.0 * (4 * vit_hidden**2 + 2 * vit_hidden * vit_mlp) / unit
    quadratic = vit_layers * 4.0 * vit_hidden / unit
    return linear, quadratic


_VIT_LINEAR, _VIT_QUADRATIC = vit_coefficients(
    vit_layers=SIGLIP_400M["layers"],
    vit_hidden=SIGLIP_400M["hidden"],
    vit_mlp=SIGLIP_400M["mlp"],
    llm_layers=LLM_8B["layers"],
    llm_hidden=LLM_8B["hidden"],
)


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Cost of a sample =
    ``llm_linear·L + llm_quadratic·L² + Σ_grids count·(vit_linear·P + vit_quadratic·P²)``.

    Defaults: the public 7B text proxy for the LLM, SigLIP-400M against the 8B LLM for the encoder
    (see the module docstring for the derivation). Every field can be set.
    """

    llm_linear: float = 24576.0
    llm_quadratic: float = 1.0
    vit_linear: float = _VIT_LINEAR  # ≈ 1393.9
    vit_quadratic: float = _VIT_QUADRATIC  # = 0.2109375

    def __post_init__(self) -> None:
        for name in ("llm_linear", "llm_quadratic", "vit_linear", "vit_quadratic"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise invalid("CostModel", name, value, "must be a number")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise invalid("CostModel", name, value, "must be finite and >= 0")
            object.__setattr__(self, name, value)

    @classmethod
    def from_model_sizes(
        cls, *, vit_layers: int, vit_hidden: int, vit_mlp: int, llm_layers: int, llm_hidden: int
    ) -> CostModel:
        """Coefficients for another encoder/LLM pair (the LLM's ``6·d`` replaces 24576)."""
        a, b = vit_coefficients(
            vit_layers=vit_layers,
            vit_hidden=vit_hidden,
            vit_mlp=vit_mlp,
            llm_layers=llm_layers,
            llm_hidden=llm_hidden,
        )
        return cls(llm_linear=6.0 * llm_hidden, llm_quadratic=1.0, vit_linear=a, vit_quadratic=b)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def llm_cost(self, num_tokens: Any) -> Any:
        """LLM cost of samples of ``num_tokens`` (a number or an array), attention within each sample."""
        tokens = np.asarray(num_tokens, dtype=np.float64)
        out = self.llm_linear * tokens + self.llm_quadratic * tokens * tokens
        return float(out) if out.ndim == 0 else out

    def grid_cost(self, patches: Any, count: Any = 1) -> Any:
        """Encoder cost of ``count`` grids of ``patches`` patches each (numbers or arrays)."""
        p = np.asarray(patches, dtype=np.float64)
        out = np.asarray(count, dtype=np.float64) * (self.vit_linear * p + self.vit_quadratic * p * p)
        return float(out) if out.ndim == 0 else out

    def vit_cost(self, sample: SampleCost) -> float:
        return float(sum(self.grid_cost(g.patches, g.count) for g in sample.grids))

    def cost(self, sample: SampleCost) -> float:
        return self.llm_cost(sample.num_tokens) + self.vit_cost(sample)

    def costs(self, samples: Sequence[SampleCost]) -> np.ndarray:
        return np.array([self.cost(s) for s in samples], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- packing


def pack_lengths(
    lengths: Any, max_length: int, costs: Any = None, names: Sequence[str] | None = None
) -> list[list[int]]:
    """Pack items of ``lengths`` into sequences of at most ``max_length``; returns index lists.

    Best-fit decreasing by length (ties: higher cost first, then lower index); among sequences with
    the same least room, the one with the lowest cost so far. Each pack lists its items in the order
    they went in; packs are in the order they were opened (so the first pack holds the longest item).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ValueError(f"max_length={max_length!r}: must be an integer >= 1")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    costs = np.zeros(n) if costs is None else np.asarray(costs, dtype=np.float64).reshape(-1)
    if len(costs) != n:
        raise ValueError(f"{len(costs)} costs for {n} lengths")

    def name(i: int) -> str:
        return repr(names[i]) if names is not None else f"#{i}"

    bad = np.flatnonzero(lengths < 1)
    if len(bad):
        raise ValueError(
            f"sample {name(int(bad[0]))} has {int(lengths[bad[0]])} tokens; every sample needs >= 1"
        )
    over = np.flatnonzero(lengths > max_length)
    if len(over):
        i = int(over[np.argmax(lengths[over])])
        raise ValueError(
            f"sample {name(i)} has {int(lengths[i]):,} tokens, more than max_length {int(max_length):,} "
            f"({len(over)} sample(s) too long); samples are never split: drop them from the "
            "mixture (max_sample_tokens) or raise max_length"
        )

    order = np.lexsort((np.arange(n), -costs, -lengths))
    packs: list[list[int]] = []
    pack_cost: list[float] = []
    # Open packs as (room left, cost so far, pack index), sorted: the first entry with room >= length
    # is the best fit, the cheapest among equally tight ones.
    open_packs: list[tuple[int, float, int]] = []
    for i in order.tolist():
        length = int(lengths[i])
        at = bisect.bisect_left(open_packs, (length, -math.inf, -1))
        if at == len(open_packs):
            packs.append([i])
            pack_cost.append(float(costs[i]))
            room = int(max_length) - length
            k = len(packs) - 1
        else:
            room, _, k = open_packs.pop(at)
            packs[k].append(i)
            pack_cost[k] += float(costs[i])
            room -= length
        if room > 0:
            bisect.insort(open_packs, (room, pack_cost[k], k))
    return packs


def pack(
    samples: Sequence[SampleCost], max_length: int, cost_model: CostModel | None = None
) -> list[list[int]]:
    """Pack samples (never split) into sequences of at most ``max_length`` tokens; returns index lists.

    A sample longer than ``max_length`` is an error naming it. See :func:`pack_lengths`.
    """
    model = cost_model or CostModel()
    return pack_lengths(
        [s.num_tokens for s in samples],
        max_length,
        model.costs(samples),
        [s.sample_id or f"#{i}" for i, s in enumerate(samples)],
    )


def real_token_share(lengths: Any, packs: Sequence[Sequence[int]], max_length: int) -> float:
    """Real tokens over the capacity of the packs (``len(packs)·max_length``); 1.0 means no padding."""
    if not packs:
        return 1.0
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[list(p)].sum()) for p in packs)
    return real / (len(packs) * max_length)


# ---------------------------------------------------------------------------------------------- balancing


def balance(costs: Any, num_groups: int) -> np.ndarray:
    """Greedy LPT: the group (0..num_groups-1) of each item, costliest item first to the least-loaded group.

    Deterministic: items of equal cost go in index order, groups of equal load by lowest index.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r}: must be an integer >= 1")
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    if len(costs) and (not np.all(np.isfinite(costs)) or costs.min() < 0):
        raise ValueError("costs must be finite and >= 0")
    assignment = np.zeros(len(costs), dtype=np.int64)
    heap = [(0.0, g) for g in range(int(num_groups))]
    for i in np.lexsort((np.arange(len(costs)), -costs)).tolist():
        load, g = heapq.heappop(heap)
        assignment[i] = g
        heapq.heappush(heap, (load + float(costs[i]), g))
    return assignment


def balance_two_level(
    pack_costs: Any, num_ranks: int, num_micro_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rank, micro-batch) of each pack: LPT across ranks, then LPT over each rank's packs across its
    micro-batches."""
    pack_costs = np.asarray(pack_costs, dtype=np.float64).reshape(-1)
    rank = balance(pack_costs, num_ranks)
    micro_batch = np.zeros(len(pack_costs), dtype=np.int64)
    for r in range(int(num_ranks)):
        mine = np.flatnonzero(rank == r)
        micro_batch[mine] = balance(pack_costs[mine], num_micro_batches)
    return rank, micro_batch


def group_loads(costs: Any, assignment: Any, num_groups: int) -> np.ndarray:
    """Total cost per group."""
    return np.bincount(
        np.asarray(assignment, dtype=np.int64),
        weights=np.asarray(costs, dtype=np.float64),
        minlength=num_groups,
    )[:num_groups]


def imbalance(loads: Any) -> float:
    """max / mean of the group loads (1.0 = perfectly even; the slowest group sets the step time)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean() if len(loads) else 0.0
    return float(loads.max() / mean) if mean > 0 else 1.0


def balance_two_level_capped(
    pack_costs: Any, pack_tokens: Any, num_ranks: int, min_micro_batches: int, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(rank, micro-batch) of each pack and the number of micro-batches per rank, when a micro-batch may
    hold at most ``max_tokens`` tokens: LPT across ranks as :func:`balance_two_level`, then the fewest
    micro-batches (at least ``min_micro_batches``, the same on every rank: data-parallel ranks step in
    lock-step) into which every rank's packs fit.

    Within a rank, packs go costliest first (ties by index) to the least-loaded micro-batch that still has
    room for them (ties by lowest index); when one does not fit anywhere, every rank tries again with one
    micro-batch more. That ends: with as many micro-batches as packs each pack gets its own, and no pack
    is longer than ``max_tokens`` (checked). Deterministic, so every rank computes the same answer.
    """
    pack_costs = np.asarray(pack_costs, dtype=np.float64).reshape(-1)
    pack_tokens = np.asarray(pack_tokens, dtype=np.int64).reshape(-1)
    if len(pack_tokens) != len(pack_costs):
        raise ValueError(f"{len(pack_tokens)} pack lengths for {len(pack_costs)} pack costs")
    if len(pack_tokens) and int(pack_tokens.max()) > max_tokens:
        raise ValueError(f"a pack of {int(pack_tokens.max())} tokens is longer than max_tokens={max_tokens}")
    rank = balance(pack_costs, num_ranks)
    mine = [np.flatnonzero(rank == r) for r in range(int(num_ranks))]
    # No fewer micro-batches than the heaviest rank's tokens need.
    least = max([-(-int(pack_tokens[m].sum()) // max_tokens) for m in mine] + [int(min_micro_batches)])
    for num_micro_batches in range(least, max(least, max(len(m) for m in mine)) + 1):
        micro_batch = np.zeros(len(pack_costs), dtype=np.int64)
        if all(
            _fill(pack_costs[m], pack_tokens[m], num_micro_batches, max_tokens, micro_batch, m) for m in mine
        ):
            return rank, micro_batch, num_micro_batches
    raise AssertionError("unreachable: one pack per micro-batch always fits")


def _fill(
    costs: np.ndarray, tokens: np.ndarray, num_bins: int, capacity: int, out: np.ndarray, where: np.ndarray
) -> bool:
    """Capacity-bounded LPT of one rank's packs into ``num_bins``; writes bins to ``out[where]``; False
    when a pack fits nowhere."""
    loads = np.zeros(num_bins)
    room = np.full(num_bins, capacity, dtype=np.int64)
    for i in np.lexsort((np.arange(len(costs)), -costs)).tolist():
        fits = np.flatnonzero(room >= tokens[i])
        if not len(fits):
            return False
        b = int(fits[np.argmin(loads[fits])])  # argmin: the first (lowest index) of equal loads
        out[where[i]] = b
        loads[b] += costs[i]
        room[b] -= tokens[i]
    return True
