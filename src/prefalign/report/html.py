"""The report page: one self-contained HTML file (inline CSS, images as data URIs, no scripts, no network).

Every builder takes a list of runs, so the single-run report and a later multi-run compare page share them: tables
have one row per fact or metric and one column per run. The layout is a single column on a phone (images at most
the screen's width, wide tables scroll sideways inside their box) and a two-column grid of plots on a laptop.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

from .metrics import Run, union_keys
from .plots import PANELS, Plot

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 16px; color: #1b1f24; background: #fff;
       font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.45rem; margin: 0.2rem 0 0.8rem; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 1.6rem 0 0.6rem; border-bottom: 1px solid #d8dee4; padding-bottom: 0.2rem; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.95rem; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #e6e9ec; text-align: left; vertical-align: top; }
thead th { background: #f4f6f8; }
table.metrics th { text-align: right; }
table.metrics th[colspan] { text-align: center; }
table.metrics th[rowspan], table.metrics tr:first-child th:first-child { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.facts { width: 100%; }
.top { display: grid; gap: 0 32px; grid-template-columns: repeat(auto-fit, minmax(min(100%, 440px), 1fr)); }
.top h2 { margin-top: 0.6rem; }
table.facts td { overflow-wrap: anywhere; }
table.facts th[scope=row] { white-space: nowrap; width: 1%; color: #57606a; font-weight: 600; }
.metric { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88rem;
          white-space: nowrap; }
.plots { display: grid; gap: 18px; grid-template-columns: repeat(auto-fill, minmax(min(100%, 480px), 1fr)); }
figure { margin: 0; }
figure img { display: block; width: 100%; max-width: 100%; height: auto; border: 1px solid #e6e9ec;
             border-radius: 4px; }
figcaption { font-size: 0.85rem; color: #57606a; margin-top: 0.25rem; }
p.note, footer { color: #57606a; font-size: 0.88rem; }
@media (max-width: 600px) {
  body { padding: 12px; }
  table { font-size: 0.86rem; }
  th, td { padding: 0.28rem 0.4rem; }
  .metric { font-size: 0.8rem; }
}
footer { margin-top: 2rem; }
"""
ORDER = [key for panel in PANELS for key in panel.keys]


def format_value(value: float) -> str:
    """Five significant digits: enough to tell runs apart, short enough for a phone's column."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.5g}"


def format_duration(seconds: float) -> str:
    """``42.3 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _ordered(keys: Sequence[str], prefix: str = "") -> list[str]:
    """Plotted metrics in the plots' order first, the rest as logged."""
    rank = {prefix + key: i for i, key in enumerate(ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), list(keys).index(k)))


def run_facts(run: Run) -> list[tuple[str, str]]:
    """What the header says about a run: where it is, what trained, how long."""
    config, summary = run.config, run.summary()
    dash = "—"
    facts = [("run directory", str(run.path.resolve())),
             ("method", str(config.get("method", dash))),
             ("model", str(config.get("model", dash)))]
    if config.get("ref_model"):
        facts.append(("reference", str(config["ref_model"])))
    if config.get("dataset") or config.get("dataset_mixture"):
        facts.append(("dataset", str(config.get("dataset") or "mixture")))
    facts.append(("steps", str(run.steps())))
    epochs = [r["epoch"] for r in run.records if isinstance(r.get("epoch"), int | float)]
    if epochs:
        facts.append(("epochs", f"{max(epochs):.3g}"))
    facts.append(("train time", format_duration(summary["train_runtime"]) if "train_runtime" in summary
                  else "— (no end-of-training record: unfinished run?)"))
    if "train_samples_per_second" in summary:
        facts.append(("samples / s", format_value(summary["train_samples_per_second"])))
    if "train_loss" in summary:
        facts.append(("mean training loss", format_value(summary["train_loss"])))
    return facts


