"""Video files: find, read, hash, probe and decode them with ffmpeg.

A video's identity is the sha256 of its bytes, so the same clip under two names is ingested once and a
renamed file is not re-tokenised. Every failure here raises :class:`BadVideo` with a reason a person can
act on; callers quarantine the file with that reason and carry on with the rest of the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import fsspec
import numpy as np
import torch

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}
MAX_ASPECT_RATIO = 200  # the processor's smart_resize refuses anything longer than 200:1
_HASH_CHUNK = 8 << 20


class BadVideo(ValueError):
    """An input that cannot become training data; ``reason`` says why in one line."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    uri: str
    size_bytes: int
    container: str
    codec: str
    pix_fmt: str
    bit_depth: int
    width: int  # as displayed (rotation applied)
    height: int
    coded_width: int
    coded_height: int
    rotation: int
    fps: float
    duration_s: float
    num_frames: int
    is_vfr: bool


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def discover(paths: list[str], suffixes: set[str] = VIDEO_SUFFIXES) -> list[str]:
    """Expand files, directories (recursive) and fsspec URIs/globs into a sorted list of video URIs.

    A path that does not exist is returned as is so that it is quarantined with a reason, not lost.
    """
    found: list[str] = []
    for item in paths:
        item = str(item)
        if is_local(item):
            path = Path(local_path(item))
            if path.is_dir():
                found += [
                    str(p)
                    for p in sorted(path.rglob("*"))
                    if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink())
                ]
            else:
                found.append(str(path))
            continue
        fs, fs_path = fsspec.core.url_to_fs(item)
        # unstrip_protocol gives each filesystem's canonical URI (s3://bucket/key, memory:///path).
        if any(ch in fs_path for ch in "*?["):
            found += [fs.unstrip_protocol(p) for p in sorted(fs.glob(fs_path))]
        elif fs.isdir(fs_path):
            found += [
                fs.unstrip_protocol(p) for p in sorted(fs.find(fs_path)) if Path(p).suffix.lower() in suffixes
            ]
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def content_hash(uri: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of the file's bytes."""
    digest = hashlib.sha256()
    size = 0
    if is_local(uri):
        # A FIFO would block the read and a symlink to /dev/zero would never end: only regular files
        # (stat follows symlinks, so a link to a regular file is fine).
        try:
            mode = os.stat(local_path(uri)).st_mode
        except FileNotFoundError as exc:
            raise BadVideo(uri, f"unreadable: file not found ({exc.strerror or exc})") from exc
        except OSError as exc:
            raise BadVideo(uri, f"unreadable: {exc.strerror or exc}") from exc
        if stat.S_ISDIR(mode):
            raise BadVideo(uri, "unreadable: is a directory")
        if not stat.S_ISREG(mode):
            raise BadVideo(uri, "not a regular file (a pipe, socket or device)")
    try:
        with fsspec.open(uri, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError as exc:
        raise BadVideo(uri, f"unreadable: file not found ({exc.strerror or exc})") from exc
    except IsADirectoryError as exc:
        raise BadVideo(uri, "unreadable: is a directory") from exc
    except OSError as exc:
        raise BadVideo(uri, f"unreadable: {exc.strerror or exc}") from exc
    if size == 0:
        raise BadVideo(uri, "empty file (0 bytes)")
    return digest.hexdigest(), size


@contextlib.contextmanager
def as_local_file(uri: str, scratch: Path | None = None) -> Iterator[str]:
    """A local path ffmpeg can open: the file itself, or a temporary copy of a remote object."""
    if is_local(uri):
        yield local_path(uri)
        return
    scratch = scratch or Path(tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    suffix = Path(uri).suffix
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=scratch)
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(uri, "rb") as src:
            shutil.copyfileobj(src, out, _HASH_CHUNK)
        yield tmp
    finally:
        os.unlink(tmp)


def _ratio(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den or 1) if float(den or 1) else 0.0
    except ValueError:
        return 0.0


def _number(value: object) -> float:
    """A finite float from ffprobe's JSON (numbers come as strings there), or 0.0 for anything else: a
    hostile container can put any text in a duration or a rotate tag."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _is_count(value: object) -> bool:
    # str.isdigit alone accepts "²", which int() refuses.
    return bool(value) and str(value).isascii() and str(value).isdigit()


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if isinstance(side, dict) and "rotation" in side:
            return round(_number(side["rotation"])) % 360
    tag = (stream.get("tags") or {}).get("rotate")
    return round(_number(tag)) % 360 if tag else 0


def _bit_depth(stream: dict) -> int:
    raw = stream.get("bits_per_raw_sample")
    if _is_count(raw):
        return int(raw)
    pix = stream.get("pix_fmt", "")
    for depth in (16, 14, 12, 10, 9):
        if f"p{depth}" in pix:
            return depth
    return 8


def probe(uri: str, path: str, size_bytes: int) -> VideoInfo:
    """Read container and stream facts with ffprobe; refuse files that cannot be training video."""
    try:
        meta = ffmpeg.probe(path)
    except ffmpeg.Error as exc:
        lines = [ln for ln in exc.stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
        detail = lines[-1].split(": ", 1)[-1] if lines else "ffprobe failed"
        raise BadVideo(uri, f"not a readable video container ({detail})") from exc
    streams = meta.get("streams", [])
    video = [s for s in streams if s.get("codec_type") == "video" and not _is_cover_art(s)]
    if not video:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise BadVideo(uri, f"no video stream (streams present: {', '.join(kinds)})")
    stream = video[0]
    coded_w, coded_h = int(_number(stream.get("width"))), int(_number(stream.get("height")))
    if coded_w <= 0 or coded_h <= 0:
        raise BadVideo(uri, f"video stream has no frame size ({coded_w}x{coded_h})")
    rotation = _rotation(stream)
    width, height = (coded_h, coded_w) if rotation % 180 == 90 else (coded_w, coded_h)
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise BadVideo(
            uri,
            f"extreme aspect ratio {width}x{height} ({max(width, height) / min(width, height):.0f}:1, "
            f"limit {MAX_ASPECT_RATIO}:1)",
        )
    fmt = meta.get("format", {})
    duration = max(0.0, _number(stream.get("duration") or fmt.get("duration")))
    avg_fps, real_fps = _ratio(stream.get("avg_frame_rate")), _ratio(stream.get("r_frame_rate"))
    fps = avg_fps or real_fps
    num_frames = int(stream["nb_frames"]) if _is_count(stream.get("nb_frames")) else 0
    # r_frame_rate is the timebase-level rate; a gap to the average rate means frames are unevenly spaced.
    is_vfr = bool(avg_fps and real_fps and abs(avg_fps - real_fps) / real_fps > 0.01)
    return VideoInfo(
        uri=uri,
        size_bytes=size_bytes,
        container=fmt.get("format_name", ""),
        codec=stream.get("codec_name", ""),
        pix_fmt=stream.get("pix_fmt", ""),
        bit_depth=_bit_depth(stream),
        width=width,
        height=height,
        coded_width=coded_w,
        coded_height=coded_h,
        rotation=rotation,
        fps=fps,
        duration_s=duration,
        num_frames=num_frames,
        is_vfr=is_vfr,
    )


def _is_cover_art(stream: dict) -> bool:
    return bool((stream.get("disposition") or {}).get("attached_pic"))


def sampling_fps(info: VideoInfo, fps: float, max_frames: int) -> float:
    """The rate we actually sample at: the requested fps, lowered so a long video stays under max_frames."""
    rate = min(fps, info.fps) if info.fps > 0 else fps
    if info.duration_s > 0 and info.duration_s * rate > max_frames:
        rate = max_frames / info.duration_s
    return rate


@dataclass
class DecodedFrames:
    frames: np.ndarray  # N×H×W×3 uint8 RGB (a memmap for long videos)
    timestamps: np.ndarray  # seconds, float32
    fps: float
    frame_indices: np.ndarray | None = (
        None  # which decoded frames these are, where frames were picked by index
    )


def _frame_buffer(num_frames: int, height: int, width: int, spool_dir: Path | None) -> np.ndarray:
    """Room for `num_frames` RGB frames: in memory, or memory-mapped scratch when they would not comfortably
    fit, so a long 1080p video costs disk, not RAM."""
    if num_frames * height * width * 3 > (512 << 20):
        spool_dir = spool_dir or Path(tempfile.gettempdir())
        spool_dir.mkdir(parents=True, exist_ok=True)
        # The map holds its own handle on the file, so closing (and so deleting) the scratch file right away
        # keeps the frames and leaves nothing on disk once they are dropped, even if this process is killed.
        with tempfile.NamedTemporaryFile(dir=spool_dir, suffix=".frames") as spool:
            return np.memmap(spool, dtype=np.uint8, mode="w+", shape=(num_frames, height, width, 3))
    return np.empty((num_frames, height, width, 3), dtype=np.uint8)


def decode(
    uri: str, path: str, info: VideoInfo, fps: float, max_frames: int, spool_dir: Path | None = None
) -> DecodedFrames:
    """Decode frames at ``fps`` (RGB, rotation applied) with ffmpeg's fps filter; timestamps are k / fps
    (the `paper` preset's sampling: one frame per 1/fps seconds of presentation time, starting at 0)."""
    rate = sampling_fps(info, fps, max_frames)
    width, height = info.width, info.height
    capacity = max(
        1, min(max_frames, math.ceil(info.duration_s * rate) + 2 if info.duration_s else max_frames)
    )
    buffer = _frame_buffer(capacity, height, width, spool_dir)

    count, errors = _run_decoder(uri, path, rate, width, height, buffer)
    if count == 0:
        # A clip shorter than one sampling interval (a single frame) yields nothing from the fps
        # filter's first slot on some containers; its first frame is still a valid sample.
        count, errors = _run_decoder(uri, path, None, width, height, buffer[:1])
    if count == 0:
        raise BadVideo(uri, f"no frame could be decoded ({errors or 'ffmpeg produced no output'})")
    expected = info.duration_s * rate
    if errors and expected > 2 and count < 0.9 * expected:
        raise BadVideo(
            uri, f"corrupt or truncated: decoded {count} of about {expected:.0f} frames ({errors})"
        )
    frames = buffer[:count]
    timestamps = (np.arange(count, dtype=np.float64) / rate).astype(np.float32)
    return DecodedFrames(frames=frames, timestamps=timestamps, fps=rate)


def container_frame_count(info: VideoInfo) -> int:
    """The frame count keye-vl-utils 1.5.2 works from (decord's `len(VideoReader)`): the stream's
    `nb_frames`, or where the container does not record it (Matroska, WebM, some streams), the average
    frame rate times the duration, truncated (decord's estimate; assumed from its source, not checked
    against decord here)."""
    if info.num_frames > 0:
        return info.num_frames
    return max(1, int(info.fps * info.duration_s))


def keye_vl_utils_frame_indices(num_frames: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """Which decoded frames keye-vl-utils 1.5.2 (`smart_nframes`, `_read_video_decord`) samples from a video
    of `num_frames` frames at average rate `video_fps`: int(num_frames / video_fps · min(fps, video_fps))
    frames, at most `max_frames`, at the rounded points of torch.linspace(0, num_frames - 1, n) (float32
    points, round half to even: torch's own, so every index lands where the reference's does).

    keye-vl-utils returns no frame at all for a clip shorter than half a sampling interval (int(...) = 0);
    we keep its first frame instead, so a very short clip is still a sample."""
    if num_frames < 1 or not video_fps > 0:
        raise ValueError(f"need frames and a frame rate, got {num_frames} frames at {video_fps} fps")
    rate = min(fps, video_fps)
    count = max(1, min(int(num_frames / video_fps * rate), max_frames))
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def keye_vl_utils_timestamps(frame_indices: list[int], video_fps: float) -> np.ndarray:
    """keye-vl-utils 1.5.2's frame timestamps: (1 / video_fps) · index in float64, stored as float32 (its
    FloatTensor). On a variable-frame-rate video these are not the frames' presentation times."""
    return np.array([(1 / video_fps) * i for i in frame_indices], dtype=np.float32)


def decode_frame_indices(
    uri: str, path: str, info: VideoInfo, frame_indices: list[int], spool_dir: Path | None = None
) -> DecodedFrames:
    """Decode only the frames at `frame_indices` (0-based, in decoding order, ascending) in one ffmpeg pass:
    a `select` filter passes exactly those frames and drops the rest before conversion to RGB. Stamped
    and rated as keye-vl-utils 1.5.2 does (`keye_vl_utils_timestamps`; `fps` is the mean sampling rate,
    frames per second of the video's frame-count duration)."""
    if not frame_indices or list(frame_indices) != sorted(set(frame_indices)) or frame_indices[0] < 0:
        raise ValueError("frame_indices must be distinct, ascending and >= 0")
    buffer = _frame_buffer(len(frame_indices), info.height, info.width, spool_dir)
    count, errors = _run_decoder(uri, path, None, info.width, info.height, buffer, frame_indices)
    if count == 0:
        raise BadVideo(uri, f"no frame could be decoded ({errors or 'ffmpeg produced no output'})")
    if count < len(frame_indices) and (errors or count < 0.9 * len(frame_indices)):
        raise BadVideo(
            uri,
            f"corrupt or truncated: decoded {count} of the {len(frame_indices)} sampled frames "
            f"({errors or 'fewer frames than the container says'})",
        )
    # A container that overstates its frame count by a frame or two: keep the sampled frames that exist.
    indices = list(frame_indices[:count])
    video_fps = info.fps
    num_frames = container_frame_count(info)
    return DecodedFrames(
        frames=buffer[:count],
        timestamps=keye_vl_utils_timestamps(indices, video_fps),
        fps=count * video_fps / num_frames,
        frame_indices=np.asarray(indices, dtype=np.int64),
    )


def _select_expression(frame_indices: list[int]) -> str:
    # One term per wanted frame, 1 on that frame and 0 elsewhere. not(n-i) rather than eq(n,i): a comma
    # would need escaping through two layers of filtergraph quoting.
    return "+".join(f"not(n-{i})" for i in frame_indices)


def _run_decoder(
    uri: str,
    path: str,
    rate: float | None,
    width: int,
    height: int,
    out: np.ndarray,
    frame_indices: list[int] | None = None,
) -> tuple[int, str]:
    """Stream raw RGB frames from ffmpeg into ``out``; return (frames written, ffmpeg's error text).
    `rate` resamples with the fps filter; `frame_indices` instead passes only those decoded frames."""
    stream = ffmpeg.input(path)
    if rate is not None:
        stream = stream.filter("fps", fps=f"{rate:.6f}")
    output_args = {}
    if frame_indices is not None:
        stream = stream.filter("select", _select_expression(frame_indices))
        # Passthrough: each selected frame is written once, never duplicated or dropped to keep a frame rate.
        output_args["fps_mode"] = "passthrough"
    # The scale keeps the size fixed even if a stream changes resolution midway, which would otherwise
    # desynchronise our fixed-size reads.
    stream = stream.filter("scale", width, height)
    args = (
        stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=len(out), **output_args)
        .global_args("-v", "error", "-nostdin", "-threads", "1")
        .compile()
    )
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    frame_bytes = width * height * 3
    count = 0
    try:
        while count < len(out):
            view = memoryview(out[count].reshape(-1))
            got = proc.stdout.readinto(view)
            while got and got < frame_bytes:
                more = proc.stdout.readinto(view[got:])
                if not more:
                    break
                got += more
            if got != frame_bytes:
                break
            count += 1
        proc.stdout.close()
    finally:
        proc.wait()
        drain.join()
    text = b"".join(err_chunks).decode(errors="replace").strip()
    # "[h264 @ 0x55d0…] msg" → "h264: msg": addresses differ per run and mean nothing to a reader.
    text = re.sub(r"\[(\S+) @ 0x[0-9a-f]+\] ", r"\1: ", text)
    # Demuxer and decoder threads interleave their messages; sorted, the same file gives the same reason.
    lines = sorted({ln.strip() for ln in text.splitlines() if ln.strip()})
    summary = "; ".join(lines[:3])
    if proc.returncode != 0 and not summary:
        summary = f"ffmpeg exited with {proc.returncode}"
    return count, summary[:300]
