"""LLM attention over packed rows with no `[L, L]` tensor.

A packed row holds several samples one after another (`sample_index` says which token belongs to which, −1 for
padding); a token may attend only to earlier tokens of its own sample. The dense way to say that is an
additive `[B, 1, L, L]` mask (`modeling.packed_causal_mask`, still selectable with `KeyeConfig.attention =
"mask"`): 1.7e10 entries at L = 131,072, and a mask also rules out SDPA's flash kernels. Here the row is cut
into its segments instead (`PackedSegments`, boundaries `cu_seqlens` as flash-attention's varlen API takes
them) and each segment is attended causally on its own.

The kernel (`packed_kernel`) is a rule of the device and the installed packages, not of `KeyeConfig`:

- "flash_varlen" on CUDA with `flash_attn` installed and a half-precision compute dtype (the autocast dtype
  under autocast): one `flash_attn_varlen_func` call over the whole batch (GQA native).
- "flex" on CUDA otherwise (the usual case: the GPU images have torch + Triton but no flash-attn), with no
  dropout: one compiled `flex_attention` call over the whole batch with a document-causal `BlockMask`
  (`document_block_mask`), GQA through `enable_gqa`. The block mask is built from the segment boundaries,
  block by block (128 × 128 tiles): torch's `create_block_mask` would evaluate the mask function on a dense
  `[B, 1, L, L]` grid first, the tensor this module exists to avoid. It is built at the first layer and kept
  on the `PackedSegments` for the others. `flex_attention` is compiled once, lazily, at its first CUDA use.
- "sdpa_loop" everywhere else (CPU): a loop of `F.scaled_dot_product_attention(..., is_causal=True,
  enable_gqa=True)` per segment. On CPU that picks torch's flash kernel (fp32, fp64, bf16, GQA included),
  whose forward and backward keep O(segment length) memory.

Tests and benchmarks force a kernel with the environment variable `KEYEFLOW_PACKED_ATTENTION_KERNEL`
(`flash_varlen`, `flex` or `sdpa_loop`). Forced "flex" on CPU runs `flex_attention` eagerly (torch runs it
there, forward only: it has no CPU backward), which is how the CPU tests compare it with the loop.

The function is registered in transformers' `AttentionInterface` under `PACKED_ATTENTION`; the model sets its
LLM to that implementation and passes a `PackedSegments` where HF passes a mask. Any other mask (a tensor or
None: the dense path, the decode steps of generation with a KV cache) goes to transformers' own SDPA function
unchanged, so one registered implementation serves both paths.

Padding: every run of −1 is a segment of its own (causal within the run). The dense mask lets padding see all
earlier padding of the row; padding outputs are never trained or read, so only they differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # the varlen kernel exists only where flash-attn is built (CUDA); never on the CPU test machines
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

PACKED_ATTENTION = "keyeflow_packed"
PACKED_KERNELS = ("flash_varlen", "flex", "sdpa_loop")
PACKED_KERNEL_ENV = "KEYEFLOW_PACKED_ATTENTION_KERNEL"  # forces a kernel; for tests and benchmarks only
FLEX_BLOCK_SIZE = 128  # flex_attention's default tile: the block mask's granularity


@dataclass(frozen=True)
class PackedSegments:
    """The segments of a `[B, L]` batch: `spans` (row, start, end) in row order, covering every position;
    `cu_seqlens` int32 `[num_segments + 1]` offsets into the flattened B·L tokens (flash-attn varlen's
    argument), on the model's device; `max_length` the longest segment. `block_masks` caches the flex
    kernel's `BlockMask` of this batch by block size, so that every layer after the first reuses it."""

    spans: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor
    max_length: int
    batch_size: int
    row_length: int
    block_masks: dict = field(default_factory=dict, repr=False, compare=False)


def packed_segments(sample_index: torch.Tensor) -> PackedSegments:
    """Segments from `sample_index` `[B, L]`: maximal runs of one sample id. A sample (id ≥ 0) must be one run
    in its row: packing puts a sample's tokens together, and a split sample would silently lose its
    attention to its own first part here."""
    if sample_index.ndim != 2:
        raise ValueError(f"sample_index must be [B, L], got shape {tuple(sample_index.shape)}")
    index = sample_index.detach().cpu()
    batch, length = index.shape
    spans: list[tuple[int, int, int]] = []
    for row in range(batch):
        ids = index[row]
        starts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()] if length else []
        ends = [*starts[1:], length]
        seen: set[int] = set()
        for start, end in zip(starts, ends):
            sample = int(ids[start])
            if sample >= 0:
                if sample in seen:
                    raise ValueError(f"sample {sample} of row {row} is not contiguous in sample_index")
                seen.add(sample)
            spans.append((row, start, end))
    offsets = [row * length + start for row, start, _ in spans] + [batch * length]
    return PackedSegments(
        spans=tuple(spans),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=sample_index.device),
        max_length=max((end - start for _, start, end in spans), default=0),
        batch_size=batch,
        row_length=length,
    )


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype under autocast (where Qwen3's QK-norm hands over fp32
    queries and keys beside bf16 values), else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def choose_packed_kernel(
    device_type: str, compute_dtype: torch.dtype, dropout: float, has_flash: bool
) -> str:
    """The rule: "flash_varlen" on CUDA with flash-attn and a half-precision compute dtype, else "flex" on
    CUDA without dropout (flex_attention has none), else "sdpa_loop"."""
    if device_type == "cuda":
        if has_flash and compute_dtype in (torch.float16, torch.bfloat16):
            return "flash_varlen"
        if dropout == 0.0:
            return "flex"
    return "sdpa_loop"


