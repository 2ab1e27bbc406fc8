"""The summary table: one row per run plus the base, computed from each model's `Scores` and the run's metrics.

Every number comes from the evaluate functions applied to the raw per-item scores (`pair_metrics`,
`generation_metrics`, `win_rate`), never copied from a log, so ``summary.csv``, ``report.md`` and the page agree
with a recomputation from the run directories. Ranking: judge win rate against the base when prompts were judged,
else held-out reward accuracy; the reward margin breaks ties.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evaluate import generation_metrics, pair_metrics, win_rate
from ..generate import prompt_text
from ..report.metrics import Run
from .score import Heldout, Scores

COLUMNS = [  # (key, header, kind): kind is how the page and report.md show it
    ("name", "run", "text"), ("method", "method", "text"), ("swept", "swept", "text"), ("status", "status", "text"),
    ("win_rate", "win rate vs base", "pct"), ("win_low", "win 95% low", "pct"), ("win_high", "win 95% high", "pct"),
    ("pass_rate", "pass rate", "pct"), ("mean_score", "mean score", "num"),
    ("reward_accuracy", "reward accuracy", "pct"), ("reward_margin", "reward margin", "num"),
    ("chosen_change", "Δ logp chosen", "num"), ("rejected_change", "Δ logp rejected", "num"),
    ("kl", "KL from base (per token)", "num"), ("mean_words", "reply words", "num"),
    ("train_seconds", "train s", "num"), ("pairs_per_second", "pairs/s", "num"), ("steps", "steps", "int"),
    ("reason", "failure", "text")]


@dataclass
class Entry:
    """One model of the compare: a run (with its metrics and scores, or a failure reason) or the base."""

    name: str
    method: str
    swept: str
    scores: Scores | None
    run: Run | None = None
    failure: str | None = None
    path: str | None = None


@dataclass
class Row:
    """A computed table row; ``values`` keyed by `COLUMNS`, ``by_group`` per-category pass rates."""

    entry: Entry
    values: dict[str, Any]
    by_group: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.entry.failure is None


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def compute_row(entry: Entry, base: Scores, held: Heldout, tokenizer: Any, reward_beta: float,
                is_base: bool = False) -> Row:
    """The row of one entry against the base (the reference of every metric)."""
    v: dict[str, Any] = {"name": entry.name, "method": entry.method, "swept": entry.swept,
                         "status": "reference" if is_base else ("failed" if entry.failure else "ok"),
                         "reason": entry.failure or ""}
    s, by_group = entry.scores, {}
    if s is not None and s.pair_chosen is not None and base.pair_chosen is not None:
        pm = pair_metrics((torch.tensor(s.pair_chosen), torch.tensor(s.pair_rejected)),
                          (torch.tensor(base.pair_chosen), torch.tensor(base.pair_rejected)), reward_beta)
        v.update(reward_accuracy=pm.reward_accuracy, reward_margin=pm.reward_margin,
                 chosen_change=pm.logps_chosen - pm.ref_logps_chosen,
                 rejected_change=pm.logps_rejected - pm.ref_logps_rejected)
    if s is not None and s.replies is not None and base.scores is not None:
        prompts = [prompt_text(r["prompt"]) for r in held.prompts]
        groups = [r.get("family") or r.get("category") for r in held.prompts]
        g = generation_metrics(prompts, s.replies, s.scores or [], held.judge, tokenizer, groups)
        v.update(pass_rate=g.pass_rate, mean_score=g.mean_score, mean_words=g.mean_words,
                 kl=0.0 if is_base else _nan(s.kl()))
        by_group = {k: m["pass_rate"] for k, m in g.by_group.items()} if g.judged else {}  # no judge: none
        if not is_base and g.judged:
            win = win_rate(s.scores or [], base.scores)
            low, high = win.interval()
            v.update(win_rate=win.win_rate, win_low=low, win_high=high)
    if entry.run is not None:
        summary = entry.run.summary()
        v.update(train_seconds=summary.get("train_runtime"), pairs_per_second=summary.get("train_samples_per_second"),
                 steps=entry.run.steps())
    return Row(entry, v, by_group)


def rank_key(rows: Sequence[Row]) -> str:
    """The metric the table is ranked by: judge win rate when any row has one, else held-out reward accuracy."""
    return "win_rate" if any(_finite(r.values.get("win_rate")) for r in rows) else "reward_accuracy"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def ranked(runs: Sequence[Row], base: Row) -> list[Row]:
    """Best run first (rank metric, then reward margin), then the base, then failed runs in grid order."""
    key = rank_key(runs)

    def score(row: Row) -> tuple[float, float]:
        a, b = row.values.get(key), row.values.get("reward_margin")
        return (a if _finite(a) else -math.inf, b if _finite(b) else -math.inf)

    ok = sorted((r for r in runs if r.ok), key=score, reverse=True)
    return [*ok, base, *(r for r in runs if not r.ok)]


def fmt(value: Any, kind: str) -> str:
    """A cell as text: percentages, 4 significant digits, '—' for missing."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if kind != "text" else ""
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "num":
        return f"{value:.4g}"
    if kind == "int":
        return str(int(value))
    return str(value)


def to_csv(rows: Sequence[Row]) -> str:
    """``summary.csv``: one row per model, exact numbers (repr), empty where not measured."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if (x := row.values.get(key)) is None or (isinstance(x, float) and not math.isfinite(x))
                         else x if isinstance(x, str) else repr(x) for key, _, _ in COLUMNS])
    return buf.getvalue()


def shown_columns(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    """The columns some row has a value for (a compare without a judge has no win-rate columns)."""
    return [c for c in COLUMNS if c[0] in ("name", "status") or any(
        r.values.get(c[0]) not in (None, "") and not (isinstance(r.values.get(c[0]), float)
                                                     and not math.isfinite(r.values[c[0]])) for r in rows)]


def to_markdown(rows: Sequence[Row], ranked_by: str) -> str:
    """The table as Markdown, ranked, with the ranking metric named."""
    cols = shown_columns(rows)
    header = dict((k, h) for k, h, _ in COLUMNS)[ranked_by]
    lines = [f"Ranked by {header} (ties: reward margin); the base model is the reference of every metric.", "",
             "| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.values.get(k), kind).replace("|", "\\|") for k, _, kind in cols)
                     + " |")
    return "\n".join(lines)
