"""prefalign vs TRL (the installed version, named in every printed and saved baseline), side by side in one run:
same model, data, batch, steps; fp32, or with ``--bf16`` both under bf16 autocast over float32 weights
(TrainingArguments bf16=True, as TRL's recipes train on a GPU).

    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 4] [--shapes long,short,mixed] [--methods dpo,orpo,cpo,kto]
                                               [--bf16]

Every (shape, method, library) runs in its own subprocess, so peak RSS is that configuration's alone. Reports
seconds per optimizer step (median over the measured steps, after two warm-up steps: the first steps of any CPU
run page-fault their buffers in and create the optimizer state), pairs/s, pair tokens/s (prompt
+ chosen + rejected tokens, the same count for both libraries), peak RSS, the per-step training losses of both (they
must agree: same math), and achieved FLOP/s of the minimal work against this machine's measured matmul ceiling
(fp32, or bf16 with ``--bf16``). prefalign's DPO precomputes reference log-probs once before training (cached for
later runs); that pass is in the reported set-up time, not in s/step, so for one epoch over the data the fair
comparison is the set-up column too.
ORPO runs with `trl_compat=True` so both libraries optimise the same loss (TRL's NLL covers the prompt).
KTO trains on the same pairs, each split into a desirable and an undesirable row by both libraries (``--batch`` rows
per step; its "pairs/s" are rows/s, its pair tokens prompt + completion + KL completion), both in TRL's sequential
order so the losses compare (prefalign's default order is random).
The "mixed" shape (prompt and reply lengths drawn per pair) adds a prefalign run with `packing=False`, so what
packing buys is measured, not asserted. `--lora` adds, per shape and method, both libraries with the same LoRA
adapter (`LORA` below; DPO's reference is then the adapter-disabled base in both), so a LoRA run's peak RSS is
measured next to the full fine-tune's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (prompt tokens, answer tokens), each a (low, high) range drawn per pair; "mixed" is where packing matters
WARMUP_STEPS = 2
SHAPES = {"long": ((128, 128), (66, 66)), "short": ((16, 16), (66, 66)), "mixed": ((40, 256), (8, 128))}
# The adapter both libraries train under --lora: TRL's ModelConfig defaults (r 16, alpha 32) on every linear layer,
# without dropout so the two runs' losses stay comparable step by step.
LORA = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules="all-linear")
WORDS = ("the river model data light paper green window stone music number table garden yellow quiet "
         "travel winter simple bright market letter answer reason summer silver forest ocean").split()


def synthetic_conversations(tok, n: int, prompt_tokens: tuple[int, int], reply_tokens: tuple[int, int],
                            replies: tuple[str, ...], seed: int = 0) -> list[dict]:
    """Conversational rows: a user prompt and one assistant reply per name in ``replies``, each about the requested
    token length (drawn per row and per reply from the given inclusive ranges)."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    # The chat template adds ~30 tokens of system prompt and markers: subtract them from the user text.
    overhead = len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
    rows = []
    for _ in range(n):
        row = {"prompt": [{"role": "user", "content": text(max(1, rng.randint(*prompt_tokens) - overhead))}]}
        for name in replies:
            row[name] = [{"role": "assistant", "content": text(max(1, rng.randint(*reply_tokens) - 2))}]
        rows.append(row)
    return rows


def synthetic_pairs(tok, n: int, prompt_tokens: tuple[int, int], answer_tokens: tuple[int, int],
                    seed: int = 0) -> list[dict]:
    """Conversational pairs (prompt, chosen, rejected) of about the requested token lengths."""
    return synthetic_conversations(tok, n, prompt_tokens, answer_tokens, ("chosen", "rejected"), seed)


