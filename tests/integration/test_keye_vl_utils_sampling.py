"""The `keye-vl-utils` preset samples frames and stamps them as keye-vl-utils 1.5.2 does.

The reference below follows that package's decord reader (`_read_video_decord`): the frame count and the
average frame rate as decord reports them (the stream's `nb_frames` and `avg_frame_rate`, read here with
ffprobe), the package's own `smart_nframes` for how many frames, `torch.linspace(0, total - 1, n).round()`
for which, and `FloatTensor([(1 / fps) * i ...])[indices]` for their timestamps, printed as the processor
prints them (`format(t, ".1f")`). Clips are rendered by ffmpeg at several durations and frame rates, one of
them with a variable frame rate; every frame of each clip is also decoded, to check that the single
selecting ffmpeg pass returns exactly the frames at those indices. Slow/Fast labels and sizes on the sampled
frames must equal the reference's as well.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
import torch

from keyeflow.datasets import pretokenize, video
from keyeflow.datasets.slowfast import allocate_tokens, resolve_config, select_frames
from keyeflow.datasets.slowfast_reference import import_keye_vl_utils
from keyeflow.model.token_stream import format_timestamp

ref = import_keye_vl_utils()
KEYE = resolve_config("keye-vl-utils")
WIDTH, HEIGHT = 160, 96

# name -> (ffmpeg frame rate, seconds, extra output args)
CLIPS = {
    "10s-30fps": ("30", 10, []),  # the issue's example: the last stamps are 8.9, 9.4, 10.0
    "3.2s-25fps": ("25", 3.2, []),
    "7s-23.976fps": ("24000/1001", 7, []),
    "2.5s-60fps": ("60", 2.5, []),
    "4s-1fps": ("1", 4, []),  # slower than 2 fps: every frame
    "vfr": ("30", 6, ["-vf", "setpts='if(lt(N,60),N/30,2+(N-60)/10)/TB'", "-fps_mode", "vfr"]),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keye_clips")
    out = {}
    for name, (rate, seconds, extra) in CLIPS.items():
        path = folder / f"{name}.mp4"
        source = f"testsrc2=size={WIDTH}x{HEIGHT}:rate={rate}:duration={seconds}"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, *extra]
            + ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12", str(path)],
            check=True,
        )
        out[name] = path
    return out


def decord_facts(path: Path) -> tuple[int, float]:
    """(len(VideoReader), get_avg_fps()) as decord gives them: the stream's nb_frames and avg_frame_rate."""
    stream = next(s for s in ffmpeg.probe(str(path))["streams"] if s["codec_type"] == "video")
    num, den = stream["avg_frame_rate"].split("/")
    return int(stream["nb_frames"]), int(num) / int(den)


def reference_sampling(path: Path) -> tuple[list[int], list[str]]:
    total, video_fps = decord_facts(path)
    n = ref.smart_nframes({}, total_frames=total, video_fps=video_fps)
    indices = torch.linspace(0, total - 1, n).round().long()
    timestamps = torch.FloatTensor([(1 / video_fps) * i for i in range(total)])[indices]
    return indices.tolist(), [format(float(t), ".1f") for t in timestamps]


def every_frame(path: Path) -> np.ndarray:
    raw, _ = (
        ffmpeg.input(str(path))
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
        .global_args("-v", "error", "-nostdin")
        .run(capture_stdout=True)
    )
    return np.frombuffer(raw, np.uint8).reshape(-1, HEIGHT, WIDTH, 3)


def probe(path: Path) -> video.VideoInfo:
    return video.probe(str(path), str(path), path.stat().st_size)


@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_and_timestamps_equal_keye_vl_utils(clips, name):
    path = clips[name]
    expected_indices, expected_stamps = reference_sampling(path)
    decoded = pretokenize.sample_frames(probe(path), str(path), KEYE)
    assert decoded.frame_indices.tolist() == expected_indices
    assert [format_timestamp(t) for t in decoded.timestamps] == expected_stamps
    # One selecting pass returns exactly those frames.
    np.testing.assert_array_equal(decoded.frames, every_frame(path)[expected_indices])


