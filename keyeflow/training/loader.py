"""The training loader: a mixture's samples, packed and balanced by cost, each rank reading only its own.

A mixture (``mixtures`` rows of one ``mixture_id`` at a pinned table version, see
:mod:`keyeflow.datasets.mixture`) becomes a stream of *occurrences*, cut into windows of
``window_size`` occurrences; one window is one optimizer step of the whole job. For every window each
rank computes the same plan from table metadata alone (no pixels):

1. pack the window's samples into sequences of at most ``max_length`` tokens (:func:`balance.pack_lengths`);
2. cost each pack (LLM tokens with attention per sample, plus the vision encoder per image/frame grid,
   Slow and Fast frames apart: :class:`balance.CostModel`);
3. spread the packs over the data-parallel ranks by cost (greedy LPT, :func:`balance.balance`);
4. spread each rank's packs over its ``micro_batches_per_step`` micro-batches the same way; or, with a
   token budget (``max_tokens_per_micro_batch``), over the fewest micro-batches (at least
   ``micro_batches_per_step``, the same number on every rank) that keep each within the budget
   (:func:`balance.balance_two_level_capped`).

Then a rank calls ``sample_reader(sample_ids)`` for the samples of its own micro-batches only, one call
per micro-batch, and yields :class:`MicroBatch` objects. The reader is the seam to the model's processor
(text tokens, pixel patches); the loader never reads a payload itself. A background thread makes those
calls ``prefetch`` micro-batches ahead of the trainer (a bounded queue), so reading overlaps the step;
what was read ahead is not "consumed" until the trainer has taken it.

**The stream.** Mixture rows sorted by ``order`` (ties by ``sample_id``) are rows ``i = 0..N-1``; a row
used ``r`` times per epoch has occurrences ``j = 0..r-1`` placed at key ``(i + j·N) / r``, i.e. spread
evenly over the epoch instead of bunched (a modality upsampled 3× keeps its token share in every part
of the epoch). Epoch 0 is the occurrences sorted by (key, i, j): the mixture's own seeded order. Epoch
``e ≥ 1`` is a permutation of epoch 0 drawn from ``numpy.random.default_rng([seed, e])``. An occurrence's
id is ``epoch·M + position`` (``M`` occurrences per epoch). Windows never cross an epoch: the last
window of an epoch may be shorter. All of this depends only on (mixture, seed, window_size), never on
the world size, so window ``w`` holds the same occurrences on any number of ranks.

**Resume** (:meth:`MixtureLoader.state_dict`). The state names the window and the exact set of its
occurrences already trained on (``consumed``, occurrence ids), plus how the current plan was made
(``layout``: world size, micro-batches per step, max_length, cost model, plan version, and the
occurrences that had been consumed before that plan, ``consumed_before``). It assumes ranks move in
lock-step, as synchronous data-parallel training does: when a rank has taken ``k`` micro-batches of a
step, every rank has, so ``consumed`` is every rank's first ``k`` micro-batches. A checkpoint at a step
boundary holds an empty ``consumed`` and the next window; the state is the same on every rank.

Loading a state:
- same layout → the same plan is rebuilt (it is a pure function of the metadata and the layout) and the
  loader continues at micro-batch ``k``: the remaining sequence is identical to an uninterrupted run;
- different layout (e.g. 2 ranks → 1) → the window's remaining occurrences (all minus ``consumed``) are
  packed and balanced again for the new layout and form one (shorter) step; later windows are planned
  for the new layout as usual. Nothing is skipped or repeated, because ``consumed`` lists occurrences,
  not positions in a plan. A second resume inside that shorter step works the same way
  (``consumed_before`` carries the first part).

Metadata for costs comes from DuckDB over the Lance tables with projection pushdown: ``mixtures`` (pinned
version, this mixture's rows), ``train_samples`` at the version the mixture pinned (num_tokens,
num_vision_tokens, media_ids), and per media id ``video_samples`` (num_slow/num_fast and the Slow/Fast
frame sizes) or ``image_samples`` (grid_h, grid_w; the ``patches`` column is never read). All three sit
beside the ``mixtures`` table (same tables root). The last two are read at their latest version: their rows
are keyed by content and config hash and never change, so a later version only adds rows. A sample with vision
tokens whose media are in neither table is costed from ``num_vision_tokens`` alone (4 patches per token,
encoder matrices only, no per-grid attention) and counted in ``num_samples_without_grids``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import duckdb
import lance
import numpy as np
import pyarrow as pa

from keyeflow.config import check_int, invalid
from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef
from keyeflow.training.balance import (
    CostModel,
    balance_two_level,
    balance_two_level_capped,
    group_loads,
    imbalance,
    pack_lengths,
)

log = logging.getLogger(__name__)

# How occurrences are laid out in epochs and windows. A resume needs the same stream version.
STREAM_VERSION = 1
# How a window is packed and balanced. A resume under another plan version re-plans the current window
# (correct either way, since the state lists the consumed occurrences); only "identical remaining
# sequence" needs the same version.
PLAN_VERSION = 1

PATCH_SIZE = 14  # the vision encoder's patch, in pixels (video_samples stores frame sizes in pixels)
PATCHES_PER_TOKEN = 4  # 2×2 patches merge into one LLM token

SampleReader = Callable[[list[str]], Sequence[Any]]


# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class SampleTable:
    """Per mixture row (sorted by ``order``): what planning needs, read without payloads."""

    sample_ids: np.ndarray  # object (str)
    modalities: np.ndarray  # object (str)
    num_tokens: np.ndarray  # int64
    repeats: np.ndarray  # int64
    costs: np.ndarray  # float64, CostModel units
    vit_costs: np.ndarray  # float64, the vision encoder's part of ``costs``
    num_samples_without_grids: int

    def __len__(self) -> int:
        return len(self.sample_ids)


def _sibling(mixture: TableRef, name: str) -> str:
    return mixture.uri.rstrip("/").rsplit("/", 1)[0] + f"/{name}.lance"


def _open(uri: str, version: int | None = None) -> lance.LanceDataset | None:
    try:
        return tables.dataset(uri, version=version)
    except (ValueError, FileNotFoundError, OSError):
        return None


def read_sample_table(mixture: TableRef, mixture_id: str, cost_model: CostModel) -> SampleTable:
    """The mixture's rows with their costs, from table columns only (no pixel payload is read)."""
    rows_ds = _open(mixture.uri, mixture.version)
    if rows_ds is None:
        raise FileNotFoundError(f"mixtures table not found: {mixture}")
    con = duckdb.connect()
    try:
        con.register("mixtures", rows_ds)
        rows = con.sql(
            "select sample_id, modality, repeats, train_samples_version from mixtures where mixture_id = ? "
            'order by "order", sample_id',
            params=[mixture_id],
        ).to_arrow_table()
        if rows.num_rows == 0:
            raise ValueError(f"mixture {mixture_id!r} has no rows in {mixture}")
        versions = pa.compute.unique(rows.column("train_samples_version")).to_pylist()
        if len(versions) != 1:
            raise ValueError(f"mixture {mixture_id!r} pins several train_samples versions {sorted(versions)}")
        samples_uri = _sibling(mixture, "train_samples")
        samples_ds = _open(samples_uri, versions[0])
        if samples_ds is None:
            raise FileNotFoundError(
                f"train_samples@v{versions[0]} (pinned by mixture {mixture_id!r}) not found at {samples_uri}"
            )
        con.register("train_samples", samples_ds)
        con.register("m", rows.select(["sample_id"]).append_column("idx", pa.array(np.arange(rows.num_rows))))
        meta = con.sql("""
            select m.idx, t.num_tokens, coalesce(t.num_vision_tokens, 0) as num_vision_tokens
            from m join train_samples t on t.sample_id = m.sample_id order by m.idx
        """).fetchnumpy()
        if len(meta["idx"]) != rows.num_rows:
            found = set(meta["idx"].tolist())
            missing = [rows.column("sample_id")[i].as_py() for i in range(rows.num_rows) if i not in found]
            raise ValueError(
                f"{len(missing)} sample(s) of mixture {mixture_id!r} are not in "
                f"train_samples@v{versions[0]}, e.g. {missing[:3]}"
            )
        # One row per (sample, grid size): Slow frames, Fast frames, images. Only metadata columns.
        parts = []
        video_ds = _open(_sibling(mixture, "video_samples"))
        image_ds = _open(_sibling(mixture, "image_samples"))
        media = (
            "(select m.idx, unnest(t.media_ids) as media_id "
            "from m join train_samples t on t.sample_id = m.sample_id)"
        )
        if video_ds is not None:
            con.register("video_samples", video_ds)
            for kind in ("slow", "fast"):
                parts.append(f"""
                    select md.idx,
                           (v.{kind}_height // {PATCH_SIZE}) * (v.{kind}_width // {PATCH_SIZE}) as patches,
                           v.num_{kind} as count
                    from {media} md join video_samples v on v.sample_id = md.media_id""")
        if image_ds is not None:
            con.register("image_samples", image_ds)
            parts.append(f"""
                select md.idx, i.grid_h * i.grid_w as patches, 1 as count
                from {media} md join image_samples i on i.sample_id = md.media_id""")
        grids = (
            con.sql(" union all ".join(parts)).fetchnumpy()
            if parts
            else {"idx": np.zeros(0, np.int64), "patches": np.zeros(0), "count": np.zeros(0)}
        )
    finally:
        con.close()

    n = rows.num_rows
    num_tokens = np.asarray(meta["num_tokens"], dtype=np.int64)
    vision_tokens = np.asarray(meta["num_vision_tokens"], dtype=np.int64)
    grid_idx = np.asarray(grids["idx"], dtype=np.int64)
    vit = (
        np.bincount(
            grid_idx,
            weights=cost_model.grid_cost(
                np.asarray(grids["patches"], dtype=np.float64), np.asarray(grids["count"], dtype=np.float64)
            ),
            minlength=n,
        )
        if len(grid_idx)
        else np.zeros(n)
    )
    has_grids = np.bincount(grid_idx, minlength=n) > 0
    fallback = (vision_tokens > 0) & ~has_grids
    vit = np.where(fallback, cost_model.vit_linear * PATCHES_PER_TOKEN * vision_tokens, vit)
    if fallback.any():
        log.warning(
            "mixture %s: %d sample(s) have vision tokens but no video_samples/image_samples rows; "
            "costed from num_vision_tokens only",
            mixture_id,
            int(fallback.sum()),
        )
    return SampleTable(
        sample_ids=np.asarray(rows.column("sample_id").to_pylist(), dtype=object),
        modalities=np.asarray(rows.column("modality").to_pylist(), dtype=object),
        num_tokens=num_tokens,
        repeats=np.asarray(rows.column("repeats").to_numpy(), dtype=np.int64),
        costs=cost_model.llm_cost(num_tokens) + vit,
        vit_costs=vit,
        num_samples_without_grids=int(fallback.sum()),
    )