def packed_kernel(query: torch.Tensor, dropout: float = 0.0) -> str:
    """The kernel for `query`: the one forced by `KEYEFLOW_PACKED_ATTENTION_KERNEL`, else
    `choose_packed_kernel`'s."""
    forced = os.environ.get(PACKED_KERNEL_ENV)
    if forced:
        if forced not in PACKED_KERNELS:
            raise ValueError(f"{PACKED_KERNEL_ENV} must be one of {PACKED_KERNELS}, got {forced!r}")
        if forced == "flash_varlen" and flash_attn_varlen_func is None:
            raise ValueError(f"{PACKED_KERNEL_ENV}=flash_varlen but flash_attn is not installed")
        return forced
    has_flash = flash_attn_varlen_func is not None
    return choose_packed_kernel(query.device.type, _compute_dtype(query), dropout, has_flash)


def segment_ids(segments: PackedSegments) -> torch.Tensor:
    """`[B, L]` int64 on `cu_seqlens`' device: the index of each token's segment in `segments.spans`.
    Segments are numbered in row order, so ids never decrease along a row and no two rows share one."""
    lengths = segments.cu_seqlens.diff().long()
    ids = torch.arange(lengths.numel(), device=lengths.device).repeat_interleave(lengths)
    return ids.view(segments.batch_size, segments.row_length)


def document_block_mask(segments: PackedSegments, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """flex_attention's `BlockMask` for causal attention within each segment, from tile-level facts only.

    With t = block_size, query tile i and key tile j < i share a segment exactly when the last token of tile j
    and the first token of tile i are in the same segment (segments are contiguous runs, numbered in order);
    such a pair is "full" (no token-level mask needed) when both tiles lie inside that one segment. The
    diagonal tile is always partial (causal inside it); tiles above it are empty. The largest tensors are
    `[B, L/t, L/t]`: 1M entries per row at L = 131,072, against 1.7e10 for a token-level mask."""
    ids = segment_ids(segments)
    length = ids.shape[1]
    num_tiles = -(-length // block_size)
    # Tokens past L (the last tile's tail) get id −1, which no segment has: the tile is never "full", and
    # the mask function below can index them (the kernel drops their scores by the sequence length anyway).
    padded = F.pad(ids, (0, num_tiles * block_size - length), value=-1)
    first, last = padded[:, ::block_size], padded[:, block_size - 1 :: block_size]  # [B, tiles]
    tile = torch.arange(num_tiles, device=ids.device)
    below = tile[None, :] < tile[:, None]  # [query tile, key tile]
    shared = below & (last[:, None, :] == first[:, :, None])
    uniform = first == last
    full = shared & uniform[:, None, :] & uniform[:, :, None]
    partial = (shared & ~full) | (tile[None, :] == tile[:, None])

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # BlockMask's layout: per query tile, how many key tiles, then their indices first.
        counts = tiles.sum(-1, dtype=torch.int32)
        indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts[:, None], indices.to(torch.int32)[:, None]

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=same_segment_causal,
        seq_lengths=(length, length),
    )  # fmt: skip


_compiled_flex_attention = None


def _flex_attention_for(query: torch.Tensor):
    """The compiled `flex_attention` on CUDA (compiled once, at the first call: the eager one materialises the
    scores); the eager one elsewhere (CPU tests: forward only, small rows)."""
    global _compiled_flex_attention
    if not query.is_cuda:
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: PackedSegments | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` `[B, Hq, L, D]`, `key`/`value` `[B, Hkv, L, D]`;
    returns `[B, L, Hq, D]` and no weights."""
    if not isinstance(attention_mask, PackedSegments):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    segments = attention_mask
    batch, num_heads, length, head_dim = query.shape
    if key.shape[2] != length or (batch, length) != (segments.batch_size, segments.row_length):
        # Segments describe a prefill or a training row, where keys and queries are the same tokens.
        raise ValueError(
            f"packed attention needs queries and keys of the segmented [B, L] = "
            f"[{segments.batch_size}, {segments.row_length}], got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}"
        )
    kernel = packed_kernel(query, dropout)
    if kernel == "flash_varlen":  # pragma: no cover - CUDA with flash-attn only
        dtype = _compute_dtype(query)
        q = query.to(dtype).transpose(1, 2).reshape(batch * length, num_heads, head_dim)
        k = key.to(dtype).transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
        v = value.to(dtype).transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
        out = flash_attn_varlen_func(
            q, k, v, segments.cu_seqlens, segments.cu_seqlens, segments.max_length, segments.max_length,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )  # fmt: skip
        return out.view(batch, length, num_heads, head_dim), None
    if kernel == "flex":
        if dropout:
            raise ValueError("the flex kernel has no attention dropout")
        block_mask = segments.block_masks.get(FLEX_BLOCK_SIZE)
        if block_mask is None or block_mask.kv_indices.device != query.device:
            block_mask = segments.block_masks[FLEX_BLOCK_SIZE] = document_block_mask(segments)
        dtype = _compute_dtype(query)  # flex_attention takes one dtype; autocast does not reach inside it
        out = _flex_attention_for(query)(
            query.to(dtype), key.to(dtype), value.to(dtype), block_mask=block_mask, scale=scaling,
            enable_gqa=key.shape[1] != num_heads,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for row, start, end in segments.spans:
        out = F.scaled_dot_product_attention(
            query[row : row + 1, :, start:end],
            key[row : row + 1, :, start:end],
            value[row : row + 1, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=key.shape[1] != num_heads,
        )
        rows[row].append(out)
    out = torch.cat([torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in rows])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
