"""Per-token log-probabilities of the tokens a loss needs, without a ``[batch, seq, vocab]`` logits tensor.

For known decoder-only architectures the model runs with ``logits_to_keep=1`` and a hook captures the final hidden
states; the LM head then runs only on the positions that predict a target token, in row chunks, each chunk under
activation checkpointing so its logits are recomputed in backward instead of kept. Other architectures take the
plain path (full logits), which gives the same numbers at a higher cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Architectures whose causal-LM head is exactly ``lm_head(last_hidden_state)``: no logit scaling or soft-capping.
CHUNKED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3", "olmo", "olmo2",
    "gemma", "starcoder2", "gpt_neox", "gpt2",
})
DEFAULT_CHUNK_ROWS = 512


def unwrap(model: Any) -> Any:
    """The model inside DDP-style wrappers (which keep it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and friends
        model = model.module
    return model


def _base_config(model: Any) -> Any:
    return getattr(unwrap(model), "config", None)


def can_chunk(model: Any) -> bool:
    cfg = _base_config(model)
    inner = unwrap(model)
    return (cfg is not None and getattr(cfg, "model_type", None) in CHUNKED_MODEL_TYPES
            and hasattr(inner, "get_decoder") and inner.get_output_embeddings() is not None)


def _gather_logps(logits: Tensor, targets: Tensor) -> Tensor:
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # fp32 at least
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _head_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return _gather_logps(head(hidden), targets)


def chunked_head_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for ``hidden: [T, H]``, at most ``chunk_rows x vocab`` logits alive."""
    outs = []
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if need_grad:
            outs.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            outs.append(_head_logps(head, h, t))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(model: Any, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, *,
                position_ids: Tensor | None = None, predictor: Tensor | None = None,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, force_full_logits: bool = False) -> Tensor:
    """``out[i, t] = log p(input_ids[i, t] | context)`` where ``target_mask[i, t]``, else 0; float32 (float64 for a
    float64 model), shape of ``input_ids``.

    The context of token ``t`` is read from the hidden state at ``predictor[i, t]`` (default ``t - 1``): with prefix
    sharing the first rejected token follows the prompt, not the chosen reply, so its predictor is the last prompt
    position. ``attention_mask`` may be 2-D (padding) or a 4-D mask the model accepts.
    """
    mask = target_mask.bool().clone()
    if predictor is None:
        mask[:, 0] = False  # nothing predicts the first token
    rows, cols = mask.nonzero(as_tuple=True)
    src = cols - 1 if predictor is None else predictor[rows, cols]
    targets = input_ids[rows, cols]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if not force_full_logits and can_chunk(model):
        inner = unwrap(model)
        captured: dict[str, Tensor] = {}

        def hook(_module: Any, _args: Any, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = inner.get_decoder().register_forward_hook(hook)
        try:
            model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        picked = chunked_head_logps(inner.get_output_embeddings(), captured["h"][rows, src], targets, chunk_rows)
    else:
        logits = model(**kwargs).logits
        picked = _gather_logps(logits[rows, src], targets)
    out = torch.zeros(mask.shape, dtype=torch.promote_types(picked.dtype, torch.float32), device=input_ids.device)
    return out.index_put((rows, cols), picked)
