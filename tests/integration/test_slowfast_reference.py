"""keyeflow's Slow-Fast against keye-vl-utils 1.5.2, the preprocessing the released model was used with.

Under the `keye-vl-utils` preset the labels must equal `extract_slow_fast_frames` frame for frame and the
sizes must equal what `fetch_video`'s own budget search and smart_resize produce; the `paper` preset must
give the reference's labels at the paper's 0.95 threshold. Inputs are synthetic sequences chosen to hit
the edges (black patches, cuts, slow drift, thin and huge frames, long clips where the budget binds) and
real clips rendered by ffmpeg's test sources and decoded through ffmpeg-python.
"""

from __future__ import annotations

import functools
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
import torch

from keyeflow.datasets import slowfast
from keyeflow.datasets.slowfast import PRESETS, allocate_tokens, select_frames, smart_resize
from keyeflow.datasets.slowfast_reference import import_keye_vl_utils

ref = import_keye_vl_utils()
THRESHOLDS = {name: config.similarity_threshold for name, config in PRESETS.items()}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The reference runs thousands of small torch ops one frame pair at a time; a second intra-op thread
    # only spin-waits on them, and on a busy two-core machine that made this module several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_labels(frames: np.ndarray, threshold: float) -> np.ndarray:
    return ref.extract_slow_fast_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), threshold).numpy()


def reference_sizes(frames: torch.Tensor, frame_types, budget_tokens: int | None, monkeypatch):
    """Slow and Fast sizes from the reference fetch_video, fed our frames through its video reader hook."""
    timestamps = torch.arange(frames.shape[0], dtype=torch.float32) / 2
    types_tensor = torch.as_tensor(np.asarray(frame_types), dtype=torch.int32)
    monkeypatch.setattr(ref, "_read_video_decord", lambda ele: (frames, timestamps, types_tensor))
    ele = {"video": "clip.mp4"}
    if budget_tokens is not None:
        ele["video_total_pixels"] = budget_tokens * 28 * 28
    _, info = ref.fetch_video(ele)
    return (info["height"], info["width"]), (info["fast_height"], info["fast_width"])


# ----------------------------------------------------------------------------------------------- inputs


