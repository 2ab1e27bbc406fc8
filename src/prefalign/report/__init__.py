"""Reports of training runs: curves (`plots`), the HTML page (`html`), from a run directory's files (`metrics`).

``write.write_report(run_dir)`` makes ``report.html`` and ``plots/*.png``; ``prefalign report RUN_DIR`` and the end
of every ``prefalign train`` call it. The builders take several runs so a compare page can reuse them. Importing
this package does not import matplotlib.
"""

from __future__ import annotations

from .metrics import Run, Series, load_run, load_runs, read_metrics

__all__ = ["Run", "Series", "load_run", "load_runs", "read_metrics"]
