"""The compare page (``report.html``) and ``report.md``: the ranked summary, the plots, and replies side by side.

The page reuses the run report's style and image embedding (`prefalign.report.html`): one self-contained file,
no scripts, no network; wide tables scroll inside their box on a phone, and the replies to one prompt sit side by
side on a laptop and stack on a phone.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..evaluate import sample_indices
from ..generate import prompt_text
from ..report.html import CSS, plots_section
from ..report.plots import Plot
from .score import Heldout
from .table import COLUMNS, Row, fmt, shown_columns, to_markdown

EXTRA_CSS = """
table.summary td, table.summary th { white-space: nowrap; }
table.summary tr.reference td { background: #f6f8fa; }
table.summary tr.failed td { color: #9a3412; }
td.reason { white-space: normal !important; min-width: 16rem; }
.prompt { margin: 1rem 0 0.4rem; font-weight: 600; overflow-wrap: anywhere; }
.replies { display: grid; gap: 8px; grid-template-columns: repeat(auto-fill, minmax(min(100%, 220px), 1fr)); }
.reply { border: 1px solid #e6e9ec; border-radius: 4px; padding: 0.4rem 0.55rem; font-size: 0.9rem;
         overflow-wrap: anywhere; white-space: pre-wrap; }
.reply b { display: block; font-size: 0.8rem; color: #57606a; white-space: normal; }
.reply.reference { background: #f6f8fa; }
"""


def _header(key: str) -> str:
    return dict((k, h) for k, h, _ in COLUMNS)[key]


def summary_table(rows: Sequence[Row]) -> str:
    """The ranked table; each number's cell carries its column key and exact value (``data-key``, ``data-value``)."""
    cols = shown_columns(rows)
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in cols)
    body = []
    for row in rows:
        cells = []
        for key, _, kind in cols:
            value = row.values.get(key)
            text = escape(fmt(value, kind))
            if kind == "text":
                cls = ' class="reason"' if key == "reason" else ""
                cells.append(f"<td{cls}>{text}</td>")
            else:
                data = f' data-key="{key}" data-value="{value!r}"' if value is not None else ""
                cells.append(f'<td class="num"{data}>{text}</td>')
        body.append(f'<tr class="{escape(row.values["status"])}">{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table class="metrics summary" id="summary"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _reply_cards(items: Sequence[tuple[str, str, str, bool]]) -> str:
    """(model, reply, score, is_reference) cards for one prompt."""
    cards = []
    for name, reply, score, ref in items:
        label = escape(name) + (f" · score {escape(score)}" if score else "")
        cards.append(f'<div class="reply{" reference" if ref else ""}"><b>{label}</b>'
                     f"{escape(reply) or '<i>(empty reply)</i>'}</div>")
    return '<div class="replies">' + "".join(cards) + "</div>"


def _score(scores: Sequence[float | None] | None, i: int) -> str:
    return "" if not scores or scores[i] is None else fmt(scores[i], "num")


def replies_section(rows: Sequence[Row], held: Heldout, samples: int) -> str:
    """Replies of the base and every scored run to a sample of held-out prompts and to the edge-case prompts."""
    scored = sorted((r for r in rows if r.entry.scores is not None and r.entry.scores.replies is not None),
                    key=lambda r: r.values["status"] != "reference")  # the base first, then runs as ranked
    if not scored:
        return ""
    parts = ["<h2>Replies to held-out prompts</h2>"]
    for i in sample_indices(len(held.prompts), samples):
        parts.append(f'<p class="prompt">{escape(prompt_text(held.prompts[i]["prompt"]))}</p>')
        parts.append(_reply_cards([(r.entry.name, r.entry.scores.replies[i],
                                    _score(r.entry.scores.scores, i),
                                    r.values["status"] == "reference") for r in scored]))
    if held.edge_cases:
        parts.append("<h2>Edge-case prompts</h2><p class=\"note\">Empty, very long and off-task prompts; not "
                     "scored.</p>")
        for j, prompt in enumerate(held.edge_cases):
            shown = prompt if len(prompt) <= 200 else prompt[:200] + f"… ({len(prompt)} characters)"
            parts.append(f'<p class="prompt">{escape(shown) or "(empty prompt)"}</p>')
            parts.append(_reply_cards([(r.entry.name, r.entry.scores.edge_replies[j], "", r.values["status"] ==
                                        "reference") for r in scored if len(r.entry.scores.edge_replies) > j]))
    return "".join(parts)


def render_page(title: str, facts: Sequence[tuple[str, str]], rows: Sequence[Row], ranked_by: str,
                plots: Sequence[Plot], held: Heldout, samples: int) -> str:
    """The whole compare page."""
    fact_rows = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in facts)
    failed = [r for r in rows if r.values["status"] == "failed"]
    sections = [f"<h1>{escape(title)}</h1>",
                f'<div class="scroll"><table class="facts"><tbody>{fact_rows}</tbody></table></div>',
                "<h2>Summary</h2>",
                f'<p class="note">Best run first, ranked by <b>{escape(_header(ranked_by))}</b> (ties: reward margin). '
                "The base model is the reference of every metric: Δ logp is the change of the mean held-out log-prob "
                "from the base; the win rate's 95% interval is Wilson's, a tie counting as half.</p>",
                summary_table(rows)]
    if failed:
        sections.append(f'<p class="note">{len(failed)} run(s) failed; their reason is in the table and the '
                        "traceback in the run directory's error.log. <code>prefalign compare … --resume</code> "
                        "retries them and reuses the finished runs.</p>")
    sections.append("<h2>Plots</h2><p class=\"note\">Training curves: thick lines smoothed, faint lines as "
                    "logged.</p>" + plots_section(plots))
    sections.append(replies_section(rows, held, samples))
    sections.append("<footer>Made by <code>prefalign compare</code>; the same numbers are in report.md and "
                    "summary.csv.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def render_markdown(title: str, facts: Sequence[tuple[str, str]], rows: Sequence[Row], ranked_by: str) -> str:
    """``report.md``: the facts and the same table as the page."""
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in facts] + ["", to_markdown(rows, ranked_by), ""]
    for row in rows:
        if row.by_group:
            lines.append(f"- pass rate per category, {row.entry.name}: "
                         + ", ".join(f"{g} {fmt(p, 'pct')}" for g, p in row.by_group.items()))
    return "\n".join(lines) + "\n"
