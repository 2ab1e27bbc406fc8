"""The fast forward: log-probs of chosen positions, with the LM head run on those positions only.

For known decoder-only architectures the model runs with ``logits_to_keep=1`` (through its own forward, so DDP and
PEFT wrappers see the call) while a hook on the decoder captures the final hidden states; the head then runs on the
rows that predict a target (speed/head.py), under the autocast the model's forward ran under (accelerate enables
it inside the forward only), as the model's own head would. Other architectures compute full logits and gather,
with the same numbers at a higher cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..models import unwrap
from .head import HeadStats, TiedGrad, chunked_head_logps, gather_logps, tied_embeds
from .layers import recompute_norm_outputs
from .precision import autocast_dtype

# Architectures whose causal-LM head is exactly ``lm_head(last_hidden_state)``: no logit scaling; soft-capping
# (Gemma 2 / 3's ``final_logit_softcapping``) only where the config sets it, and then can_chunk says no.
CHUNKED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3", "olmo", "olmo2",
    "olmo3", "gemma", "gemma2", "gemma3_text", "starcoder2", "gpt_neox", "gpt2", "gpt_oss", "lfm2",
})


@dataclass(frozen=True)
class FastPath:
    """What the fast forward needs, handed to it as an argument by the speed boundary (``speed.enable``).

    ``chunk_rows``: LM-head rows per chunk (None: as many as fit in 256 MiB). ``rebuild_norm_outputs``: lean
    RMSNorms are in place, so their outputs saved by the projections they feed are rebuilt in backward.
    """

    chunk_rows: int | None = None
    rebuild_norm_outputs: bool = False


def can_chunk(model: Any) -> bool:
    return chunk_refusal(model) is None


def chunk_refusal(model: Any) -> str | None:
    """Why the chunked head cannot stand in for this model's logits (then target_logps computes the model's full
    logits and gathers: the plain path's numbers), or None."""
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if cfg is None or not hasattr(inner, "get_decoder") or inner.get_output_embeddings() is None:
        return "it has no decoder and output embeddings to run the head on"
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return f"its logits are soft-capped (final_logit_softcapping={cfg.final_logit_softcapping})"
    if model_type not in CHUNKED_MODEL_TYPES:
        scale = next((n for n in ("logit_scale", "logits_scaling", "output_multiplier_scale") if hasattr(cfg, n)), None)
        return (f"its logits are scaled ({scale})" if scale else
                f"its head ({model_type}) is not one prefalign knows to be a plain linear layer")
    return None


def target_logps(model: Any, model_inputs: dict[str, Any], rows: Tensor, src: Tensor, targets: Tensor,
                 path: FastPath, stats: HeadStats | None = None) -> Tensor:
    """``log p(targets[k] | hidden state at (rows[k], src[k]))`` for every k: a float32 (float64) vector.

    ``model_inputs`` are the model's keyword arguments (``input_ids``, ``attention_mask``, ``position_ids``);
    ``stats`` collects per-target statistics of the logits (speed/head.py's HeadStats).
    """
    kwargs = {**model_inputs, "use_cache": False}
    rebuild = path.rebuild_norm_outputs and torch.is_grad_enabled()
    with recompute_norm_outputs() if rebuild else contextlib.nullcontext():
        if not can_chunk(model):
            logits = model(**kwargs).logits[rows, src]
            if stats is not None:
                stats.observe(logits, targets)
            return gather_logps(logits, targets)
        inner = unwrap(model)
        captured: dict[str, Tensor] = {}

        def hook(_module: Any, _args: Any, output: Any) -> None:
            captured["h"] = h = output[0] if isinstance(output, tuple) else output.last_hidden_state
            amp = autocast_dtype(h.device)  # on inside the forward (accelerate wraps it): the head runs under it too
            captured["amp"] = torch.autocast(h.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

        head = inner.get_output_embeddings()
        tied = TiedGrad()
        embeds = tied_embeds(inner.get_input_embeddings(), head, kwargs["input_ids"], has_targets=rows.numel() > 0,
                             tied=tied)
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
            del kwargs["input_ids"]
        handle = inner.get_decoder().register_forward_hook(hook)
        try:
            model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        with captured["amp"]:  # the head as the model's own forward would run it
            return chunked_head_logps(head, captured["h"][rows, src], targets, path.chunk_rows,
                                      tied=tied if embeds is not None else None, stats=stats)