def epoch_stream(repeats: np.ndarray) -> np.ndarray:
    """Row index of each occurrence of epoch 0: row ``i``'s ``r`` uses at keys ``(i + j·N)/r``, spread
    evenly."""
    repeats = np.asarray(repeats, dtype=np.int64)
    if len(repeats) and repeats.min() < 1:
        raise ValueError("every mixture row needs repeats >= 1")
    n = len(repeats)
    rows = np.repeat(np.arange(n, dtype=np.int64), repeats)
    # j = 0..r-1 within each row's run.
    starts = np.repeat(np.cumsum(repeats) - repeats, repeats)
    j = np.arange(len(rows), dtype=np.int64) - starts
    key = (rows + j * n) / repeats[rows]  # correctly rounded: equal rationals give equal floats
    return rows[np.lexsort((j, rows, key))]


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Pack:
    """One packed sequence: samples back to back, attention within each."""

    sample_ids: tuple[str, ...]
    occurrences: tuple[int, ...]  # occurrence ids (epoch · occurrences per epoch + position)
    num_tokens: tuple[int, ...]
    modalities: tuple[str, ...]
    cost: float

    @property
    def length(self) -> int:
        return sum(self.num_tokens)


@dataclass(frozen=True)
class MicroBatch:
    """What one rank trains on in one micro-batch; ``payloads[p][s]`` is what the reader gave for pack p's
    sample s."""

    step: int  # the global window index (= optimizer step, counted from the start of training)
    epoch: int
    index: int  # micro-batch within the step
    num_micro_batches: int
    rank: int
    packs: tuple[Pack, ...]  # may be empty when the step has fewer packs than ranks × micro-batches
    payloads: tuple[tuple[Any, ...], ...]

    @property
    def is_last_in_step(self) -> bool:
        return self.index == self.num_micro_batches - 1

    @property
    def sample_ids(self) -> list[str]:
        return [s for p in self.packs for s in p.sample_ids]

    @property
    def occurrences(self) -> list[int]:
        return [o for p in self.packs for o in p.occurrences]

    @property
    def num_tokens(self) -> int:
        return sum(p.length for p in self.packs)

    @property
    def cost(self) -> float:
        return sum(p.cost for p in self.packs)


