"""``prefalign compare CONFIG.yaml``: train a grid of methods and options and write one report (`prefalign.compare`)."""

from __future__ import annotations

import argparse

from . import PROG, print_error


def run(args: argparse.Namespace) -> int:
    """Check the whole grid first (one-line errors, nothing written), then train, score and report; exit code 1 if
    any run failed (the report has its failure row), else 0."""
    from ..compare.grid import load_spec
    from ..compare.run import run_compare
    from ..errors import ConfigError

    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other. Fix: pass one of them.")
    spec = load_spec(args.config, args.set_pairs, overwrite=args.overwrite)
    try:
        outcome = run_compare(spec, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print_error(f"interrupted; finished runs are kept in {spec.output_dir}. Continue with: {PROG} compare "
                    f"{args.config} --resume")
        return 130
    print((spec.output_dir / "report.md").read_text(encoding="utf-8"))
    print(f"{PROG}: compare report: {outcome.report}")
    if outcome.failed:
        print(f"{PROG}: {outcome.failed} of {len(spec.runs)} runs failed (see the failure rows); continue with: "
              f"{PROG} compare {args.config} --resume")
        return 1
    return 0
