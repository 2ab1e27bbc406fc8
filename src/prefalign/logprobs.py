"""Per-token log-probabilities of the tokens a loss needs, without a ``[batch, seq, vocab]`` logits tensor.

For known decoder-only architectures the model runs with ``logits_to_keep=1`` and a hook captures the final hidden
states; the LM head then runs only on the positions that predict a target token, in row chunks, each chunk under
activation checkpointing so its logits are recomputed in backward instead of kept. Other architectures take the
plain path (full logits), which gives the same numbers at a higher cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Architectures whose causal-LM head is exactly ``lm_head(last_hidden_state)``: no logit scaling or soft-capping.
CHUNKED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "smollm3", "olmo", "olmo2",
    "gemma", "starcoder2", "gpt_neox", "gpt2",
})
CHUNK_BYTES = 256 * 2**20  # float32 logits alive at once when chunk_rows is not given


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


class _LinearHeadLogps(torch.autograd.Function):
    """``log softmax(h W^T + b)[target]`` in row chunks, keeping only ``h`` and one logsumexp per row for backward.

    With ``z = h W^T + b``, ``lse = logsumexp(z)`` and ``out_t = z_t[y_t] - lse_t``, upstream gradient ``g_t`` gives
    ``dL/dz_t = g_t (onehot(y_t) - softmax(z_t))``, so ``dL/dh = G W``, ``dL/dW = G^T h``, ``dL/db = sum_t G_t``.
    Backward recomputes one chunk of logits at a time and turns that buffer into ``G`` in place, accumulating
    ``dL/dW`` into a single buffer: no second ``[rows, vocab]`` tensor, no per-chunk ``[vocab, hidden]`` gradient.
    When all rows fit in one chunk, forward's buffer is kept as the softmax instead, saving the recompute (one
    ``[rows, hidden] x [hidden, vocab]`` matmul and its exp): the memory is the same chunk buffer, held longer.
    This is the fused linear-cross-entropy idea (Liger Kernel; Wijmans et al. 2024, "Cut Your Losses") applied to
    per-token log-probs.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_rows: int, tied: TiedGrad | None = None) -> Tensor:
        out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        lse = torch.empty_like(out)
        buf = None
        for start in range(0, hidden.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            z = buf = _logits(hidden[sl], weight, bias, buf)
            m = z.amax(-1, keepdim=True)
            picked = z.gather(-1, targets[sl, None])
            lse[sl] = (m + z.sub_(m).exp_().sum(-1, keepdim=True).log_()).squeeze(-1)  # z now holds exp(z - m)
            out[sl] = picked.squeeze(-1) - lse[sl]
        # One chunk: its buffer becomes softmax(z) and is kept for backward, which then needs no recompute.
        keep = hidden.shape[0] <= chunk_rows and any(ctx.needs_input_grad[:3])
        ctx.softmax = z.mul_((m - lse[:, None]).exp_()) if keep else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.tied = chunk_rows, tied
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        buf = None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            sl = slice(start, start + ctx.chunk_rows)
            g = grad_out[sl].to(lse.dtype)
            if ctx.softmax is not None:
                dz, ctx.softmax = ctx.softmax, None  # dL/dz built in place in the kept softmax
            else:
                dz = buf = _logits(hidden[sl], weight, bias, buf)  # recomputed, then turned into dL/dz in place
                dz.sub_(lse[sl, None]).exp_()
            dz.mul_(-g[:, None]).scatter_add_(-1, targets[sl, None], g[:, None])
            dz = dz.to(weight.dtype)
            if need_h:
                torch.mm(dz, weight, out=grad_h[sl])
            if need_w:
                if start == 0:
                    torch.mm(dz.t(), hidden[sl], out=grad_w)
                else:
                    grad_w.addmm_(dz.t(), hidden[sl])
            if need_b:
                grad_b.add_(dz.sum(0))
        if ctx.tied is not None:
            ctx.tied.grad = grad_w  # the tied input embedding adds its rows here (_SparseGradEmbedding)
        return grad_h, grad_w, grad_b, None, None, None


class TiedGrad:
    """Hands the LM head's dense weight gradient to the tied input embedding's backward within one graph.

    Autograd sums the two gradients of a tied weight in its input buffer, and a dense + sparse sum there is out of
    place: a second ``[vocab, hidden]`` tensor at the end of backward, where every other gradient is already alive
    (113 MB for SmolLM2; that moment is the step's peak under activation checkpointing). The head's backward always
    runs first (the embedding feeds everything the head reads), so the embedding adds its rows into the head's
    gradient in place and passes no gradient of its own.
    """

    def __init__(self) -> None:
        self.grad: Tensor | None = None


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, buf: Tensor | None) -> Tensor:
    """``hidden W^T + b`` in float32 at least, written into ``buf`` (the previous chunk's buffer) when it fits."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    if hidden.dtype == torch.float32 or hidden.dtype == torch.float64:
        out = buf[:rows] if buf is not None else hidden.new_empty(rows, vocab)
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return torch.nn.functional.linear(hidden, weight, bias).float()  # half precision: upcast for the softmax


def _plain_linear(head: torch.nn.Module, hidden: Tensor) -> bool:
    """A plain ``nn.Linear`` whose weight is materialised here (not a PEFT/quantised wrapper, not an FSDP/ZeRO-3
    shard): only then may its weight be used outside its own forward."""
    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and isinstance(w, Tensor) and w.dim() == 2
            and w.shape[1] == hidden.shape[-1] and w.device == hidden.device)


def chunked_head_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor,
                       chunk_rows: int | None = None, tied: TiedGrad | None = None) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for ``hidden: [T, H]``, at most ``chunk_rows x vocab`` logits alive.

    A plain linear head takes the fused path (_LinearHeadLogps); any other head runs as a module, each chunk under
    activation checkpointing, with the same numbers at a higher cost.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    if chunk_rows is None:
        weight = getattr(head, "weight", None)
        vocab = getattr(head, "out_features", None) or (weight.shape[0] if isinstance(weight, Tensor) else 0)
        chunk_rows = max(1, CHUNK_BYTES // (4 * vocab)) if vocab else 512
    if _plain_linear(head, hidden):
        return _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_rows, tied)
    outs = []
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if need_grad:
            outs.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            outs.append(_head_logps(head, h, t))
    return torch.cat(outs)


class _SparseGradEmbedding(torch.autograd.Function):
    """``weight[ids]`` whose weight gradient is a sparse tensor holding only the looked-up rows.

    nn.Embedding's dense backward zero-fills a ``[vocab, hidden]`` tensor (113 MB for SmolLM2) every step, then
    autograd adds it to the LM head's gradient of the same tied weight. Only the looked-up rows are produced here.
    Given the head's ``TiedGrad`` they are added in place into the head's dense gradient and no gradient is
    returned; without it they are returned as a sparse tensor, which autograd sums with the head's dense gradient
    into a new dense one. Only used for a tied weight whose LM head also gets a gradient in the same step, so the
    accumulated ``.grad`` is always dense (optimizers never see a sparse gradient).
    """

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None,
                tied: TiedGrad | None = None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.padding_idx, ctx.tied = weight.shape, padding_idx, tied
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        dense = ctx.tied.grad if ctx.tied is not None else None
        if dense is not None:
            ctx.tied.grad = None  # drop the reference: autograd may then use the buffer as .grad without a copy
            dense.index_add_(0, ids, grad.to(dense.dtype))
            return None, None, None, None
        sparse = torch.sparse_coo_tensor(ids[None], grad, ctx.weight_shape, check_invariants=False)
        return None, sparse, None, None


def _tied_embeds(embed: Any, head: Any, input_ids: Tensor, has_targets: bool, tied: TiedGrad) -> Tensor | None:
    """Input embeddings through _SparseGradEmbedding when that gives the same result; else None (model embeds)."""
    weight = getattr(embed, "weight", None)
    if not (type(embed) is torch.nn.Embedding and type(head) is torch.nn.Linear and weight is head.weight
            and tuple(weight.shape) == (embed.num_embeddings, embed.embedding_dim)  # not an FSDP/ZeRO-3 shard
            and has_targets and weight.requires_grad and torch.is_grad_enabled()
            and embed.max_norm is None and not embed.scale_grad_by_freq and not embed.sparse):
        return None
    return _SparseGradEmbedding.apply(input_ids, weight, embed.padding_idx, tied)


def token_logps(model: Any, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, *,
                position_ids: Tensor | None = None, predictor: Tensor | None = None,
                chunk_rows: int | None = None, force_full_logits: bool = False) -> Tensor:
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

        head = inner.get_output_embeddings()
        tied = TiedGrad()
        embeds = _tied_embeds(inner.get_input_embeddings(), head, input_ids, has_targets=rows.numel() > 0,
                              tied=tied)
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
            del kwargs["input_ids"]
        handle = inner.get_decoder().register_forward_hook(hook)
        try:
            with _lean_forward(inner, attention_mask):
                model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        picked = chunked_head_logps(head, captured["h"][rows, src], targets, chunk_rows,
                                    tied=tied if embeds is not None else None)
    else:
        with _lean_forward(unwrap(model), attention_mask):
            logits = model(**kwargs).logits
        picked = _gather_logps(logits[rows, src], targets)
    out = torch.zeros(mask.shape, dtype=torch.promote_types(picked.dtype, torch.float32), device=input_ids.device)
    return out.index_put((rows, cols), picked)


@contextlib.contextmanager
def _lean_forward(model: Any, attention_mask: Tensor) -> Iterator[None]:
    """Memory savings for one forward that change no number.

    - RMSNorm outputs saved by the projections they feed are rebuilt in backward (layers.recompute_norm_outputs),
      when lean activations are applied and autograd is recording.
    - On CPU with a custom 4-D mask, SDPA gets grouped-query key/value heads as they are (``enable_gqa``) instead of
      copies repeated to every query head: the CPU flash kernel supports it and then keeps 3 heads, not 9, of keys
      and values per layer for backward (and runs faster). transformers only does this without a mask, so it is
      asked to through its TRANSFORMERS_SDPA_FORCE_GQA switch, for this forward only.
    """
    from .layers import recompute_norm_outputs

    with contextlib.ExitStack() as stack:
        if torch.is_grad_enabled() and getattr(model, "_prefalign_lean", 0):
            stack.enter_context(recompute_norm_outputs())
        cfg = getattr(model, "config", None)
        # Not under activation checkpointing: its recompute in backward runs outside this block and must see the
        # same key/value shapes as the forward did.
        if (isinstance(attention_mask, Tensor) and attention_mask.dim() == 4 and attention_mask.device.type == "cpu"
                and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
                and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ):
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
            stack.callback(os.environ.pop, "TRANSFORMERS_SDPA_FORCE_GQA", None)
        yield


def model_attention_mask(mask: Tensor, kind: str | None, dtype: torch.dtype) -> Any:
    """A boolean ``[R, 1, L, L]`` mask (True = may attend) in the form the attention kernel takes.

    "float": additive, 0 or the dtype's minimum, built once per batch (eager; SDPA too: given a boolean mask, SDPA
    converts it to this form in every layer and its kernels keep each copy for backward, 30 extra copies for
    SmolLM2). "bool": as is. "block": a flex-attention BlockMask whose mask_mod reads the boolean mask, so fully
    masked blocks (between packed pairs, rejected rows over chosen columns) are skipped rather than computed.
    """
    if kind == "float":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if kind == "block":
        from torch.nn.attention.flex_attention import create_block_mask

        dense = mask[:, 0]

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return dense[b, q, k]

        rows, length = dense.shape[0], dense.shape[-1]
        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=mask.device)
    return mask


def pair_token_logps(model: Any, batch: dict[str, Tensor], wanted: Tensor, *, attention_mask: Tensor | None = None,
                     chunk_rows: int | None = None) -> Tensor:
    """token_logps for a PrefixSharedCollator batch: ``wanted`` and the result are in pair layout ``[B, P]``.

    The model runs on the (maybe packed) rows; ``pair_index`` carries the targets there and the log-probs back.
    """
    index, ids = batch["pair_index"], batch["input_ids"]
    wanted = wanted.bool()
    target = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    target[index[wanted]] = True
    mask = batch["attention_mask"] if attention_mask is None else attention_mask
    tok = token_logps(model, ids, mask, target.view(ids.shape), position_ids=batch["position_ids"],
                      predictor=batch["predictor"], chunk_rows=chunk_rows)
    return tok.flatten()[index] * wanted
