"""CPU memory policy for training under glibc: keep freed memory for reuse, or hand it back at chosen points.

By default glibc serves allocations above a dynamic threshold (at most 32 MiB) with fresh ``mmap`` pages and trims
the heap top back to the kernel on free. A training step allocates and frees the same activation, logits and
gradient buffers every step, so on CPU each step page-faults them in again: on SmolLM2-135M ORPO (the benchmark's
long shape), 121k-162k minor faults and up to 0.9 s of system time per steady-state step. With ``mmap`` off for
allocations and no heap trimming, freed blocks are reused: once the heap has settled (a few steps) a step has almost
no faults (3 by the fifth step). The cost is heap slack: the heap keeps what it once held (peak RSS of the
benchmark's runs moved by less than 0.15 GB either way). The setting is process-wide and cannot be undone exactly,
so it is applied only when asked for (``retain_freed_memory``; ``cpu_allocator_cache=True``, which the ``prefalign``
command sets) and then kept for the life of the process.

The heap kept that way is not all in use at the step's high-water mark: temporaries freed between the activations
that a layer keeps for backward leave holes that later, larger buffers do not fit (measured on the benchmark's long
DPO batch: 2.65 GB of heap, at most 2.05 GB of it in use). ``release_after_layers`` trades speed for that memory:
every N decoder layers, in forward and in backward, the free pages go back to the kernel (``malloc_trim``), so peak
RSS follows what is in use (benchmark, long DPO, N=1: peak 3.40 -> 2.90 GB, step time +16% from the page faults of
reusing released pages).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("prefalign")

_M_TRIM_THRESHOLD = -1  # from <malloc.h>
_M_MMAP_MAX = -4
_RETAIN = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
_process_wide = False  # this module's own record that the process asked for the policy (read nowhere else)


@functools.cache
def _libc_function(name: str) -> Any:
    """A glibc malloc function by name, or None off Linux or where libc lacks it (musl has no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _mallopt(values: dict[int, int]) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in values.items()])  # every call made, then checked


def retain_freed_memory() -> bool:
    """Keep freed memory for reuse for the rest of the process. True if applied (or already), False where not glibc.

    Process-wide and for good, so it is never done behind a caller's back: the ``prefalign`` command asks for it
    (its process is the run), a library user asks with ``cpu_allocator_cache=True`` or by calling this. It cannot
    be undone exactly: setting either parameter switches off glibc's dynamic mmap threshold for the rest of the
    process, and glibc has no call that switches it back on or reads the parameters.
    """
    global _process_wide
    if _process_wide:
        return True
    if not _mallopt(_RETAIN):
        return False
    _process_wide = True
    logger.debug("glibc malloc: mmap off, trim threshold 2 GiB for the life of the process")
    return True


def can_release_memory() -> bool:
    """Whether release_freed_memory can do anything here (glibc's malloc_trim exists)."""
    return _libc_function("malloc_trim") is not None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc ``malloc_trim(0)``). False where unavailable."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a transformers causal LM (``layers``, or ``h`` for GPT-2 style), outermost first;
    empty when the model has no such list."""
    import torch

    from ..models import unwrap

    inner = unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for owner in (decoder, getattr(inner, "model", None), inner):
        for name in ("layers", "h"):
            blocks = getattr(owner, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
                return list(blocks)
    return []


def release_after_layers(model: Any, every: int, release: Callable[[], Any] | None = None) -> list[Any]:
    """Call ``release`` (default release_freed_memory) after every ``every``-th decoder layer's forward in training
    mode, and when backward reaches that layer.

    Backward is reached through a hook on the layer's output gradient, so activation checkpointing (which runs the
    layer again in backward) needs nothing special. Returns the hook handles (``handle.remove()`` undoes it); empty
    when the model has no decoder-layer list or ``every`` < 1.
    """
    handles = []
    if every < 1:
        return handles

    def run() -> None:
        (release or release_freed_memory)()

    def in_backward(_grad: Any) -> None:
        run()

    def after_forward(module: Any, _args: Any, output: Any) -> None:
        if not module.training:  # evaluation and generation keep their speed
            return
        run()
        out = output[0] if isinstance(output, tuple) else output
        if getattr(out, "requires_grad", False):
            out.register_hook(in_backward)

    for i, layer in enumerate(decoder_layers(model)):
        if i % every == every - 1:
            handles.append(layer.register_forward_hook(after_forward))
    return handles


def preallocate_adam_state(optimizer: Any) -> int:
    """Create torch Adam/AdamW state (moments and step) for every trainable parameter now, before the first step.

    torch creates it lazily inside the first ``step()``, after the first backward has freed that step's activations,
    so the state lands in the freed activation space and the next step's activations need fresh memory around it:
    on CPU, allocating it up front lowered the benchmark's long ORPO peak RSS from 3.91 to 3.79 GB (the state then
    sits below the memory that every step reuses). The values are exactly those of the lazy
    initialisation (zeros, step 0), so training is unchanged (tests/test_allocator.py). Other optimizers are left
    alone. Returns the number of parameters given state.
    """
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return 0
    count = 0
    for group in inner.param_groups:
        if group.get("differentiable"):
            return count
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            if not p.requires_grad or torch.is_complex(p) or inner.state.get(p):  # .state is a defaultdict
                continue
            state = inner.state[p]
            # as torch.optim.Adam._init_group: a float32 step on the parameter's device when fused or capturable,
            # else torch's default scalar dtype on the CPU
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device else torch.tensor(
                0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            count += 1
    return count
