"""Draw the architecture picture of the docs: the DAG of flows and the stores every step reads and writes.

python scripts/architecture.py [docs/images/architecture.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# name → (x, y, width, label, colour); coordinates in a 100 × 60 canvas
BOXES = {
    "videos": (2, 50, 18, "videos\ningest → Slow-Fast\npre-tokenise (ffmpeg)", "#dbeafe"),
    "images": (2, 39, 18, "images\ningest → smart-resize\npatches", "#dbeafe"),
    "text": (2, 28, 18, "conversations,\ncaptions, text", "#dbeafe"),
    "samples": (25, 39, 17, "train_samples\n(exact token counts)\n+ GX gates", "#e0e7ff"),
    "mixture": (47, 39, 17, "mixtures\n24/50/26 in tokens\n(DuckDB) + gate", "#e0e7ff"),
    "pretrain": (
        69,
        39,
        29,
        "pretrain\n1 align → 2 multi-task →\n3 anneal ×variants → 4 fusion\neval + promotion gate each",
        "#dcfce7",
    ),
    "longcot": (
        25,
        16,
        39,
        (
            "longcot: collect → multi-path generate → assess A/B/C →\n"
            "human review (Prefect pause) → score 1–5 → gates"
        ),
        "#fef3c7",
    ),
    "posttrain": (
        69,
        10,
        29,
        (
            "posttrain\nSFT → reward model → MPO →\nLongCoT SFT + expert merge →\n"
            "GSPO rounds (hints, rejection\nsampling) → alignment RL"
        ),
        "#dcfce7",
    ),
}
ARROWS = [
    ("videos", "samples"),
    ("images", "samples"),
    ("text", "samples"),
    ("samples", "mixture"),
    ("mixture", "pretrain"),
    ("pretrain", "posttrain"),
    ("longcot", "posttrain"),
]
STORES = (
    "Lance tables (local dir or s3://) · DuckDB `keyeflow sql` · MLflow runs: params, metrics, pictures, "
    "lineage tags uri@vN · Prefect: flows, tasks, artifacts, deployments · checkpoints/<stage>-<key>/"
)


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 8.4))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 62)
    ax.axis("off")
    heights = {}
    for name, (x, y, w, label, colour) in BOXES.items():
        h = 3.2 + 2.2 * label.count("\n")
        heights[name] = h
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4", fc=colour, ec="#334155", lw=1.2))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9.5, family="DejaVu Sans")
    for a, b in ARROWS:
        xa, ya, wa, *_ = BOXES[a]
        xb, yb, wb, *_ = BOXES[b]
        start = (xa + wa + 0.5, ya + heights[a] / 2)
        end = (xb - 0.5, yb + heights[b] / 2)
        if a == "pretrain":  # down into post-training
            start, end = (xa + wa / 2, ya - 0.5), (xb + wb / 2, yb + heights[b] + 0.5)
        ax.add_patch(
            FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#334155", lw=1.2)
        )
    ax.text(
        50,
        60,
        "keyeflow: the Keye-VL-1.5 recipe as one DAG (Prefect flows; domain code under them)",
        ha="center",
        fontsize=13,
        weight="bold",
    )
    ax.add_patch(FancyBboxPatch((2, 1.5), 96, 4, boxstyle="round,pad=0.4", fc="#f1f5f9", ec="#94a3b8"))
    ax.text(50, 3.5, STORES, ha="center", va="center", fontsize=8.8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/architecture.png"))
