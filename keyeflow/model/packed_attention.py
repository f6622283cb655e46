"""LLM attention over packed rows with no `[L, L]` tensor.

A packed row holds several samples one after another (`sample_index` says which token belongs to which, −1 for
padding); a token may attend only to earlier tokens of its own sample. The dense way to say that is an
additive `[B, 1, L, L]` mask (`modeling.packed_causal_mask`, still selectable with `KeyeConfig.attention =
"mask"`): 1.7e10 entries at L = 131,072, and a mask also rules out SDPA's flash kernels. Here the row is cut
into its segments instead (`PackedSegments`, boundaries `cu_seqlens` as flash-attention's varlen API takes
them) and each segment is attended causally on its own:

- on CUDA with `flash_attn` installed and a half-precision dtype: one `flash_attn_varlen_func` call over the
  whole batch (GQA native). Not exercised by the CPU test suite.
- everywhere else: a loop of `F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` per
  segment. On CPU that picks torch's flash kernel (fp32, fp64, bf16, GQA included), whose forward and
  backward keep O(segment length) memory.

The function is registered in transformers' `AttentionInterface` under `PACKED_ATTENTION`; the model sets its
LLM to that implementation and passes a `PackedSegments` where HF passes a mask. Any other mask (a tensor or
None: the dense path, the decode steps of generation with a KV cache) goes to transformers' own SDPA function
unchanged, so one registered implementation serves both paths.

Padding: every run of −1 is a segment of its own (causal within the run). The dense mask lets padding see all
earlier padding of the row; padding outputs are never trained or read, so only they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # the varlen kernel exists only where flash-attn is built (CUDA); never on the CPU test machines
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

PACKED_ATTENTION = "keyeflow_packed"


@dataclass(frozen=True)
class PackedSegments:
    """The segments of a `[B, L]` batch: `spans` (row, start, end) in row order, covering every position;
    `cu_seqlens` int32 `[num_segments + 1]` offsets into the flattened B·L tokens (flash-attn varlen's
    argument), on the model's device; `max_length` the longest segment."""

    spans: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor
    max_length: int
    batch_size: int
    row_length: int


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


def _use_flash_varlen(query: torch.Tensor) -> bool:
    return (
        flash_attn_varlen_func is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
    )


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
    if _use_flash_varlen(query):  # pragma: no cover - CUDA only
        q = query.transpose(1, 2).reshape(batch * length, num_heads, head_dim)
        k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
        out = flash_attn_varlen_func(
            q, k, v, segments.cu_seqlens, segments.cu_seqlens, segments.max_length, segments.max_length,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )  # fmt: skip
        return out.view(batch, length, num_heads, head_dim), None

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
