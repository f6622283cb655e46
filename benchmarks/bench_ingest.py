"""Ingest + Slow-Fast pre-tokenise CPU time against ffmpeg decode-only of the same videos at the same fps.

Decoding is the floor: every sampled frame must come out of the codec. Both sides run on one core
(ffmpeg -threads 1; torch/OpenCV single-threaded) and are measured as CPU seconds of this process plus its
children (ffprobe/ffmpeg), so the ratio does not depend on what else the machine is doing.
Target: ratio <= 1.2.

    python benchmarks/bench_ingest.py [--seconds 40]
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import torch

torch.set_num_threads(1)
cv2.setNumThreads(1)

CLIPS = {
    # name: (lavfi source, size, fps). Camera footage carries sensor grain, which sets its bitrate and so
    # its decode cost; the grain filter gives the synthetic sources that property. The clean synthetic
    # clip is kept as the hard case: it decodes almost for free, so fixed per-frame work shows most.
    "grain_720p_30fps": ("mandelbrot=size=1280x720:rate=30,noise=alls=14:allf=t", "1280x720", 30),
    "grain_cuts_1080p_25fps": ("testsrc2=size=1920x1080:rate=25,noise=alls=10:allf=t", "1920x1080", 25),
    "grain_life_960x540_30fps": (
        ("life=size=240x135:rate=30:seed=7:mold=10,scale=960:540:flags=neighbor,noise=alls=12:allf=t"),
        "960x540",
        30,
    ),
    "clean_testsrc2_640x360_30fps": ("testsrc2=size=640x360:rate=30", "640x360", 30),
}


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_clips(dest: Path, seconds: int) -> list[Path]:
    out = []
    for name, (source, _, fps) in CLIPS.items():
        path = dest / f"{name}.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                source,
                "-t",
                str(seconds),
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                "23",
                "-g",
                str(fps * 2),
                "-pix_fmt",
                "yuv420p",
                str(path),
            ],
            check=True,
        )
        out.append(path)
    return out


def decode_only(path: Path, fps: float) -> int:
    """The floor: ffmpeg decodes at the sampling rate to raw RGB that nobody looks at."""
    proc = subprocess.Popen(
        [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-threads",
            "1",
            "-i",
            str(path),
            "-vf",
            f"fps={fps}",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:",
        ],
        stdout=subprocess.PIPE,
    )
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    proc.wait()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--preset", default="paper")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["KEYEFLOW_HOME"] = str(tmp / "home")
        from keyeflow.datasets import ingest, pretokenize, tables
        from keyeflow.datasets.slowfast import resolve_config

        clips = make_clips(tmp, args.seconds)
        config = resolve_config(args.preset)
        # warm imports and lazy initialisation outside the measurement
        decode_only(clips[0], config.fps)

        rows = []
        for clip in clips:
            c0, w0 = cpu_seconds(), time.perf_counter()
            decode_only(clip, config.fps)
            floor_cpu, floor_wall = cpu_seconds() - c0, time.perf_counter() - w0

            c0, w0 = cpu_seconds(), time.perf_counter()
            ingest.ingest_shard([str(clip)])
            pending = pretokenize.pending_videos(tables.ref("videos"), config)
            report = pretokenize.pretokenize_shard(pending, config)
            ours_cpu, ours_wall = cpu_seconds() - c0, time.perf_counter() - w0
            assert report.num_done == 1, report
            rows.append((clip.stem, floor_cpu, ours_cpu, floor_wall, ours_wall, report.total_tokens))

    print(
        f"\ningest + pre-tokenise ({args.preset}) vs ffmpeg decode-only at {config.fps} fps, one core, "
        f"{args.seconds} s clips"
    )
    print(f"{'clip':28s} {'decode cpu s':>12s} {'ours cpu s':>11s} {'ratio':>6s} {'tokens':>7s}")
    for name, fc, oc, fw, ow, tok in rows:
        print(f"{name:28s} {fc:12.2f} {oc:11.2f} {oc / fc:6.2f} {tok:7d}")
    floor = sum(r[1] for r in rows)
    ours = sum(r[2] for r in rows)
    print(f"{'total':28s} {floor:12.2f} {ours:11.2f} {ours / floor:6.2f}   (target <= 1.2)")


if __name__ == "__main__":
    main()
