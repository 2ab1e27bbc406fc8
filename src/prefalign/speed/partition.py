"""Whether a weight is whole here, or held in shards by FSDP2 or DeepSpeed ZeRO-3: the one place the speed path asks.

The fast path reads some weights outside their module's forward (the LM head's in speed/forward.py, the tied input
embedding's in speed/head.py). Under a sharding engine that is wrong: FSDP2 keeps a parameter as a sharded
``DTensor`` and swaps in the whole tensor only between its module's pre-forward and post-forward (or backward)
hooks; ZeRO-3 keeps an empty placeholder (``ds_id``, ``ds_status``, ``ds_shape``) and gathers it inside the forward.
``sharded_by`` says which engine manages a module's weights (even at a moment they happen to be gathered), so the
fast path runs those parts inside the module's forward, where the engine has gathered the weight, or takes the plain
path; ``partitioned`` says whether one tensor is not whole right now.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

FSDP2 = "FSDP2"
ZERO3 = "ZeRO-3"


@functools.cache
def _classes() -> tuple[type, ...]:
    """(DTensor, FSDPModule), or () for a PyTorch built without distributed."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor, FSDPModule


def _is_dtensor(t: Any) -> bool:
    classes = _classes()
    return bool(classes) and isinstance(t, classes[0])


def _is_zero3(t: Any) -> bool:
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def partitioned(t: Any) -> str | None:
    """The engine holding ``t`` in pieces at this moment (``"FSDP2"``: a DTensor; ``"ZeRO-3"``: a DeepSpeed
    parameter not gathered, its data an empty placeholder), or None for a whole tensor that may be read here."""
    if _is_dtensor(t):
        return FSDP2
    if _is_zero3(t):
        status = getattr(t.ds_status, "name", str(t.ds_status))  # deepspeed's ZeroParamStatus enum
        return None if status.rsplit(".", 1)[-1] == "AVAILABLE" else ZERO3
    return None


def sharded_by(module: Any) -> str | None:
    """The engine managing ``module``'s own weights in shards (FSDP2: it is an ``FSDPModule`` or one of its
    parameters is a DTensor; ZeRO-3: a parameter carries ``ds_id``), even where they are gathered right now; None
    when every weight is an ordinary tensor the fast path may read outside the module's forward."""
    if not isinstance(module, torch.nn.Module):
        return None
    classes = _classes()
    if classes and isinstance(module, classes[1]):
        return FSDP2
    for p in module.parameters(recurse=False):
        if _is_zero3(p):
            return ZERO3
        if _is_dtensor(p):
            return FSDP2
    return None


def model_sharded_by(model: Any) -> str | None:
    """The engine sharding any weight of ``model`` (see ``sharded_by``), or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    return next((engine for m in model.modules() if (engine := sharded_by(m)) is not None), None)
