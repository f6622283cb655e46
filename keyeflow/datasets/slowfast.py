"""Slow-Fast video encoding: which sampled frames are Slow, and how many tokens each kind gets.

Keye-VL-1.5 (SPEC §2) keeps full detail for "Slow" frames, the ones that differ from the latest Slow frame,
and gives the "Fast" frames in between 30% of a Slow frame's tokens. Two presets exist: the paper's numbers
and those of the released preprocessing package keye-vl-utils 1.5.2, which the model was used with. Under
the `keye-vl-utils` preset this module must give that package's frame types and frame sizes bit for bit,
so several choices below (uint8 bilinear downscale, float32 ratios, Python's `round`) look arbitrary and
are there only to land on the same side of every threshold as the reference does.

The reference compares frame pairs one at a time in Python; here the downscale and colour conversion run
once over the whole clip, patch vectors are built once, and each Slow frame is compared with a run of
following frames in one batched product, jumping straight to the next frame that turns out Slow.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from keyeflow.config import check_flag, check_int, check_number, config_hash, invalid

FRAME_SLOW = 0
FRAME_FAST = 1
FRAME_SAMPLINGS = ("fps", "keye-vl-utils")


@dataclass(frozen=True, kw_only=True)
class SlowFastConfig:
    """Every setting that decides Slow/Fast labels and frame sizes (1 token = one factor x factor area)."""

    similarity_threshold: float  # a frame is Slow when its similarity to the latest Slow frame is below this
    total_token_budget: int  # per video, over all frames
    strict_budget: (
        bool  # True: largest per-frame size that fits; False: keye-vl-utils' search (may overshoot)
    )
    preset: str  # the preset this came from; informational, not part of the hash
    fps: float = 2.0  # frame sampling rate; used by whoever samples frames, hashed because it changes tokens
    # How frames are picked and stamped (video.py): "fps" = ffmpeg's fps filter at `fps`, stamped k / rate;
    # "keye-vl-utils" = keye-vl-utils 1.5.2's rule, int(duration · fps) frame indices spread with linspace
    # from the first to the last frame, stamped index / the container's average frame rate.
    frame_sampling: str = "fps"
    patch_cosine_threshold: float = 0.7  # a patch counts as similar when its HSV cosine is above this
    selection_max_tokens: int = (
        256  # frames are compared at this size at most, which is also what makes it cheap
    )
    fast_ratio: float = 0.3  # a Fast frame's share of a Slow frame's tokens
    min_tokens_per_frame: int = 48
    max_tokens_per_frame: int = 768
    patch_size: int = 14
    merge_size: int = 2

    def __post_init__(self) -> None:
        def fail(name: str, value: Any, why: str) -> None:
            raise invalid("SlowFastConfig", name, value, why)

        # Normalise numbers so that 2 and 2.0 give the same hash and JSON.
        for name in ("fps", "similarity_threshold", "patch_cosine_threshold", "fast_ratio"):
            object.__setattr__(self, name, check_number("SlowFastConfig", name, getattr(self, name)))
        for name, minimum in (
            ("selection_max_tokens", None),
            ("min_tokens_per_frame", 1),
            ("max_tokens_per_frame", None),
            ("total_token_budget", 1),
            ("patch_size", 1),
            ("merge_size", 1),
        ):
            object.__setattr__(
                self, name, check_int("SlowFastConfig", name, getattr(self, name), minimum=minimum)
            )
        strict = self.strict_budget
        if isinstance(strict, np.bool_):  # NumPy's bool is not a bool, but says the same
            strict = bool(strict)
        object.__setattr__(self, "strict_budget", check_flag("SlowFastConfig", "strict_budget", strict))
        if not isinstance(self.preset, str):
            fail("preset", self.preset, "must be a string")

        if self.fps <= 0:
            fail("fps", self.fps, "must be > 0")
        if self.frame_sampling not in FRAME_SAMPLINGS:
            fail("frame_sampling", self.frame_sampling, f"must be one of {', '.join(FRAME_SAMPLINGS)}")
        if not 0.0 <= self.similarity_threshold <= 1.0:
            fail("similarity_threshold", self.similarity_threshold, "must be in [0, 1]")
        if not 0.0 <= self.patch_cosine_threshold <= 1.0:
            fail("patch_cosine_threshold", self.patch_cosine_threshold, "must be in [0, 1]")
        if not 0.0 < self.fast_ratio <= 1.0:
            fail("fast_ratio", self.fast_ratio, "must be in (0, 1]")
        if self.max_tokens_per_frame < self.min_tokens_per_frame:
            fail(
                "max_tokens_per_frame",
                self.max_tokens_per_frame,
                f"must be >= min_tokens_per_frame ({self.min_tokens_per_frame})",
            )
        if self.selection_max_tokens < self.min_tokens_per_frame:
            fail(
                "selection_max_tokens",
                self.selection_max_tokens,
                f"must be >= min_tokens_per_frame ({self.min_tokens_per_frame})",
            )

    @property
    def factor(self) -> int:
        """Side in pixels of the area one LLM token covers (ViT patch x 2x2 merge = 28)."""
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable across processes and Python versions; the preset name is left out because two presets
        with the same numbers make the same tokens. `frame_sampling` is left out at "fps", the only way
        frames were sampled before it existed, so samples stored then keep their keys."""
        fields = self.to_dict()
        del fields["preset"]
        if fields["frame_sampling"] == "fps":
            del fields["frame_sampling"]
        return config_hash(fields, compact=True)


