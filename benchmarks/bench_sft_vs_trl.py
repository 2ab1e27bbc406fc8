"""prefalign's SFTTrainer vs TRL 1.13's, side by side in one run: same model, data, batch, steps, fp32.

    .venv/bin/python benchmarks/bench_sft_vs_trl.py [--steps 4] [--batch 8] [--shape mixed]

Every configuration runs in its own subprocess, so its peak RSS is its own. Data: conversational prompt-completion
rows whose prompt and completion lengths are drawn per row (the "mixed" shape: where padding costs most), loss on the
completion (both libraries' default for prompt-completion data). Configurations, each library with its defaults
and with packing:

- ``trl``: TRL's defaults (padded batches, ``loss_type='chunked_nll'``: its LM head on completion tokens only);
- ``trl-packing``: ``packing=True`` (TRL's best-fit-decreasing packing into ``max_length`` rows, padding-free);
- ``prefalign``: defaults (in-batch packing by attention mask, the speed boundary);
- ``prefalign-nopack``: ``packing=False``, so what packing buys is measured.

Reports seconds per optimizer step (median after two warm-up steps), tokens/s (every token the step ran: prompts and
completions, padding not counted; TRL's packing puts more rows in a step, so tokens/s is the comparable number),
peak RSS, and the per-step losses (the unpacked configurations and prefalign's packed one see the same batches and
must agree; TRL's packing changes which examples form a batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vs_trl import synthetic_conversations  # this directory is on sys.path when run as a script

WARMUP_STEPS = 2
SHAPES = {"mixed": ((16, 256), (8, 256)), "long": ((128, 128), (128, 128)), "short": ((16, 16), (48, 48))}
CONFIGS = ("trl", "trl-packing", "prefalign", "prefalign-nopack")


def synthetic_rows(tok, n: int, prompt_tokens: tuple[int, int], completion_tokens: tuple[int, int],
                   seed: int = 0) -> list[dict]:
    """Conversational prompt-completion rows of about the requested token lengths (drawn per row): the DPO
    benchmark's generator with one reply."""
    return synthetic_conversations(tok, n, prompt_tokens, completion_tokens, ("completion",), seed)


def make_trainer(config: str, rows: list[dict], steps: int, batch: int):
    import datasets

    from prefalign.models import load_model, load_tokenizer

    ds = datasets.Dataset.from_list(rows)
    tok = load_tokenizer()
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=512, max_steps=steps,
                  learning_rate=2e-5, logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
                  bf16=False, gradient_checkpointing=False, disable_tqdm=True)
    model = load_model()
    if config.startswith("trl"):
        import trl

        return trl.SFTTrainer(model, args=trl.SFTConfig(**common, packing=config == "trl-packing"),
                              train_dataset=ds, processing_class=tok)
    import prefalign

    common["cpu_allocator_cache"] = True  # what the prefalign command does (process-wide; the library asks first)
    return prefalign.SFTTrainer(model, args=prefalign.SFTConfig(**common, packing=config == "prefalign"),
                                train_dataset=ds, processing_class=tok)


def _batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a collated batch."""
    if "token_count" in batch:
        return int(batch["token_count"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())  # TRL's padding-free packed rows: every position is a token


def worker(config: str, shape: str, steps: int, batch: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from prefalign.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer()
    total = steps + WARMUP_STEPS
    rows = synthetic_rows(tok, total * batch * (4 if config == "trl-packing" else 1), *SHAPES[shape])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    trainer = make_trainer(config, rows, total, batch)
    setup = time.perf_counter() - t0
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(examples: list) -> dict:  # the batches in the order training sees them
        out = collate(examples)
        tokens.append(_batch_tokens(out))
        return out

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    trainer.train()
    measured = list(zip(times, tokens, strict=False))[WARMUP_STEPS:]
    return {"config": config, "shape": shape, "s_per_step": statistics.median(t for t, _ in measured),
            "tokens_per_s": sum(n for _, n in measured) / sum(t for t, _ in measured),
            "tokens_per_step": statistics.mean(n for _, n in measured),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r], "setup_s": setup,
            "step_times": times}


def render(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    base = by.get("trl")
    lines = ["| config | s/step | tokens/step | tokens/s | vs TRL tokens/s | peak RSS GB | vs TRL RSS | losses |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        rss = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else "-"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][WARMUP_STEPS:])
        lines.append(f"| {r['config']} | {r['s_per_step']:.2f} | {r['tokens_per_step']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {speed} | {r['peak_rss_gb']:.2f} | {rss} | {losses} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help=f"measured steps (after {WARMUP_STEPS} warm-up steps)")
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--shape", default="mixed", choices=list(SHAPES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="benchmarks/results_sft.json")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.batch)))
        return
    rows = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", config, args.shape, "--steps", str(args.steps), "--batch",
               str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{config}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{config}: {rows[-1]['s_per_step']:.2f} s/step, {rows[-1]['tokens_per_s']:.0f} tokens/s, "
              f"{rows[-1]['peak_rss_gb']:.2f} GB", file=sys.stderr)
    import trl  # the baseline's version labels every output

    table = render(rows)
    print(f"baseline: TRL {trl.__version__}")
    print(table)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "shape": args.shape,
                                          "batch": args.batch, "steps": args.steps, "trl_version": trl.__version__,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
