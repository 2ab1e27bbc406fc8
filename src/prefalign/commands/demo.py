"""``prefalign demo``: base model vs DPO vs ORPO on the bundled task."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Run the bundled demo (`prefalign.demo.run`); the only command that imports the demo package."""
    import torch

    from ..demo.run import DemoSettings, run_demo
    from ..models import DEFAULT_MODEL
    from ..speed import retain_freed_memory

    if not torch.cuda.is_available():  # the demo trains twice, evaluating in between: one policy for the process
        retain_freed_memory()

    run_demo(DemoSettings(model=args.model or DEFAULT_MODEL, output_dir=args.output_dir, seed=args.seed))
    return 0
