"""The mixture chart: target vs reached token share per modality (logged next to the gate report).

Built on ``matplotlib.figure.Figure`` with the Agg canvas, so it never touches pyplot's global state or
needs a display: safe in flows, workers and tests.
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keyeflow.datasets.mixture import MixtureReport

_TARGET_COLOR = "#9aa5b1"
_REACHED_OK = "#2b8a3e"
_REACHED_OFF = "#c92a2a"


def shares_chart(report: MixtureReport) -> Figure:
    """Grouped bars per modality: the target share and the share reached, labelled in percent.

    A reached bar is red when it misses its target by more than the report's tolerance.
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [m.modality for m in report.modalities]
    xs = range(len(names))
    width = 0.38
    targets = [100 * m.target_share for m in report.modalities]
    reached = [100 * m.reached_share for m in report.modalities]
    colors = [
        _REACHED_OK if abs(r - t) <= report.tolerance_pp + 1e-12 else _REACHED_OFF
        for r, t in zip(reached, targets)
    ]
    target_bars = ax.bar([x - width / 2 for x in xs], targets, width, label="target", color=_TARGET_COLOR)
    reached_bars = ax.bar([x + width / 2 for x in xs], reached, width, label="reached", color=colors)
    ax.bar_label(target_bars, labels=[f"{v:.1f}%" for v in targets], padding=2, fontsize=9)
    ax.bar_label(reached_bars, labels=[f"{v:.2f}%" for v in reached], padding=2, fontsize=9)
    ax.set_xticks(list(xs), [f"{m.modality}\n{m.reached_tokens:,} tok" for m in report.modalities])
    ax.set_ylabel("share of tokens (%)")
    ax.set_ylim(0, max(targets + reached + [1.0]) * 1.18)
    ax.set_title(
        f"Stage {report.stage} mixture {report.mixture_id}: "
        f"{report.reached_tokens:,} tokens (±{report.tolerance_pp} pp)",
        fontsize=10,
    )
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
