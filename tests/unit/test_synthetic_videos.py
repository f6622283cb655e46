"""The generated samples really have the properties their names and the module table claim.

Everything is checked with ffprobe/ffmpeg on the real files, because the rest of the test suite leans on
these clips (a "static" clip that moves, or a "rotated" one without the matrix, would make those tests
pass for the wrong reason).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from keyeflow.synthetic import videos as synthetic_videos


def ffprobe(path: Path, *extra: str) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", *extra, "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"ffprobe failed on {path}: {result.stderr}"
    return json.loads(result.stdout)


def probe_fails(path: Path) -> bool:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", str(path)], capture_output=True, check=False
    )
    return result.returncode != 0


def video_stream(info: dict) -> dict:
    (stream,) = [s for s in info["streams"] if s["codec_type"] == "video"]
    return stream


def gray_frames(path: Path, width: int, height: int) -> np.ndarray:
    """All frames decoded, scaled to width x height, as float grey images: shape (frames, height, width)."""
    result = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(path),
            "-vf",
            f"scale={width}:{height}",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "gray",
            "-",
        ],
        capture_output=True,
        check=True,
    )
    return np.frombuffer(result.stdout, np.uint8).reshape(-1, height, width).astype(np.float32)


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between each frame and the next."""
    return np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    dest = tmp_path_factory.mktemp("samples")
    start = time.monotonic()
    videos = synthetic_videos.generate_videos(dest)
    bad = synthetic_videos.generate_bad_videos(dest / "bad")
    return dest, videos, bad, time.monotonic() - start


@pytest.fixture(scope="module")
def videos(generated):
    return {p.name: p for p in generated[1]}


@pytest.fixture(scope="module")
def bad(generated):
    return generated[2]


def test_generation_is_quick_and_leaves_no_partial_files(generated):
    dest, _, _, elapsed = generated
    # The target is well under 20 s on 2 cores; the bound is loose so a busy CI machine does not flake.
    assert elapsed < 60
    leftovers = [p for p in dest.rglob(".*")]
    assert leftovers == []


def test_sample_set_is_small(videos):
    assert len(videos) == 8
    assert sum(p.stat().st_size for p in videos.values()) < 3 * 1024 * 1024


PORTRAIT = (
    "portrait_360x640_vp9_30fps.webm"
    if synthetic_videos._has_encoder("libvpx-vp9")
    else "portrait_360x640_h264_30fps.mp4"
)