def test_the_issues_example_and_the_vfr_clip(clips):
    """Literal values, so the reference itself is pinned: 10 s at 30 fps gives 20 frames ending "8.9, 9.4,
    10.0"; on the VFR clip (60 frames in 2 s, then 120 at 10 fps; the container says 180 frames at an
    average 300/23 fps) the stamps are index / average rate, not presentation times: frame 14 is shown at
    0.47 s and stamped "1.1"."""
    indices, stamps = reference_sampling(clips["10s-30fps"])
    assert len(indices) == 20 and indices[-3:] == [268, 283, 299] and stamps[-3:] == ["8.9", "9.4", "10.0"]
    total, video_fps = decord_facts(clips["vfr"])
    assert total == 180 and video_fps == 300 / 23
    indices, stamps = reference_sampling(clips["vfr"])
    assert len(indices) == 27 and indices[:3] == [0, 7, 14] and stamps[:3] == ["0.0", "0.5", "1.1"]
    assert indices[-3:] == [165, 172, 179] and stamps[-3:] == ["12.6", "13.2", "13.7"]
    assert probe(clips["vfr"]).is_vfr


@pytest.mark.parametrize("name", list(CLIPS))
def test_slow_fast_labels_and_sizes_equal_keye_vl_utils(clips, name, monkeypatch):
    path = clips[name]
    info = probe(path)
    sample, frame_rows = pretokenize.tokenize_video(info, "0" * 64, KEYE)
    frames = every_frame(path)[reference_sampling(path)[0]]
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2)
    expected_types = ref.extract_slow_fast_frames(tensor, KEYE.similarity_threshold)
    assert sample["frame_types"] == expected_types.tolist()
    assert select_frames(frames, config=KEYE).tolist() == expected_types.tolist()

    # The reference's sizes from its own fetch_video, fed these frames through its reader hook.
    stamps = torch.tensor(sample["timestamps"], dtype=torch.float32)
    monkeypatch.setattr(ref, "_read_video_decord", lambda ele: (tensor, stamps, expected_types))
    _, sizes = ref.fetch_video({"video": str(path)})
    assert (sample["slow_height"], sample["slow_width"]) == (sizes["height"], sizes["width"])
    assert (sample["fast_height"], sample["fast_width"]) == (sizes["fast_height"], sizes["fast_width"])
    assert allocate_tokens(expected_types.numpy(), HEIGHT, WIDTH, config=KEYE)[:2] == (
        (sizes["height"], sizes["width"]),
        (sizes["fast_height"], sizes["fast_width"]),
    )
    assert frame_rows.num_rows == len(sample["frame_types"])


def test_a_clip_shorter_than_half_a_sampling_interval_keeps_its_first_frame(tmp_path):
    """keye-vl-utils samples int(0.4 s · 2) = 0 frames here (and then fails); we keep frame 0."""
    path = tmp_path / "short.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={WIDTH}x{HEIGHT}:rate=10:duration=0.4",
        ]
        + ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    assert ref.smart_nframes({}, total_frames=4, video_fps=10.0) == 0
    decoded = pretokenize.sample_frames(probe(path), str(path), KEYE)
    assert decoded.frame_indices.tolist() == [0] and decoded.timestamps.tolist() == [0.0]


def test_the_paper_preset_keeps_the_fps_filter_and_its_keys():
    paper = resolve_config("paper")
    assert paper.frame_sampling == "fps" and KEYE.frame_sampling == "keye-vl-utils"
    assert paper.config_hash() == "a89efb34dc90192d"  # unchanged by the new setting at its old behaviour
    with pytest.raises(ValueError, match="frame_sampling"):
        resolve_config("paper", frame_sampling="linspace")


@pytest.mark.parametrize(
    "num_frames, video_fps", [(30 * 3600, 30.0), (7203, 24000 / 1001), (90, 59.94), (5, 1.5), (1, 25.0)]
)
def test_frame_count_and_cap_equal_smart_nframes(num_frames, video_fps):
    """Without rendering: long videos hit keye-vl-utils' cap (65,536 tokens / 48 per frame = 1365 frames),
    the same as `max_frames` of the preset."""
    cap = pretokenize.max_frames(KEYE)
    assert cap == 1365
    expected = max(1, ref.smart_nframes({}, total_frames=num_frames, video_fps=video_fps))
    indices = video.keye_vl_utils_frame_indices(num_frames, video_fps, KEYE.fps, cap)
    assert len(indices) == expected
    assert indices == torch.linspace(0, num_frames - 1, expected).round().long().tolist()
    assert indices[0] == 0 and indices[-1] == num_frames - 1 or len(indices) == 1
