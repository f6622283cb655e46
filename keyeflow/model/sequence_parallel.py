"""Ulysses sequence (context) parallelism for `KeyeForConditionalGeneration`, the ViT split included.

A long packed row does not fit one GPU's activations (stage 3 trains 131,072 tokens), so the ranks of a
sequence group share one row: each holds L/n consecutive tokens through every LLM layer, and only attention
needs the whole sequence. Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023) does that with two all-to-alls per
layer: q/k/v go from [L/n tokens, all heads] to [all L tokens, heads/n], the packed attention
(`packed_attention`) runs on the whole sequence for the local heads (segment boundaries stay global: it gets
the `PackedSegments` of the whole row), and the output goes back to [L/n tokens, all heads]. Communication per
layer is 4 activations of L/n tokens whatever n is; Ring attention would pass K/V blocks around n − 1 times
and needs a segment-aware block schedule. Ulysses caps n at the number of KV heads without repeating them:
when the KV heads do not split evenly over n (Qwen3-8B has 8, so n = 16 would), each KV head is repeated
(`repeat_interleave`, as GQA itself does) just enough that they do, and the repeats' gradients add up.

What the model does under a `SequenceParallel` (`KeyeForConditionalGeneration.set_sequence_parallel`):
1. The ViT work of the row is split across the group by frame cost (`vision_assignment`: every image and
   every video frame is its own grid, attended alone, so frames are independent units; greedy LPT on
   `grid_cost`), each rank encodes its frames, and the embeddings are gathered in token order
   (`sharded_vision_embeddings`: an all-gather whose backward sums the gradient over the group and keeps this
   rank's rows), so every rank has all of them.
2. The ids, the 3-row mRoPE positions and the labels (shifted first: the logit at i predicts label i + 1,
   which may sit on the next rank) are padded to a multiple of n (padding: sample −1, label −100) and each
   rank keeps its slice of L (`shard_sequence`); it embeds its slice and places the vision embeddings that
   fall in it.
3. Every LLM attention layer runs `ulysses_attention` (registered in transformers' `AttentionInterface` as
   `SEQUENCE_PARALLEL_ATTENTION`): one fused all-to-all for q, k and v, the packed attention, one back.
4. Outputs are gathered along L (`gather_sequence`): logits `[B, L, V]`, `token_logprobs` `[B, L − 1]`; the
   loss is the global token mean (each rank's summed token loss over its slice, summed over the group with
   `sum_over_group`, divided by the row's label count, which every rank knows from the full labels).

Gradients: every rank gets the same outputs, and the backward of each collective is arranged so that the
parameter gradients SUMMED over the group are the gradients of one process running the whole row (the
trainer's rule: losses are divided by global counts and gradients summed over ranks). The all-to-all and the
vision gather pass the exact adjoint (the inverse all-to-all; a sum over the group); the output gather and the
loss sum, whose results every rank uses identically, pass each rank only its own share (a slice; the
identity): the exact adjoint would add the same gradient n times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from transformers import AttentionInterface

from keyeflow.model.packed_attention import PackedSegments, packed_attention

SEQUENCE_PARALLEL_ATTENTION = "keyeflow_ulysses"


def patch_count(patches: int) -> float:
    """The default cost of one frame of `patches` patches (the ViT's matrices dominate at Keye's sizes)."""
    return float(patches)


@dataclass(frozen=True)
class SequenceParallel:
    """The sequence group this rank belongs to. `grid_cost(patches)` is the ViT cost of one frame; the trainer
    passes the balancer's (`training.balance.CostModel.grid_cost`), so frames are spread by the same cost the
    loader balances packs with."""

    group: dist.ProcessGroup
    grid_cost: Callable[[int], float] = field(default=patch_count)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def sequence_parallel_mesh(
    sequence_parallel_size: int, *, device_type: str = "cpu", grid_cost: Callable[[int], float] = patch_count
) -> tuple[DeviceMesh, SequenceParallel]:
    """The (data, sequence) mesh over the started process group, and this rank's `SequenceParallel`. A
    sequence group is `sequence_parallel_size` consecutive ranks (within a node, where the all-to-alls are
    cheapest); a data-parallel group (`mesh.get_group("data")`) joins the ranks at the same place of each."""
    world = dist.get_world_size()
    if sequence_parallel_size < 1 or world % sequence_parallel_size:
        raise ValueError(
            f"sequence_parallel_size {sequence_parallel_size} must be >= 1 and divide the world size {world}"
        )
    mesh = init_device_mesh(
        device_type,
        (world // sequence_parallel_size, sequence_parallel_size),
        mesh_dim_names=("data", "sequence"),
    )
    return mesh, SequenceParallel(mesh.get_group("sequence"), grid_cost)


# ---------------------------------------------------------------------------------------------- collectives


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Chunk j of `scatter_dim` goes to rank j; what rank i sends lands at place i of `gather_dim`. Its
    adjoint is the inverse all-to-all (the two dims swapped)."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: SequenceParallel) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, sp.group)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.rank, ctx.length = dim, dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.length, ctx.length), None, None


def gather_sequence(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    """The group's equal slices of `dim` joined in rank order. Backward keeps this rank's slice of the
    gradient: every rank computes the same thing from the result (module docstring)."""
    return _GatherSequence.apply(x, dim, sp.group)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The sum of `x` over the group. Backward passes the gradient through unchanged: every rank computes the
    same thing from the sum, so this rank's addend gets that gradient once, summed over the group."""
    return _SumOverGroup.apply(x, sp.group)


