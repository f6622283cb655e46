"""Contact sheets of pre-tokenised videos: a strip of frames per video, Slow and Fast marked.

Built from the stored patches (not from the source files), so the picture also shows that what training
will read round-trips to the right pixels at the right Slow/Fast sizes.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: flows run on servers and workers without a display

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.compute as pc

from keyeflow.datasets import tables
from keyeflow.datasets.pretokenize import unpatchify

SLOW_COLOUR = "#1f77b4"
FAST_COLOUR = "#ff7f0e"


def frame_strips(
    samples: tables.TableRef,
    frames: tables.TableRef,
    *,
    num_videos: int = 4,
    frames_per_video: int = 10,
    patch: int = 14,
    merge: int = 2,
    root: str | None = None,
):
    """A matplotlib Figure: one row per video, evenly spaced frames, blue = Slow, orange = Fast."""
    sample_rows = (
        tables.open_table("video_samples", version=samples.version, root=root)
        .to_table(
            columns=[
                "sample_id",
                "uri",
                "num_frames",
                "num_slow",
                "num_fast",
                "total_tokens",
                "slow_height",
                "slow_width",
                "fast_height",
                "fast_width",
            ]
        )
        .to_pylist()
    )
    sample_rows = sorted(sample_rows, key=lambda r: -r["num_frames"])[:num_videos]
    if not sample_rows:
        raise ValueError("no pre-tokenised samples to draw")
    frame_table = tables.open_table("video_frames", version=frames.version, root=root)
    fig, axes = plt.subplots(
        len(sample_rows),
        frames_per_video,
        figsize=(1.6 * frames_per_video, 1.5 * len(sample_rows) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for row_axes, sample in zip(axes, sample_rows):
        picks = np.unique(np.linspace(0, sample["num_frames"] - 1, frames_per_video).round().astype(int))
        rows = frame_table.to_table(
            columns=["frame_index", "frame_type", "timestamp", "grid_h", "grid_w", "patches"],
            filter=(pc.field("sample_id") == sample["sample_id"])
            & pc.field("frame_index").isin(picks.tolist()),
        ).to_pylist()
        rows.sort(key=lambda r: r["frame_index"])
        for ax in row_axes:
            ax.axis("off")
        for ax, frame in zip(row_axes, rows):
            patches = np.frombuffer(frame["patches"], dtype=np.uint8).reshape(
                frame["grid_h"] * frame["grid_w"], -1
            )
            image = unpatchify(patches, frame["grid_h"], frame["grid_w"], patch, merge)
            slow = frame["frame_type"] == 0
            ax.imshow(image)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(SLOW_COLOUR if slow else FAST_COLOUR)
                spine.set_linewidth(4 if slow else 2)
            ax.set_title(
                f"{'S' if slow else 'F'} {frame['timestamp']:.1f}s",
                fontsize=7,
                color=SLOW_COLOUR if slow else FAST_COLOUR,
            )
        name = sample["uri"].rsplit("/", 1)[-1]
        row_axes[0].text(
            0,
            -0.35,
            f"{name[:40]}  {sample['num_slow']}S/{sample['num_fast']}F  "
            f"slow {sample['slow_width']}x{sample['slow_height']}  fast {sample['fast_width']}x"
            f"{sample['fast_height']}  {sample['total_tokens']} tok",
            transform=row_axes[0].transAxes,
            fontsize=7,
            ha="left",
        )
    fig.suptitle("Slow-Fast frames (blue = Slow, orange = Fast; shown at stored size)", fontsize=9)
    return fig
