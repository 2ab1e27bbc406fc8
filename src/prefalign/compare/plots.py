"""The compare page's figures: training curves of every run on shared axes (`prefalign.report.plots`), the
sweep's quality-vs-KL trade-off, and per-category pass rates. Same drawing rules as the run report: a Figure on its
own Agg canvas, no pyplot, nothing changed in the process."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..report.metrics import Run
from ..report.plots import DPI, FIGSIZE, FONT, MARGINS, PANELS, RUN_COLORS, Plot, plot_panel, present_panels
from .table import COLUMNS, Row

CURVES = ("loss", "reward_accuracy", "reward_margins", "logps", "nll_loss")


def training_plots(runs: Mapping[str, Run]) -> list[Plot]:
    """Loss, reward accuracy and margins, chosen / rejected log-probs over steps, every run on one set of axes."""
    present = {p.name for p in present_panels(runs)} if runs else set()
    return [plot_panel(p, runs) for p in PANELS if p.name in CURVES and p.name in present]


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    fig.subplots_adjust(**MARGINS)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def tradeoff_plot(rows: Sequence[Row], quality: str) -> Plot | None:
    """Held-out quality (the ranking metric) against KL from the base: one point per run, one line per method
    (coloured in the order the methods first appear in ``rows``), each point labelled with its swept value; None
    when no run has both numbers."""
    points: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        x, y = row.values.get("kl"), row.values.get(quality)
        if row.ok and row.values["status"] == "ok" and _finite(x) and _finite(y):
            points.setdefault(row.values["method"], []).append((x, y, row.entry.swept))
    if not points:
        return None
    fig, ax = _figure()
    xs = [p[0] for pts in points.values() for p in pts]
    middle = (min(xs) + max(xs)) / 2
    for i, (method, pts) in enumerate(points.items()):
        pts.sort()
        color = RUN_COLORS[i % len(RUN_COLORS)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, label=method.upper(), linewidth=1.6)
        for k, (x, y, label) in enumerate(pts):  # above, below, higher, lower: neighbouring runs often coincide
            right = x > middle  # labels of the right half point left, so none runs off the axes
            ax.annotate(label.replace(", ", "\n"), (x, y), textcoords="offset points",
                        xytext=(-5 if right else 5, (5, -12, 17, -24)[k % 4]), ha="right" if right else "left",
                        fontsize=FONT - 3, color=color)
    ax.margins(x=0.25, y=0.25)  # room for the labels of the outermost points
    if quality == "win_rate":
        ax.axhline(0.5, color="#888", linestyle=":", linewidth=1.2, label="base (50%)")
    header = dict((k, h) for k, h, _ in COLUMNS)[quality]
    ax.set_title(f"Trade-off: {header} vs KL from base", fontsize=FONT + 1)
    ax.set_xlabel("KL from base per reply token (nats)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # KL values are small and close: few ticks stay readable
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=FONT - 1, framealpha=0.8)
    return Plot("tradeoff", f"{header} vs KL from base", _png(fig))


def category_plot(rows: Sequence[Row]) -> Plot | None:
    """Pass rate per judge category (prompt family), a bar per model; None when the prompts have no categories."""
    shown = [r for r in rows if r.by_group]
    groups = sorted({g for r in shown for g in r.by_group})
    if not groups:
        return None
    fig, ax = _figure()
    width = 0.8 / len(shown)
    for i, row in enumerate(shown):
        color = "#777777" if row.values["status"] == "reference" else RUN_COLORS[i % len(RUN_COLORS)]
        xs = [g + (i - (len(shown) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [row.by_group.get(g, float("nan")) for g in groups], width, color=color, label=row.entry.name)
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups], fontsize=FONT - 2, rotation=20)
    ax.set_ylim(0, 1.0 + 0.12 * math.ceil(len(shown) / 3))  # the legend sits above the bars, not on them
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("Pass rate per category", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=FONT - 3, framealpha=0.9, ncol=3, loc="upper center")
    return Plot("categories", "Pass rate per category", _png(fig))


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
