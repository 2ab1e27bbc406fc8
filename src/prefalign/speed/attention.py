"""Grouped-query attention through SDPA with a custom mask on CPU, without repeating the key/value heads.

transformers' SDPA path hands ``enable_gqa`` to torch only when there is no mask; with prefix sharing's 4-D mask it
repeats every key/value head to the query heads first (9 copies of 3 heads for SmolLM2), and autograd keeps those
copies for backward in every layer. torch's CPU kernels take grouped heads with a mask, so ``grouped_sdpa`` passes
them as they are: same values and gradients (tests/test_prefix_sharing.py), less memory, less time.

It is selected per model, by name: ``use_grouped_sdpa`` sets the model's ``config._attn_implementation`` to
``ATTENTION_NAME`` and returns a function that sets it back. The name is registered once in transformers' attention
and mask registries (an entry that nothing uses unless a model selects it). Nothing else changes: without a mask,
off CPU, or with features this function does not handle, it calls transformers' own SDPA function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ATTENTION_NAME = "prefalign_grouped_sdpa"


def grouped_sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' ``sdpa_attention_forward``, with ``enable_gqa`` also when a mask is given on CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = key.shape[1] != query.shape[1]
    if (attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, grouped_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # 2-D padding masks are built as for SDPA


def use_grouped_sdpa(model: Any) -> Callable[[], None] | None:
    """Select ``grouped_sdpa`` for a CPU model with SDPA and grouped key/value heads; returns the undo (None when
    the model does not qualify)."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    param = next(iter(model.parameters()), None)
    if (getattr(config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads or kv_heads == heads
            or param is None or param.device.type != "cpu" or getattr(config, "sub_configs", None)):
        return None
    _register()
    config._attn_implementation = ATTENTION_NAME

    def undo() -> None:
        config._attn_implementation = "sdpa"

    return undo
