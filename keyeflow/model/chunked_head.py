"""`lm_head` + log-softmax over sequence chunks: log p of chosen tokens without a `[T, V]` tensor.

The full way (`lm_head(hidden).float()` then a log-softmax) holds `[T, V]` fp32 logits, 4.9 GB for one 8K row
at Qwen3's vocabulary of 151,936, and the backward holds another. Here the positions that are scored (only
those: a label of −100 costs nothing) are cut into chunks of `chunk_size`; each chunk's logits are computed,
reduced to one log-probability per position and dropped. Each chunk runs under non-reentrant activation
checkpointing, so the backward recomputes that chunk's logits when it reaches it: forward and backward both
hold at most `[chunk_size, V]` at a time. The values are the same as the full way's (the logits in the
weight's dtype, upcast to fp32, picked logit minus logsumexp, as `training.losses.token_logprobs`), up to the
order of floating-point sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from keyeflow.model.token_stream import IGNORE_INDEX

# Rows per chunk: [512, 151936] fp32 is 311 MB at the 8B vocabulary; at the tiny vocabulary (4096) a 4K row
# never holds more than 1/8 of its [T, V].
DEFAULT_CHUNK_SIZE = 512


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (fp64 stays)
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log p(targets[..., t]) under the logits `hidden[..., t, :] @ weight.T`, in fp32 (fp64 for an fp64
    model), shaped like `targets`;
    0 (and no gradient) where the target is −100. `hidden` `[..., H]`, `weight` `[V, H]` (an `lm_head`
    weight), `targets` `[...]` token ids aligned with `hidden` (the caller shifts them)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not align")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_targets = targets.reshape(-1)
    scored = torch.nonzero(flat_targets != IGNORE_INDEX).flatten()
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(flat_targets.shape, dtype=dtype, device=hidden.device)
    if scored.numel() == 0:
        # Keep the graph connected (a zero that still reaches the weights), as a full loss over no tokens.
        return (out + hidden.sum() * 0.0 + weight.sum() * 0.0).view(targets.shape)
    picked_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    picked_targets = flat_targets.index_select(0, scored)
    recompute = torch.is_grad_enabled() and (picked_hidden.requires_grad or weight.requires_grad)
    parts = []
    for h, t in zip(picked_hidden.split(chunk_size), picked_targets.split(chunk_size)):
        if recompute:
            parts.append(checkpoint(_chunk_logprobs, h, weight, t, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(h, weight, t))
    return out.index_put((scored,), torch.cat(parts) if len(parts) > 1 else parts[0]).view(targets.shape)
