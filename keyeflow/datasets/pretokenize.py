"""Slow-Fast pre-tokenisation of ingested videos into ``video_samples`` and ``video_frames``.

Per video: decode once at the sampling rate, label frames Slow/Fast, search the per-frame token budget,
resize every frame to its Slow or Fast size and store it as uint8 14×14 patches in merge order, ready for
the vision encoder. A sample's key is (video, config hash): changing any knob that changes tokens makes
new rows, and an unchanged config finds its rows and skips the video.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from keyeflow.datasets import tables
from keyeflow.datasets.slowfast import SlowFastConfig, allocate_tokens, select_frames
from keyeflow.datasets.video import (
    BadVideo,
    DecodedFrames,
    VideoInfo,
    as_local_file,
    container_frame_count,
    decode,
    decode_frame_indices,
    keye_vl_utils_frame_indices,
)
from keyeflow.faults import kill_point

STAGE = "pretokenize"
_FLUSH_BYTES = 256 << 20  # commit frame rows at least this often to bound memory on long videos


def sample_id(video_id: str, config: SlowFastConfig) -> str:
    return f"{video_id[:16]}-{config.config_hash()}"


def max_frames(config: SlowFastConfig) -> int:
    # The most frames the budget can hold if every one were Fast at the minimum size (the same cap the
    # reference preprocessing uses); more frames could not all get tokens, so sample fewer instead.
    return max(1, config.total_token_budget // config.min_tokens_per_frame)


def sample_frames(
    info: VideoInfo, path: str, config: SlowFastConfig, spool_dir: Path | None = None
) -> DecodedFrames:
    """The frames (and their timestamps) a video is tokenised from, sampled as `config.frame_sampling` says:
    - "fps" (the `paper` preset): ffmpeg's fps filter at `config.fps` (lowered so a long video stays within
      `max_frames`), one frame per 1/fps s of presentation time from 0, stamped k / rate;
    - "keye-vl-utils": keye-vl-utils 1.5.2's frame indices (int(duration · fps) frames spread with linspace
      from the first frame to the last, capped at `max_frames`), decoded in one ffmpeg pass that keeps only
      those frames, stamped index / the container's average frame rate as that package does.
    """
    if config.frame_sampling == "keye-vl-utils":
        if not info.fps > 0:
            raise BadVideo(info.uri, "no frame rate in the container: keye-vl-utils sampling needs one")
        indices = keye_vl_utils_frame_indices(
            container_frame_count(info), info.fps, config.fps, max_frames(config)
        )
        return decode_frame_indices(info.uri, path, info, indices, spool_dir)
    return decode(info.uri, path, info, config.fps, max_frames(config), spool_dir)


def patchify(frame: np.ndarray, patch: int, merge: int) -> np.ndarray:
    """H×W×3 uint8 → (H/p · W/p) × (3·p·p) uint8, rows grouped so each merge×merge block is contiguous."""
    h, w, c = frame.shape
    gh, gw = h // patch, w // patch
    x = frame.reshape(gh // merge, merge, patch, gw // merge, merge, patch, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, c, p, p)
    return np.ascontiguousarray(x).reshape(gh * gw, c * patch * patch)


def unpatchify(patches: np.ndarray, grid_h: int, grid_w: int, patch: int, merge: int) -> np.ndarray:
    """Inverse of :func:`patchify`: back to H×W×3 uint8 (for pictures and checks)."""
    c = patches.shape[1] // (patch * patch)
    x = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, c, patch, patch)
    x = x.transpose(0, 2, 5, 1, 3, 6, 4)  # (gh/m, m, p, gw/m, m, p, c)
    return np.ascontiguousarray(x).reshape(grid_h * patch, grid_w * patch, c)


def resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H×W×3 uint8 frame to its Slow/Fast size with the filter Keye-VL-1.5's processor uses, in
    both directions: `torch.nn.functional.interpolate(uint8 frames, mode="bilinear", antialias=True)`
    (`KeyeVL1_5Processor.__call__` resizes the uint8 frames keye-vl-utils decoded this way before
    normalising). On uint8 torch runs its integer antialias kernel, so the pixels are the processor's
    exactly; when enlarging, antialias changes nothing and this is plain bilinear."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return np.ascontiguousarray(frame)
    chw = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(chw, size=(height, width), mode="bilinear", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


@dataclass
class PretokenizeReport:
    num_videos: int = 0
    num_done: int = 0
    num_skipped: int = 0
    num_quarantined: int = 0
    total_tokens: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)


def pending_videos(videos: tables.TableRef, config: SlowFastConfig, root: str | None = None) -> list[dict]:
    """Videos of the pinned ``videos`` version that have no sample for this config and no known defect."""
    ds = tables.open_table("videos", version=videos.version, root=root)
    rows = ds.to_table().to_pylist()
    wanted = {sample_id(r["video_id"], config): r for r in rows}
    done = tables.existing_keys("video_samples", wanted, root)
    bad = set()
    if tables.exists("quarantine", root):
        q = tables.open_table("quarantine", root=root).to_table(
            columns=["content_hash"],
            filter=(pc.field("stage") == STAGE) & (pc.field("config_hash") == config.config_hash()),
        )
        bad = set(q.column("content_hash").to_pylist())
    return [r for key, r in sorted(wanted.items()) if key not in done and r["video_id"] not in bad]


def tokenize_video(info: VideoInfo, video_id: str, config: SlowFastConfig, spool_dir: Path | None = None):
    """Decode, select, allocate and patchify one video → (sample row, frame rows as an Arrow table)."""
    with as_local_file(info.uri, spool_dir) as path:
        decoded = sample_frames(info, path, config, spool_dir)
    frames = decoded.frames
    frame_types = select_frames(frames, config=config)
    (slow_h, slow_w), (fast_h, fast_w), total = allocate_tokens(
        frame_types, info.height, info.width, config=config
    )[:3]
    sid = sample_id(video_id, config)
    patch, merge = config.patch_size, config.merge_size
    sizes = [(slow_h, slow_w) if kind == 0 else (fast_h, fast_w) for kind in frame_types]
    patches = [
        patchify(resize(frame, h, w), patch, merge).reshape(-1) for frame, (h, w) in zip(frames, sizes)
    ]
    grid_h = np.array([h // patch for h, _ in sizes], dtype=np.int32)
    grid_w = np.array([w // patch for _, w in sizes], dtype=np.int32)
    offsets = np.zeros(len(patches) + 1, dtype=np.int64)
    np.cumsum([p.size for p in patches], out=offsets[1:])
    # One contiguous buffer + offsets: Arrow takes it without a per-frame Python bytes object.
    blob = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(patches), [None, pa.py_buffer(offsets), pa.py_buffer(np.concatenate(patches))]
    )
    frame_rows = pa.Table.from_arrays(
        [
            pa.array([f"{sid}/{i:06d}" for i in range(len(patches))], pa.string()),
            pa.array([sid] * len(patches), pa.string()),
            pa.array(np.arange(len(patches), dtype=np.int32)),
            pa.array(frame_types.astype(np.int8)),
            pa.array(decoded.timestamps.astype(np.float32)),
            pa.array(grid_h),
            pa.array(grid_w),
            pa.array(grid_h * grid_w // (merge * merge)),
            blob,
        ],
        schema=tables.SCHEMAS["video_frames"],
    )
    num_fast = int(frame_types.sum())
    factor2 = config.factor**2
    sample = {
        "sample_id": sid,
        "video_id": video_id,
        "uri": info.uri,
        "config_hash": config.config_hash(),
        "preset": config.preset,
        "sampling_fps": decoded.fps,
        "num_frames": len(frame_types),
        "num_slow": len(frame_types) - num_fast,
        "num_fast": num_fast,
        "frame_types": frame_types.astype(np.int8).tolist(),
        "timestamps": decoded.timestamps.tolist(),
        "slow_height": slow_h,
        "slow_width": slow_w,
        "fast_height": fast_h,
        "fast_width": fast_w,
        "slow_tokens": slow_h * slow_w // factor2,
        "fast_tokens": fast_h * fast_w // factor2,
        "total_tokens": int(total),
        "token_budget": config.total_token_budget,
        "created_at": tables.now(),
    }
    return sample, frame_rows


def _info(row: dict) -> VideoInfo:
    return VideoInfo(**{k: row[k] for k in VideoInfo.__dataclass_fields__})


def pretokenize_shard(
    rows: list[dict],
    config: SlowFastConfig,
    root: str | None = None,
    spool_dir: Path | None = None,
    on_item: Callable[[], None] | None = None,
) -> PretokenizeReport:
    """Tokenise a shard of ``videos`` rows; frames are committed before the sample row that marks a
    video done, so a crash leaves at most orphan frames, which the rerun replaces."""
    report = PretokenizeReport(num_videos=len(rows))
    samples, frames, bad = [], [], []
    buffered = 0
    for row in rows:
        try:
            sample, frame_rows = tokenize_video(_info(row), row["video_id"], config, spool_dir)
        except BadVideo as exc:
            bad.append(
                tables.quarantine_row(row["uri"], exc.reason, STAGE, row["video_id"], config.config_hash())
            )
            report.quarantined[row["uri"]] = exc.reason
        else:
            samples.append(sample)
            frames.append(frame_rows)
            buffered += frame_rows.nbytes
            report.num_done += 1
            report.total_tokens += sample["total_tokens"]
            if buffered > _FLUSH_BYTES:
                tables.replace_groups("video_frames", pa.concat_tables(frames), "sample_id", root)
                frames, buffered = [], 0
        if on_item:
            on_item()
    report.num_quarantined = len(report.quarantined)
    if frames:
        tables.replace_groups("video_frames", pa.concat_tables(frames), "sample_id", root)
    kill_point("pretokenize.frames_committed")  # the shard's frames written, its samples (done marks) not
    tables.upsert("quarantine", bad, root)
    tables.upsert("video_samples", samples, root)
    kill_point("pretokenize.shard_committed")  # the shard's frames and samples written; later shards not
    return report


def compact_frames(root: str | None = None) -> int:
    """Merge the fragments the shards appended to ``video_frames`` (see :func:`tables.compact`); the table
    version after it. The pre-tokenisation flow runs it once all shards are committed.

    Why: the loader reads a micro-batch's frames with one Lance ``take``, whose cost grows with the fragments
    it touches (~0.04 ms each over a ~0.3 ms fixed cost), and every shard, every flush of a long video and
    every rerun appends a fragment; the videos of one micro-batch are spread over all of them. Measured on a
    1M-row table built in 20 appends (``benchmarks/bench_loader.py``): one fragment instead of 20 took the
    ``take`` from 0.78 to 0.56 ms and ``MediaReader.read`` from 1.08 to 0.90 ms (medians)."""
    return tables.compact("video_frames", root)
