"""The LM head on target positions only: log-probs without a ``[batch, seq, vocab]`` logits tensor.

A plain linear head is fused with the log-softmax (``_LinearHeadLogps``: row chunks, the softmax gradient built in
place); any other head runs as a module, chunk by chunk under activation checkpointing. A tied input embedding adds
its gradient rows into the head's weight gradient in place (``TiedGrad``). Same numbers as full logits
(tests/test_logprobs.py). Under autocast the head's matmul runs in autocast's dtype as ``nn.Linear`` would, the
log-softmax in float32 (speed/precision.py; tests/test_mixed_precision.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .partition import partitioned, sharded_by
from .precision import matmul_dtype, outside_autocast

CHUNK_BYTES = 256 * 2**20  # float32 logits alive at once when chunk_rows is not given


class HeadStats:
    """Per-target-row statistics read off the logits the head computes anyway, with no second pass over the
    vocabulary. Ask for them by name: ``hits``, whether the target was the model's top prediction (TRL's
    mean_token_accuracy); ``log_sum_sq``, ``log sum_v p_v^2`` of the row's distribution (WPO's normaliser, Zhou et
    al. 2024). Detached: statistics, not part of the loss's graph."""

    def __init__(self, *names: str) -> None:
        unknown = set(names) - {"hits", "log_sum_sq"}
        if unknown:
            raise ValueError(f"unknown head statistics {sorted(unknown)}")
        self.parts: dict[str, list[Tensor]] = {name: [] for name in names}

    def wants(self, name: str) -> bool:
        return name in self.parts

    def add(self, name: str, values: Tensor) -> None:
        self.parts[name].append(values.detach().reshape(-1))

    def observe(self, logits: Tensor, targets: Tensor) -> None:
        """The statistics of a chunk of full logits ``[rows, vocab]``."""
        if self.wants("hits"):
            self.add("hits", logits.argmax(-1) == targets)
        if self.wants("log_sum_sq"):
            with torch.no_grad():
                z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
                self.add("log_sum_sq", (2 * z).logsumexp(-1) - 2 * z.logsumexp(-1))

    def get(self, name: str) -> Tensor:
        parts = self.parts[name]
        if parts:
            return torch.cat(parts)
        return torch.zeros(0, dtype=torch.bool if name == "hits" else torch.float32)


