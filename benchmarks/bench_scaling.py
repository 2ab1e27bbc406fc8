"""Scaling on this machine: 1 process vs 2 processes under DDP and FSDP2 (CPU, gloo), the embedded 135M model.

    .venv/bin/python benchmarks/bench_scaling.py [--method orpo] [--steps 6] [--batch 2] [--out results_scaling.json]

Configurations, each in its own process group so its peak RSS is its own:

- ``1 process``: per-device batch 2b, ``OMP_NUM_THREADS`` = all cores (the whole machine, one process);
- ``1 process 1 thread``: the same on one thread (the 2-process runs' share of the machine per process);
- ``DDP x2``: ``torchrun --nproc_per_node 2``, per-device batch b, one thread each (same global batch);
- ``FSDP2 x2``: the same with the Trainer's ``fsdp`` arguments (FSDP2, full state dict, reshard after forward).

Reports pairs/s (global batch over the median step time after two warm-up steps), CPU seconds per step (all
processes and threads: the cost, which other load on a shared machine changes less than the wall time), peak RSS
per process, the 1-minute load average at the end, and the largest per-step loss difference from the first run
(the same global batches: it must be ~0). The speed path
is on in every configuration (prefalign's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP_STEPS = 2
CONFIGS = ("1 process", "1 process 1 thread", "DDP x2", "FSDP2 x2")


def _rows(n: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from bench_vs_trl import synthetic_conversations

    from prefalign.models import load_tokenizer

    return synthetic_conversations(load_tokenizer(), n, (48, 96), (16, 48), ("chosen", "rejected"), seed=0)


def worker(config: str, method: str, steps: int, batch: int, out: str) -> None:
    """One process of a configuration: train, time each optimizer step, write this rank's numbers."""
    import datasets
    from transformers import TrainerCallback

    from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer
    from prefalign.models import load_model, load_tokenizer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self._start = self._cpu = 0.0

        def on_step_begin(self, *a, **k) -> None:
            self._start, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu)  # this process's CPU seconds, all threads

    extra = {}
    if config.startswith("FSDP2"):
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                               "reshard_after_forward": True, "cpu_ram_efficient_loading": False}}
    config_class, trainer_class = (ORPOConfig, ORPOTrainer) if method == "orpo" else (DPOConfig, DPOTrainer)
    args = config_class(**extra, output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                        learning_rate=1e-5, max_length=256, logging_steps=1, report_to=[], save_strategy="no",
                        seed=0, use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    timer = Timer()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = trainer_class(load_model(), args=args, processing_class=load_tokenizer(),
                            train_dataset=datasets.Dataset.from_list(_rows(batch * world * steps)), callbacks=[timer])
    trainer.train()
    record = {"times": timer.times, "cpu": timer.cpu,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
              "fsdp": trainer.is_fsdp_enabled, "world": trainer.accelerator.num_processes}
    Path(out, f"rank-{trainer.args.process_index}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, method: str, steps: int, batch: int) -> dict:
    out = tempfile.mkdtemp()
    cores = os.cpu_count() or 1
    processes = 1 if config.startswith("1 process") else 2
    threads = 1 if config.endswith("1 thread") else max(1, cores // processes)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    me = [str(Path(__file__).resolve()), "--worker", config, "--method", method, "--steps", str(steps),
          "--batch", str(batch * (2 if processes == 1 else 1)), "--out-dir", out]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *me]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    step = statistics.median(ranks[0]["times"][WARMUP_STEPS:])
    cpu = statistics.median([sum(r["cpu"][i] for r in ranks) for i in range(WARMUP_STEPS, len(ranks[0]["cpu"]))])
    return {"config": config, "processes": processes, "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "global_batch": batch * 2, "step_s": step, "pairs_per_s": batch * 2 / step, "cpu_s_per_step": cpu,
            "load_avg": os.getloadavg()[0],
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks], "losses": ranks[0]["losses"],
            "fsdp": ranks[0]["fsdp"], "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["orpo", "dpo"], default="orpo")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="per-device batch of the 2-process runs (1 process: twice)")
    p.add_argument("--out", default=str(HERE / "results_scaling.json"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=1, help="run the configurations this many times, interleaved")
    p.add_argument("--worker")
    p.add_argument("--out-dir")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.method, a.steps, a.batch, a.out_dir)
    results = [run(c, a.method, a.steps, a.batch) for _ in range(a.repeats) for c in a.configs.split(",")]
    base = results[0]["losses"]
    print(f"{'config':<20} {'procs':>5} {'step s':>7} {'pairs/s':>8} {'CPU s/step':>10} {'peak RSS/proc MB':>18} "
          f"{'max |dloss|':>12} {'load':>5}")
    for r in results:
        r["max_loss_diff"] = max(abs(x - y) for x, y in zip(r["losses"], base, strict=True))
        rss = "/".join(f"{m:.0f}" for m in r["peak_rss_mb"])
        print(f"{r['config']:<20} {r['processes']:>5} {r['step_s']:>7.2f} {r['pairs_per_s']:>8.2f} "
              f"{r['cpu_s_per_step']:>10.2f} {rss:>18} {r['max_loss_diff']:>12.2e} {r['load_avg']:>5.1f}")
    Path(a.out).write_text(json.dumps({"method": a.method, "steps": a.steps, "cpu_count": os.cpu_count(),
                                       "results": results}, indent=1))


if __name__ == "__main__":
    main()
