"""The Keye-style vision-language model: a native-resolution SigLIP-like ViT, a 2×2-merge MLP projector and a
transformers `Qwen3Model` with multimodal 3D RoPE (SPEC §1). Architecture only: no training loop here.

Inputs (built by `keyeflow.model.processor`):
- `pixel_values`: uint8 patches `[num_patches, 3·14·14]` of every image and frame in the batch, in token
  order. Each row is one 14×14 patch, values channel-major (c, y, x); within an image/frame the rows follow
  the pre-tokeniser's order (`keyeflow.datasets.pretokenize.patchify`, the Qwen2-VL order): 2×2 merge groups
  in raster order, and inside a group (0,0), (0,1), (1,0), (1,1). Normalisation happens here, in the first
  step of `KeyeVisionTransformer.forward`: x/255 then (x − 0.5)/0.5 (SigLIP's mean and std 0.5, Keye's
  processor); floating-point `pixel_values` are taken as already normalised.
- `grid_thw`: `[num_grids, 3]` (t, h, w) in 14-px patches per image/frame. Every image and every video frame
  is its own grid with t = 1 (SPEC §2; Slow and Fast frames of different sizes mix freely); t > 1 is run as t
  separate frames.
- `position_ids`: `[3, B, L]` temporal/height/width positions (`mrope_position_ids`), restarting at 0 for
  every sample of a packed row.
- `sample_index`: `[B, L]` which sample of its row each token belongs to (−1 for padding). Attention stays
  inside each sample (causal, block-diagonal); `attention_mask` (HF 0/1 padding mask) is accepted instead.

ViT (Keye-VL-1.5, vLLM `keye.py`): patch embedding (a Linear over the 588 patch values, the same map as
Keye's stride-14 Conv2d), plus learnable absolute position embeddings on a square grid bilinearly interpolated
(align_corners=False) to each grid's h×w, then pre-norm SigLIP layers whose attention applies 2D RoPE (the
first half of the rotary pairs turn with the patch row, the second half with the column; theta 1e4) and never
crosses a grid: grids are batched by length and attended separately, so nothing is masked and nothing leaks.

Projector (Keye-VL-1.5 `mlp_AR`): each contiguous group of 4 patch features is concatenated (4·hidden) →
LayerNorm → Linear → GELU → Linear to the LLM width, giving one LLM token per 28×28 pixels.

LLM: transformers' `Qwen3Model` (QK-norm, GQA) + `lm_head`, with its rotary module replaced by
`MultimodalRotaryEmbedding`: cos/sin are computed for the three position streams and the rotary frequency
pairs are split in contiguous sections `mrope_section` (Qwen2-VL / Keye style, [16, 24, 24] at full size:
pairs 0-15 turn with time, 16-39 with height, 40-63 with width). Text tokens advance all three streams
together, so on text the model is exactly Qwen3 with 1D RoPE.

LLM attention (`KeyeConfig.attention`): "packed" (the default) cuts each row into its samples and attends
each causally on its own (`keyeflow.model.packed_attention`: flash-attn varlen on CUDA where installed, else
FlexAttention with a document mask on CUDA, a per-segment SDPA loop on CPU), never building an `[L, L]`
tensor; "mask" materialises the `[B, 1, L, L]` additive mask (`packed_causal_mask`) and runs transformers'
SDPA on it, kept to compare against.

Activation checkpointing (`set_activation_checkpointing`): "full" recomputes every LLM decoder layer and every
ViT layer in the backward, "selective" every other one (layers 0, 2, 4, …: about half the saved activations
for about half the recompute), "off" none. It is applied by this model's own layer loops whenever autograd is
recording, in train and in eval mode alike (HF layers checkpoint only in train mode, and RL trains the policy
in eval mode), with non-reentrant `torch.utils.checkpoint`.

Log-probs for losses (`forward(logprob_labels=...)`): the per-token log-probabilities of the labels, computed
over sequence chunks (`keyeflow.model.chunked_head`) so that no `[T, V]` logits exist; the training losses use
this instead of `logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, Qwen3Model
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from keyeflow.model.chunked_head import chunked_token_logprobs
from keyeflow.model.config import ACTIVATION_CHECKPOINTING, KeyeConfig, KeyeVisionConfig
from keyeflow.model.packed_attention import PACKED_ATTENTION, packed_segments
from keyeflow.model.sequence_parallel import (
    SEQUENCE_PARALLEL_ATTENTION,
    SequenceParallel,
    SequenceParallelSegments,
    gather_sequence,
    pad_sequence,
    shard_sequence,
    sharded_vision_embeddings,
    sum_over_group,
)

IGNORE_INDEX = -100
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # SigLIP normalisation over [0, 1], per channel


def checkpointed_layers(mode: str, num_layers: int) -> frozenset[int]:
    """The layers whose activations are recomputed in the backward, when autograd is recording: all ("full"),
    every other one from the first ("selective"), none ("off")."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    if mode == "off" or not torch.is_grad_enabled():
        return frozenset()
    return frozenset(range(0, num_layers, 2 if mode == "selective" else 1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------------------------------------- layout


@lru_cache(maxsize=256)
def _patch_rows_cols(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    if h % merge or w % merge:
        raise ValueError(f"grid {h}×{w} is not divisible by the spatial merge size {merge}")
    raster = torch.arange(h * w).view(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
    return raster // w, raster % w


def patch_rows_cols(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) in the h×w patch grid of every patch row, in the pre-tokeniser's merge-group order."""
    rows, cols = _patch_rows_cols(int(h), int(w), int(merge))
    return rows.clone(), cols.clone()


def merge_order_index(grid_thw: torch.Tensor | Sequence[Sequence[int]], merge: int) -> torch.Tensor:
    """For each patch row in merge-group order, the index of the same patch among rows in raster order
    (the released Keye processor's), over all grids in turn (a grid with t > 1 is t frames). The reordering
    behind `processor.raster_to_merge_order`."""
    index, offset = [], 0
    for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist():
        rows, cols = _patch_rows_cols(h, w, merge)
        for _ in range(t):
            index.append(offset + rows * w + cols)
            offset += h * w
    return torch.cat(index) if index else torch.zeros(0, dtype=torch.long)


def mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    grid_thw: Sequence[Sequence[int]] | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """3D RoPE positions `[3, L]` (temporal, height, width) of one sample, as Keye-VL-1.5 computes them
    (vLLM `KeyeVL1_5ForConditionalGeneration.get_mrope_input_positions`, Qwen2-VL's `get_rope_index`).

    A text token takes the next position p in all three streams. A grid (t, h, w) — its t·(h/m)·(w/m) pad
    tokens, consumed in `grid_thw` order — gets (p + ti, p + hi, p + wi) for its merged tokens in raster
    order, and the next token continues at 1 + the largest of those. Each frame being its own t=1 grid, a
    later frame's temporal index is always larger: the temporal stream follows the frame order.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    grids = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3).tolist()
    m = int(spatial_merge_size)
    is_vision = (ids == image_token_id) | (ids == video_token_id)
    vision_at = torch.nonzero(is_vision).flatten().tolist()
    sizes = [t * (h // m) * (w // m) for t, h, w in grids]
    if len(vision_at) != sum(sizes):
        raise ValueError(f"{len(vision_at)} vision pad tokens but the grids {grids} need {sum(sizes)}")

    positions = torch.empty(3, ids.numel(), dtype=torch.long)
    cursor, next_pos, used = 0, 0, 0  # cursor: next token index to place
    for (t, h, w), size in zip(grids, sizes):
        start = vision_at[used]
        if vision_at[used + size - 1] != start + size - 1:
            raise ValueError(f"the {size} pad tokens of grid {(t, h, w)} are not contiguous")
        if not bool((ids[start : start + size] == ids[start]).all()):
            raise ValueError(f"grid {(t, h, w)} mixes image and video pad tokens")
        text_len = start - cursor
        positions[:, cursor:start] = torch.arange(next_pos, next_pos + text_len)
        next_pos += text_len
        gh, gw = h // m, w // m
        ti = torch.arange(t).repeat_interleave(gh * gw)
        hi = torch.arange(gh).repeat_interleave(gw).repeat(t)
        wi = torch.arange(gw).repeat(t * gh)
        positions[:, start : start + size] = torch.stack([ti, hi, wi]) + next_pos
        next_pos += max(t, gh, gw)
        cursor, used = start + size, used + size
    positions[:, cursor:] = torch.arange(next_pos, next_pos + ids.numel() - cursor)
    return positions


# ---------------------------------------------------------------------------------------------- vision


class VisionAttention(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: VisionGroups
    ) -> torch.Tensor:
        num_patches = x.shape[0]
        shape = (num_patches, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        # RoPE in fp32 at least, whatever the model dtype: bf16 cannot resolve the angles of a wide grid.
        cos, sin = cos[:, None, :], sin[:, None, :]
        rope_dtype = torch.promote_types(q.dtype, torch.float32)
        q = (q.to(rope_dtype) * cos + rotate_half(q.to(rope_dtype)) * sin).to(v.dtype)
        k = (k.to(rope_dtype) * cos + rotate_half(k.to(rope_dtype)) * sin).to(v.dtype)
        out = groups.attend(q, k, v, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(num_patches, -1))


class VisionGroups:
    """Patches regrouped so each image/frame attends only to itself: frames of equal length are stacked into
    one `[n, heads, L, d]` batch (no mask needed, no cross-frame attention possible)."""

    def __init__(self, frame_lengths: list[int], device: torch.device):
        lengths = torch.tensor(frame_lengths, dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        self.chunks: list[tuple[int, int]] = []  # (frame length, number of frames)
        order = []
        for length in sorted(set(frame_lengths)):
            frames = torch.nonzero(lengths == length).flatten()
            order.append((starts[frames, None] + torch.arange(length)).reshape(-1))
            self.chunks.append((length, frames.numel()))
        self.order = torch.cat(order).to(device)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(self.order.numel(), device=device)
        self.identity = len(self.chunks) == 1

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        if not self.identity:
            q, k, v = q[self.order], k[self.order], v[self.order]
        outs, offset = [], 0
        for length, count in self.chunks:
            span = slice(offset, offset + length * count)
            qs, ks, vs = (t[span].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout)
            outs.append(out.transpose(1, 2).reshape(length * count, *q.shape[1:]))
            offset += length * count
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out if self.identity else out[self.inverse]


class VisionMLP(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(GradientCheckpointingLayer):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: VisionGroups
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class KeyeVisionTransformer(nn.Module):
    """Native-resolution ViT over packed grids; returns one feature per input patch, in input order."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([VisionLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation_checkpointing = "off"  # set through KeyeForConditionalGeneration

    def interpolated_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The learnt side×side position grid resized to h×w (bilinear, align_corners=False), raster order."""
        side, dim = self.config.position_grid_side, self.config.hidden_size
        grid = self.pos_embed.weight.view(1, side, side, dim).permute(0, 3, 1, 2)
        if (h, w) != (side, side):
            grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=False)
        return grid.to(self.pos_embed.weight.dtype).permute(0, 2, 3, 1).reshape(h * w, dim)

    def rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quarter = self.config.head_dim // 4
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(quarter, dtype=torch.float, device=rows.device) / quarter)
        )
        freqs = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # [P, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dtype, device = self.patch_embed.weight.dtype, self.patch_embed.weight.device
        grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != num_patches:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} do not match the grids {grids} "
                f"({num_patches} patches)"
            )
        if pixel_values.dtype == torch.uint8:
            x = (pixel_values.to(device=device, dtype=torch.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
        else:
            x = pixel_values.to(device=device, dtype=torch.float32)
        x = self.patch_embed(x.to(dtype))

        merge = self.config.spatial_merge_size
        pos, rows, cols, frame_lengths, per_size = [], [], [], [], {}
        for t, h, w in grids:
            if (h, w) not in per_size:
                r, c = patch_rows_cols(h, w, merge)
                per_size[h, w] = (self.interpolated_pos_embed(h, w)[(r * w + c).to(device)], r, c)
            p, r, c = per_size[h, w]
            pos.extend([p] * t)
            rows.extend([r] * t)
            cols.extend([c] * t)
            frame_lengths.extend([h * w] * t)
        x = x + torch.cat(pos)
        cos, sin = self.rope(torch.cat(rows).to(device).float(), torch.cat(cols).to(device).float())
        groups = VisionGroups(frame_lengths, device)
        recomputed = checkpointed_layers(self.activation_checkpointing, len(self.layers))
        for i, layer in enumerate(self.layers):
            if i in recomputed:
                x = checkpoint(layer, x, cos, sin, groups, use_reentrant=False)
            else:
                x = layer(x, cos, sin, groups)
        return self.post_norm(x)


class KeyeProjector(nn.Module):
    """2×2 merge: concatenate each group of 4 patch features → LayerNorm → Linear → GELU → Linear."""

    def __init__(self, config: KeyeConfig):
        super().__init__()
        merge = config.vision_config.spatial_merge_size
        self.merged_size = config.vision_config.hidden_size * merge * merge
        self.norm = nn.LayerNorm(self.merged_size, eps=1e-5)
        self.fc1 = nn.Linear(self.merged_size, config.projector_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features.reshape(-1, self.merged_size)))))


# ---------------------------------------------------------------------------------------------- LLM rope


class MultimodalRotaryEmbedding(nn.Module):
    """Drop-in for `Qwen3Model.rotary_emb`: takes `[3, B, L]` position ids (or `[B, L]` for text, the same
    position in all three streams) and returns cos/sin `[B, L, head_dim]` where rotary pair i turns with the
    stream of its `mrope_section`. It keeps no buffers: theta is read from the config at every call, so
    changing `config.rope_theta` on a loaded model takes effect, and meta-device builds need no re-init."""

    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.text_config.head_dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        theta = self.config.rope_theta
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=x.device) / self.head_dim)
        )
        freqs = position_ids[..., None].float() * inv_freq  # [3, B, L, head_dim / 2]
        sections = torch.split(freqs, self.config.mrope_section, dim=-1)
        freqs = torch.cat([section[i] for i, section in enumerate(sections)], dim=-1)  # [B, L, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def packed_causal_mask(sample_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, 1, L, L]` additive mask: a token sees earlier tokens of its own sample only. Padding (−1) sees
    padding, so no row is empty (its outputs are never trained)."""
    length = sample_index.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sample_index.device).tril()
    allowed = (sample_index[:, :, None] == sample_index[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sample_index.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------------------------- model


class KeyePreTrainedModel(PreTrainedModel):
    config_class = KeyeConfig
    config: KeyeConfig
    base_model_prefix = "keye"  # no separate base-model attribute: checkpoints always hold the whole model
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["VisionLayer", "Qwen3DecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True


@dataclass
class KeyeCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `token_logprobs` `[B, L − 1]` fp32 (given `logprob_labels`): entry t is
    log p(label t + 1), 0 where that label is −100."""

    token_logprobs: torch.FloatTensor | None = None


class KeyeForConditionalGeneration(KeyePreTrainedModel):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def __init__(self, config: KeyeConfig):
        super().__init__(config)
        self.vision = KeyeVisionTransformer(config.vision_config)
        self.projector = KeyeProjector(config)
        self.language_model = Qwen3Model(config.text_config)
        self.language_model.rotary_emb = MultimodalRotaryEmbedding(config)
        # One registered attention function serves both paths: it runs the per-segment kernels on the
        # `PackedSegments` the "packed" path passes and hands a dense mask (or None) to transformers' SDPA.
        self.language_model.set_attn_implementation(PACKED_ATTENTION)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.activation_checkpointing = "off"
        self.sequence_parallel: SequenceParallel | None = None
        self.post_init()

    def set_activation_checkpointing(self, mode: str) -> None:
        """ "full" | "selective" | "off" for the LLM decoder layers and the ViT layers (module docstring)."""
        checkpointed_layers(mode, 0)  # validates
        self.activation_checkpointing = mode
        self.vision.activation_checkpointing = mode

    def set_sequence_parallel(self, sequence_parallel: SequenceParallel | None) -> None:
        """Split every row's tokens over `sequence_parallel`'s group from the next forward on (None: off). All
        ranks of the group must call the forward with the same batch (`keyeflow.model.sequence_parallel`)."""
        if sequence_parallel is not None and self.config.attention != "packed":
            raise ValueError(
                f"sequence parallelism needs the packed attention path, not {self.config.attention!r}"
            )
        self.sequence_parallel = sequence_parallel
        self.language_model.set_attn_implementation(
            PACKED_ATTENTION if sequence_parallel is None else SEQUENCE_PARALLEL_ATTENTION
        )

    def attention_mask_for(self, sample_index: torch.Tensor, dtype: torch.dtype) -> object:
        """What the LLM's attention takes as its mask for rows segmented by `sample_index` `[B, L]` (−1 for
        padding): `PackedSegments` on the "packed" path, the `[B, 1, L, L]` additive mask on "mask"."""
        if self.config.attention == "packed":
            return packed_segments(sample_index)
        return packed_causal_mask(sample_index, dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_vision_embeddings(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """LLM-width embeddings `[num_merged_tokens, hidden]` of all grids, in token order. 4-D
        `pixel_values` `[N, C, P, P]` are the released Keye processor's, rows in raster order per grid; they
        are put in merge-group order first (`processor.raster_to_merge_order`)."""
        if pixel_values.ndim == 4:
            rows = pixel_values.reshape(pixel_values.shape[0], -1)
            index = merge_order_index(grid_thw, self.config.vision_config.spatial_merge_size)
            pixel_values = rows[index.to(rows.device)] if index.numel() == rows.shape[0] else rows
        sp = self.sequence_parallel
        if sp is not None and sp.size > 1:
            return sharded_vision_embeddings(
                lambda pixels, grids: self.projector(self.vision(pixels, grids)),
                [*self.vision.parameters(), *self.projector.parameters()],
                self.config.text_config.hidden_size, pixel_values, grid_thw,
                self.config.vision_config.spatial_merge_size, sp,
            )  # fmt: skip
        return self.projector(self.vision(pixel_values, grid_thw))

    def position_ids_for(
        self, input_ids: torch.Tensor, grid_thw: torch.Tensor | None, sample_index: torch.Tensor
    ) -> torch.Tensor:
        """`[3, B, L]` mRoPE positions computed from the ids (what the processor precomputes)."""
        cfg, merge = self.config, self.config.vision_config.spatial_merge_size
        grids = [] if grid_thw is None else torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
        used = 0
        for b in range(input_ids.shape[0]):
            for s in sorted(set(sample_index[b].tolist()) - {-1}):
                where = torch.nonzero(sample_index[b] == s).flatten().cpu()
                ids = input_ids[b, where].cpu()
                num_vision = int(((ids == cfg.image_token_id) | (ids == cfg.video_token_id)).sum())
                mine = []
                while num_vision > 0:
                    t, h, w = grids[used]
                    mine.append(grids[used])
                    num_vision -= t * (h // merge) * (w // merge)
                    used += 1
                out[:, b, where] = mrope_position_ids(
                    ids, mine, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                    spatial_merge_size=merge,
                )  # fmt: skip
        return out.to(input_ids.device)

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        sample_index: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logprob_labels: torch.LongTensor | None = None,
        vision_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> KeyeCausalLMOutput:
        """Logits `[B, L, vocab]` and, with `labels`, the mean next-token cross-entropy over the labels that
        are not −100 (labels are shifted here: the logit at i predicts label i+1). With `logprob_labels`
        (`[B, L]`, shifted the same way) the output holds only `token_logprobs` `[B, L − 1]`, computed over
        chunks of the scored positions (no logits at all: the path the training losses take).
        `vision_embeddings` (`[num vision tokens, hidden]`, in token order) stand in for `pixel_values`: the
        caller ran `get_vision_embeddings` itself, e.g. once for a prompt shared by several samples."""
        if sample_index is None:
            sample_index = (
                torch.zeros_like(input_ids) if attention_mask is None
                else torch.where(attention_mask.bool(), 0, -1).to(input_ids.device)
            )  # fmt: skip
        if position_ids is None:
            position_ids = self.position_ids_for(input_ids, grid_thw, sample_index)

        is_vision = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        num_vision = int(is_vision.sum())
        vision = None
        if num_vision and vision_embeddings is not None:
            vision = vision_embeddings.to(self.language_model.embed_tokens.weight.dtype)
            if vision.shape[0] != num_vision:
                raise ValueError(f"{num_vision} vision pad tokens but {vision.shape[0]} vision_embeddings")
        elif num_vision:
            if pixel_values is None or grid_thw is None:
                raise ValueError(
                    f"input_ids hold {num_vision} vision pad tokens but no pixel_values/grid_thw"
                )
            vision = self.get_vision_embeddings(pixel_values, grid_thw)
            vision = vision.to(self.language_model.embed_tokens.weight.dtype)
            if vision.shape[0] != num_vision:
                raise ValueError(
                    f"{num_vision} vision pad tokens but the grids give {vision.shape[0]} embeddings"
                )
        elif pixel_values is not None and pixel_values.numel():
            raise ValueError("pixel_values given but input_ids hold no vision pad tokens")
        if self.sequence_parallel is not None and self.sequence_parallel.size > 1:
            return self.sequence_parallel_forward(
                input_ids, is_vision, vision, position_ids, sample_index, labels, logprob_labels, **kwargs
            )

        embeds = self.language_model.embed_tokens(input_ids)
        if vision is not None:
            embeds = embeds.masked_scatter(is_vision[..., None], vision)
        mask = self.attention_mask_for(sample_index.to(embeds.device), embeds.dtype)
        hidden = self.language_hidden_states(embeds, position_ids.to(embeds.device), mask, **kwargs)
        if logprob_labels is not None:
            targets = logprob_labels[:, 1:].to(hidden.device)
            logps = chunked_token_logprobs(hidden[:, :-1], self.lm_head.weight, targets)
            return KeyeCausalLMOutput(token_logprobs=logps)
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            if (targets != IGNORE_INDEX).any():
                loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )  # fmt: skip
            else:
                loss = logits.sum() * 0.0
        return KeyeCausalLMOutput(loss=loss, logits=logits)

    def sequence_parallel_forward(
        self,
        input_ids: torch.Tensor,
        is_vision: torch.Tensor,
        vision: torch.Tensor | None,
        position_ids: torch.Tensor,
        sample_index: torch.Tensor,
        labels: torch.Tensor | None,
        logprob_labels: torch.Tensor | None,
        **kwargs,
    ) -> KeyeCausalLMOutput:
        """`forward` with this rank holding one slice of L (`keyeflow.model.sequence_parallel`); the same
        outputs on every rank of the group. `vision`: the embeddings of every vision token of the batch."""
        sp = self.sequence_parallel
        length = input_ids.shape[1]
        embeds = self.language_model.embed_tokens(shard_sequence(input_ids, 1, 0, sp))
        if vision is not None:
            # The global index of each vision token, so this rank places the embeddings of its slice only.
            vision_order = (torch.cumsum(is_vision.reshape(-1), 0) - 1).view_as(is_vision)
            local = shard_sequence(is_vision, 1, False, sp)
            placed = vision[shard_sequence(vision_order, 1, 0, sp)[local]]
            embeds = embeds.masked_scatter(local[..., None], placed)
        # Segment boundaries are the whole rows' (padding: sample −1): the attention sees every token.
        segments = packed_segments(pad_sequence(sample_index, 1, -1, sp).to(embeds.device))
        positions = shard_sequence(position_ids.to(embeds.device), 2, 0, sp)
        hidden = self.language_hidden_states(
            embeds, positions, SequenceParallelSegments(segments, sp), **kwargs
        )

        def shifted(target: torch.Tensor) -> torch.Tensor:
            # Shift before the split: the logit at i predicts label i + 1, which may be on the next rank.
            target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], IGNORE_INDEX)], dim=1)
            return shard_sequence(target.to(hidden.device), 1, IGNORE_INDEX, sp)

        if logprob_labels is not None:
            logps = chunked_token_logprobs(hidden, self.lm_head.weight, shifted(logprob_labels))
            return KeyeCausalLMOutput(token_logprobs=gather_sequence(logps, 1, sp)[:, : length - 1])
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # The global token mean: every rank's summed token loss, over the row's label count.
            summed = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), shifted(labels).reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )  # fmt: skip
            num_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = sum_over_group(summed, sp) / max(num_labels, 1)
        return KeyeCausalLMOutput(loss=loss, logits=gather_sequence(logits, 1, sp)[:, :length])

    def language_hidden_states(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: object, **kwargs
    ) -> torch.Tensor:
        """The LLM's final hidden states `[B, L, hidden]`: `Qwen3Model.forward`'s layer loop (same calls, same
        order), written out here so that activation checkpointing is this model's choice in any mode."""
        lm = self.language_model
        position_embeddings = lm.rotary_emb(embeds, position_ids)
        recomputed = checkpointed_layers(self.activation_checkpointing, len(lm.layers))
        hidden = embeds
        for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
            layer_kwargs = {
                "attention_mask": mask, "position_embeddings": position_embeddings,
                "position_ids": position_ids, **kwargs,
            }  # fmt: skip
            if i in recomputed:
                hidden = checkpoint(layer, hidden, use_reentrant=False, **layer_kwargs)
            else:
                hidden = layer(hidden, **layer_kwargs)
        return lm.norm(hidden)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per part (works on the meta device)."""
    parts = {
        "vision": model.vision, "projector": model.projector, "language_model": model.language_model,
        "lm_head": model.lm_head,
    }  # fmt: skip
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
