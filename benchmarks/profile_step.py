"""Where a training step's time goes: torch.profiler over one optimizer step, after two warm-up steps.

    .venv/bin/python benchmarks/profile_step.py [--lib prefalign|trl] [--method dpo|orpo] [--shape long|short]

Same model, synthetic data, batch and settings as bench_vs_trl.py. Prints the step's wall time, the top operators by
self CPU time, and the same time grouped into matmul / attention / LM-head log-softmax / elementwise / optimizer /
other, so a claim about where time goes can be checked by running this.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_trl import SHAPES, make_trainer, synthetic_pairs  # noqa: E402

GROUPS = (  # first match wins; matched against the lower-cased operator name
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("log-softmax / gather", ("logsumexp", "log_softmax", "gather", "aten::exp", "aten::max")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
    ("copies / layout", ("copy_", "contiguous", "aten::cat", "index", "aten::clone", "aten::to", "_to_copy",
                         "aten::fill_", "aten::zero_", "aten::empty", "aten::zeros", "aten::scatter")),
    ("elementwise / norms", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::pow", "aten::rsqrt",
                             "aten::mean", "aten::sum", "aten::neg", "aten::silu", "aten::sigmoid", "aten::where",
                             "aten::embedding", "threshold", "aten::norm", "aten::sqrt", "aten::linalg")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default="prefalign",
                    choices=["prefalign", "trl", "prefalign-nopack", "prefalign-release", "prefalign-gc"])
    ap.add_argument("--method", default="dpo", choices=["dpo", "orpo"])
    ap.add_argument("--shape", default="long", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--by-shape", action="store_true", help="also list the top operators split by input shapes")
    ap.add_argument("--memory", action="store_true",
                    help="instead of profiling, account for peak RSS: process at start, model, optimizer state, step")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from prefalign.models import load_tokenizer

    if args.memory:
        return memory_account(args)
    torch.manual_seed(0)
    rows = synthetic_pairs(load_tokenizer(), 4 * args.batch, *SHAPES[args.shape])
    trainer = make_trainer(args.lib, args.method, rows, steps=4, batch=args.batch)
    state: dict = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if s.global_step == 2:  # steps 0 and 1 warm up (first-touch page faults, optimizer state)
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape)
                state["prof"].__enter__()
                state["t"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            if "prof" in state and "wall" not in state:
                state["wall"] = time.perf_counter() - state["t"]
                state["prof"].__exit__(None, None, None)

    trainer.add_callback(Profile())
    trainer.train()
    events = state["prof"].key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    import trl

    label = f"{args.lib} (TRL {trl.__version__})" if args.lib == "trl" else args.lib
    print(f"{label} {args.method} {args.shape}: step wall {state['wall']:.2f} s, profiled self CPU {total:.2f} s "
          f"(over threads; profiler overhead included)")
    grouped: dict[str, float] = defaultdict(float)
    for e in events:
        grouped[group_of(e.key)] += e.self_cpu_time_total / 1e6
    print("\n| group | self CPU s | share |\n|---|---|---|")
    for g, s in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {s:.2f} | {100 * s / total:.0f}% |")
    print(f"\ntop {args.top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:6d} calls  {e.key}")
    if args.by_shape:
        print(f"\ntop {args.top} operators by self CPU time, split by input shapes:")
        shaped = state["prof"].key_averages(group_by_input_shape=True)
        for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"  {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:6d} calls  {e.key}  {e.input_shapes}")


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024**2


def memory_account(args: argparse.Namespace) -> None:
    """Peak RSS split into what the process holds before training and what a step adds on top of it."""
    import resource

    import torch
    from transformers import TrainerCallback

    from prefalign.models import load_tokenizer

    torch.manual_seed(0)
    rows = synthetic_pairs(load_tokenizer(), 4 * args.batch, *SHAPES[args.shape])
    marks = {"imports + tokenizer": rss_gb()}
    trainer = make_trainer(args.lib, args.method, rows, steps=4, batch=args.batch)
    marks["trainer built (model, data, reference pass)"] = rss_gb()
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 1024**3

    class Marks(TrainerCallback):
        def on_step_end(self, a, s, c, **kw):
            marks[f"after step {s.global_step}"] = rss_gb()

    trainer.add_callback(Marks())
    peak_op: dict[str, tuple[str, float, float]] = {}
    trainer.add_callback(heap_trace(step=3, into=peak_op))
    heap: dict[str, float] = {}
    backward = trainer.accelerator.backward

    def traced_backward(loss, **kw):  # the step's high-water mark is where backward starts (all activations alive)
        system, used = heap_gb()
        if system and system - used > heap.get("free", -1.0):  # nothing recorded where mallinfo2 is unavailable
            heap.update(system=system, used=used, free=system - used)
        return backward(loss, **kw)

    trainer.accelerator.backward = traced_backward
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    import trl

    label = f"{args.lib} (TRL {trl.__version__})" if args.lib == "trl" else args.lib
    print(f"{label} {args.method} {args.shape}: peak RSS {peak:.2f} GB; weights {weights:.2f} GB, their gradients "
          f"{weights:.2f} GB, AdamW state {2 * weights:.2f} GB (fp32)")
    for name, value in marks.items():
        print(f"  RSS {value:5.2f} GB  {name}")
    base = marks["trainer built (model, data, reference pass)"]
    print(f"  peak - (trainer built + gradients + AdamW state) = {peak - base - 3 * weights:.2f} GB: activations, "
          "logits buffers and allocator slack at the step's high-water mark")
    if heap:
        print(f"  malloc heap when backward starts: {heap['system']:.2f} GB held, {heap['used']:.2f} GB in use, "
              f"{heap['free']:.2f} GB free but resident (fragmentation between the step's buffers)")
    if peak_op:
        op, used, held = peak_op["peak"]
        print(f"  malloc heap over step 3, read after every operator: at most {used:.2f} GB in use (after {op}), "
              f"{held:.2f} GB held then")


def heap_trace(step: int, into: dict) -> object:
    """A TrainerCallback that reads the malloc heap after every operator of one step (forward, backward, optimizer)
    and keeps in ``into["peak"]`` the reading with the most bytes in use: (operator, GB in use, GB held)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import TrainerCallback

    class Reader(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            held, used = heap_gb()
            if "peak" not in into or used > into["peak"][1]:
                into["peak"] = (str(func), used, held)
            return out

    class HeapTrace(TrainerCallback):
        def __init__(self) -> None:
            self.reader: Reader | None = None

        def on_step_begin(self, a, s, c, **kw):
            if s.global_step + 1 == step and heap_gb()[0]:
                self.reader = Reader()
                self.reader.__enter__()

        def on_step_end(self, a, s, c, **kw):
            if self.reader is not None:
                self.reader.__exit__(None, None, None)
                self.reader = None

    return HeapTrace()


def heap_gb() -> tuple[float, float]:
    """(bytes the glibc malloc heap holds, bytes in use), from mallinfo2; (0, 0) where that is unavailable."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0.0, 0.0
    fn.restype = MallInfo2
    info = fn()
    return (info.arena + info.hblkhd) / 1024**3, (info.uordblks + info.hblkhd) / 1024**3


if __name__ == "__main__":
    main()