def gather_logps(logits: Tensor, targets: Tensor) -> Tensor:
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # fp32 at least
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _head_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, stats: HeadStats | None = None) -> Tensor:
    logits = head(hidden)
    if stats is not None:
        stats.observe(logits, targets)
    return gather_logps(logits, targets)


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
    @outside_autocast
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_rows: int, tied: TiedGrad | None = None, stats: HeadStats | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or hidden.dtype  # the matmul dtype (autocast's); logsumexp and outputs in float32 at least
        w, b = _cast(weight, dtype), _cast(bias, dtype)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32))
        lse = torch.empty_like(out)
        buf = None
        for start in range(0, hidden.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            z = buf = _logits(hidden[sl].to(dtype), w, b, buf)
            m = z.amax(-1, keepdim=True)
            picked = z.gather(-1, targets[sl, None])
            if stats is not None and stats.wants("hits"):
                stats.add("hits", picked.squeeze(-1) >= m.squeeze(-1))  # the target holds the row's largest logit
            log_sum = z.sub_(m).exp_().sum(-1, keepdim=True).log_()  # z now holds exp(z - m)
            lse[sl] = (m + log_sum).squeeze(-1)
            out[sl] = picked.squeeze(-1) - lse[sl]
            if stats is not None and stats.wants("log_sum_sq"):  # log sum p^2 = log sum e^(2(z-m)) - 2 log sum e^(z-m)
                stats.add("log_sum_sq", 2 * (torch.linalg.vector_norm(z, dim=-1).log() - log_sum.squeeze(-1)))
        # One chunk: its buffer becomes softmax(z) and is kept for backward, which then needs no recompute.
        keep = hidden.shape[0] <= chunk_rows and any(ctx.needs_input_grad[:3])
        ctx.softmax = z.mul_((m - lse[:, None]).exp_()) if keep else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.tied, ctx.dtype = chunk_rows, tied, dtype
        return out

    @staticmethod
    @outside_autocast
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.dtype
        w, b = _cast(weight, dtype), _cast(bias, dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        buf = None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            sl = slice(start, start + ctx.chunk_rows)
            h = hidden[sl].to(dtype)
            g = grad_out[sl].to(lse.dtype)
            if ctx.softmax is not None:
                dz, ctx.softmax = ctx.softmax, None  # dL/dz built in place in the kept softmax
            else:
                dz = buf = _logits(h, w, b, buf)  # recomputed, then turned into dL/dz in place
                dz.sub_(lse[sl, None]).exp_()
            dz.mul_(-g[:, None]).scatter_add_(-1, targets[sl, None], g[:, None])
            dz = dz.to(dtype)
            if need_h:
                if grad_h.dtype == dtype:
                    torch.mm(dz, w, out=grad_h[sl])
                else:  # a float32 hidden state under autocast: its gradient in its own dtype
                    grad_h[sl] = torch.mm(dz, w)
            if need_w:
                if weight.dtype != dtype:  # under autocast: each chunk's product summed in the weight's dtype
                    part = torch.mm(dz.t(), h)
                    grad_w.copy_(part) if start == 0 else grad_w.add_(part)
                elif start == 0:
                    torch.mm(dz.t(), h, out=grad_w)
                else:
                    grad_w.addmm_(dz.t(), h)
            if need_b:
                grad_b.add_(dz.sum(0))
        if ctx.tied is not None:
            ctx.tied.grad = grad_w  # the tied input embedding adds its rows here (_SparseGradEmbedding)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


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


def materialised_linear(head: torch.nn.Module, hidden: Tensor) -> bool:
    """A plain ``nn.Linear`` (or FSDP2's subclass of it) whose weight is whole here (not a PEFT/quantised wrapper, not
    an FSDP/ZeRO-3 shard: speed/partition.py): only then may the fused head read its weight."""
    w = getattr(head, "weight", None)
    linear = isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward  # FSDP2's subclass too
    return (linear and isinstance(w, Tensor) and partitioned(w) is None and w.dim() == 2
            and w.shape[1] == hidden.shape[-1] and w.device == hidden.device)


def chunked_head_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor,
                       chunk_rows: int | None = None, tied: TiedGrad | None = None,
                       stats: HeadStats | None = None) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for ``hidden: [T, H]``, at most ``chunk_rows x vocab`` logits alive.

    A plain linear head takes the fused path (_LinearHeadLogps); any other head runs as a module, each chunk under
    activation checkpointing, with the same numbers at a higher cost. ``stats`` collects per-row statistics.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    if chunk_rows is None:
        weight = getattr(head, "weight", None)
        vocab = getattr(head, "out_features", None) or (weight.shape[0] if isinstance(weight, Tensor) else 0)
        chunk_rows = max(1, CHUNK_BYTES // (4 * vocab)) if vocab else 512
    if materialised_linear(head, hidden):
        dtype = matmul_dtype(hidden, head.weight)  # autocast's when it is on (speed/precision.py)
        return _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_rows, tied, stats, dtype)
    outs = []
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if need_grad:
            if stats is not None:
                with torch.no_grad():
                    stats.observe(head(h), t)
            outs.append(checkpoint(_head_logps, head, h, t, use_reentrant=False))
        else:
            outs.append(_head_logps(head, h, t, stats))
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
    @outside_autocast
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None,
                tied: TiedGrad | None = None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.padding_idx, ctx.tied = weight.shape, padding_idx, tied
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    @outside_autocast
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


def tied_embeds(embed: Any, head: Any, input_ids: Tensor, has_targets: bool, tied: TiedGrad) -> Tensor | None:
    """Input embeddings through _SparseGradEmbedding when that gives the same result; else None (model embeds)."""
    weight = getattr(embed, "weight", None)
    if not (type(embed) is torch.nn.Embedding and type(head) is torch.nn.Linear and weight is head.weight
            and sharded_by(embed) is None and sharded_by(head) is None  # its weight is read outside the forward
            and tuple(weight.shape) == (embed.num_embeddings, embed.embedding_dim)
            and has_targets and weight.requires_grad and torch.is_grad_enabled()
            and embed.max_norm is None and not embed.scale_grad_by_freq and not embed.sparse):
        return None
    return _SparseGradEmbedding.apply(input_ids, weight, embed.padding_idx, tied)
