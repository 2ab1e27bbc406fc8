"""The fast forward: log-probs of chosen positions, with the LM head run on those positions only.

For known decoder-only architectures the model runs with ``logits_to_keep=1`` (through its own forward, so DDP and
PEFT wrappers see the call) while a hook on the decoder captures the final hidden states; the head then runs on the
rows that predict a target (speed/head.py), under the autocast the model's forward ran under (accelerate enables
it inside the forward only), as the model's own head would. Other architectures compute full logits and gather,
with the same numbers at a higher cost.

Under FSDP2 or DeepSpeed ZeRO-3 (speed/partition.py) the head's weight is whole only inside the head's own forward,
so there the chunked head runs inside it: the model runs with every position kept, the head module's forward is
swapped for one call to compute the target rows' log-probs from its input, and those come back as the model's
"logits" (so the engine's backward hooks, attached to the forward's outputs, gather the weight again for backward).
The tied-embedding gradient (speed/head.py) is left to the model's own embedding there.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..models import unwrap
from .head import HeadStats, TiedGrad, chunked_head_logps, gather_logps, tied_embeds
from .layers import recompute_norm_outputs
from .partition import sharded_by
from .precision import autocast_dtype

logger = logging.getLogger("prefalign")
_TOLD: set[str] = set()  # engines whose head placement was logged (once per process)

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
        head = inner.get_output_embeddings()
        engine = sharded_by(head)
        if engine is not None:
            if engine not in _TOLD:
                _TOLD.add(engine)
                logger.info("fast_path: %s shards the LM head, so the chunked head runs inside the head's forward "
                            "(where %s gathers its weight); the tied-embedding gradient is the model's own", engine,
                            engine)
            return _logps_inside_head(model, head, kwargs, rows, src, targets, path, stats)
        captured: dict[str, Tensor] = {}

        def hook(_module: Any, _args: Any, output: Any) -> None:
            captured["h"] = h = output[0] if isinstance(output, tuple) else output.last_hidden_state
            amp = autocast_dtype(h.device)  # on inside the forward (accelerate wraps it): the head runs under it too
            captured["amp"] = torch.autocast(h.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

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


def _logps_inside_head(model: Any, head: Any, kwargs: dict[str, Any], rows: Tensor, src: Tensor, targets: Tensor,
                       path: FastPath, stats: HeadStats | None) -> Tensor:
    """The chunked head run inside ``head``'s own forward, where FSDP2 / ZeRO-3 have gathered its weight.

    The head's forward is replaced on the instance for this one call (put back as soon as it runs, and in any case
    after), and its result, the target log-probs, is what the model returns as ``logits``: the engine's hooks on the
    forward's outputs then see the tensor backward starts from."""
    own = head.__dict__.get("forward")  # an instance-level forward already there (kept as it was)

    def restore() -> None:
        if own is not None:
            head.forward = own
        else:
            head.__dict__.pop("forward", None)

    def forward(hidden: Tensor) -> Tensor:
        restore()  # a module head run chunk by chunk below calls the real forward
        return chunked_head_logps(head, hidden[rows, src], targets, path.chunk_rows, stats=stats)

    head.forward = forward
    try:
        logps = model(**kwargs, logits_to_keep=0).logits
    finally:
        restore()
    if logps.dim() != 1 or logps.shape[0] != targets.shape[0]:
        raise RuntimeError(f"{type(unwrap(model)).__name__}'s forward did not return its LM head's output as logits "
                           "(it changes them after the head); set fast_path: false for this model under FSDP/ZeRO-3")
    return logps
