"""Running a compare: train every run of the grid (or reuse it), score it, and write the report.

Each run trains through `prefalign.commands.train.train_plan`, the code of ``prefalign train``, into
``<output_dir>/<name>/``. The base model is scored once and cached in ``<output_dir>/base_scores.json``; each run's
scores are cached in its ``scores.json``, both keyed by the held-out data, judge and lengths. With ``resume`` a
finished run (and its scores) is reused and an unfinished one trained again. A run that fails becomes a failure row
with its one-line reason; the others go on, and the command exits 1 at the end.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import runs as run_dirs
from ..errors import PrefalignError, one_line
from ..judges import Judge
from ..report.metrics import load_run
from .grid import CompareSpec, RunSpec
from .score import BASE_SCORES_FILE, SCORES_FILE, Heldout, read_scores, score_model, write_scores
from .table import Entry, Row, compute_row, rank_key, ranked, to_csv

REPORT_HTML, REPORT_MD, SUMMARY_CSV = "report.html", "report.md", "summary.csv"
NO_JUDGE = Judge("none", lambda prompt, reply: None)  # prompts without a judge: replies and KL, no scores


@dataclass
class Outcome:
    """What a compare produced: its ranked rows and where the report went."""

    rows: list[Row]
    report: Path
    failed: int


def report_files(out: Path, title: str, facts: Sequence[tuple[str, str]], entries: Sequence[Entry], base: Entry,
                 held: Heldout, tokenizer: Any, reward_beta: float, samples: int) -> Outcome:
    """Compute the table from the entries, draw the plots, write report.html, report.md and summary.csv (and
    plots/*.png) atomically; shared by the compare command and the demo."""
    from ..report.write import publish
    from .page import render_markdown, render_page
    from .plots import category_plot, tradeoff_plot, training_plots

    rows = [compute_row(e, base.scores, held, tokenizer, reward_beta) for e in entries]
    base_row = compute_row(base, base.scores, held, tokenizer, reward_beta, is_base=True)
    ordered = ranked(rows, base_row)
    key = rank_key(rows)
    plots = training_plots({e.name: e.run for e in entries if e.run is not None})
    # runs in training order, so each method keeps the colour its first run has in the training curves
    plots += [p for p in (tradeoff_plot(rows, key), category_plot(ordered)) if p is not None]
    files = {REPORT_HTML: render_page(title, facts, ordered, key, plots, held, samples),
             REPORT_MD: render_markdown(title, facts, ordered, key), SUMMARY_CSV: to_csv(ordered)}
    publish(out, files, plots)
    return Outcome(ordered, out / REPORT_HTML, sum(1 for r in rows if not r.ok))


def _failure_reason(run_dir: Path, code: int) -> str:
    """The last line of the run's traceback (error.log), e.g. ``RuntimeError: out of memory``."""
    try:
        lines = [line for line in (run_dir / run_dirs.ERROR_LOG_FILE).read_text().splitlines() if line.strip()]
        return one_line(lines[-1])
    except (OSError, IndexError):
        return f"training exited with code {code}"


def _train(spec: RunSpec, resume: bool, desc: str) -> str | None:
    """Train one run unless it finished earlier (with ``resume``); returns None, or why it failed."""
    from ..commands.train import train_plan
    from ..pipeline import is_finished

    out = spec.plan.output_dir
    if resume and is_finished(out):
        return None
    spec.plan.overwrite = spec.plan.overwrite or out.exists()  # an unfinished run starts again
    try:
        code = train_plan(spec.plan, desc)
    except PrefalignError as e:
        return one_line(e)
    if code == 130:
        raise KeyboardInterrupt
    return None if code == 0 else _failure_reason(out, code)


def run_compare(spec: CompareSpec, *, resume: bool = False, overwrite: bool = False,
                say: Callable[[str], None] = print) -> Outcome:
    """The whole compare (see the module docstring)."""
    from ..commands import progress_bar
    from ..data.load import load_preference_dataset
    from ..generate import EDGE_CASE_PROMPTS, read_prompt_rows
    from ..judges import load_judge
    from ..models import load_model, load_tokenizer
    from ..pipeline import is_finished

    s = spec.settings
    if not resume:
        run_dirs.check_output_dir(spec.output_dir, overwrite, keep=spec.inputs())
    pairs = load_preference_dataset(spec.eval_dataset).to_list() if spec.eval_dataset else []
    prompts = read_prompt_rows(spec.eval_prompts) if spec.eval_prompts else []
    judge = load_judge(str(s["judge"]), s["pass_threshold"]) if s["judge"] else NO_JUDGE
    tokenizer = load_tokenizer(spec.model)
    held = Heldout(pairs, prompts, judge, EDGE_CASE_PROMPTS if s["edge_cases"] and prompts else (),
                   max_new_tokens=int(s["max_new_tokens"]), chat_template_kwargs=s.get("chat_template_kwargs"))
    key = held.key(spec.model)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    base_model = load_model(spec.model)
    total = len(spec.runs)

    def progress(label: str) -> Callable[[str, int], Callable[[int], None]]:
        return lambda what, n: progress_bar(f"{label}: {what}", n)

    base_file = spec.output_dir / BASE_SCORES_FILE
    base_scores = None if overwrite else read_scores(base_file, key)
    if base_scores is None:
        base_scores = score_model(base_model, tokenizer, held, progress=progress("base model"))
        write_scores(base_file, base_scores, key)
    entries = []
    for i, run in enumerate(spec.runs, 1):
        label = f"run {i}/{total} {run.name}"
        out = run.plan.output_dir
        if resume and is_finished(out):
            say(f"{label}: finished earlier, reused {out}")
        failure = _train(run, resume, label)
        scores = None
        if failure is None:
            scores = read_scores(out / SCORES_FILE, key)
            if scores is None:
                policy = load_model(str(out))
                scores = score_model(policy, tokenizer, held, reference=base_model, progress=progress(label))
                write_scores(out / SCORES_FILE, scores, key)
                del policy
                gc.collect()
        else:
            say(f"{label}: failed: {failure}")
        entries.append(Entry(run.name, run.method, run.label, scores, None if failure else load_run(out),
                             failure, str(out)))
    facts = [("output directory", str(spec.output_dir.resolve())), ("base model (reference)", spec.model),
             ("held-out pairs", f"{spec.eval_dataset} ({len(pairs)})" if pairs else "—"),
             ("held-out prompts", f"{spec.eval_prompts} ({len(prompts)})" if prompts else "—"),
             ("judge", judge.name if s["judge"] else "— (none)"), ("runs", str(total))]
    base = Entry("base", "—", "untrained", base_scores)
    return report_files(spec.output_dir, f"Compare: {spec.output_dir.name}", facts, entries, base, held, tokenizer,
                        float(s["reward_beta"]), int(s["samples"]))
