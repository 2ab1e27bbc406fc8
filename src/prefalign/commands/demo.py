"""``prefalign demo``: base model vs DPO vs ORPO on the bundled task."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Run the bundled demo (`prefalign.demo.run`); the only command that imports the demo package."""
    from ..demo.run import DemoSettings, run_demo
    from ..models import DEFAULT_MODEL

    run_demo(DemoSettings(model=args.model or DEFAULT_MODEL, output_dir=args.output_dir, seed=args.seed))
    return 0