@dataclass(frozen=True)
class Layout:
    """Everything besides the window's occurrences that decides a plan."""

    world_size: int
    micro_batches_per_step: int
    max_length: int
    cost_model: dict[str, float]
    plan_version: int = PLAN_VERSION
    # None: exactly ``micro_batches_per_step`` micro-batches per step. Else the step has as many micro-batches
    # (at least ``micro_batches_per_step``) as keep every one of them at or under this many tokens.
    max_tokens_per_micro_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "world_size": self.world_size,
            "micro_batches_per_step": self.micro_batches_per_step,
            "max_length": self.max_length,
            "cost_model": dict(self.cost_model),
            "plan_version": self.plan_version,
        }
        # Only when set, so states saved without a budget stay byte-identical to those of earlier versions.
        if self.max_tokens_per_micro_batch is not None:
            out["max_tokens_per_micro_batch"] = self.max_tokens_per_micro_batch
        return out


@dataclass(frozen=True)
class WindowPlan:
    """A window's packs and who trains on each; the same on every rank."""

    window: int
    epoch: int
    layout: Layout
    occurrences: np.ndarray  # the planned occurrence ids (window minus those consumed before)
    rows: np.ndarray  # mixture row of each planned occurrence
    packs: tuple[np.ndarray, ...]  # indices into ``occurrences``
    pack_tokens: np.ndarray
    pack_costs: np.ndarray
    pack_rank: np.ndarray
    pack_micro_batch: np.ndarray
    num_micro_batches: int  # per rank; = layout.micro_batches_per_step unless a token budget needs more
    _by_slot: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for k, (r, m) in enumerate(zip(self.pack_rank.tolist(), self.pack_micro_batch.tolist())):
            self._by_slot.setdefault((r, m), []).append(k)

    def micro_batch_packs(self, rank: int, index: int) -> list[int]:
        """Pack indices of one rank's micro-batch, in pack order."""
        return self._by_slot.get((rank, index), [])

    def consumed(self, micro_batches_done: int) -> np.ndarray:
        """Occurrence ids in every rank's first ``micro_batches_done`` micro-batches (sorted)."""
        taken = [self.packs[k] for k in np.flatnonzero(self.pack_micro_batch < micro_batches_done).tolist()]
        return np.sort(self.occurrences[np.concatenate(taken)]) if taken else np.zeros(0, np.int64)

    @property
    def rank_loads(self) -> np.ndarray:
        return group_loads(self.pack_costs, self.pack_rank, self.layout.world_size)

    @property
    def rank_imbalance(self) -> float:
        """max / mean rank cost of this step."""
        return imbalance(self.rank_loads)

    def micro_batch_loads(self, rank: int) -> np.ndarray:
        mine = self.pack_rank == rank
        return group_loads(self.pack_costs[mine], self.pack_micro_batch[mine], self.num_micro_batches)

    @property
    def real_token_share(self) -> float:
        """Real tokens over pack capacity (packs × max_length)."""
        if not len(self.packs):
            return 1.0
        return float(self.pack_tokens.sum()) / (len(self.packs) * self.layout.max_length)

    @cached_property
    def num_empty_micro_batches(self) -> int:
        return self.layout.world_size * self.num_micro_batches - len(self._by_slot)


