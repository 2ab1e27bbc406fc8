"""SDPA on CPU as prefalign's batches need it: grouped key/value heads with a custom mask, and packed segments.

Grouped heads: transformers' SDPA path hands ``enable_gqa`` to torch only when there is no mask; with prefix
sharing's 4-D mask it repeats every key/value head to the query heads first (9 copies of 3 heads for SmolLM2), and
autograd keeps those copies for backward in every layer. torch's CPU kernels take grouped heads with a mask, so
``grouped_sdpa`` passes them as they are: same values and gradients (tests/test_prefix_sharing.py), less memory,
less time.

Segments: a packed SFT batch is one row of several examples back to back (data/collate.py's ``LMCollator`` with
``flat``), described by ``cu_seq_lens_q`` / ``cu_seq_lens_k``, the keyword arguments flash-attention's variable-
length kernels take in transformers. Each example then attends causally within its own span, one SDPA call per
example with ``is_causal``: no padding anywhere, and attention costs the sum of the squared example lengths instead
of a dense mask over the whole row (tests/test_sft.py: the same losses and gradients as the block-diagonal mask).

It is selected per model, by name: ``use_grouped_sdpa`` sets the model's ``config._attn_implementation`` to
``ATTENTION_NAME`` and returns a function that sets it back. The name is registered once in transformers' attention
and mask registries (an entry that nothing uses unless a model selects it). Nothing else changes: without a mask or
segments, off CPU, or with features this function does not handle, it calls transformers' own SDPA function.
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
    """transformers' ``sdpa_attention_forward``, with ``enable_gqa`` also when a mask is given on CPU, and one
    causal call per segment when ``cu_seq_lens_q`` describes a packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = key.shape[1] != query.shape[1]
    segments = kwargs.get("cu_seq_lens_q")
    if (segments is not None and query.device.type == "cpu" and not kwargs.get("output_attentions")
            and kwargs.get("s_aux") is None and kwargs.get("softcap") is None):
        return _segment_sdpa(query, key, value, attention_mask, segments, kwargs.get("cu_seq_lens_k"), dropout,
                             scaling, grouped)
    if (attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _segment_sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, cu_q: Tensor, cu_k: Tensor | None,
                  dropout: float, scaling: float | None, grouped: bool) -> tuple[Tensor, None]:
    """Causal attention within each ``[cu[i], cu[i + 1])`` span of a one-row batch ``[1, H, T, D]``; a mask, if the
    mask builder made one, is applied within each span too."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or (cu_k is not None and not torch.equal(cu_k, cu_q)):
        raise ValueError("packed segments need one row with queries and keys over the same positions")
    bounds = cu_q.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        span = slice(start, end)
        sub = None if mask is None else mask[..., span, span]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, span], key[:, :, span], value[:, :, span], attn_mask=sub, dropout_p=dropout, scale=scaling,
            is_causal=sub is None, enable_gqa=grouped))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def takes_segments(model: Any) -> bool:
    """Whether ``model`` runs packed segments (``cu_seq_lens_q``) once the speed boundary is on: SDPA on CPU."""
    return _qualifies(model) or getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, grouped_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # 2-D padding masks are built as for SDPA


def use_grouped_sdpa(model: Any) -> Callable[[], None] | None:
    """Select ``grouped_sdpa`` for a CPU model with SDPA; returns the undo (None when the model does not qualify)."""
    if not _qualifies(model):
        return None
    _register()
    config = model.config
    config._attn_implementation = ATTENTION_NAME

    def undo() -> None:
        config._attn_implementation = "sdpa"

    return undo


def _qualifies(model: Any) -> bool:
    config = getattr(model, "config", None)
    param = next(iter(model.parameters()), None)
    return (getattr(config, "_attn_implementation", None) == "sdpa" and param is not None
            and param.device.type == "cpu" and not getattr(config, "sub_configs", None))