PRESETS: MappingProxyType[str, SlowFastConfig] = MappingProxyType(
    {
        "paper": SlowFastConfig(
            similarity_threshold=0.95, total_token_budget=75_000, strict_budget=True, preset="paper"
        ),
        "keye-vl-utils": SlowFastConfig(
            similarity_threshold=0.90,
            total_token_budget=65_536,
            strict_budget=False,
            preset="keye-vl-utils",
            frame_sampling="keye-vl-utils",
        ),
    }
)

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SlowFastConfig))


def resolve_config(preset: str = "paper", **overrides: Any) -> SlowFastConfig:
    """A preset with some fields replaced; the result keeps the preset's name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown slow-fast preset {preset!r}; valid presets: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(_FIELD_NAMES))
    if unknown:
        valid = [name for name in _FIELD_NAMES if name != "preset"]
        raise ValueError(f"unknown SlowFastConfig override(s) {unknown}; valid: {valid}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _config(config: SlowFastConfig | None, preset: str, overrides: dict[str, Any]) -> SlowFastConfig:
    if config is None:
        return resolve_config(preset, **overrides)
    if overrides:
        raise ValueError(f"pass either config= or overrides, not both (got overrides {sorted(overrides)})")
    return config


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int, max_ratio: float = 200
) -> tuple[int, int]:
    """(h, w) with both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    The arithmetic is keye-vl-utils' on purpose, Python's banker's `round` included (42 px -> 56, 70 px
    -> 56 with factor 28): sizes are part of the token stream and must agree with the released model's.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > max_ratio:
        raise ValueError(f"aspect ratio {ratio:.1f} of a {height}x{width} frame exceeds {max_ratio}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


# ---------------------------------------------------------------------------------------------------------
# Frame selection

# The fast path computes cosines from float32 BLAS dot products; the reference also works in float32 but
# in another order, so the two can disagree on a patch whose cosine is within rounding of the threshold.
# A float32 sum of n non-negative terms is off by at most about n·2**-24 relative (1.4e-4 for the 2352
# components of a patch), so the two cosines are always well within 1e-3 of each other. A patch closer than
# that to the threshold is "uncertain", and a frame whose verdict hinges on uncertain patches is redone
# with the reference's own float32 operations. Tests set this to 1.0 to send every frame that way.
_COSINE_TOLERANCE = 1e-3
_DOWNSCALE_BATCH = 32  # frames per interpolate call; bounds the temporaries for 1080p input
_BLOCK = 16  # frames whose float32 patch vectors are held at once (~38 MB at the default 256 tokens)


def _downscale_hsv(frames: np.ndarray, cfg: SlowFastConfig) -> np.ndarray:
    """The clip as uint8 HSV (N, h, w, 3) at comparison size, pixel for pixel what the reference compares."""
    num_frames, height, width, _ = frames.shape
    f = cfg.factor
    h, w = smart_resize(
        height,
        width,
        factor=f,
        min_pixels=cfg.min_tokens_per_frame * f * f,
        max_pixels=cfg.selection_max_tokens * f * f,
    )
    hsv = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    for start in range(0, num_frames, _DOWNSCALE_BATCH):
        chunk = np.ascontiguousarray(frames[start : start + _DOWNSCALE_BATCH])
        with warnings.catch_warnings():
            # Decoded frames are often read-only buffers; nothing here writes to them.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            nchw = torch.from_numpy(chunk).permute(0, 3, 1, 2)
        # The reference downscales the uint8 tensor itself (torch's integer antialias kernel, which rounds
        # to uint8); a float downscale gives different pixels. NHWC memory, as the reference gets it.
        small = F.interpolate(nchw, size=[h, w], mode="bilinear", antialias=True)
        rgb = np.ascontiguousarray(small.permute(0, 2, 3, 1).numpy())
        for i in range(len(chunk)):  # frame by frame stays in cache and is faster than one tall image
            cv2.cvtColor(rgb[i], cv2.COLOR_RGB2HSV, dst=hsv[start + i])
    return hsv


def _patch_vectors(hsv: np.ndarray, factor: int, out: np.ndarray) -> np.ndarray:
    """float32 (N, P, factor*factor*3) patch vectors written into `out`, components in (row, column,
    channel) order.

    The reference orders components (channel, row, column); a cosine does not depend on the order, and
    the exact path builds the reference's layout itself. `out` is reused block after block because fresh
    pages for a 40 MB array cost as much as filling them.
    """
    n, h, w, _ = hsv.shape
    gh, gw = h // factor, w // factor
    vectors = out[:n].reshape(n, gh, gw, factor, factor, 3)
    np.copyto(vectors, hsv.reshape(n, gh, factor, gw, factor, 3).transpose(0, 1, 3, 2, 4, 5))
    return out[:n]


def _share_is_slow(num_similar: np.ndarray, num_valid: np.ndarray, threshold: float) -> np.ndarray:
    """Slow verdicts from patch counts, rounded as the reference's float32 mean rounds (count / n).

    With every patch skipped (both frames black) the reference takes the mean of nothing, NaN, and NaN < t
    is False: such a frame is Fast. Kept rather than "fixed", so that labels match.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.asarray(num_similar).astype(np.float32) / np.asarray(num_valid).astype(np.float32)
    return share.astype(np.float64) < threshold


def _exact_patch_similar(
    slow_hsv: np.ndarray, other_hsv: np.ndarray, factor: int, threshold: float
) -> np.ndarray:
    """Per-patch "cosine > threshold" for one frame pair, with the reference's float32 operations and
    layout."""
    h, w, _ = slow_hsv.shape
    gh, gw = h // factor, w // factor

    def normalised(hsv: np.ndarray) -> torch.Tensor:
        blocks = hsv.reshape(gh, factor, gw, factor, 3).transpose(0, 2, 4, 1, 3)  # (gh, gw, c, row, col)
        vectors = torch.from_numpy(np.ascontiguousarray(blocks).reshape(gh, gw, -1)).float()
        return vectors / (torch.norm(vectors, p=2, dim=-1, keepdim=True) + 1e-8)

    return ((normalised(slow_hsv) * normalised(other_hsv)).sum(dim=-1) > threshold).reshape(-1).numpy()


def select_frames(
    frames: np.ndarray, *, preset: str = "paper", config: SlowFastConfig | None = None, **overrides: Any
) -> np.ndarray:
    """Slow (0) / Fast (1) label per frame of a uint8 RGB clip (N, H, W, 3), as int8.

    Frame 0 is Slow; every later frame is compared with the latest Slow frame and becomes the new Slow
    frame when the share of its similar patches falls below `similarity_threshold`. Settings come from
    `preset` plus `overrides`, or from `config` as a whole.
    """
    cfg = _config(config, preset, overrides)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
    num_frames = frames.shape[0]
    labels = np.full(num_frames, FRAME_FAST, dtype=np.int8)
    if num_frames == 0:
        return labels
    labels[0] = FRAME_SLOW
    if num_frames == 1:
        return labels

    hsv = _downscale_hsv(frames, cfg)
    thr, tol, f = cfg.patch_cosine_threshold, _COSINE_TOLERANCE, cfg.factor

    _, h, w, _ = hsv.shape
    buffer = np.empty((min(_BLOCK, num_frames), (h // f) * (w // f), f * f * 3), dtype=np.float32)

    def load_block(first: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = _patch_vectors(hsv[first : first + _BLOCK], f, buffer)
        return vectors, np.sqrt(np.einsum("kpd,kpd->kp", vectors, vectors).astype(np.float64))

    block_first = 0
    block_vectors, block_norms = load_block(0)
    slow = 0
    slow_vector, slow_norm = block_vectors[0].copy(), block_norms[0].copy()

    start, run = 1, 4
    while start < num_frames:
        if start >= block_first + _BLOCK:
            block_first = start - start % _BLOCK
            block_vectors, block_norms = load_block(block_first)
        stop = min(start + run, block_first + _BLOCK, num_frames)
        vectors = block_vectors[start - block_first : stop - block_first]  # (K, P, D)
        norms = block_norms[start - block_first : stop - block_first]  # (K, P)
        dots = np.matmul(vectors.transpose(1, 0, 2), slow_vector[:, :, None])[:, :, 0].T  # (K, P)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = dots / (slow_norm * norms)
        cos = np.nan_to_num(cos, nan=0.0)  # the reference normalises a zero vector to zeros: cosine 0
        # Integer pixels: a norm is exactly 0 or at least 1, so the reference's "< 0.01" is "== 0".
        valid = (slow_norm > 0) | (norms > 0)
        num_valid = valid.sum(axis=1)
        num_sure = ((cos > thr + tol) & valid).sum(axis=1)
        num_unsure = ((np.abs(cos - thr) <= tol) & valid).sum(axis=1)
        slow_even_if_all_similar = _share_is_slow(num_sure + num_unsure, num_valid, cfg.similarity_threshold)
        slow_if_none_similar = _share_is_slow(num_sure, num_valid, cfg.similarity_threshold)

        new_slow = None
        for k in np.flatnonzero(slow_if_none_similar):  # in order; frames not listed are Fast for sure
            if not slow_even_if_all_similar[k]:
                similar = _exact_patch_similar(hsv[slow], hsv[start + k], f, thr) & valid[k]
                if not _share_is_slow(np.count_nonzero(similar), num_valid[k], cfg.similarity_threshold):
                    continue
            new_slow = start + int(k)
            break

        if new_slow is None:
            start, run = stop, min(2 * run, _BLOCK)
        else:
            labels[new_slow] = FRAME_SLOW
            slow = new_slow
            slow_vector = block_vectors[slow - block_first].copy()
            slow_norm = block_norms[slow - block_first].copy()
            # The next gap is probably like this one; sizing the run to it wastes little work either way.
            run = max(2, min(_BLOCK, 2 * (new_slow - start + 1)))
            start = new_slow + 1
    return labels


# ---------------------------------------------------------------------------------------------------------
# Token allocation


class TokenAllocation(NamedTuple):
    slow_size: tuple[int, int]  # (height, width) of every Slow frame
    fast_size: tuple[int, int]  # (height, width) of every Fast frame
    total_tokens: int
    slow_tokens: int  # per Slow frame
    fast_tokens: int  # per Fast frame
    num_slow: int
    num_fast: int


def _first_over_budget(cost: Callable[[int], int], low: int, high: int, budget: int) -> int:
    """Smallest t in [low, high) whose cost exceeds the budget, or `high` when none does."""
    while low < high:
        mid = (low + high) // 2
        if cost(mid) > budget:
            high = mid
        else:
            low = mid + 1
    return low


def allocate_tokens(
    frame_types: Sequence[int] | np.ndarray,
    height: int,
    width: int,
    *,
    preset: str = "paper",
    config: SlowFastConfig | None = None,
    **overrides: Any,
) -> TokenAllocation:
    """Frame sizes for a clip of `height` x `width` frames labelled by `select_frames`.

    The search prices a Slow frame at t tokens and a Fast one at max(int(fast_ratio * t), min); the sizes
    smart_resize then gives never cost more than that, except for frames it must enlarge to reach the
    minimum (very thin ones), so with `strict_budget` the total stays within the budget whenever the
    minimum-size clip does.
    """
    cfg = _config(config, preset, overrides)
    types = np.asarray(frame_types).reshape(-1)
    if types.size and not np.isin(types, (FRAME_SLOW, FRAME_FAST)).all():
        raise ValueError(f"frame_types must contain only {FRAME_SLOW} (Slow) and {FRAME_FAST} (Fast)")
    num_fast = int(np.count_nonzero(types == FRAME_FAST))
    num_slow = int(types.size) - num_fast
    low, high = cfg.min_tokens_per_frame, cfg.max_tokens_per_frame

    def cost(tokens_per_slow: int) -> int:
        # `int(ratio * t)` in float, not integer arithmetic: the reference's search takes this exact path.
        return num_slow * tokens_per_slow + num_fast * max(int(cfg.fast_ratio * tokens_per_slow), low)

    if cfg.strict_budget:
        tokens_per_slow = max(_first_over_budget(cost, low, high + 1, cfg.total_token_budget) - 1, low)
    else:
        # keye-vl-utils stops at the first size that goes OVER the budget (never testing the maximum) and
        # uses it; the smart_resize floor usually, but not always, brings the clip back under.
        tokens_per_slow = _first_over_budget(cost, low, high, cfg.total_token_budget)

    area = cfg.factor * cfg.factor
    slow_size = smart_resize(
        height, width, factor=cfg.factor, min_pixels=low * area, max_pixels=tokens_per_slow * area
    )
    slow_tokens = slow_size[0] * slow_size[1] // area
    fast_max_pixels = max(int(slow_tokens * cfg.fast_ratio) * area, low * area)
    fast_size = smart_resize(
        height, width, factor=cfg.factor, min_pixels=low * area, max_pixels=fast_max_pixels
    )
    fast_tokens = fast_size[0] * fast_size[1] // area
    return TokenAllocation(
        slow_size=slow_size,
        fast_size=fast_size,
        total_tokens=num_slow * slow_tokens + num_fast * fast_tokens,
        slow_tokens=slow_tokens,
        fast_tokens=fast_tokens,
        num_slow=num_slow,
        num_fast=num_fast,
    )
