"""From a training sample to model inputs: `encode_sample` (one sample → `Features`) and `collate` (a list of
`Features` → one batch, padded or packed).

Token ids and labels come from `token_stream.render_conversation` (the one definition of the layout); this
module adds what the model needs beside them: the pre-tokenised uint8 patches of every image and frame,
concatenated in token order, their grids, and the 3D RoPE positions (`modeling.mrope_position_ids`).

`media_lookup(part)` gets each image/video part of the messages, in order, and returns a `MediaPatches`:
- image: `patches` uint8 `[h·w, 588]` and `grids=[(1, h, w)]` (h, w in 14-px patches, as in
  `image_samples.grid_h/grid_w`);
- video: `patches` of all frames concatenated, one `(1, h, w)` grid per frame, `frame_types` (0 slow, 1 fast)
  and `timestamps` (seconds); `slow_tokens`/`fast_tokens` (LLM tokens per frame) are derived from the grids
  and, when given (as in `video_samples`), checked against them.
Patch rows follow the pre-tokeniser's layout (see `keyeflow.datasets.tables`, `video_frames.patches`).

Normalisation to SigLIP's [-1, 1] happens inside the model (`KeyeVisionTransformer.forward`), so features and
batches carry the compact uint8 patches.

Patch order. Our rows are in 2×2 merge-group order (`keyeflow.datasets.pretokenize.patchify`); the released
Keye-VL-1.5 processor (`KeyeVL1_5ImageProcessor`) gives each grid's rows in raster order, as `[N, 3, 14, 14]`
float values already normalised to [-1, 1]. `raster_to_merge_order` is the one conversion between the two
(`merge_to_raster_order` its inverse): `MediaPatches(order="raster")` and the model's 4-D `pixel_values` (the
released processor's own output) go through it, so either kind of input gives the same features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from keyeflow.model.modeling import merge_order_index, mrope_position_ids
from keyeflow.model.token_stream import (
    FAST,
    IGNORE_INDEX,
    SLOW,
    image_ids,
    render_conversation,
    render_text,
    video_ids,
    vision_token_ids,
)


def raster_to_merge_order(
    pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]], spatial_merge_size: int = 2
) -> torch.Tensor:
    """Patch rows in raster order per grid (the released Keye-VL-1.5 processor's `pixel_values`,
    `[N, C, P, P]` or `[N, C·P·P]`) → our merge-group order, `[N, C·P·P]`. Values and dtype are kept: the
    processor's float rows (normalised to [-1, 1]) stay float, which the model takes as normalised; uint8
    rows stay uint8. Each row's values are channel-major (c, y, x) in both layouts, so only rows move."""
    rows = pixel_values.reshape(pixel_values.shape[0], -1)
    index = merge_order_index(grid_thw, spatial_merge_size)
    if index.numel() != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} patch rows but the grids {grid_thw} hold {index.numel()}")
    return rows[index.to(rows.device)]


def merge_to_raster_order(
    pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]], spatial_merge_size: int = 2
) -> torch.Tensor:
    """The inverse of `raster_to_merge_order`: our rows → raster order per grid, `[N, C·P·P]`."""
    rows = pixel_values.reshape(pixel_values.shape[0], -1)
    index = merge_order_index(grid_thw, spatial_merge_size)
    if index.numel() != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} patch rows but the grids {grid_thw} hold {index.numel()}")
    out = torch.empty_like(rows)
    out[index.to(rows.device)] = rows
    return out


