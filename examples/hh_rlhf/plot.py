"""Held-out reward accuracy against training time, and one table row per run, from run directories' metrics.jsonl.

    python examples/hh_rlhf/plot.py runs/hh-rlhf/dpo runs/hh-rlhf/orpo --out docs/images/hh-rlhf-accuracy.png

Each run's evaluations (``eval_rewards/accuracies``, logged every ``eval_steps`` and once at the end) are placed at
the training time they were taken: the run's ``train_runtime`` less the time its evaluations took, shared out over
the steps (a step's time is about constant; runs on a loaded CPU vary). A DPO run's rewards are measured against its
reference, the base model for a one-stage run, so its accuracy is the held-out reward accuracy against the base and
``eval_rewards/chosen / beta`` the change of the chosen replies' summed log-prob; ORPO's own rewards are the policy's
mean log-probs (TRL's definition), so for ORPO (and SFT → DPO, whose reference is the SFT model) those columns come
from ``score.py`` (``eval_vs_base.json``) when the run directory has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's settings, its evaluations with their training time, and its final numbers."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    final = next((r for r in reversed(records) if "train_runtime" in r), {})
    steps = int(final.get("step") or max((r["step"] for r in records), default=0))
    end = next((i for i, r in enumerate(records) if "train_runtime" in r), len(records))
    eval_time = sum(r.get("eval_runtime", 0.0) for r in records[:end])  # evaluations inside train_runtime
    train_s = max(0.0, float(final.get("train_runtime", 0.0)) - eval_time)
    curve = [(r["step"] / max(steps, 1) * train_s / 60, r["eval_rewards/accuracies"]) for r in evals]
    run = {
        "name": run_dir.name,
        "config": config,
        "steps": steps,
        "train_s": train_s,
        "curve": curve,
        "final": evals[-1] if evals else {},
    }
    beta = config.get("beta")
    if config.get("method", "dpo") == "dpo" and evals and beta:
        run["accuracy"] = evals[-1]["eval_rewards/accuracies"]
        run["margin"] = evals[-1]["eval_rewards/margins"]
        run["d_chosen"] = evals[-1]["eval_rewards/chosen"] / float(beta)
        run["d_rejected"] = evals[-1]["eval_rewards/rejected"] / float(beta)
        best = max(evals, key=lambda r: r["eval_rewards/accuracies"])
        run["best"] = (best["eval_rewards/accuracies"], best["step"], best["eval_rewards/chosen"] / float(beta))
    scored = run_dir / "eval_vs_base.json"
    if scored.is_file():  # score.py: against the base model, for any method
        numbers = json.loads(scored.read_text())
        run["accuracy"] = numbers["eval_rewards/accuracies"]
        run["margin"] = numbers["eval_rewards/margins"]
        run["d_chosen"] = numbers["logps_chosen_change"]
        run["d_rejected"] = numbers["logps_rejected_change"]
        run.pop("best", None)
        run["curve"] = [(train_s / 60, run["accuracy"])]  # its own eval_rewards are not against the base
    return run


def settings(config: dict[str, Any]) -> str:
    """The options that differ between the exploration's runs, as a table cell."""
    keys = (
        "method",
        "learning_rate",
        "beta",
        "orpo_alpha",
        "loss_type",
        "loss_weights",
        "per_device_train_batch_size",
        "max_length",
        "use_peft",
        "bf16",
        "num_train_epochs",
    )
    shown = {k: config.get(k) for k in keys if config.get(k) not in (None, False)}
    if shown.get("method") != "orpo":
        shown.pop("orpo_alpha", None)
    else:
        shown.pop("beta", None)
    return ", ".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shown.items())


def table_row(run: dict[str, Any]) -> str:
    """``| run | settings | steps | train min | accuracy | margin | Δ logp chosen / rejected | best on the curve |``.

    The best evaluation on the curve is shown beside the final one, not instead of it: it is picked on the same
    held-out pairs it is measured on."""

    def num(key: str, fmt: str) -> str:
        return format(run[key], fmt) if run.get(key) is not None else "—"

    best = "—"
    if run.get("best"):
        accuracy, step, chosen = run["best"]
        best = f"{accuracy:.3f} at step {step} ({chosen:+.1f})"

    return (
        f"| {run['name']} | {settings(run['config'])} | {run['steps']} | {run['train_s'] / 60:.1f} | "
        f"{num('accuracy', '.3f')} | {num('margin', '.3f')} | {num('d_chosen', '+.1f')} / "
        f"{num('d_rejected', '+.1f')} | {best} |"
    )


def plot(runs: list[dict[str, Any]], out: Path, target: float, machine: str = "") -> None:
    """Accuracy against training minutes, one line per run, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for run in runs:
        if run["curve"]:
            xs, ys = zip(*run["curve"], strict=True)
            ax.plot(xs, ys, marker="o", label=run["name"])
    ax.axhline(target, linestyle="--", color="grey", label=f"target {target}")
    ax.axhline(0.5, linestyle=":", color="lightgrey")
    ax.set_xlabel(f"training time (minutes{', ' + machine if machine else ''}, evaluations excluded)")
    ax.set_ylabel("held-out reward accuracy vs base")
    ax.set_title("HH-RLHF harmless-base: 200 held-out pairs, prompts never trained on")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl, config.yaml)")
    parser.add_argument("--out", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--target", type=float, default=0.65, help="the accuracy drawn as the target line")
    parser.add_argument("--machine", default="", help="where the runs were timed, for the axis label")
    args = parser.parse_args()
    runs = [read_run(r) for r in args.runs if (r / "metrics.jsonl").is_file()]
    print("| run | settings | steps | train min | held-out acc | margin | Δ logp chosen / rejected | best on the curve "
          "(Δ logp chosen) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(table_row(run))
    if args.out:
        plot(runs, args.out, args.target, args.machine)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