def matmul_ceiling(bf16: bool = False) -> float:
    """FLOP/s of a large square matmul on this machine (best of a few), in fp32 or bf16."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    n = 1024 if bf16 else 2048  # a CPU without bf16 instructions multiplies bf16 far slower: keep this short
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def make_trainer(lib: str, method: str, rows: list[dict], steps: int, batch: int, bf16: bool = False):
    """The trainer both the benchmark and the profiler run: CPU, fp32 (or bf16 autocast over fp32 weights), each
    library's default reference."""
    import datasets

    from prefalign.models import load_model, load_tokenizer

    ds = datasets.Dataset.from_list(rows)
    tok = load_tokenizer()
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=512, max_steps=steps,
                  learning_rate=1e-6, logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
                  bf16=bf16, gradient_checkpointing=False, disable_tqdm=True)
    model = load_model()
    peft = {}
    if lib.endswith("-lora"):
        from peft import LoraConfig

        lib, peft = lib.removesuffix("-lora"), {"peft_config": LoraConfig(**LORA)}
    if lib == "trl":
        import trl
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        if method == "dpo":
            # No ref_model: each library's default (TRL loads a second copy from the model's path; with LoRA both
            # use the adapter-disabled base).
            return trl.DPOTrainer(model, args=trl.DPOConfig(**common), train_dataset=ds, processing_class=tok, **peft)
        if method == "cpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOTrainer(model, args=CPOConfig(**common), train_dataset=ds, processing_class=tok, **peft)
        if method == "kto":  # no ref_model: TRL loads a second copy, prefalign precomputes with the policy
            return trl.KTOTrainer(model, args=trl.KTOConfig(**common), train_dataset=ds, processing_class=tok, **peft)
        return ORPOTrainer(model, args=ORPOConfig(**common), train_dataset=ds, processing_class=tok, **peft)
    import prefalign

    common["cpu_allocator_cache"] = True  # what the prefalign command does (process-wide; the library asks first)
    if lib == "prefalign-nopack":
        common["packing"] = False
    if lib in ("prefalign-release", "prefalign-gc"):  # free heap pages go back to the kernel after every layer
        common["release_cpu_memory_every"] = 1
    if lib == "prefalign-gc":  # memory mode: also activations recomputed in backward, LM head in small chunks
        common.update(gradient_checkpointing=True, logprob_chunk_rows=256)
    if method == "dpo":
        return prefalign.DPOTrainer(model, args=prefalign.DPOConfig(**common), train_dataset=ds, processing_class=tok,
                                    **peft)
    if method == "cpo":  # CPO's sigmoid loss + NLL of the chosen replies, TRL's tokens (trl_compat)
        return prefalign.CPOTrainer(model, args=prefalign.CPOConfig(**common, trl_compat=True), train_dataset=ds,
                                    processing_class=tok, **peft)
    if method == "kto":  # TRL's batch order, so the logged losses compare
        return prefalign.KTOTrainer(model, args=prefalign.KTOConfig(**common, train_sampling_strategy="sequential"),
                                    train_dataset=ds, processing_class=tok, **peft)
    return prefalign.ORPOTrainer(model, args=prefalign.ORPOConfig(**common, trl_compat=True), train_dataset=ds,
                                 processing_class=tok, **peft)


def worker(lib: str, method: str, shape: str, steps: int, batch: int, bf16: bool = False) -> dict:
    import torch
    import trl
    from transformers import TrainerCallback

    from prefalign.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer()
    p_len, a_len = SHAPES[shape]
    total_steps = steps + WARMUP_STEPS
    rows = synthetic_pairs(tok, total_steps * batch, p_len, a_len)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    trainer = make_trainer(lib, method, rows, total_steps, batch, bf16)
    setup = time.perf_counter() - t0
    trainer.add_callback(Clock())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    measured = times[WARMUP_STEPS:]
    s_step = statistics.median(measured)
    tokenized = _tokenized(trainer)
    prompt_tokens = sum(len(e["prompt_ids"]) for e in tokenized) / len(rows)
    reply_tokens = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in tokenized) / (2 * len(rows))
    pair_tokens = prompt_tokens + 2 * reply_tokens
    return {"lib": lib, "trl_version": trl.__version__, "precision": "bf16 autocast" if bf16 else "fp32",
            "mixed_precision": trainer.accelerator.mixed_precision,
            "method": method, "shape": shape, "s_per_step": s_step, "pairs_per_s": batch / s_step,
            "pair_tokens_per_s": batch * pair_tokens / s_step, "pair_tokens": pair_tokens,
            "prompt_tokens": prompt_tokens, "reply_tokens": reply_tokens,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "losses": losses,
            "setup_s": setup, "step_times": times,
            "n_params": sum(p.numel() for p in trainer.model.parameters())}


