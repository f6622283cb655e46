"""Frames are resized to their Slow/Fast size with Keye-VL-1.5's processor filter, in both directions.

The released processor (`KeyeVL1_5Processor.__call__`) resizes the uint8 frame tensor keye-vl-utils decoded,
all Slow frames in one call and all Fast frames in another: `nn.functional.interpolate(frames, [h, w],
mode="bilinear", antialias=True)`, then `.float()`. The reference below does that, on the stacked N×C×H×W
video as the processor holds it, not through `pretokenize.resize`.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from keyeflow.datasets.pretokenize import resize


def processor_resize(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """N×H×W×3 uint8 frames as Keye's processor resizes them (values as its float tensor, back to uint8)."""
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)  # what keye-vl-utils returns: N×C×H×W uint8
    resized = torch.nn.functional.interpolate(
        frames, [height, width], mode="bilinear", antialias=True
    ).float()
    assert torch.equal(resized, resized.round())  # uint8 in, uint8 steps out: the cast below is exact
    return resized.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def clip(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Frames with edges, gradients and noise, so a different filter cannot give the same pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for k in range(num_frames):
        base = np.stack(
            [(x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), ((x + y + 7 * k) % 32) * 8]
        )
        box = (abs(x - width // 2 - k) < width // 5) & (abs(y - height // 2) < height // 4)
        frame = np.where(box, 255 - base, base).transpose(1, 2, 0) + rng.integers(-12, 13, (height, width, 3))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.mark.parametrize(
    "source, target",
    [
        ((60, 100), (84, 140)),  # the 100×60 frame, enlarged to a Slow size
        ((60, 100), (112, 168)),
        ((31, 45), (56, 84)),  # odd source sides
        ((60, 100), (56, 84)),  # shrinking keeps the same filter
        ((90, 160), (28, 56)),  # a Fast size, strongly reduced
        ((60, 100), (28, 196)),  # one side up, the other down
    ],
)
def test_resized_frames_equal_keyes_processor(source, target):
    video = clip(3, *source, seed=sum(source + target))
    ours = np.stack([resize(frame, *target) for frame in video])
    assert ours.dtype == np.uint8 and ours.shape == (3, *target, 3)
    np.testing.assert_array_equal(ours, processor_resize(video, *target))


def test_enlarging_is_bilinear_not_the_old_bicubic():
    """Pillow's bilinear (its own fixed-point rounding) agrees within one level; OpenCV's bicubic, which
    enlarged frames before, does not."""
    video = clip(1, 60, 100, seed=5)
    ours = resize(video[0], 112, 168).astype(int)
    pillow = np.asarray(Image.fromarray(video[0]).resize((168, 112), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(ours - pillow).max() <= 1
    bicubic = cv2.resize(video[0], (168, 112), interpolation=cv2.INTER_CUBIC).astype(int)
    assert np.abs(bicubic - processor_resize(video, 112, 168)[0].astype(int)).max() > 8


def test_same_size_is_returned_unchanged():
    frame = clip(1, 56, 84, seed=1)[0]
    np.testing.assert_array_equal(resize(frame, 56, 84), frame)
