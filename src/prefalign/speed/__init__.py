"""The speed boundary: everything that makes prefalign fast, switched on in one place and undone in one place.

    handle = speed.enable(model, args)      # or: with speed.enable(model, args) as handle:
    ...  logps.pair_logps(model, batch, handle.path)
    handle.undo()

What ``enable`` may do, each only where it gives the same numbers, and what ``undo`` sets back:

- lean Llama-family MLPs and RMSNorms (``lean_activations``; speed/layers.py): instance ``forward`` patches, removed;
- grouped key/value heads through SDPA with a mask on CPU (speed/attention.py): the model's attention
  implementation switched by name, switched back;
- glibc keeps freed memory for reuse (``cpu_allocator_cache``, off unless asked for; speed/allocator.py): a
  process-wide setting that glibc cannot fully undo, so it is applied only when asked and then kept for the life of
  the process (the ``prefalign`` command asks: its process is the run);
- the heap's free pages handed back every N decoder layers (``release_cpu_memory_every``): hooks, removed;
- AdamW state created before the first step (``handle.prepare_optimizer``): exact zeros, nothing to undo.

The fused, chunked LM head and the tied-embedding gradient (speed/head.py, speed/forward.py) patch nothing: they run
when ``handle.path`` (a ``FastPath``) is passed to the log-prob function, and the plain path (``path=None``: full
logits, gather, mask) is the oracle they are tested against. ``fast_path=False`` in the config makes ``enable`` a
no-op whose ``path`` is None. Nothing here keeps state in the environment or on the model after ``undo``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..models import prompt_learning, unwrap
from . import layers
from .allocator import (
    can_release_memory,
    decoder_layers,
    preallocate_adam_state,
    release_after_layers,
    retain_freed_memory,
)
from .attention import use_grouped_sdpa
from .forward import FastPath, chunk_refusal

__all__ = ["FastPath", "Speed", "enable", "retain_freed_memory"]
logger = logging.getLogger("prefalign")
_TOLD: set[tuple[str, str]] = set()  # fallbacks already logged


class Speed:
    """What ``enable`` switched on, and how to switch it off. ``path`` is what the log-prob function takes."""

    def __init__(self, path: FastPath | None, undo: list[Callable[[], Any]], lean_modules: int = 0,
                 grouped_attention: bool = False) -> None:
        self.path = path
        self._undo = undo
        self.lean_modules, self.grouped_attention = lean_modules, grouped_attention

    def prepare_optimizer(self, optimizer: Any) -> None:
        """AdamW state before the first step, not inside it: less heap fragmentation (speed/allocator.py)."""
        if self.path is not None:
            preallocate_adam_state(optimizer)

    def undo(self) -> None:
        """Set back everything ``enable`` changed, last change first; safe to call twice. Every step runs even if
        one fails; the first failure is raised after the others."""
        _run_all(self._undo)

    def __enter__(self) -> Speed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def enable(model: Any, args: Any) -> Speed:
    """Switch the speed machinery on for ``model`` as ``args`` (a config) asks; see the module docstring.

    Reads ``fast_path``, ``lean_activations``, ``cpu_allocator_cache``, ``release_cpu_memory_every`` and
    ``logprob_chunk_rows`` (absent fields take the configs' defaults). Undoes what it did if it fails halfway.
    ``cpu_allocator_cache`` is the one thing ``undo`` leaves: it is a process-wide request, kept by design.
    """
    if not getattr(args, "fast_path", True):
        return Speed(None, [])
    method = prompt_learning(model)
    if method is not None:
        if ("prompt-learning", method) not in _TOLD:
            _TOLD.add(("prompt-learning", method))
            logger.warning("fast_path: off for PEFT %s (its virtual tokens / prefix keys go through PEFT's own "
                           "forward): log-probs take the plain path", method)
        return Speed(None, [])
    inner = unwrap(model)
    param = next(iter(inner.parameters()), None)
    on_cpu = param is not None and param.device.type == "cpu"
    undo: list[Callable[[], Any]] = []
    try:
        patched = layers.apply(inner) if getattr(args, "lean_activations", True) else []
        if patched:
            undo.append(lambda: layers.restore(patched))
        if on_cpu and getattr(args, "cpu_allocator_cache", False):
            retain_freed_memory()  # asked for: process-wide and for good (speed/allocator.py says why not undone)
        hooks = _release_hooks(inner, getattr(args, "release_cpu_memory_every", 0)) if on_cpu else []
        undo.extend(h.remove for h in hooks)
        attention_undo = use_grouped_sdpa(inner)
        if attention_undo is not None:
            undo.append(attention_undo)
    except BaseException:
        _run_all(undo)
        raise
    refusal = chunk_refusal(inner)
    if refusal is not None and (type(inner).__name__, refusal) not in _TOLD:  # once per process, not per enable
        _TOLD.add((type(inner).__name__, refusal))
        logger.warning("fast_path: the LM head runs on full logits for %s (as the plain path): %s",
                       type(inner).__name__, refusal)
    path = FastPath(chunk_rows=getattr(args, "logprob_chunk_rows", None), rebuild_norm_outputs=bool(patched))
    return Speed(path, undo, lean_modules=len(patched), grouped_attention=attention_undo is not None)


def _release_hooks(model: Any, every: int) -> list[Any]:
    """release_cpu_memory_every's hooks; a warning says why when it can do nothing."""
    if not every:
        return []
    if not can_release_memory():
        logger.warning("release_cpu_memory_every=%d has no effect: this C library has no malloc_trim (glibc only)",
                       every)
        return []
    hooks = release_after_layers(model, every)
    if not hooks:
        n_layers = len(decoder_layers(model))
        why = (f"the model has only {n_layers} decoder layers" if n_layers
               else "the model has no decoder-layer list (layers or h)")
        logger.warning("release_cpu_memory_every=%d has no effect: %s", every, why)
    return hooks


def _run_all(steps: list[Callable[[], Any]]) -> None:
    """Pop and run every step, last first; re-raise the first failure once all have run."""
    error: BaseException | None = None
    while steps:
        try:
            steps.pop()()
        except BaseException as e:  # noqa: BLE001 - the rest must still be undone
            error = error or e
    if error is not None:
        raise error
