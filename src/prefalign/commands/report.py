"""``prefalign report RUN_DIR``: write the run's ``report.html`` and ``plots/*.png`` and print the page's path."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Bad input (no run directory, missing or corrupt metrics.jsonl) raises a one-line error and writes nothing."""
    from ..report.write import write_report

    print(write_report(args.run_dir))
    return 0