def texture(rng, height, width, block=8, blur=1.2) -> np.ndarray:
    """Random coloured blocks, ~40% of them black, softened: detail at the scale of a few pixels.

    HSV cosines are dominated by saturation and brightness, so two smooth random images are "similar"
    almost everywhere; patches only differ when their bright and dark pixels differ, as here.
    """
    import cv2

    grid_h, grid_w = -(-height // block), -(-width // block)
    colours = rng.integers(0, 256, size=(grid_h, grid_w, 3), dtype=np.uint8)
    colours[rng.random((grid_h, grid_w)) < 0.4] = 0
    image = np.repeat(np.repeat(colours, block, axis=0), block, axis=1)[:height, :width]
    return cv2.GaussianBlur(image, (0, 0), blur) if blur else np.ascontiguousarray(image)


def jitter(rng, frame, amount=6) -> np.ndarray:
    """Sensor-like noise on lit pixels only: noise on black gives dark pixels random hue and high
    saturation, which makes every HSV patch look alike and would hide the cuts."""
    noise = rng.integers(-amount, amount + 1, size=frame.shape)
    noisy = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return np.where(frame > 2 * amount, noisy, frame)


def crossfade(rng, height, width, num_frames, block=8) -> np.ndarray:
    a, b = texture(rng, height, width, block), texture(rng, height, width, block)
    weights = np.linspace(0, 1, num_frames)[:, None, None, None]
    return ((1 - weights) * a + weights * b).round().astype(np.uint8)


def scene_cuts(rng, height=270, width=480, scenes=5, per_scene=8) -> np.ndarray:
    frames = []
    for _ in range(scenes):
        base = texture(rng, height, width)
        frames += [jitter(rng, base) for _ in range(per_scene)]
    return np.stack(frames)


def pan(rng, height=360, width=640, num_frames=60, step=3) -> np.ndarray:
    wide = texture(rng, height, width + step * num_frames, block=12)
    return np.stack([wide[:, i * step : i * step + width] for i in range(num_frames)])


def black_mix(rng, height=224, width=392) -> np.ndarray:
    content = texture(rng, height, width)
    black = np.zeros_like(content)
    half = content.copy()
    half[: height // 2] = 0
    sparse = (rng.random(content.shape) < 0.02).astype(np.uint8)  # near-black but not zero: never skipped
    return np.stack([black, black, half, half, content, black, sparse, sparse, black, half, black])


def long_drift(rng, num_frames=300, height=180, width=320) -> np.ndarray:
    frames, base = [], texture(rng, height, width, block=10)
    for i in range(num_frames):
        if i % 37 == 0:
            base = texture(rng, height, width, block=10)
        base = np.roll(base, 1, axis=1)
        frames.append(jitter(rng, base, 4))
    return np.stack(frames)


def shares_at_threshold(rng) -> np.ndarray:
    """20 lit patches out of 64, then 0-3 of them changed: shares of exactly 20/20 .. 17/20, where the
    float32 rounding of the reference's mean decides whether 18/20 is below 0.9 and 19/20 below 0.95."""
    lit = np.zeros((224, 224, 3), dtype=np.uint8)
    lit[:84, :112] = texture(rng, 84, 112, block=4, blur=0)
    lit[:56] = texture(rng, 56, 224, block=4, blur=0)
    frames = []
    for changed in (0, 1, 2, 3, 1, 2):
        frame = lit.copy()
        region = frame[:28, : 28 * changed]
        # Lit pixels go dark and dark ones grey: the changed patches have cosine 0 with the originals.
        frame[:28, : 28 * changed] = np.where(region.any(axis=-1, keepdims=True), 0, 200)
        frames += [lit, frame]
    return np.stack(frames)


SYNTHETIC = {
    "noise": lambda rng: rng.integers(0, 256, size=(10, 360, 640, 3), dtype=np.uint8),
    "crossfade": lambda rng: crossfade(rng, 360, 640, 30),
    "scene_cuts": scene_cuts,
    "pan": pan,
    "black_and_sparse": black_mix,
    "tall_1000x17": lambda rng: crossfade(rng, 1000, 17, 8),
    "hd_1080x1920": lambda rng: crossfade(rng, 1080, 1920, 8, block=24),
    "odd_361x643": lambda rng: np.concatenate(
        [crossfade(rng, 361, 643, 10), scene_cuts(rng, 361, 643, 2, 4)]
    ),
    "small_100x100_upscaled": lambda rng: crossfade(rng, 100, 100, 12),
    "long_300": long_drift,
    "shares_at_threshold": shares_at_threshold,
}


@functools.cache
def synthetic(name: str) -> np.ndarray:
    return SYNTHETIC[name](np.random.default_rng(sorted(SYNTHETIC).index(name)))  # shared: do not modify


@functools.cache
def synthetic_reference(name: str, threshold: float) -> np.ndarray:
    return reference_labels(synthetic(name), threshold)


def decode_rgb(path: Path, fps: float = 2.0) -> np.ndarray:
    """Frames at `fps` as uint8 (N, H, W, 3) RGB, decoded by ffmpeg."""
    stream = next(s for s in ffmpeg.probe(str(path))["streams"] if s["codec_type"] == "video")
    out, _ = (
        ffmpeg.input(str(path))
        .filter("fps", fps)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24")
        .run(capture_stdout=True, capture_stderr=True)
    )
    return np.frombuffer(out, np.uint8).reshape(-1, stream["height"], stream["width"], 3).copy()


def _lavfi(spec: str, seconds: float):
    return ffmpeg.input(spec, f="lavfi", t=seconds)


CLIP_SOURCES = {
    "testsrc2": lambda: _lavfi("testsrc2=size=640x360:rate=10", 30),
    "mandelbrot": lambda: _lavfi("mandelbrot=size=320x240:rate=4", 30),
    "smptebars": lambda: _lavfi("smptebars=size=640x360:rate=4", 10),
    "noisy_testsrc2": lambda: _lavfi("testsrc2=size=480x270:rate=4", 20).filter("noise", alls=60, allf="t"),
    "life": lambda: _lavfi("life=size=320x240:rate=4:mold=10:ratio=0.3:death_color=#203040", 30),
    "cuts": lambda: ffmpeg.concat(
        *[
            _lavfi(f"{source}=size=480x270:rate=10", 6)
            for source in ("testsrc2", "smptebars", "mandelbrot", "rgbtestsrc", "testsrc2")
        ]
    ),
    "fast_pan": lambda: _lavfi("testsrc2=size=2560x360:rate=10", 30).crop(
        x="n*20", y=0, width=640, height=360
    ),
    "hd_1080p": lambda: _lavfi("testsrc2=size=1920x1080:rate=4", 6),
    "long_150s": lambda: _lavfi("testsrc2=size=320x180:rate=2", 150),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("slowfast_clips")
    decoded = {}
    for name, source in CLIP_SOURCES.items():
        path = folder / f"{name}.mp4"
        source().output(
            str(path), vcodec="libx264", preset="ultrafast", pix_fmt="yuv420p"
        ).overwrite_output().run(quiet=True)
        decoded[name] = decode_rgb(path)
    return decoded


@pytest.fixture(scope="module")
def clip_reference(clips):
    """Reference labels of a decoded clip, computed once per threshold: they are the slow part here."""
    cache: dict[tuple[str, float], np.ndarray] = {}

    def labels(name: str, threshold: float) -> np.ndarray:
        if (name, threshold) not in cache:
            cache[name, threshold] = reference_labels(clips[name], threshold)
        return cache[name, threshold]

    return labels


# ----------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_labels_equal_reference_on_synthetic_sequences(name, preset):
    expected = synthetic_reference(name, THRESHOLDS[preset])
    assert select_frames(synthetic(name), preset=preset).tolist() == expected.tolist()


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", list(CLIP_SOURCES))
def test_labels_equal_reference_on_decoded_clips(clips, clip_reference, name, preset):
    expected = clip_reference(name, THRESHOLDS[preset])
    assert select_frames(clips[name], preset=preset).tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["crossfade", "scene_cuts", "black_and_sparse", "noisy_testsrc2"])
def test_exact_path_alone_equals_reference(clips, clip_reference, name, monkeypatch):
    # With the tolerance at 1 every frame is decided by the float32 fallback, so the fallback itself is
    # checked against the reference, not only the rare frames that need it.
    monkeypatch.setattr(slowfast, "_COSINE_TOLERANCE", 1.0)
    for preset, threshold in THRESHOLDS.items():
        if name in clips:
            frames, expected = clips[name], clip_reference(name, threshold)
        else:
            frames, expected = synthetic(name), synthetic_reference(name, threshold)
        assert select_frames(frames, preset=preset).tolist() == expected.tolist()


def test_inputs_exercise_slow_frames_and_the_exact_fallback(clips, clip_reference, monkeypatch):
    # Guards the inputs above: a suite where every frame came out Fast, or where no frame was ever close
    # enough to the threshold to need the float32 fallback, would prove little.
    assert (select_frames(clips["cuts"], preset="keye-vl-utils") == 0).sum() >= 4
    assert (select_frames(synthetic("long_300"), preset="keye-vl-utils") == 0).sum() >= 20
    assert (select_frames(clips["life"], preset="paper") == 0).sum() >= 3
    calls = []
    exact = slowfast._exact_patch_similar
    monkeypatch.setattr(slowfast, "_exact_patch_similar", lambda *args: calls.append(1) or exact(*args))
    labels = select_frames(clips["long_150s"], preset="keye-vl-utils")
    assert len(calls) >= 1
    assert labels.tolist() == clip_reference("long_150s", 0.9).tolist()


def test_reference_fails_on_one_row_of_patches_and_we_match_its_intent(monkeypatch):
    # 17x1000 frames are compared at 28x1512: one row of 54 patches. get_frame_sim's `norm.squeeze()`
    # then drops the row axis too and boolean indexing raises. Doubling that row gives the reference a
    # shape it can handle without changing any cosine or the share (2c / 2n rounds like c / n in float32).
    frames = crossfade(np.random.default_rng(7), 17, 1000, 8)
    with pytest.raises(IndexError):
        reference_labels(frames, 0.9)

    original = ref.get_frame_sim

    def two_rows(frame1, frame2, *args, **kwargs):
        if frame1.shape[1] == 28:
            frame1, frame2 = torch.cat([frame1, frame1], dim=1), torch.cat([frame2, frame2], dim=1)
        return original(frame1, frame2, *args, **kwargs)

    monkeypatch.setattr(ref, "get_frame_sim", two_rows)
    for preset, threshold in THRESHOLDS.items():
        assert select_frames(frames, preset=preset).tolist() == reference_labels(frames, threshold).tolist()


# ----------------------------------------------------------------------------------------------- sizes


def test_smart_resize_equals_reference():
    rng = np.random.default_rng(3)
    sizes = [(h, w) for h, w in rng.integers(1, 4000, size=(400, 2)) if max(h, w) / min(h, w) <= 200]
    sizes += [
        (17, 1000),
        (1000, 17),
        (42, 70),
        (70, 42),
        (28, 28),
        (1, 1),
        (360, 640),
        (1080, 1920),
        (10, 2000),
    ]
    for height, width in sizes:
        for min_tokens, max_tokens in [(4, 20480), (48, 768), (48, 256), (48, 48), (48, 411), (100, 101)]:
            limits = {"min_pixels": min_tokens * 784, "max_pixels": max_tokens * 784}
            assert smart_resize(int(height), int(width), **limits) == ref.smart_resize(
                int(height), int(width), 28, **limits
            ), (height, width, limits)
    with pytest.raises(ValueError):
        ref.smart_resize(8, 2000, 28, 784, 784)
    with pytest.raises(ValueError):
        smart_resize(8, 2000, min_pixels=784, max_pixels=784)


@pytest.mark.parametrize("budget", [None, 20_000, 5_000, 2_000])
@pytest.mark.parametrize("name", ["testsrc2", "cuts", "hd_1080p", "long_150s", "life"])
def test_sizes_equal_reference_fetch_video_on_clips(clips, clip_reference, name, budget, monkeypatch):
    frames = clips[name]
    labels = select_frames(frames, preset="keye-vl-utils")
    nchw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    slow, fast = reference_sizes(nchw, clip_reference(name, 0.9), budget, monkeypatch)
    overrides = {} if budget is None else {"total_token_budget": budget}
    ours = allocate_tokens(labels, frames.shape[1], frames.shape[2], preset="keye-vl-utils", **overrides)
    assert (ours.slow_size, ours.fast_size) == (slow, fast)


def test_sizes_equal_reference_fetch_video_across_budget_regimes(monkeypatch):
    # Only the frame counts and the frame size reach the search, so an empty (0, 3, H, W) tensor stands in
    # for the pixels and thousands of combinations run in a second.
    rng = np.random.default_rng(5)
    checked = budget_bound = overshoot = 0
    for height, width in [
        (360, 640),
        (720, 1280),
        (1080, 1920),
        (1920, 1080),
        (600, 1000),
        (17, 1000),
        (560, 560),
        (333, 777),
    ]:
        empty = torch.empty((0, 3, height, width), dtype=torch.uint8)
        for num_frames in [1, 2, 10, 64, 120, 300, 1000]:
            for slow_share in [0.0, 0.05, 0.3, 1.0]:
                labels = (rng.random(num_frames) >= slow_share).astype(np.int8)
                labels[0] = 0
                for budget in [None, 200, 2_000, 9_999, 20_000, 65_535, 200_000]:
                    slow, fast = reference_sizes(empty, labels, budget, monkeypatch)
                    overrides = {} if budget is None else {"total_token_budget": budget}
                    ours = allocate_tokens(labels, height, width, preset="keye-vl-utils", **overrides)
                    assert (ours.slow_size, ours.fast_size) == (slow, fast), (
                        height,
                        width,
                        num_frames,
                        budget,
                    )
                    checked += 1
                    limit = budget or 65_536
                    budget_bound += (
                        ours.slow_tokens
                        < allocate_tokens(
                            labels, height, width, preset="keye-vl-utils", total_token_budget=10**9
                        ).slow_tokens
                    )
                    overshoot += ours.total_tokens > limit
    assert checked == 8 * 7 * 4 * 7
    assert budget_bound > 300 and overshoot > 0  # both regimes were really reached


def test_reference_search_overshoots_where_strict_fits(monkeypatch):
    # The reference ends its search on the first per-frame size over the budget: a 560x560 frame (400
    # tokens as it is) under a 399-token budget keeps all 400. The paper preset's strict search does not.
    empty = torch.empty((0, 3, 560, 560), dtype=torch.uint8)
    slow, _ = reference_sizes(empty, [0], 399, monkeypatch)
    assert slow == (560, 560) and slow[0] * slow[1] // 784 == 400
    assert allocate_tokens([0], 560, 560, preset="keye-vl-utils", total_token_budget=399).slow_size == slow
    assert allocate_tokens([0], 560, 560, preset="paper", total_token_budget=399).total_tokens <= 399