class _GatherVision(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.rank, ctx.counts, ctx.group = dist.get_rank(group), counts, group
        padded = x.new_zeros(max(counts), *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        # Each rank places different rows of the gathered embeddings, so the gradient of this rank's rows is
        # the sum of what every rank sends back for them.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


# ---------------------------------------------------------------------------------------------- ViT split


def vision_assignment(costs: Sequence[float], num_ranks: int) -> list[int]:
    """The rank that encodes each frame, from the frames' costs: greedy LPT (costliest first, to the least
    loaded rank, the lowest rank on a tie), as the loader balances packs; deterministic, so every rank
    computes the same plan."""
    loads = [0.0] * num_ranks
    owner = [0] * len(costs)
    for frame in sorted(range(len(costs)), key=lambda f: (-costs[f], f)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        owner[frame] = rank
        loads[rank] += costs[frame]
    return owner


def sharded_vision_embeddings(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    parameters: Sequence[torch.nn.Parameter],
    width: int,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    spatial_merge_size: int,
    sp: SequenceParallel,
) -> torch.Tensor:
    """`encode(pixel_values, grid_thw)` (ViT + projector: one `width`-wide embedding per `merge²` patches)
    of all grids, in token order, each rank encoding only its frames (`vision_assignment`). A grid with
    t > 1 is t frames: the ViT attends and merges within a frame, so encoding frames apart gives the same
    embeddings. `parameters` are the encoder's (to keep a rank with no frame in the backward)."""
    frames = [(h, w) for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist() for _ in range(t)]
    patches = [h * w for h, w in frames]
    owner = vision_assignment([sp.grid_cost(p) for p in patches], sp.size)
    merged = spatial_merge_size**2
    starts = [0]
    for p in patches:
        starts.append(starts[-1] + p)
    mine = [f for f in range(len(frames)) if owner[f] == sp.rank]
    if mine:
        rows = torch.cat([torch.arange(starts[f], starts[f + 1]) for f in mine]).to(pixel_values.device)
        local = encode(pixel_values[rows], torch.tensor([(1, *frames[f]) for f in mine]))
    else:
        # No frame here, but the gather's backward is a collective every rank must join: tie the empty output
        # to the trained weights, so autograd records it exactly when the other ranks' outputs need grad.
        first = parameters[0]
        local = first.new_zeros(0, width)
        for p in parameters:
            if p.requires_grad:
                local = local + p.reshape(-1)[:1].sum() * 0
    counts = [sum(patches[f] for f in range(len(frames)) if owner[f] == r) // merged for r in range(sp.size)]
    gathered = _GatherVision.apply(local, counts, sp.group)
    # Rows arrive rank by rank, each rank's frames in token order; put them back in the row's token order.
    token_starts = [s // merged for s in starts]
    arrived = [
        torch.arange(token_starts[f], token_starts[f + 1])
        for r in range(sp.size)
        for f in range(len(frames))
        if owner[f] == r
    ]
    order = torch.empty(token_starts[-1], dtype=torch.long)
    order[torch.cat(arrived)] = torch.arange(token_starts[-1])
    return gathered[order.to(gathered.device)]


# ---------------------------------------------------------------------------------------------- LLM


def pad_sequence(x: torch.Tensor, dim: int, fill: int | bool, sp: SequenceParallel) -> torch.Tensor:
    """`x` padded along `dim` with `fill` to a multiple of the group size."""
    missing = -x.shape[dim] % sp.size
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


def shard_sequence(x: torch.Tensor, dim: int, fill: int | bool, sp: SequenceParallel) -> torch.Tensor:
    """This rank's slice of `dim`, after `pad_sequence`."""
    x = pad_sequence(x, dim, fill, sp)
    local = x.shape[dim] // sp.size
    return x.narrow(dim, sp.rank * local, local)


@dataclass(frozen=True)
class SequenceParallelSegments:
    """What the LLM's attention takes as its mask under sequence parallelism: the segments of the whole
    (padded) rows, and the group the rows are split over."""

    segments: PackedSegments
    sequence_parallel: SequenceParallel


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: SequenceParallelSegments | PackedSegments | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, `query` `[B, Hq, L/n, D]` and `key`/`value`
    `[B, Hkv, L/n, D]` of this rank's slice; returns `[B, L/n, Hq, D]`. Any mask but a
    `SequenceParallelSegments` goes to `packed_attention` unchanged."""
    if not isinstance(attention_mask, SequenceParallelSegments):
        return packed_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    sp = attention_mask.sequence_parallel
    n, num_heads = sp.size, query.shape[1]
    if num_heads % n:
        raise ValueError(f"{num_heads} query heads do not split over a sequence group of {n}")
    # KV heads that do not split evenly are repeated just enough (each query head keeps its own KV head).
    repeat = n // math.gcd(key.shape[1], n)
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    local_heads, local_kv_heads = num_heads // n, key.shape[1] // n
    # One all-to-all for q, k and v: [B, n, heads of rank j, L/n, D] → [B, 1, local heads, L, D].
    qkv = torch.cat([t.unflatten(1, (n, -1)) for t in (query, key, value)], dim=2)
    qkv = all_to_all(qkv, scatter_dim=1, gather_dim=3, sp=sp).squeeze(1)
    q, k, v = qkv.split([local_heads, local_kv_heads, local_kv_heads], dim=1)
    out, _ = packed_attention(
        module, q, k, v, attention_mask.segments, dropout=dropout, scaling=scaling, **kwargs
    )
    return all_to_all(
        out, scatter_dim=1, gather_dim=2, sp=sp
    ), None  # [B, L, local heads, D] → [B, L/n, Hq, D]


AttentionInterface.register(SEQUENCE_PARALLEL_ATTENTION, ulysses_attention)