# name: (codec, width, height, fps, seconds)
EXPECTED = {
    "cuts_640x360_h264_25fps.mp4": ("h264", 640, 360, 25, 8),
    "static_then_motion_320x240_mpeg4_30fps.avi": ("mpeg4", 320, 240, 30, 7),
    "pan_1280x720_h264_30fps.mp4": ("h264", 1280, 720, 30, 6),
    "zoom_640x360_h264_60fps.mp4": ("h264", 640, 360, 60, 3),
    PORTRAIT: ("vp9" if PORTRAIT.endswith(".webm") else "h264", 360, 640, 30, 4),
    "wide_840x360_mjpeg_24fps.mkv": ("mjpeg", 840, 360, 24, 4),
    "life_320x240_h264_12fps.mp4": ("h264", 320, 240, 12, 9),
    "solid_colors_640x480_mpeg4_25fps.mp4": ("mpeg4", 640, 480, 25, 5),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_properties(videos, name):
    codec, width, height, fps, seconds = EXPECTED[name]
    info = ffprobe(videos[name], "-count_frames")
    stream = video_stream(info)
    assert stream["codec_name"] == codec
    assert (stream["width"], stream["height"]) == (width, height)
    assert Fraction(stream["r_frame_rate"]) == fps
    assert Fraction(stream["avg_frame_rate"]) == fps
    assert int(stream["nb_read_frames"]) == fps * seconds
    assert float(info["format"]["duration"]) == pytest.approx(seconds, abs=0.05)
    assert 3 <= seconds <= 10


def test_every_clip_states_what_it_shows(videos):
    """The corpus's captions and questions read describe_video: it must agree with the file it describes."""
    for name, path in videos.items():
        scene = synthetic_videos.describe_video(name)
        assert scene is not None, name
        _, width, height, fps, seconds = EXPECTED[name]
        assert (scene.size, scene.fps, scene.seconds) == ((width, height), fps, seconds), name
        assert scene.shots[0].start == 0 and scene.shots[-1].end == seconds, name
        assert all(a.end == b.start for a, b in itertools.pairwise(scene.shots)), name
        has_audio = any(s["codec_type"] == "audio" for s in ffprobe(path)["streams"])
        assert (scene.audio is not None) == has_audio, name
    assert synthetic_videos.describe_video("holiday_clip.mp4") is None


def test_samples_cover_aspect_ratios(videos):
    aspects = set()
    for path in videos.values():
        stream = video_stream(ffprobe(path))
        aspects.add(round(stream["width"] / stream["height"], 2))
    assert {1.78, 1.33, 0.56, 2.33} <= aspects


def test_cuts_clip_cuts_where_the_sources_change(videos):
    diffs = frame_diffs(gray_frames(videos["cuts_640x360_h264_25fps.mp4"], 64, 36))
    # Diff i compares frames i and i+1, so the cuts at 2, 4 and 6 s (frames 50, 100, 150) are diffs
    # 49, 99, 149.
    assert sorted(np.argsort(diffs)[-3:].tolist()) == [49, 99, 149]
    assert diffs[[49, 99, 149]].min() > 5 * np.median(diffs)


def test_cuts_clip_has_an_audio_track(videos):
    info = ffprobe(videos["cuts_640x360_h264_25fps.mp4"])
    assert [s["codec_name"] for s in info["streams"] if s["codec_type"] == "audio"] == ["aac"]


def test_static_stretches_are_static(videos):
    diffs = frame_diffs(gray_frames(videos["static_then_motion_320x240_mpeg4_30fps.avi"], 80, 60))
    assert diffs[:89].max() < 1.0  # the held frame, 3 s
    assert diffs[89] > 20  # cut to the Game of Life
    assert diffs[90:149].min() > 0.5  # life keeps moving
    assert diffs[150:].max() < 1.0  # the held colour, 2 s
    solid = frame_diffs(gray_frames(videos["solid_colors_640x480_mpeg4_25fps.mp4"], 64, 48))
    cuts = [24, 49, 74, 99]
    assert np.delete(solid, cuts).max() < 1.0
    assert solid[cuts].min() > 10


def test_pan_moves_100_pixels_a_second(videos):
    frames = gray_frames(videos["pan_1280x720_h264_30fps.mp4"], 320, 180)  # 1/4 scale: 25 px a second
    first, one_second_later = frames[0], frames[30]
    shifted = np.abs(first[:, 25:] - one_second_later[:, :-25]).mean()
    unshifted = np.abs(first - one_second_later).mean()
    assert shifted < 3 and unshifted > 4 * shifted


def test_zoom_magnifies_the_centre(videos):
    frames = gray_frames(videos["zoom_640x360_h264_60fps.mp4"], 320, 180)
    assert frame_diffs(frames).min() > 0  # the picture changes every frame
    # The last frame (zoom 1 + 0.004 * 179) is the first frame's centre, magnified: sample it that way.
    zoom = 1 + 0.004 * 179
    rows = (90 + (np.arange(180) - 90) / zoom).astype(int)
    cols = (160 + (np.arange(320) - 160) / zoom).astype(int)
    predicted = frames[0][np.ix_(rows, cols)]
    assert np.abs(predicted - frames[-1]).mean() < 5
    assert np.abs(frames[0] - frames[-1]).mean() > 20


def test_zero_byte_and_text_are_not_videos(bad):
    assert bad["zero_byte"].stat().st_size == 0
    assert bad["text_as_mp4"].suffix == ".mp4"
    assert probe_fails(bad["zero_byte"])
    assert probe_fails(bad["text_as_mp4"])


def test_truncated_without_index_is_unreadable(bad):
    assert bad["truncated"].stat().st_size > 0
    assert probe_fails(bad["truncated"])


def test_truncated_tail_probes_but_runs_out_of_frames(bad):
    stream = video_stream(ffprobe(bad["truncated_tail"], "-count_frames"))
    assert int(stream["nb_frames"]) == 50
    assert 0 < int(stream["nb_read_frames"]) < 50


def test_audio_only_has_no_video(bad):
    info = ffprobe(bad["audio_only"])
    assert [s["codec_type"] for s in info["streams"]] == ["audio"]


def test_unreadable_is_a_dangling_symlink_in_the_listing(bad):
    path = bad["unreadable"]
    assert path.name == "dangling.mp4"
    assert path in list(path.parent.iterdir())
    assert path.is_symlink() and not path.exists()
    with pytest.raises(OSError):
        path.read_bytes()


def test_one_frame(bad):
    info = ffprobe(bad["one_frame"], "-count_frames")
    assert video_stream(info)["nb_read_frames"] == "1"
    assert 1 <= float(info["format"]["duration"]) <= 3


def test_extreme_aspects(bad):
    wide = video_stream(ffprobe(bad["extreme_wide"]))
    assert wide["width"] / wide["height"] > 200
    tall = video_stream(ffprobe(bad["extreme_tall_ok"]))
    assert (tall["width"], tall["height"]) == (56, 1400)
    assert tall["height"] / tall["width"] == 25


def test_rotated_carries_a_90_degree_display_matrix(bad):
    stream = video_stream(ffprobe(bad["rotated"]))
    assert (stream["width"], stream["height"]) == (640, 360)
    rotations = [sd.get("rotation") for sd in stream.get("side_data_list", [])]
    tag = stream.get("tags", {}).get("rotate")
    assert any(r in (90, -90) for r in rotations) or tag in ("90", "-90", "270")


def test_vfr_has_irregular_timestamps(bad):
    stream = video_stream(ffprobe(bad["vfr"]))
    assert Fraction(stream["r_frame_rate"]) != Fraction(stream["avg_frame_rate"])
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts_time",
            "-of",
            "csv=p=0",
            str(bad["vfr"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pts = sorted(float(line) for line in result.stdout.split())
    steps = np.diff(pts)
    # 10 frames 0.1 s apart, then 30 frames 1/30 s apart (pts are printed to the ms, hence the tolerance).
    assert len(pts) == 40
    assert np.allclose(steps[:10], 0.1, atol=0.002)
    assert np.allclose(steps[10:], 1 / 30, atol=0.002)


def test_ten_bit(bad):
    stream = video_stream(ffprobe(bad["ten_bit"]))
    assert stream["pix_fmt"] == "yuv420p10le"


@pytest.mark.parametrize(
    "key",
    [
        "one_frame",
        "extreme_wide",
        "extreme_tall_ok",
        "rotated",
        "vfr",
        "ten_bit",
        "name_spaces",
        "name_quotes",
        "name_unicode",
    ],
)
def test_odd_but_good_inputs_decode_and_last_1_to_3_s(bad, key):
    info = ffprobe(bad[key], "-count_frames")
    assert int(video_stream(info)["nb_read_frames"]) >= 1
    assert 1 <= float(info["format"]["duration"]) <= 3


def test_awkward_names(bad):
    assert bad["name_spaces"].name == "my clip with spaces.mp4"
    assert "'" in bad["name_quotes"].name and '"' in bad["name_quotes"].name
    assert bad["name_unicode"].name == "vidéo_日本語_клип.mp4"
    # Distinct bytes, so a content-hash dedup keeps all three.
    contents = {bad[k].read_bytes() for k in ("name_spaces", "name_quotes", "name_unicode")}
    assert len(contents) == 3


def test_rerun_keeps_existing_files(generated):
    dest, videos, bad, _ = generated
    files = [*videos, *(p for p in bad.values() if p.exists())]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert synthetic_videos.generate_videos(dest) == videos
    assert synthetic_videos.generate_bad_videos(dest / "bad") == bad
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_overwrite_reencodes_to_identical_bytes(generated):
    dest, videos, _, _ = generated
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in videos}
    time.sleep(0.01)
    synthetic_videos.generate_videos(dest, overwrite=True)
    for path, (mtime, data) in before.items():
        assert path.stat().st_mtime_ns != mtime
        assert path.read_bytes() == data, f"{path.name} is not byte-deterministic"


def test_main_writes_both_sets(generated, capsys):
    dest, videos, bad, _ = generated
    assert synthetic_videos.main([str(dest)]) == 0  # everything exists, so this only lists
    out = capsys.readouterr().out
    assert all(str(p) in out for p in [*videos, *bad.values()])


def test_failed_command_raises_with_ffmpeg_stderr(tmp_path):
    with pytest.raises(RuntimeError, match="No such filter"):
        synthetic_videos._run_ffmpeg(
            ["-filter_complex", "nosuchfilter[v]", "-map", "[v]", str(tmp_path / "x.mp4")], "x.mp4"
        )
    assert not os.path.exists(tmp_path / "x.mp4")
