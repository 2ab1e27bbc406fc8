"""Writing a report: ``report.html`` and ``plots/*.png`` in a run directory (or a compare's), whole or not at all."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .html import render_run_report
from .metrics import load_run
from .plots import Plot, render_plots, write_plots

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
logger = logging.getLogger("prefalign")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Read the run, draw its plots, write the page; returns the page's path.

    Everything is made in memory first and moved into place by `publish`, so a bad input (`ConfigError` /
    `DataError`) or a failure while drawing leaves the run directory as it was.
    """
    run = load_run(run_dir)
    plots = render_plots({run.name: run})
    publish(run_dir, {REPORT_FILE: render_run_report(run, plots)}, plots)
    return Path(run_dir) / REPORT_FILE


def publish(directory: str | os.PathLike, files: Mapping[str, str], plots: Sequence[Plot]) -> None:
    """Write ``files`` (name → text) and ``plots/*.png`` into ``directory``, each whole or not at all.

    Everything is written to a temporary directory inside ``directory`` first, then renamed into place (the old
    ``plots/`` replaced, not merged with stale panels), so a reader never sees a half-written page.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        write_plots(plots, staging / PLOTS_DIR)
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if (out / PLOTS_DIR).is_dir():
            (out / PLOTS_DIR).rename(staging / "old-plots")
        (staging / PLOTS_DIR).rename(out / PLOTS_DIR)
        for name in files:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_report_or_warn(run_dir: str | os.PathLike) -> Path | None:
    """`write_report` for the end of a training run: a failure is a warning line, never a failed run."""
    try:
        return write_report(run_dir)
    except Exception as e:  # the model is saved; a plotting problem must not turn that into an error
        logger.warning(f"could not write {REPORT_FILE} in {run_dir}: {type(e).__name__}: {e}. The run itself is "
                       f"complete; retry with: prefalign report {run_dir}")
        return None
