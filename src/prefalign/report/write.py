"""Writing a run's report: ``report.html`` and ``plots/*.png`` in the run directory, whole or not at all."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .html import render_run_report
from .metrics import load_run
from .plots import render_plots, write_plots

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
logger = logging.getLogger("prefalign")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Read the run, draw its plots, write the page; returns the page's path.

    Everything is made in memory and in a temporary directory inside the run first, then moved into place, so a bad
    input (`ConfigError` / `DataError`) or a failure while drawing leaves the run directory as it was.
    """
    run = load_run(run_dir)
    plots = render_plots({run.name: run})
    page = render_run_report(run, plots)
    out = Path(run_dir)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        write_plots(plots, staging / PLOTS_DIR)
        (staging / REPORT_FILE).write_text(page, encoding="utf-8")
        if (out / PLOTS_DIR).is_dir():  # the previous report's plots: replaced, not merged with stale panels
            (out / PLOTS_DIR).rename(staging / "old-plots")
        (staging / PLOTS_DIR).rename(out / PLOTS_DIR)
        os.replace(staging / REPORT_FILE, out / REPORT_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / REPORT_FILE


def write_report_or_warn(run_dir: str | os.PathLike) -> Path | None:
    """`write_report` for the end of a training run: a failure is a warning line, never a failed run."""
    try:
        return write_report(run_dir)
    except Exception as e:  # the model is saved; a plotting problem must not turn that into an error
        logger.warning(f"could not write {REPORT_FILE} in {run_dir}: {type(e).__name__}: {e}. The run itself is "
                       f"complete; retry with: prefalign report {run_dir}")
        return None
