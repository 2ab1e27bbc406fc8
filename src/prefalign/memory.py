"""Memory options that trade compute or transfers for activation memory, TRL's names and meanings: selective
activation checkpointing (``gradient_checkpointing_kwargs: {selective: true}``) and ``activation_offloading``.

Both are switched on by the trainer for the span of ``train()`` and undone after (the model's own
``gradient_checkpointing_enable`` comes back), like the speed boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# The aten attention kernels whose outputs selective checkpointing keeps (TRL 1.16's list): their backward is
# unavoidable, their recompute is not.
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _attention_ops() -> set[Any]:
    return {getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)}


def _keep_attention(ops: set[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save what attention computes; recompute everything else in backward."""
    if op in ops or "flash_attn" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def selective_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """While open, the Trainer's enabling of checkpointing checkpoints selectively (non-reentrant, with a policy
    context that keeps attention outputs), as TRL 1.16's SFTTrainer does: transformers routes the enable through an
    instance's own ``gradient_checkpointing_enable``, so that is what is wrapped."""
    if not enabled:
        yield
        return
    context_fn = partial(create_selective_checkpoint_contexts, partial(_keep_attention, _attention_ops()))
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the model it wraps
    had_own = "gradient_checkpointing_enable" in vars(model)
    original = model.gradient_checkpointing_enable

    def enable(gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        options = {**(gradient_checkpointing_kwargs or {}), "use_reentrant": False, "context_fn": context_fn}
        return original(gradient_checkpointing_kwargs=options, **kwargs)

    model.gradient_checkpointing_enable = enable
    try:
        yield
    finally:
        if had_own:
            model.gradient_checkpointing_enable = original
        else:
            del model.gradient_checkpointing_enable


def activation_offload(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``activation_offloading`` on a GPU: tensors saved for backward wait in pinned CPU memory. On CPU there is
    nowhere to offload to (the config said so when it was built)."""
    if enabled and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()
