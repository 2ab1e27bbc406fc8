"""How the speed path's custom autograd functions behave under autocast (mixed precision), declared in one place.

A custom ``torch.autograd.Function`` sees autocast in its forward (ops inside are autocast as usual) but not
reliably in its backward, which may run where autocast is off: a bf16 gradient then meets a float32 weight and the
matmul fails (``expected m1 and m2 to have the same dtype``). ``torch.amp.custom_fwd`` fixes that only for one
device type named when the class is written; prefalign runs the same functions on CPU and CUDA. So the rule here is
explicit casting, device-agnostic:

- the caller, where autocast is visible, asks ``matmul_dtype`` for the dtype autocast would run the function's
  matmuls in (autocast's own dtype for the tensors' device when it is on there; else the operands' promoted dtype)
  and passes it to the function;
- the function's forward and backward run with autocast off (``outside_autocast``) and cast their matmul operands
  to that dtype themselves: the values are those autocast would give, gradients come back in each input's own dtype
  (a float32 weight gets a float32 gradient), and nothing depends on whether autocast is on when backward runs.

Reductions that make log-probs (logsumexp, sums over tokens) stay in float32 whatever the matmul dtype, as TRL's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device`` right now, or None when autocast is off there."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def matmul_dtype(x: Tensor, *weights: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` with ``weights`` runs in: autocast's on x's device when it is on, else the
    operands' promoted dtype (what ``F.linear`` would need them cast to)."""
    amp = autocast_dtype(x.device)
    if amp is not None and x.is_floating_point():
        return amp
    dtype = x.dtype
    for w in weights:
        dtype = torch.promote_types(dtype, w.dtype)
    return dtype


def outside_autocast(fn: F) -> F:
    """Run a custom Function's ``forward(ctx, ...)`` or ``backward(ctx, ...)`` with autocast off on the device of its
    first tensor argument: its operands are cast by the function itself (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any) -> Any:
        t = next((a for a in args if isinstance(a, Tensor)), None)
        if t is None or autocast_dtype(t.device) is None:
            return fn(ctx, *args)
        with torch.autocast(t.device.type, enabled=False):
            return fn(ctx, *args)

    return wrapper  # type: ignore[return-value]


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's attention runs in now: autocast's on its device when on, else its own (mask dtype)."""
    param = next(iter(model.parameters()), None)
    amp = autocast_dtype(param.device) if param is not None else None
    return amp if amp is not None else getattr(model, "dtype", torch.float32)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so ``bf16: true`` can be faster here."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_bf16_hint() -> str | None:
    """For a float32 run on a CPU that multiplies bf16 in hardware: that ``bf16: true`` would be faster, or None.

    A hint, not a default: bf16 autocast rounds every weight to 8 bits of mantissa at each use, so at DPO's small
    learning rates the logged losses move by bf16's rounding, not only by training (docs/benchmarks.md, "Mixed
    precision"); float32 stays the default so a run's numbers do not depend on the machine it ran on."""
    if not cpu_has_bf16_matmul():
        return None
    return ("this CPU multiplies bf16 in hardware (AVX512-BF16 / AMX): bf16: true (autocast over float32 weights) "
            "trains faster here, at bf16's rounding (see docs/benchmarks.md, Mixed precision); prefalign keeps "
            "float32 unless asked")


def cpu_bf16_note() -> str | None:
    """Why bf16 would be slow on this CPU, or None when it has bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them PyTorch emulates bf16 matmuls: measured on a 2-core AVX2 AMD EPYC (2026-12-04), a 1024x1024 bf16
    matmul took 2.88 s against 0.041 s in float32, 70x slower, so ``bf16: true`` there trades speed for nothing."""
    if cpu_has_bf16_matmul():
        return None
    return (f"this CPU has no bf16 matrix instructions (capability {torch.backends.cpu.get_cpu_capability()}, no "
            "AVX512-BF16 or AMX), so bf16 matmuls are emulated and far slower than float32 here (70x measured on "
            "such a CPU); bf16: false trains faster on it")
