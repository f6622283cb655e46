"""The picture of what RL learned: held-out pass rate (with its 95% interval) before RL and after every GSPO
round, over the RL steps, beside the pass rate of each step's own rollouts on the training items."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: flows run on servers and workers without a display

import matplotlib.pyplot as plt


def pass_rate_chart(
    heldout: Sequence[Mapping[str, float]], training: Sequence[tuple[int, float]] = ()
) -> plt.Figure:
    """`heldout`: one point per evaluation, ``{"step", "mean", "half_width"}`` (step 0: before RL).
    `training`: (RL step, pass rate of that step's rollouts)."""
    figure, axes = plt.subplots(figsize=(7, 4))
    if training:
        steps, rates = zip(*training)
        axes.plot(
            steps, rates, color="#bbbbbb", marker=".", linewidth=1, label="training rollouts (per step)"
        )
    axes.errorbar(
        [p["step"] for p in heldout],
        [p["mean"] for p in heldout],
        yerr=[p["half_width"] for p in heldout],
        color="#1f5fa8",
        marker="o",
        capsize=4,
        linewidth=2,
        label="held-out items (95% interval)",
    )
    for p in heldout:
        axes.annotate(
            f"{p['mean']:.2f}", (p["step"], p["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8
        )
    axes.set_xlabel("GSPO steps (0 = before RL)")
    axes.set_ylabel("pass rate")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("What GSPO learned: pass rate on held-out items")
    figure.tight_layout()
    return figure