def _tokenized(trainer) -> list[dict]:
    ds = trainer.train_dataset
    if "KL_completion_ids" in ds.column_names:  # TRL's KTO rows: the completion and the KL completion
        rows = ds.select_columns(["prompt_ids", "completion_ids", "KL_completion_ids"]).to_list()
        return [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"],
                 "rejected_ids": r["KL_completion_ids"]} for r in rows]
    if "prompt_ids" in ds.column_names:
        return ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    # TRL's ORPO and CPO datasets: prompt_input_ids + chosen/rejected labels (prompt included there)
    out = []
    for r in ds:
        p = len(r["prompt_input_ids"])
        out.append({"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"][p:],
                    "rejected_ids": r["rejected_input_ids"][p:]})
    return out


def minimal_flops(method: str, n_params: int, prompt: float, reply: float, vocab: int, hidden: int) -> float:
    """FLOPs per pair of the least work the method needs: prompt once, both replies, LM head on reply tokens."""
    body = n_params - vocab * hidden  # tied LM head counted separately
    tokens = prompt + 2 * reply
    train = 6 * body * tokens + 6 * vocab * hidden * 2 * reply
    ref = 2 * body * tokens + 2 * vocab * hidden * 2 * reply if method in ("dpo", "kto") else 0
    return train + ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help=f"measured steps (after {WARMUP_STEPS} warm-up steps)")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--shapes", default="long,short,mixed")
    ap.add_argument("--methods", default="dpo,orpo")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results.json, with --bf16 "
                                                   "benchmarks/results_bf16.json)")
    ap.add_argument("--bf16", action="store_true",
                    help="both libraries train under bf16 autocast over float32 weights (TrainingArguments bf16=True)")
    ap.add_argument("--memory-mode", action="store_true",
                    help="also run prefalign with release_cpu_memory_every=1, and in memory mode (that plus "
                         "gradient_checkpointing and logprob_chunk_rows=256): peak RSS vs speed")
    ap.add_argument("--lora", action="store_true",
                    help="also run both libraries with the same LoRA adapter (LORA): peak RSS next to the full "
                         "fine-tune's")
    ap.add_argument("--vs-fp32", action="store_true",
                    help="with --bf16: also run both libraries in fp32 in the same run, interleaved, and print each "
                         "library's bf16 speed-up over its own fp32 and how far its bf16 losses are from its fp32 ones")
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "METHOD", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        lib, method, shape = args.worker
        fp32 = lib.endswith("-fp32")  # a --vs-fp32 companion run: the same library without autocast
        result = worker(lib.removesuffix("-fp32"), method, shape, steps=args.steps, batch=args.batch,
                        bf16=args.bf16 and not fp32)
        print("RESULT " + json.dumps({**result, "lib": lib}), flush=True)
        return
    import trl

    baseline = f"TRL {trl.__version__}"
    precision = "bf16" if args.bf16 else "fp32"
    out = args.out or ("benchmarks/results_bf16.json" if args.bf16 else "benchmarks/results.json")
    ceiling = matmul_ceiling(args.bf16)
    print(f"baseline {baseline}, {precision}; {precision} matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s",
          file=sys.stderr)
    results = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            extra = (("prefalign-nopack",) if shape == "mixed" else ()) + (
                ("prefalign-release", "prefalign-gc") if args.memory_mode else ()) + (
                ("trl-lora", "prefalign-lora") if args.lora else ()) + (
                ("trl-fp32", "prefalign-fp32") if args.vs_fp32 and args.bf16 else ())
            for lib in ("trl", "prefalign") + extra:
                print(f"running {lib} {method} {shape} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--worker", lib, method, shape, "--steps",
                                       str(args.steps), "--batch", str(args.batch)] + (["--bf16"] if args.bf16 else []),
                                      capture_output=True, text=True,
                                      env={**os.environ, "TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{lib} {method} {shape} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[len("RESULT "):]))
    from prefalign.models import load_model

    cfg = load_model().config
    rows = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            t, p = (next(r for r in results if r["lib"] == lib and r["method"] == method and r["shape"] == shape)
                    for lib in ("trl", "prefalign"))
            nopack, release, gc, trl_lora, lora, trl_fp32, fp32 = (
                next((r for r in results if r["lib"] == lib and r["method"] == method and r["shape"] == shape), None)
                for lib in ("prefalign-nopack", "prefalign-release", "prefalign-gc", "trl-lora", "prefalign-lora",
                            "trl-fp32", "prefalign-fp32"))
            flops = minimal_flops(method, p["n_params"], p["prompt_tokens"], p["reply_tokens"], cfg.vocab_size,
                                  cfg.hidden_size)
            n = min(len(t["losses"]), len(p["losses"]))
            rows.append({
                "shape": shape, "method": method, "trl": t, "prefalign": p, "prefalign_nopack": nopack,
                "prefalign_release": release, "prefalign_gc": gc, "trl_lora": trl_lora, "prefalign_lora": lora,
                "trl_fp32": trl_fp32, "prefalign_fp32": fp32,
                "speedup_pairs_per_s": p["pairs_per_s"] / t["pairs_per_s"],
                "rss_ratio": p["peak_rss_gb"] / t["peak_rss_gb"],
                "max_abs_loss_diff": max(abs(a - b) for a, b in zip(t["losses"][:n], p["losses"][:n], strict=True)),
                "trl_flops_fraction": flops * t["pairs_per_s"] / ceiling,
                "prefalign_flops_fraction": flops * p["pairs_per_s"] / ceiling})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"baseline": baseline, "trl_version": trl.__version__, "precision": precision,
                                     "ceiling_flops": ceiling, "rows": rows, "date": time.strftime("%Y-%m-%d"),
                                     "steps": args.steps, "batch": args.batch}, indent=2) + "\n")
    print(render(rows, ceiling, baseline, precision))


