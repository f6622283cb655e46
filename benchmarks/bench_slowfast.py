"""Slow-Fast selection and sizing: keyeflow against keye-vl-utils 1.5.2, side by side on one CPU core.

    python benchmarks/bench_slowfast.py

Renders a few clips with ffmpeg's test sources, decodes them at 2 fps, and on the same decoded frames times
  reference: extract_slow_fast_frames + fetch_video's budget search and smart_resize
  keyeflow:  select_frames + allocate_tokens (preset "keye-vl-utils")
checking that labels and sizes agree. Both sides must downscale every frame with torch's uint8 antialias
kernel and convert it to HSV with OpenCV, since their exact pixels decide the labels; the "floor" column
is what that alone costs here, and the last column the speedup a free comparison would give.
"""

from __future__ import annotations

import os

# One core for both sides, set before numpy, torch and OpenCV start their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
import tempfile
import time
from pathlib import Path

import cv2
import ffmpeg
import numpy as np
import torch

torch.set_num_threads(1)
cv2.setNumThreads(1)

try:
    from keyeflow.datasets import slowfast
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from keyeflow.datasets import slowfast
from keyeflow.datasets.slowfast_reference import import_keye_vl_utils

REPEATS = 5


def lavfi(spec: str, seconds: float):
    return ffmpeg.input(spec, f="lavfi", t=seconds)


CLIPS = {
    "testsrc2 640x360 60s": lambda: lavfi("testsrc2=size=640x360:rate=10", 60),
    "life 640x360 60s": lambda: lavfi("life=size=640x360:rate=4:mold=10:ratio=0.3:death_color=#203040", 60),
    "720p cuts 40s": lambda: ffmpeg.concat(
        *[
            lavfi(f"{source}=size=1280x720:rate=10", 10)
            for source in ("testsrc2", "smptebars", "mandelbrot", "rgbtestsrc")
        ]
    ),
    "1080p testsrc2 30s": lambda: lavfi("testsrc2=size=1920x1080:rate=4", 30),
    "testsrc2 320x180 150s": lambda: lavfi("testsrc2=size=320x180:rate=2", 150),
}


def decode_rgb(path: Path, fps: float = 2.0) -> np.ndarray:
    stream = next(s for s in ffmpeg.probe(str(path))["streams"] if s["codec_type"] == "video")
    out, _ = (
        ffmpeg.input(str(path))
        .filter("fps", fps)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24")
        .run(capture_stdout=True, capture_stderr=True)
    )
    return np.frombuffer(out, np.uint8).reshape(-1, stream["height"], stream["width"], 3).copy()


def best_of(fn, repeats=REPEATS):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    ref = import_keye_vl_utils()
    config = slowfast.resolve_config("keye-vl-utils")

    def reference(frames: np.ndarray):
        nchw = torch.from_numpy(frames).permute(0, 3, 1, 2)
        labels = ref.extract_slow_fast_frames(nchw, config.similarity_threshold)
        # fetch_video's own search and smart_resize, fed the labels through its reader hook.
        ref._read_video_decord = lambda ele: (nchw, None, labels)
        _, info = ref.fetch_video({"video": "clip"})
        return labels.numpy(), (info["height"], info["width"]), (info["fast_height"], info["fast_width"])

    def ours(frames: np.ndarray):
        labels = slowfast.select_frames(frames, config=config)
        allocation = slowfast.allocate_tokens(labels, frames.shape[1], frames.shape[2], config=config)
        return labels, allocation.slow_size, allocation.fast_size

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, source in CLIPS.items():
            path = Path(folder) / "clip.mp4"
            source().output(
                str(path), vcodec="libx264", preset="ultrafast", pix_fmt="yuv420p"
            ).overwrite_output().run(quiet=True)
            frames = decode_rgb(path)
            # First calls pay one-off set-up (kernel dispatch, allocator growth) that neither side has per
            # clip.
            reference(frames[:4])
            ours(frames[:4])
            ref_time, ref_result = best_of(lambda frames=frames: reference(frames))
            our_time, our_result = best_of(lambda frames=frames: ours(frames))
            floor_time, _ = best_of(lambda frames=frames: slowfast._downscale_hsv(frames, config))
            assert np.array_equal(ref_result[0], our_result[0]), f"{name}: labels differ"
            assert ref_result[1:] == our_result[1:], (
                f"{name}: sizes differ {ref_result[1:]} vs {our_result[1:]}"
            )
            rows.append(
                (name, frames.shape[0], int((our_result[0] == 0).sum()), ref_time, our_time, floor_time)
            )

    header = (
        f"{'clip':24} {'frames':>6} {'slow':>5} {'reference ms':>13} {'keyeflow ms':>12} {'speedup':>8} "
        f"{'floor ms':>9} {'speedup above floor':>20}"
    )
    print(
        f"torch {torch.__version__}, OpenCV {cv2.__version__}, 1 thread; best of {REPEATS}; "
        "labels and sizes equal"
    )
    print(header)
    print("-" * len(header))
    for name, num_frames, num_slow, ref_time, our_time, floor_time in rows:
        above = (ref_time - floor_time) / max(our_time - floor_time, 1e-9)
        print(
            f"{name:24} {num_frames:6d} {num_slow:5d} {ref_time * 1e3:13.1f} {our_time * 1e3:12.1f} "
            f"{ref_time / our_time:7.1f}x {floor_time * 1e3:9.1f} {above:19.1f}x"
        )
    total_ref, total_ours = sum(r[3] for r in rows), sum(r[4] for r in rows)
    total_frames = sum(r[1] for r in rows)
    print(
        f"{'all clips':24} {total_frames:6d} {'':5} {total_ref * 1e3:13.1f} {total_ours * 1e3:12.1f} "
        f"{total_ref / total_ours:7.1f}x"
    )


if __name__ == "__main__":
    main()