def join_rows(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(blocks)`` of 2-D row blocks, without a copy when they already lie back to back in one
    storage (as `sample_reader.MediaReader.read` lays out a micro-batch's patches): then one view of them,
    pinned if that storage is. Otherwise (and for a single block: itself) the same values as ``torch.cat``."""
    first = blocks[0]
    at = first.storage_offset()
    for block in blocks:
        if not (
            block.dtype == first.dtype
            and block.device == first.device
            and block.ndim == 2
            and block.shape[1] == first.shape[1]
            and block.is_contiguous()
            and block.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and block.storage_offset() == at
        ):
            return torch.cat(blocks)
        at += block.numel()
    return first.as_strided((sum(b.shape[0] for b in blocks), first.shape[1]), (first.shape[1], 1))


@dataclass(frozen=True)
class MediaPatches:
    """One pre-tokenised image (`frame_types` None) or video (one grid per frame). `order`: "merge" for
    our stored patches, "raster" for rows in the released processor's raster order (converted on encode)."""

    patches: np.ndarray | torch.Tensor
    grids: Sequence[tuple[int, int, int]]
    frame_types: Sequence[int] | None = None
    timestamps: Sequence[float] | None = None
    slow_tokens: int | None = None
    fast_tokens: int | None = None
    order: str = "merge"

    @property
    def kind(self) -> str:
        return "image" if self.frame_types is None else "video"


@dataclass
class Features:
    """One sample's model inputs. `pixel_values` uint8 `[num_patches, 588]`, `grid_thw` `[num_grids, 3]`,
    `position_ids` `[3, L]`; `num_vision_tokens` counts every id that came from media (as
    `RenderedConversation`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    position_ids: torch.Tensor
    num_vision_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.numel())


MediaLookup = Callable[[Mapping], MediaPatches]


def _tokens_per_grid(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    if h % merge or w % merge:
        raise ValueError(f"grid {grid} is not divisible by the spatial merge size {merge}")
    return t * (h // merge) * (w // merge)


def _video_frame_tokens(media: MediaPatches, merge: int) -> tuple[int, int]:
    types = [int(t) for t in media.frame_types]
    if len(types) != len(media.grids):
        raise ValueError(f"video has {len(types)} frame types but {len(media.grids)} frame grids")
    per_kind: dict[int, set[int]] = {SLOW: set(), FAST: set()}
    for kind, grid in zip(types, media.grids):
        if grid[0] != 1:
            raise ValueError(f"every video frame is its own t=1 grid, got {grid}")
        per_kind.setdefault(kind, set()).add(_tokens_per_grid(grid, merge))
    derived = {}
    for kind, given, name in (
        (SLOW, media.slow_tokens, "slow_tokens"),
        (FAST, media.fast_tokens, "fast_tokens"),
    ):
        counts = per_kind[kind]
        if len(counts) > 1:
            raise ValueError(
                f"{name}: frames of one kind must share one size, got token counts {sorted(counts)}"
            )
        value = counts.pop() if counts else given
        if given is not None and value is not None and int(given) != value:
            raise ValueError(f"{name}={given} but the frame grids give {value} tokens per frame")
        derived[kind] = value
    return derived[SLOW] or 0, derived[FAST] or 0


def encode_sample(
    messages: Sequence[Mapping] | Mapping | str,
    tokenizer: PreTrainedTokenizerBase,
    media_lookup: MediaLookup | None = None,
    *,
    spatial_merge_size: int = 2,
) -> Features:
    """Model inputs of one sample. `messages` is a chat (`[{"role", "content"}, ...]` or
    `{"messages": [...]}`, only assistant turns trained) or a plain-text sample: a string, or
    `[{"role": "text", "content": str}]` as `train_samples.messages` stores text chunks (every token trained,
    then EOS)."""
    media_list: list[MediaPatches] = []  # in token order: render_conversation calls back part by part

    def media_ids(part: Mapping) -> list[int]:
        if media_lookup is None:
            raise ValueError(f"{part.get('type')} part found but no media_lookup was given")
        media = media_lookup(part)
        if media.kind != part["type"]:
            raise ValueError(f"a {part['type']} part was looked up as a {media.kind}")
        if media.kind == "image":
            if len(media.grids) != 1:
                raise ValueError(f"an image is one grid, got {len(media.grids)}")
            ids = image_ids(tokenizer, _tokens_per_grid(tuple(media.grids[0]), spatial_merge_size))
        else:
            slow, fast = _video_frame_tokens(media, spatial_merge_size)
            ids = video_ids(tokenizer, media.frame_types, media.timestamps, slow, fast)
        media_list.append(media)
        return ids

    if isinstance(messages, str):
        rendered = render_text(tokenizer, messages)
    elif (
        isinstance(messages, Sequence) and len(messages) == 1 and isinstance(messages[0], Mapping)
        and messages[0].get("role") == "text"
    ):  # fmt: skip
        rendered = render_text(tokenizer, messages[0]["content"])
    else:
        rendered = render_conversation(tokenizer, messages, media_ids)

    grids = [tuple(int(v) for v in g) for media in media_list for g in media.grids]
    patches = []
    for media in media_list:
        # A tensor stays itself (no round trip through numpy, which would lose its storage and pinning).
        block = (
            media.patches.contiguous()
            if isinstance(media.patches, torch.Tensor)
            else torch.as_tensor(np.ascontiguousarray(media.patches))
        )
        expected = sum(t * h * w for t, h, w in media.grids)
        if media.order not in ("merge", "raster"):
            raise ValueError(f"{media.kind} patch order must be 'merge' or 'raster', got {media.order!r}")
        if media.order == "raster" and block.shape[:1] == (expected,):
            block = raster_to_merge_order(block, media.grids, spatial_merge_size)
        if block.dtype != torch.uint8 or block.ndim != 2 or block.shape[0] != expected:
            raise ValueError(
                f"{media.kind} patches must be uint8 [{expected}, patch values], got {block.dtype} "
                f"{tuple(block.shape)}"
            )
        patches.append(block)
    pixel_values = join_rows(patches) if patches else torch.zeros(0, 0, dtype=torch.uint8)
    grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    ids = vision_token_ids(tokenizer)
    input_ids = torch.tensor(rendered.input_ids, dtype=torch.long)
    position_ids = mrope_position_ids(
        input_ids, grid_thw, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
        spatial_merge_size=spatial_merge_size,
    )  # fmt: skip
    return Features(
        input_ids=input_ids,
        labels=torch.tensor(rendered.labels, dtype=torch.long),
        pixel_values=pixel_values,
        grid_thw=grid_thw,
        position_ids=position_ids,
        num_vision_tokens=rendered.num_vision_tokens,
    )


def collate(
    features_list: Sequence[Features], pack: bool, max_length: int | None = None, *, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """One batch for `KeyeForConditionalGeneration.forward`.

    `pack=False`: one sample per row, right-padded to the longest. `pack=True`: samples are concatenated in
    the given order into rows of at most `max_length` tokens (a new row starts when the next sample does not
    fit; `max_length=None` puts everything in one row); attention stays inside each sample (`sample_index`)
    and positions restart per sample, so a packed row computes what its samples would alone. Either way a
    sample's first label is set to −100 (no logit of its own sample predicts it), padding has label −100,
    position 0, `sample_index` −1 and id `pad_token_id` (any id but a vision pad). A sample longer than
    `max_length` is an error: cutting it could split an image's tokens from its patches.

    Returns input_ids, labels, sample_index `[B, L]`, position_ids `[3, B, L]`, pixel_values (uint8, all
    samples' patches in row/token order), grid_thw `[num_grids, 3]`.
    """
    if not features_list:
        raise ValueError("collate needs at least one sample")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for n, f in enumerate(features_list):
        if max_length is not None and len(f) > max_length:
            raise ValueError(f"sample {n} has {len(f)} tokens, more than max_length={max_length}")

    rows: list[list[Features]] = []
    if pack:
        used = 0
        for f in features_list:
            if not rows or (max_length is not None and used + len(f) > max_length):
                rows.append([])
                used = 0
            rows[-1].append(f)
            used += len(f)
    else:
        rows = [[f] for f in features_list]
    return collate_rows(rows, pad_token_id=pad_token_id)


def collate_rows(rows: Sequence[Sequence[Features]], *, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The batch of `collate` with the rows given: each inner list is packed into one row, in order (for a
    loader that has already planned its packs). Rows are right-padded to the longest."""
    if not rows or any(not row for row in rows):
        raise ValueError("collate_rows needs at least one row and no empty row")
    width = max(sum(len(f) for f in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    sample_index = torch.full((batch, width), -1, dtype=torch.long)
    position_ids = torch.zeros((3, batch, width), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, f in enumerate(row):
            end = start + len(f)
            input_ids[b, start:end] = f.input_ids
            labels[b, start:end] = f.labels
            labels[b, start] = IGNORE_INDEX
            sample_index[b, start:end] = s
            position_ids[:, b, start:end] = f.position_ids
            start = end

    ordered = [f for row in rows for f in row]
    blocks = [f.pixel_values for f in ordered if f.pixel_values.numel()]
    pixel_values = join_rows(blocks) if blocks else torch.zeros(0, 0, dtype=torch.uint8)
    grid_thw = torch.cat([f.grid_thw for f in ordered]).reshape(-1, 3)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "sample_index": sample_index,
        "position_ids": position_ids,
        "pixel_values": pixel_values,
        "grid_thw": grid_thw,
    }
