"""Slow-Fast selection and token allocation on hand-made frames and hand-computed sizes.

The frames are 224x224 (8x8 patches of 28 px, 64 tokens): inside the comparison size limits, so the
downscale keeps every pixel and each expected label can be worked out on paper.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from keyeflow.datasets import slowfast
from keyeflow.datasets.slowfast import (
    PRESETS,
    SlowFastConfig,
    TokenAllocation,
    allocate_tokens,
    resolve_config,
    select_frames,
    smart_resize,
)

SIDE = 224


def stripes(shift: int = 0, *, period: int = 28, side: int = SIDE) -> np.ndarray:
    """White/black vertical stripes, 14 px each, moved right by `shift` px.

    In HSV, white is (0, 0, 255) and black (0, 0, 0), so a patch vector is 255 on its white columns. Two
    patches whose white halves overlap by o columns have cosine o / 14: shifted by s <= 14 px, (14 - s) / 14,
    which is above 0.7 for s <= 4 and below it from s = 5.
    """
    columns = ((np.arange(side) - shift) // (period // 2)) % 2 == 0
    frame = np.zeros((side, side, 3), dtype=np.uint8)
    frame[:, columns] = 255
    return frame


def clip(*frames: np.ndarray) -> np.ndarray:
    return np.stack(frames)


BLACK = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
WHITE = np.full((SIDE, SIDE, 3), 255, dtype=np.uint8)


@pytest.fixture(params=["paper", "keye-vl-utils"])
def preset(request) -> str:
    return request.param


@pytest.fixture(params=[slowfast._COSINE_TOLERANCE, 1.0], ids=["fast-path", "exact-path"])
def cosine_path(request, monkeypatch):
    """Run selection tests twice: as shipped, and with every frame sent through the exact float32 path."""
    monkeypatch.setattr(slowfast, "_COSINE_TOLERANCE", request.param)


# ----------------------------------------------------------------------------------------------- selection


def test_identical_frames_are_one_slow_then_fast(preset, cosine_path):
    labels = select_frames(clip(*[stripes()] * 5), preset=preset)
    assert labels.dtype == np.int8
    assert labels.tolist() == [0, 1, 1, 1, 1]


def test_scene_cut_starts_a_new_slow_frame(preset, cosine_path):
    # stripes(14) is the negative of stripes(0): every patch has cosine 0 with the other.
    a, b = stripes(0), stripes(14)
    assert select_frames(clip(a, a, a, b, b, a), preset=preset).tolist() == [0, 1, 1, 0, 1, 0]


def test_comparison_is_with_latest_slow_frame_not_previous_frame(preset, cosine_path):
    # 2 px per frame: each frame is 2 px from its predecessor (cosine 12/14, similar), but 6 px from the
    # Slow frame three frames back (cosine 8/14, dissimilar), so a Slow frame comes every third frame.
    frames = clip(*[stripes(2 * i) for i in range(8)])
    assert select_frames(frames, preset=preset).tolist() == [0, 1, 1, 0, 1, 1, 0, 1]


def test_a_small_change_is_fast_and_a_patch_share_below_threshold_is_slow(cosine_path):
    # One patch row of 8 inverted out of 8 rows: 56/64 = 0.875 of the patches are similar, which is below
    # both presets' thresholds; with a 0.85 threshold the same frame is Fast.
    changed = stripes(0).copy()
    changed[:28] = stripes(14)[:28]
    frames = clip(stripes(0), changed)
    assert select_frames(frames, preset="paper").tolist() == [0, 0]
    assert select_frames(frames, preset="keye-vl-utils").tolist() == [0, 0]
    assert select_frames(frames, preset="paper", similarity_threshold=0.85).tolist() == [0, 1]


def test_all_black_frames_skip_every_patch_and_count_as_fast(preset, cosine_path):
    # Every patch is near zero in both frames, so none is compared; the reference's mean over nothing is
    # NaN, NaN < threshold is False, and the frame is Fast.
    assert select_frames(clip(BLACK, BLACK, BLACK), preset=preset).tolist() == [0, 1, 1]


def test_light_after_black_and_black_after_light_are_slow(preset, cosine_path):
    # A zero vector against a non-zero one has cosine 0 (it is not skipped: only one side is zero).
    assert select_frames(clip(BLACK, BLACK, WHITE, WHITE, BLACK), preset=preset).tolist() == [0, 1, 0, 1, 0]


def test_black_patches_are_left_out_of_the_share(cosine_path):
    # Seven of eight patch rows are black in both frames and skipped; the remaining row is identical, so the
    # share is 8/8 = 1 and the frame is Fast. Counting the black patches as dissimilar would give 8/64.
    frame = BLACK.copy()
    frame[-28:] = stripes(0)[-28:]
    assert select_frames(clip(frame, frame.copy()), preset="paper").tolist() == [0, 1]
    # The same row inverted: 0/8 similar, Slow, even though 56 of 64 patches are (skipped) black.
    other = BLACK.copy()
    other[-28:] = stripes(14)[-28:]
    assert select_frames(clip(frame, other), preset="paper", similarity_threshold=0.5).tolist() == [0, 0]


def test_share_exactly_at_the_threshold_is_slow_like_the_reference(cosine_path):
    # 20 patches are lit (two full rows and four of the third), the other 44 are black in both frames and
    # skipped. The reference takes the share as a float32 mean, and float32(18/20) = 0.89999998 < 0.9,
    # float32(19/20) = 0.94999999 < 0.95: a share exactly at the threshold is Slow, not Fast.
    lit = BLACK.copy()
    lit[:56] = stripes(0)[:56]
    lit[56:84, :112] = stripes(0)[56:84, :112]

    def invert(num_patches: int) -> np.ndarray:
        frame = lit.copy()
        frame[:28, : 28 * num_patches] = stripes(14)[:28, : 28 * num_patches]
        return frame

    assert select_frames(clip(lit, invert(2)), preset="keye-vl-utils").tolist() == [0, 0]  # 18/20
    assert select_frames(clip(lit, invert(1)), preset="keye-vl-utils").tolist() == [0, 1]  # 19/20
    assert select_frames(clip(lit, invert(1)), preset="paper").tolist() == [0, 0]  # 19/20


def test_long_run_of_fast_frames_crosses_blocks(cosine_path):
    # Longer than the comparison block, with a cut at a block boundary and one just after it.
    cut_at = {slowfast._BLOCK, slowfast._BLOCK + 1, 2 * slowfast._BLOCK + 7}
    frames, expected, current = [], [], 0
    for i in range(3 * slowfast._BLOCK):
        if i in cut_at:
            current = 14 - current
        frames.append(stripes(current))
        expected.append(0 if i == 0 or i in cut_at else 1)
    assert select_frames(np.stack(frames), preset="paper").tolist() == expected


def test_any_frame_size_and_edge_cases():
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, size=(3, 17, 1000, 3), dtype=np.uint8)  # one row of patches after resizing
    assert select_frames(odd, preset="paper")[0] == 0
    assert select_frames(np.zeros((0, 10, 10, 3), np.uint8)).tolist() == []
    assert select_frames(BLACK[None]).tolist() == [0]
    # Read-only and non-contiguous input (e.g. frames straight from a decode buffer, or BGR flipped).
    frames = clip(stripes(0), stripes(14))[..., ::-1]
    frames.flags.writeable = False
    assert select_frames(frames).tolist() == [0, 0]


def test_select_frames_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        select_frames(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        select_frames(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        select_frames(np.zeros((2, 2, 500, 3), np.uint8))


def test_config_object_can_be_passed_instead_of_preset():
    config = resolve_config("paper", similarity_threshold=0.85)
    changed = stripes(0).copy()
    changed[:28] = stripes(14)[:28]
    assert select_frames(clip(stripes(0), changed), config=config).tolist() == [0, 1]
    with pytest.raises(ValueError, match="either config"):
        select_frames(clip(stripes(0)), config=config, fast_ratio=0.5)


# ----------------------------------------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(
    ("height", "width", "min_tokens", "max_tokens", "expected"),
    [
        (224, 224, 48, 256, (224, 224)),  # already multiples of 28, 64 tokens: unchanged
        (42, 70, 4, 20480, (56, 56)),  # 1.5 and 2.5 round half to even: 2 and 2 patches
        (720, 1280, 48, 768, (560, 1008)),  # 26x46 patches is too many: scale by 1/1.237 and floor
        (100, 100, 48, 768, (196, 196)),  # 16 tokens is too few: scale by 1.94 and ceil to 7x7
        (17, 1000, 48, 256, (28, 1512)),  # below min: ceil(0.9)=1 row, ceil(53.1)=54 columns
        (1, 1, 1, 1, (28, 28)),  # never below one patch
    ],
)
def test_smart_resize_hand_computed(height, width, min_tokens, max_tokens, expected):
    assert smart_resize(height, width, min_pixels=min_tokens * 784, max_pixels=max_tokens * 784) == expected


def test_smart_resize_rejects_extreme_aspect_and_empty_frames():
    with pytest.raises(ValueError, match="aspect ratio 250.0 of a 8x2000 frame exceeds 200"):
        smart_resize(8, 2000, min_pixels=784, max_pixels=784 * 768)
    assert smart_resize(10, 2000, min_pixels=784, max_pixels=784 * 768)  # exactly 200:1 is allowed
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10, min_pixels=784, max_pixels=784)


# ----------------------------------------------------------------------------------------------- allocation


def test_allocation_when_the_budget_does_not_bind(preset):
    # 3 frames cannot reach either budget, so Slow frames get the 768-token maximum: 720x1280 scaled by
    # sqrt(921600 / 602112) = 1.2372 is 582.0 x 1034.6, floored to 20 x 36 patches = 560 x 1008, 720 tokens.
    # Fast: int(0.3 * 720) = 216 tokens max, scale 2.3328: 308.6 x 548.7 -> 11 x 19 patches, 209 tokens.
    result = allocate_tokens([0, 1, 1], 720, 1280, preset=preset)
    assert result == TokenAllocation((560, 1008), (308, 532), 720 + 2 * 209, 720, 209, 1, 2)
    slow, fast, total = result[:3]
    assert (slow, fast, total) == ((560, 1008), (308, 532), 1138)


def test_strict_and_keye_vl_utils_searches_differ_by_one_token():
    # 600x1000 frames, 1 Slow + 2 Fast, budget 680. cost(t) = t + 2 * max(int(0.3 t), 48):
    # cost(426) = 426 + 2 * 127 = 680 fits; cost(427) = 427 + 2 * 128 = 683 does not.
    # keye-vl-utils stops at the first t over the budget (427), strict keeps the last that fits (426).
    # At t tokens this aspect gives floor(sqrt(0.6 t)) x floor(sqrt(t / 0.6)) patches:
    #   t=427: 16 x 26 = 416 Slow tokens; Fast max int(0.3*416)=124: 8 x 14 = 112 -> 416 + 224 = 640
    #   t=426: 15 x 26 = 390 Slow tokens; Fast max int(0.3*390)=117: 8 x 13 = 104 -> 390 + 208 = 598
    types = [0, 1, 1]
    keye = allocate_tokens(types, 600, 1000, preset="keye-vl-utils", total_token_budget=680)
    strict = allocate_tokens(types, 600, 1000, preset="paper", total_token_budget=680)
    assert keye == TokenAllocation((448, 728), (224, 392), 640, 416, 112, 1, 2)
    assert strict == TokenAllocation((420, 728), (224, 364), 598, 390, 104, 1, 2)


def test_keye_vl_utils_search_can_overshoot_the_budget_and_strict_does_not():
    # A 560x560 frame is 400 tokens as it is. With a 399-token budget keye-vl-utils picks t=400, where the
    # frame fits unchanged: 400 tokens, one over. Strict picks t=399: 20 * sqrt(399/400) = 19.97 -> 19x19.
    keye = allocate_tokens([0], 560, 560, preset="keye-vl-utils", total_token_budget=399)
    strict = allocate_tokens([0], 560, 560, preset="paper", total_token_budget=399)
    assert (keye.slow_size, keye.total_tokens) == ((560, 560), 400)
    assert (strict.slow_size, strict.total_tokens) == ((532, 532), 361)


def test_budget_below_the_minimum_gives_minimum_sized_frames(preset):
    # 300 frames at 48 tokens already cost 14,400 > 1,000: both searches bottom out at t = 48.
    # 360x640 at 48 tokens: scale 2.4744 -> 5.2 x 9.2 patches, floored to 5 x 9 = 45 tokens (smart_resize
    # floors below its own minimum here, as the reference does); Fast gets max(int(13.5), 48) -> the same.
    result = allocate_tokens([0] * 3 + [1] * 297, 360, 640, preset=preset, total_token_budget=1_000)
    assert result == TokenAllocation((140, 252), (140, 252), 300 * 45, 45, 45, 3, 297)


def test_strict_budget_is_respected_whenever_it_can_be():
    # The one exception: a frame that smart_resize must enlarge to reach its minimum (17x1000 becomes 1x54
    # patches, 54 tokens) costs more than the minimum the search assumes, whatever the budget.
    types = [0] * 7 + [1] * 113
    for height, width in [(360, 640), (1080, 1920), (1000, 600), (17, 1000)]:
        smallest = allocate_tokens(types, height, width, preset="paper", total_token_budget=1).total_tokens
        for budget in range(len(types) * 48, 60_000, 997):
            result = allocate_tokens(types, height, width, preset="paper", total_token_budget=budget)
            assert result.total_tokens <= max(budget, smallest), (budget, height, width, result)
    assert smallest == 120 * 54


def test_sizes_are_multiples_of_28_and_fast_is_about_30_percent(preset):
    for height, width in [(360, 640), (720, 1280), (1080, 1920), (480, 854), (1920, 1080), (333, 777)]:
        for types in ([0, 1, 1, 1], [0] * 10 + [1] * 190):
            result = allocate_tokens(types, height, width, preset=preset)
            assert all(side % 28 == 0 for side in result.slow_size + result.fast_size)
            assert result.slow_tokens == result.slow_size[0] * result.slow_size[1] // 784
            assert result.fast_tokens == result.fast_size[0] * result.fast_size[1] // 784
            assert result.fast_tokens <= max(int(0.3 * result.slow_tokens), 48)
            assert result.fast_tokens >= 0.2 * result.slow_tokens
            assert (
                result.total_tokens
                == result.num_slow * result.slow_tokens + result.num_fast * result.fast_tokens
            )


def test_allocation_counts_frames_and_rejects_bad_labels():
    result = allocate_tokens(np.array([0, 1, 1, 0, 1], dtype=np.int8), 360, 640)
    assert (result.num_slow, result.num_fast) == (2, 3)
    assert allocate_tokens([], 360, 640).total_tokens == 0
    with pytest.raises(ValueError, match="frame_types"):
        allocate_tokens([0, 2], 360, 640)


# ----------------------------------------------------------------------------------------------- config


def test_presets():
    paper, keye = PRESETS["paper"], PRESETS["keye-vl-utils"]
    assert (paper.similarity_threshold, paper.total_token_budget, paper.strict_budget) == (0.95, 75_000, True)
    assert (keye.similarity_threshold, keye.total_token_budget, keye.strict_budget) == (0.90, 65_536, False)
    for config in (paper, keye):
        assert (config.fps, config.patch_cosine_threshold, config.selection_max_tokens) == (2.0, 0.7, 256)
        assert (config.fast_ratio, config.min_tokens_per_frame, config.max_tokens_per_frame) == (0.3, 48, 768)
        assert config.factor == 28


def test_resolve_config_overrides_and_keeps_preset_name():
    config = resolve_config("keye-vl-utils", total_token_budget=1000, fps=1)
    assert (config.preset, config.total_token_budget, config.fps) == ("keye-vl-utils", 1000, 1.0)
    assert isinstance(config.fps, float)
    assert resolve_config() == PRESETS["paper"]


def test_config_hash_is_stable_and_ignores_the_preset_name():
    paper = PRESETS["paper"]
    # Literal: a change here re-tokenises every stored video, so it must be deliberate.
    assert paper.config_hash() == "a89efb34dc90192d"
    assert len(paper.config_hash()) == 16
    assert dataclasses.replace(paper, preset="renamed").config_hash() == paper.config_hash()
    assert resolve_config("paper", fps=2).config_hash() == paper.config_hash()  # 2 and 2.0 are one value
    assert resolve_config("paper", fps=1.0).config_hash() != paper.config_hash()
    assert PRESETS["keye-vl-utils"].config_hash() != paper.config_hash()
    assert paper.to_dict()["preset"] == "paper" and paper.to_dict()["total_token_budget"] == 75_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fps": -1.0}, r"SlowFastConfig.fps=-1.0: must be > 0"),
        ({"fps": 0}, r"fps=0.0"),
        ({"similarity_threshold": 1.2}, r"similarity_threshold=1.2: must be in \[0, 1\]"),
        ({"patch_cosine_threshold": -0.1}, r"patch_cosine_threshold=-0.1"),
        ({"fast_ratio": 0.0}, r"fast_ratio=0.0"),
        ({"min_tokens_per_frame": 0}, r"min_tokens_per_frame=0"),
        ({"max_tokens_per_frame": 10}, r"max_tokens_per_frame=10: must be >= min_tokens_per_frame \(48\)"),
        ({"selection_max_tokens": 10}, r"selection_max_tokens=10"),
        ({"total_token_budget": 0}, r"total_token_budget=0"),
        ({"total_token_budget": 1.5}, r"total_token_budget=1.5: must be an integer"),
        ({"strict_budget": "yes"}, r"strict_budget='yes'"),
        ({"fps": float("nan")}, r"fps=nan: must be a finite number"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("paper", **overrides)


def test_unknown_preset_and_override_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown slow-fast preset 'qwen'.*\['keye-vl-utils', 'paper'\]"):
        resolve_config("qwen")
    with pytest.raises(ValueError, match=r"\['threshold'\].*similarity_threshold"):
        resolve_config("paper", threshold=0.5)
    with pytest.raises(ValueError, match="unknown slow-fast preset"):
        select_frames(clip(BLACK), preset="qwen")
    with pytest.raises(ValueError, match="unknown SlowFastConfig override"):
        allocate_tokens([0], 360, 640, budget=5)
    with pytest.raises(TypeError):
        SlowFastConfig(similarity_threshold=0.9)  # the four preset-defining fields have no defaults
