"""A run's held-out reward accuracy against the base model, for runs whose own rewards are not (ORPO, SFT → DPO).

    python examples/hh_rlhf/score.py runs/hh-rlhf/orpo [--heldout runs/hh-rlhf/heldout.jsonl]

The run's model is evaluated as a DPO policy whose reference is the base model, under the recipes' precision and
length limits, so the numbers are those a one-stage DPO run logs as ``eval_rewards/*`` (beta 0.1): reward accuracy,
margin, and the change of the chosen and rejected replies' summed log-probs. Written to ``RUN/eval_vs_base.json``,
which ``plot.py`` reads. ``prefalign eval --model RUN --pairs HELDOUT`` gives the same view in fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from prefalign import DPOConfig, DPOTrainer, load_preference_dataset
from prefalign.models import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (or any model directory)")
    parser.add_argument("--heldout", default="runs/hh-rlhf/heldout.jsonl", help="the held-out pairs")
    parser.add_argument("--base", default=DEFAULT_MODEL, help="the base model (the reference)")
    parser.add_argument("--beta", type=float, default=0.1, help="the implicit reward's beta")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch,
            bf16=True,
            beta=args.beta,
            max_length=512,
            max_prompt_length=256,
            per_device_eval_batch_size=16,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        )
        held = load_preference_dataset(args.heldout)  # also the train_dataset the trainer asks for: nothing trains
        trainer = DPOTrainer(str(args.run), ref_model=args.base, args=config, train_dataset=held, eval_dataset=held)
        metrics = trainer.evaluate()
    metrics["logps_chosen_change"] = metrics["eval_rewards/chosen"] / args.beta
    metrics["logps_rejected_change"] = metrics["eval_rewards/rejected"] / args.beta
    (args.run / "eval_vs_base.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(
        f"{args.run}: held-out reward accuracy vs base {metrics['eval_rewards/accuracies']:.3f}, margin "
        f"{metrics['eval_rewards/margins']:.3f}, chosen log-prob change {metrics['logps_chosen_change']:+.2f}, "
        f"rejected {metrics['logps_rejected_change']:+.2f}"
    )


if __name__ == "__main__":
    main()