def render(rows: list[dict], ceiling: float, baseline: str = "TRL", precision: str = "fp32") -> str:
    """The results as Markdown; every TRL figure is labelled with ``baseline`` (e.g. "TRL 1.13.0")."""
    T = baseline
    lines = [f"prefalign vs {T}, {precision}; {precision} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s", "",
             f"| shape | method | {T} s/step | prefalign s/step | {T} pairs/s | prefalign pairs/s | speed-up | "
             f"{T} tokens/s | prefalign tokens/s | {T} peak RSS | prefalign peak RSS | RSS ratio | max \\|Δ loss\\| | "
             f"% of ceiling ({T} / prefalign) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, p = r["trl"], r["prefalign"]
        lines.append(f"| {r['shape']} | {r['method'].upper()} | {t['s_per_step']:.2f} | {p['s_per_step']:.2f} | "
                     f"{t['pairs_per_s']:.3f} | {p['pairs_per_s']:.3f} | {r['speedup_pairs_per_s']:.2f}× | "
                     f"{t['pair_tokens_per_s']:.0f} | {p['pair_tokens_per_s']:.0f} | "
                     f"{t['peak_rss_gb']:.2f} GB | {p['peak_rss_gb']:.2f} GB | {r['rss_ratio']:.2f} | "
                     f"{r['max_abs_loss_diff']:.1e} | {100 * r['trl_flops_fraction']:.0f}% / "
                     f"{100 * r['prefalign_flops_fraction']:.0f}% |")
    for r in rows:
        if r.get("prefalign_nopack"):
            n, p = r["prefalign_nopack"], r["prefalign"]
            lines.append(f"\npacking, {r['shape']} {r['method'].upper()}: {n['s_per_step']:.2f} s/step without, "
                         f"{p['s_per_step']:.2f} s/step with ({n['s_per_step'] / p['s_per_step']:.2f}×)")
    for key, label in (("prefalign_release", "release_cpu_memory_every=1"),
                       ("prefalign_gc", "memory mode (release_cpu_memory_every=1, gradient_checkpointing, "
                                        "logprob_chunk_rows=256)")):
        for r in rows:
            if r.get(key):
                g, t = r[key], r["trl"]
                diff = max(abs(a - b) for a, b in zip(t["losses"], g["losses"], strict=False))
                lines.append(f"\n{label}, {r['shape']} {r['method'].upper()}: {g['s_per_step']:.2f} s/step "
                             f"({t['s_per_step'] / g['s_per_step']:.2f}× {T}), peak RSS {g['peak_rss_gb']:.2f} GB "
                             f"({g['peak_rss_gb'] / t['peak_rss_gb']:.2f}× {T}), max |Δ loss| vs {T} {diff:.1e}")
    for r in rows:
        if r.get("prefalign_lora") and r.get("trl_lora"):
            tl, pl, t, p = r["trl_lora"], r["prefalign_lora"], r["trl"], r["prefalign"]
            n = min(len(tl["losses"]), len(pl["losses"]))
            diff = max(abs(a - b) for a, b in zip(tl["losses"][:n], pl["losses"][:n], strict=True))
            lines.append(f"\nLoRA (r {LORA['r']}, all-linear), {r['shape']} {r['method'].upper()}: {T} "
                         f"{tl['s_per_step']:.2f} s/step, {tl['peak_rss_gb']:.2f} GB (full fine-tune "
                         f"{t['peak_rss_gb']:.2f} GB); prefalign {pl['s_per_step']:.2f} s/step, "
                         f"{pl['peak_rss_gb']:.2f} GB (full fine-tune {p['peak_rss_gb']:.2f} GB); speed-up "
                         f"{tl['s_per_step'] / pl['s_per_step']:.2f}×, RSS ratio "
                         f"{pl['peak_rss_gb'] / tl['peak_rss_gb']:.2f}, max |Δ loss| {diff:.1e}")
    for r in rows:
        if r.get("prefalign_fp32") and r.get("trl_fp32"):
            lines.append(f"\nbf16 vs fp32, {r['shape']} {r['method'].upper()}: "
                         + "; ".join(_vs_fp32(name, r[key], r[f"{key}_fp32"])
                                     for name, key in ((T, "trl"), ("prefalign", "prefalign")))
                         + f"; prefalign bf16 vs {T} fp32 "
                           f"{r['trl_fp32']['s_per_step'] / r['prefalign']['s_per_step']:.2f}×")
    return "\n".join(lines)


def _vs_fp32(name: str, bf16: dict, fp32: dict) -> str:
    """One library's bf16 run against its own fp32 run: speed-up and the largest per-step loss difference."""
    n = min(len(bf16["losses"]), len(fp32["losses"]))
    diff = max(abs(a - b) for a, b in zip(bf16["losses"][:n], fp32["losses"][:n], strict=True))
    first = abs(bf16["losses"][0] - fp32["losses"][0])
    return (f"{name} {fp32['s_per_step']:.2f} -> {bf16['s_per_step']:.2f} s/step "
            f"({fp32['s_per_step'] / bf16['s_per_step']:.2f}×), |Δ loss| step 1 {first:.1e}, max {diff:.1e}")


if __name__ == "__main__":
    main()