def facts_table(runs: Sequence[Run]) -> str:
    """Run facts: one row per fact, one column per run (a column header only when there are several)."""
    names = [label for label, _ in run_facts(runs[0])]
    per_run = [dict(run_facts(run)) for run in runs]
    for facts in per_run[1:]:
        names += [n for n in facts if n not in names]
    head = ("<thead><tr><th></th>" + "".join(f"<th>{escape(r.name)}</th>" for r in runs) + "</tr></thead>"
            if len(runs) > 1 else "")
    rows = "".join(f'<tr><th scope="row">{escape(n)}</th>'
                   + "".join(f"<td>{escape(facts.get(n, '—'))}</td>" for facts in per_run) + "</tr>"
                   for n in names)
    return f'<div class="scroll"><table class="facts">{head}<tbody>{rows}</tbody></table></div>'


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Every metric logged in training or evaluation, by its training name (``eval_loss`` is ``loss``)."""
    names = union_keys(runs, eval_=False)
    names += [k for k in (key.removeprefix("eval_") for key in union_keys(runs, eval_=True)) if k not in names]
    return _ordered(names)


def metrics_table(runs: Sequence[Run]) -> str:
    """Final values: one row per metric; per run a train and (when any run evaluated) an eval column.

    Each number's cell carries ``data-key`` (the name in metrics.jsonl) and ``data-value`` (the exact number).
    """
    names = metric_names(runs)
    if not names:
        return ""
    train = [run.final(eval_=False) for run in runs]
    evaluation = [run.final(eval_=True) for run in runs]
    kinds = [("train", "")] + ([("eval", "eval_")] if any(evaluation) else [])
    sub = "".join(f"<th>{kind}</th>" for kind, _ in kinds) * len(runs)
    if len(runs) > 1:
        head = ('<tr><th rowspan="2">metric</th>' + "".join(f'<th colspan="{len(kinds)}">{escape(r.name)}</th>'
                                                             for r in runs) + f"</tr><tr>{sub}</tr>")
    else:
        head = f"<tr><th>metric</th>{sub}</tr>"
    body = []
    for name in names:
        cells = []
        for finals in zip(train, evaluation, strict=True):
            for (_, prefix), final in zip(kinds, finals, strict=False):
                key = prefix + name
                cells.append(f'<td class="num" data-key="{escape(key)}" data-value="{final[key]!r}">'
                             f"{format_value(final[key])}</td>" if key in final else '<td class="num">—</td>')
        body.append(f'<tr><td class="metric">{escape(name)}</td>{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table class="metrics" id="final-metrics"><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plots_section(plots: Sequence[Plot]) -> str:
    """The figures, images embedded; each note (values left out) under its figure."""
    if not plots:
        return '<p class="note">No metric this page knows how to plot was logged.</p>'
    figures = []
    for plot in plots:
        notes = "<br>".join(escape(n) for n in plot.notes)  # the title is drawn in the image itself
        figures.append(f'<figure id="plot-{escape(plot.name)}"><img src="{data_uri(plot.png)}" '
                       f'alt="{escape(plot.title)}" width="750" height="480">'
                       + (f"<figcaption>{notes}</figcaption>" if notes else "") + "</figure>")
    return f'<div class="plots">{"".join(figures)}</div>'


def render_page(title: str, runs: Sequence[Run], plots: Sequence[Plot]) -> str:
    """The whole page for one or several runs."""
    if not runs:
        raise ValueError("render_page needs at least one run")
    table = metrics_table(runs) or '<p class="note">No metric logged.</p>'
    sections = [f"<h1>{escape(title)}</h1>",
                f'<div class="top"><section><h2>Run</h2>{facts_table(runs)}</section>'
                f"<section><h2>Final metrics</h2>{table}</section></div>"]
    sections.append("<h2>Training curves</h2>"
                    '<p class="note">Thick lines are smoothed (exponential moving average), faint lines the logged '
                    "values; circles are evaluations.</p>" + plots_section(plots))
    records = sum(len(run.records) for run in runs)
    sections.append(f"<footer>Made by <code>prefalign report</code> from {records} records of metrics.jsonl."
                    "</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def render_run_report(run: Run, plots: Sequence[Plot]) -> str:
    """The page ``prefalign report`` writes for one run."""
    return render_page(f"Training report: {run.name}", [run], plots)
