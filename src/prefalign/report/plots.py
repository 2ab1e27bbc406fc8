"""Training curves as PNG images, for one run or several on shared axes (a later ``prefalign compare``).

Each figure is a ``matplotlib.figure.Figure`` drawn on its own ``FigureCanvasAgg``: no pyplot, no
``matplotlib.use()``, no rcParams, so making a report changes nothing in the process that trained the model.
A panel is drawn only when some run logged one of its metrics; eval values of the same metric are drawn on the same
axes as markers. Every training line is smoothed (debiased EMA, as TensorBoard does), with the raw values faint.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import Run, Series

FIGSIZE = (5.0, 3.2)  # inches; at DPI that is 750 x 480 px: text still about 11 px on a 390 px wide phone
DPI = 150
FONT = 11
MARGINS = {"left": 0.135, "right": 0.975, "top": 0.9, "bottom": 0.15}
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
KEY_STYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class Panel:
    """One figure: a title, the training metrics it draws (eval twins ``eval_<key>`` join them), y limits, and
    whether smoothing helps (a schedule such as the learning rate is drawn as logged)."""

    name: str
    title: str
    keys: tuple[str, ...]
    ylim: tuple[float, float] | None = None
    smoothed: bool = True


PANELS = (
    Panel("loss", "Training loss", ("loss",)),
    Panel("nll_loss", "NLL term of the loss (ORPO, RPO)", ("nll_loss",)),
    Panel("reward_accuracy", "Reward accuracy (chosen reward > rejected)", ("rewards/accuracies",), (-0.03, 1.03)),
    Panel("reward_margins", "Reward margin (chosen − rejected)", ("rewards/margins",)),
    Panel("rewards", "Rewards of chosen and rejected replies", ("rewards/chosen", "rewards/rejected")),
    Panel("logps", "Log-probs of chosen and rejected replies", ("logps/chosen", "logps/rejected")),
    Panel("log_odds", "ORPO log odds", ("log_odds_ratio", "log_odds_chosen")),
    Panel("token_accuracy", "Mean token accuracy", ("mean_token_accuracy",), (-0.03, 1.03)),
    Panel("grad_norm", "Gradient norm", ("grad_norm",)),
    Panel("learning_rate", "Learning rate", ("learning_rate",), smoothed=False),
)


@dataclass(frozen=True)
class Plot:
    """A drawn panel: its PNG bytes and notes the page shows under it (values left out)."""

    name: str
    title: str
    png: bytes
    notes: tuple[str, ...] = ()


def smoothing_weight(n: int) -> float:
    """EMA weight for a series of ``n`` points: a span of about a tenth of the run (0 for short series)."""
    span = max(1, n // 10)
    return 1.0 - 2.0 / (span + 1)


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average: ``s_t = w·s_{t-1} + (1-w)·x_t``, divided by ``1 - w^t``.

    The debiasing keeps the start of the curve at the data instead of pulling it towards 0.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float] = []
    last = 0.0
    for t, x in enumerate(values, start=1):
        last = weight * last + (1.0 - weight) * x
        out.append(last / (1.0 - weight**t))
    return out


def _label(key: str) -> str:
    return key.split("/", 1)[1] if "/" in key else key


def present_panels(runs: Mapping[str, Run]) -> list[Panel]:
    """The panels at least one run has a value for (training or eval)."""
    return [p for p in PANELS
            if any(len(run.series(k)) or len(run.series("eval_" + k)) for run in runs.values() for k in p.keys)]


def _draw(ax, series: Series, color: str, style: str, label: str, *, eval_: bool, smoothed: bool) -> None:
    if eval_:
        ax.plot(series.steps, series.values, linestyle=style if len(series) > 1 else "none", linewidth=1.2,
                marker="o", markersize=5, color=color, label=label, markerfacecolor="white", markeredgewidth=1.5)
        return
    if smoothed and len(series) > 2:
        ax.plot(series.steps, series.values, linestyle=style, linewidth=1.0, color=color, alpha=0.25)
        ax.plot(series.steps, smooth(series.values, smoothing_weight(len(series))), linestyle=style,
                linewidth=2.0, color=color, label=label)
    else:
        ax.plot(series.steps, series.values, linestyle=style, linewidth=2.0, color=color, label=label,
                marker="." if len(series) <= 2 else None)


def plot_panel(panel: Panel, runs: Mapping[str, Run]) -> Plot:
    """Draw one panel for every run in ``runs`` (name → run) on shared axes; returns the PNG and its notes."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    fig.subplots_adjust(**MARGINS)  # fixed: a layout engine would draw every figure twice
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    several = len(runs) > 1
    notes: list[str] = []
    for r, (name, run) in enumerate(runs.items()):
        for k, key in enumerate(panel.keys):
            # One run: a colour per metric. Several: a colour per run, a line style per metric.
            color = RUN_COLORS[(r if several else k) % len(RUN_COLORS)]
            style = KEY_STYLES[k % len(KEY_STYLES)] if several else "-"
            parts = ([name] if several else []) + ([_label(key)] if len(panel.keys) > 1 else [])
            for eval_ in (False, True):
                series = run.series("eval_" + key if eval_ else key)
                if series.nonfinite:
                    notes.append(f"{(name + ': ') if several else ''}{series.nonfinite} non-finite value(s) of "
                                 f"{'eval_' + key if eval_ else key} not drawn")
                if not len(series):
                    continue
                label = " · ".join(parts + ["eval"] if eval_ else parts) or "train"
                _draw(ax, series, color, style, label, eval_=eval_, smoothed=panel.smoothed)
    ax.set_title(panel.title, fontsize=FONT + 1)
    ax.set_xlabel("step", fontsize=FONT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
    ax.tick_params(labelsize=FONT)
    ax.grid(True, alpha=0.3)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if panel.name == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) > 1 or several or any("eval" in label for label in labels):
        many = len(labels) > 6  # several runs times chosen / rejected: two small columns, not one tall box
        ax.legend(fontsize=FONT - (4 if many else 1), framealpha=0.8, ncol=2 if many else 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return Plot(panel.name, panel.title, buf.getvalue(), tuple(notes))


def render_plots(runs: Mapping[str, Run]) -> list[Plot]:
    """Every present panel for these runs, in the page's order."""
    if not runs:
        return []
    return [plot_panel(p, runs) for p in present_panels(runs)]


def write_plots(plots: Sequence[Plot], directory: str | Path) -> list[Path]:
    """``<directory>/<panel>.png`` for each plot."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot in plots:
        path = out / f"{plot.name}.png"
        path.write_bytes(plot.png)
        paths.append(path)
    return paths