# ---------------------------------------------------------------------------------------------- loader


class MixtureLoader:
    """Iterate one rank's micro-batches of a mixture, step after step; resumable to the exact sample.

    ``window_size`` occurrences form one step on every rank together; ``num_epochs=None`` runs forever.
    Call :meth:`load_state_dict` before iterating. See the module docstring for the plan and resume.

    ``max_tokens_per_micro_batch`` (off by default) caps each micro-batch's tokens: a step then has as
    many micro-batches as that needs, at least ``micro_batches_per_step``
    (:attr:`MicroBatch.num_micro_batches` says how many; read until :attr:`MicroBatch.is_last_in_step`).
    ``prefetch`` micro-batches are read
    ahead by a background thread while the caller trains (0: read in the caller's thread).
    """

    def __init__(
        self,
        mixture: TableRef,
        mixture_id: str,
        *,
        rank: int,
        world_size: int,
        max_length: int,
        micro_batches_per_step: int,
        seed: int,
        sample_reader: SampleReader,
        window_size: int,
        cost_model: CostModel | None = None,
        num_epochs: int | None = 1,
        max_tokens_per_micro_batch: int | None = None,
        prefetch: int = 2,
    ):
        self.world_size = check_int("MixtureLoader", "world_size", world_size, minimum=1)
        self.rank = check_int("MixtureLoader", "rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise invalid("MixtureLoader", "rank", rank, f"must be < world_size={world_size}")
        self.max_length = check_int("MixtureLoader", "max_length", max_length, minimum=1)
        self.micro_batches_per_step = check_int(
            "MixtureLoader", "micro_batches_per_step", micro_batches_per_step, minimum=1
        )
        self.seed = check_int("MixtureLoader", "seed", seed, minimum=0)
        self.window_size = check_int("MixtureLoader", "window_size", window_size, minimum=1)
        self.num_epochs = (
            None if num_epochs is None else check_int("MixtureLoader", "num_epochs", num_epochs, minimum=1)
        )
        self.max_tokens_per_micro_batch = (
            None
            if max_tokens_per_micro_batch is None
            else check_int(
                "MixtureLoader", "max_tokens_per_micro_batch", max_tokens_per_micro_batch, minimum=1
            )
        )
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < self.max_length:
            raise invalid(
                "MixtureLoader",
                "max_tokens_per_micro_batch",
                max_tokens_per_micro_batch,
                f"must be >= max_length={max_length} (a micro-batch holds at least one full pack)",
            )
        self.prefetch = check_int("MixtureLoader", "prefetch", prefetch, minimum=0)
        if not callable(sample_reader):
            raise invalid("MixtureLoader", "sample_reader", sample_reader, "must be callable(sample_ids)")
        self.sample_reader = sample_reader
        self.cost_model = cost_model or CostModel()
        self.mixture = mixture
        self.mixture_id = mixture_id
        self.samples = read_sample_table(mixture, mixture_id, self.cost_model)
        longest = int(np.argmax(self.samples.num_tokens))
        if self.samples.num_tokens[longest] > self.max_length:
            over = int((self.samples.num_tokens > self.max_length).sum())
            raise ValueError(
                f"sample {self.samples.sample_ids[longest]!r} of mixture {mixture_id!r} has "
                f"{int(self.samples.num_tokens[longest]):,} tokens, more than max_length "
                f"{self.max_length:,} ({over} sample(s) too long); samples are never split"
            )
        self.layout = Layout(
            self.world_size,
            self.micro_batches_per_step,
            self.max_length,
            self.cost_model.to_dict(),
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
        )
        self._stream0 = epoch_stream(self.samples.repeats)
        self.occurrences_per_epoch = len(self._stream0)
        self.windows_per_epoch = -(-self.occurrences_per_epoch // self.window_size)
        self._epoch_cache: tuple[int, np.ndarray] = (0, self._stream0)
        # Position: the current window, what of it was consumed before the current plan, and how many
        # micro-batches of the current plan this rank has taken.
        self._window = 0
        self._consumed_before = np.zeros(0, np.int64)
        self._done = 0
        self._plan: WindowPlan | None = None

    # ------------------------------------------------------------------------------------------ stream

    @property
    def num_steps(self) -> int | None:
        """Windows in the whole run (None when it runs forever)."""
        return None if self.num_epochs is None else self.num_epochs * self.windows_per_epoch

    def stream(self, epoch: int) -> np.ndarray:
        """Mixture row of each occurrence of ``epoch``, in stream order."""
        if epoch == 0:
            return self._stream0
        cached_epoch, rows = self._epoch_cache
        if cached_epoch != epoch:
            rows = self._stream0[
                np.random.default_rng([self.seed, epoch]).permutation(self.occurrences_per_epoch)
            ]
            self._epoch_cache = (epoch, rows)
        return rows

    def window_occurrences(self, window: int) -> np.ndarray:
        """Occurrence ids of a window (the same for every world size)."""
        epoch, w = divmod(window, self.windows_per_epoch)
        start = w * self.window_size
        end = min(start + self.window_size, self.occurrences_per_epoch)
        return np.arange(start, end, dtype=np.int64) + epoch * self.occurrences_per_epoch

    def rows_of(self, occurrences: np.ndarray) -> np.ndarray:
        """Mixture rows of occurrence ids (one epoch at a time or several)."""
        occurrences = np.asarray(occurrences, dtype=np.int64)
        epochs, positions = np.divmod(occurrences, self.occurrences_per_epoch)
        out = np.empty(len(occurrences), np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.stream(e)[positions[sel]]
        return out

    # ------------------------------------------------------------------------------------------ plans

    def plan_window(self, window: int, exclude: Any = ()) -> WindowPlan:
        """The plan of ``window`` without the occurrences in ``exclude``, for this loader's layout.

        A pure function of the mixture's metadata, (seed, window_size), the layout and ``exclude``.
        """
        layout = self.layout
        occurrences = self.window_occurrences(window)
        exclude = np.asarray(exclude, dtype=np.int64)
        if len(exclude):
            occurrences = occurrences[~np.isin(occurrences, exclude)]
        rows = self.rows_of(occurrences)
        lengths = self.samples.num_tokens[rows]
        costs = self.samples.costs[rows]
        packs = tuple(
            np.asarray(p, dtype=np.int64)
            for p in pack_lengths(lengths, layout.max_length, costs, self.samples.sample_ids[rows])
        )
        pack_tokens = np.array([int(lengths[p].sum()) for p in packs], dtype=np.int64)
        pack_costs = np.array([float(costs[p].sum()) for p in packs], dtype=np.float64)
        if layout.max_tokens_per_micro_batch is None:
            num_micro_batches = layout.micro_batches_per_step
            pack_rank, pack_micro_batch = balance_two_level(pack_costs, layout.world_size, num_micro_batches)
        else:
            pack_rank, pack_micro_batch, num_micro_batches = balance_two_level_capped(
                pack_costs,
                pack_tokens,
                layout.world_size,
                layout.micro_batches_per_step,
                layout.max_tokens_per_micro_batch,
            )
        return WindowPlan(
            window,
            window // self.windows_per_epoch,
            layout,
            occurrences,
            rows,
            packs,
            pack_tokens,
            pack_costs,
            pack_rank,
            pack_micro_batch,
            num_micro_batches,
        )

    def _plan_and_warn(self, window: int, exclude: np.ndarray) -> WindowPlan:
        plan = self.plan_window(window, exclude)
        if plan.num_empty_micro_batches:
            log.warning(
                "step %d: %d packs for %d ranks × %d micro-batches; %d micro-batch(es) are empty "
                "(raise window_size)",
                window,
                len(plan.packs),
                self.world_size,
                plan.num_micro_batches,
                plan.num_empty_micro_batches,
            )
        return plan

    def current_plan(self) -> WindowPlan:
        if self._plan is None:
            self._plan = self._plan_and_warn(self._window, self._consumed_before)
        return self._plan

    # ------------------------------------------------------------------------------------------ iteration

    def _finished(self, window: int) -> bool:
        return self.num_steps is not None and window >= self.num_steps

    def _schedule(self) -> Iterator[tuple[WindowPlan, int, tuple[Pack, ...]]]:
        """(plan, micro-batch index, packs) of this rank from the current position on. Reads nothing and
        changes no position (it starts from a copy of it): the prefetch thread runs it ahead of what the
        caller has taken, while the caller moves the position."""
        return self._schedule_from(self._window, self._done, self._plan, self._consumed_before)

    def _schedule_from(
        self, window: int, done: int, plan: WindowPlan | None, consumed_before: np.ndarray
    ) -> Iterator[tuple[WindowPlan, int, tuple[Pack, ...]]]:
        while not self._finished(window):
            if plan is None:
                plan = self._plan_and_warn(window, consumed_before)
            for index in range(done, plan.num_micro_batches):
                yield plan, index, self._packs(plan, index)
            window, done, plan, consumed_before = window + 1, 0, None, np.zeros(0, np.int64)

    def _packs(self, plan: WindowPlan, index: int) -> tuple[Pack, ...]:
        packs = []
        for k in plan.micro_batch_packs(self.rank, index):
            members = plan.packs[k]
            rows = plan.rows[members]
            packs.append(
                Pack(
                    sample_ids=tuple(self.samples.sample_ids[rows].tolist()),
                    occurrences=tuple(plan.occurrences[members].tolist()),
                    num_tokens=tuple(self.samples.num_tokens[rows].tolist()),
                    modalities=tuple(self.samples.modalities[rows].tolist()),
                    cost=float(plan.pack_costs[k]),
                )
            )
        return tuple(packs)

    def _read(self, plan: WindowPlan, index: int, packs: tuple[Pack, ...]) -> tuple[WindowPlan, MicroBatch]:
        ids = [s for p in packs for s in p.sample_ids]
        payloads: tuple[tuple[Any, ...], ...] = ()
        if ids:
            try:
                got = list(self.sample_reader(ids))
                if len(got) != len(ids):
                    raise ValueError(f"sample_reader returned {len(got)} payloads for {len(ids)} sample ids")
            except Exception as exc:
                # Raised again in the training thread when read ahead: say which micro-batch it was.
                exc.add_note(
                    f"reading step {plan.window} micro-batch {index} (rank {self.rank}): samples {ids}"
                )
                raise
            split = np.cumsum([len(p.sample_ids) for p in packs])[:-1].tolist()
            payloads = tuple(tuple(got[a:b]) for a, b in zip([0, *split], [*split, len(got)]))
        return plan, MicroBatch(
            step=plan.window,
            epoch=plan.epoch,
            index=index,
            num_micro_batches=plan.num_micro_batches,
            rank=self.rank,
            packs=packs,
            payloads=payloads,
        )

    def __iter__(self) -> Iterator[MicroBatch]:
        batches = (
            (self._read(*item) for item in self._schedule()) if self.prefetch == 0 else self._read_ahead()
        )
        try:
            for plan, batch in batches:
                # The schedule started at this loader's position and moves as the position does.
                assert plan.window == self._window and batch.index == self._done, "loader position lost"
                # Advance before yielding: a state_dict() taken after receiving this micro-batch counts it.
                self._plan, self._done = plan, batch.index + 1
                if self._done == plan.num_micro_batches:
                    self._next_window()
                yield batch
        finally:
            batches.close()

    def _read_ahead(self) -> Iterator[tuple[WindowPlan, MicroBatch]]:
        """Micro-batches read by a background thread, at most ``prefetch`` ahead of the caller (a bounded
        queue). A reader error is raised here, in the caller's thread, with the micro-batch's samples
        named; closing this generator (the caller stops early, or is collected) stops the thread."""
        schedule = self._schedule()  # from the position now, before the caller can move it
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        end = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in schedule:
                    if stop.is_set() or not put(self._read(*item)):
                        return
                put(end)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                put(exc)

        thread = threading.Thread(target=work, name=f"keyeflow-loader-rank{self.rank}", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _next_window(self) -> None:
        self._window += 1
        self._done = 0
        self._consumed_before = np.zeros(0, np.int64)
        self._plan = None

    # ------------------------------------------------------------------------------------------ resume

    def _consumed(self) -> np.ndarray:
        if self._done == 0:
            return np.sort(self._consumed_before)
        return np.union1d(self._consumed_before, self.current_plan().consumed(self._done))

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is, exactly (JSON-serialisable; identical on every rank of a lock-step job)."""
        consumed = self._consumed()
        epoch, w = divmod(self._window, self.windows_per_epoch)
        return {
            "stream_version": STREAM_VERSION,
            "mixture_id": self.mixture_id,
            "mixture_version": self.mixture.version,
            "seed": self.seed,
            "window_size": self.window_size,
            "occurrences_per_epoch": self.occurrences_per_epoch,
            "window": self._window,
            "consumed": consumed.tolist(),
            "consumed_before": np.sort(self._consumed_before).tolist(),
            "micro_batches_done": self._done,
            "layout": self.layout.to_dict(),
            # For people and logs: occurrences trained on since the start (all epochs).
            "samples_consumed": epoch * self.occurrences_per_epoch + w * self.window_size + len(consumed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped (see the module docstring); the world size may differ."""
        expected = {
            "stream_version": STREAM_VERSION,
            "mixture_id": self.mixture_id,
            "seed": self.seed,
            "window_size": self.window_size,
            "occurrences_per_epoch": self.occurrences_per_epoch,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume: state has {key}={state.get(key)!r}, this loader has {value!r} "
                    "(the stream of windows would differ)"
                )
        window = check_int("MixtureLoader", "state['window']", state["window"], minimum=0)
        in_window = self.window_occurrences(window)
        consumed = np.asarray(state["consumed"], dtype=np.int64)
        if len(consumed) and not np.isin(consumed, in_window).all():
            raise ValueError(f"cannot resume: consumed occurrences outside window {window}")
        saved = state["layout"]
        saved_layout = Layout(
            saved["world_size"],
            saved["micro_batches_per_step"],
            saved["max_length"],
            dict(saved["cost_model"]),
            saved.get("plan_version", -1),
            saved.get("max_tokens_per_micro_batch"),
        )
        self._window, self._plan = window, None
        if saved_layout == self.layout and state["micro_batches_done"] > 0:
            # Same layout: rebuild the same plan and go on from the same micro-batch.
            self._consumed_before = np.asarray(state["consumed_before"], dtype=np.int64)
            self._done = check_int(
                "MixtureLoader", "state['micro_batches_done']", state["micro_batches_done"], minimum=0
            )
            if not np.array_equal(self._consumed(), np.sort(consumed)):
                raise ValueError(
                    "cannot resume: the rebuilt plan does not reproduce the saved consumed "
                    "occurrences (metadata or cost inputs changed)"
                )
        else:
            # Another layout (or a step boundary): plan what is left of the window for this layout.
            self._consumed_before = np.sort(consumed)
            self._done = 0
        if len(self._consumed_before) == len(in_window) and len(in_window):
            self._next_window()
