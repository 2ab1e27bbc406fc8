"""A batch becomes numbers: one function from (model, batch) to per-pair log-probs, token counts and NLL terms.

Every collator (data/collate.py) describes its batch in the same two views, so nothing downstream asks how the batch
was laid out:

- **row layout**, what the model runs on: ``input_ids``, ``attention_mask`` (2-D padding or a boolean 4-D mask),
  ``position_ids`` ``[R, L]``, and ``predictor`` ``[R, L]``: the position whose hidden state predicts each token;
- **pair layout**, what the loss reads: each pair's tokens as ``[prompt | chosen | rejected]``, right-padded to
  ``P``, with ``prompt_mask`` / ``chosen_mask`` / ``rejected_mask`` ``[B, P]`` and ``pair_index`` ``[B, P]``, the
  flat row position of each pair token.

``pair_logps(model, batch, path)`` takes the fast path when given the speed boundary's ``FastPath`` and the plain
path (``path=None``) otherwise. The plain path is the oracle: each pair rebuilt as two ordinary sequences, prompt +
chosen and prompt + rejected, full logits, log-softmax, gather, mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .models import prompt_learning, unwrap
from .speed.attention import ATTENTION_NAME
from .speed.forward import FastPath, target_logps
from .speed.head import HeadStats, gather_logps
from .speed.precision import compute_dtype

# attention implementations that take a custom mask, and in which form (see model_attention_mask)
_MASK_KINDS = {"sdpa": "float", "eager": "float", ATTENTION_NAME: "float", "flex_attention": "block"}


@dataclass
class PairLogps:
    """Per-pair sums of token log-probs and their token counts, all ``[B]``.

    ``nll`` / ``nll_tokens`` cover the tokens an NLL term is taken over: the chosen reply, plus the prompt after its
    first token when asked (TRL's ORPO). ``chosen_shared`` / ``rejected_shared`` sum only each reply's first
    min(|chosen|, |rejected|) tokens.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    nll: Tensor
    nll_tokens: Tensor
    # the first min(|chosen|, |rejected|) tokens of each reply: LD-DPO's shared length (Liu et al. 2024)
    chosen_shared: Tensor | None = None
    rejected_shared: Tensor | None = None
    # sums over each reply's tokens of log sum_v p_v^2, WPO's normaliser (Zhou et al. 2024), when asked for
    chosen_log_sum_sq: Tensor | None = None
    rejected_log_sum_sq: Tensor | None = None


def mask_kind(model: Any) -> str | None:
    """How a model takes a custom attention mask: "float" (SDPA and eager: additive), "block" (flex attention's
    BlockMask), or None (flash-attention kernels take no mask, and a model whose sliding window a custom mask
    cannot carry: see custom_mask_refusal)."""
    if custom_mask_refusal(model) is not None:
        return None
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    return _MASK_KINDS.get(impl or "")


def _sliding_window(model: Any) -> tuple[int | None, bool]:
    """The model's sliding window (None: none), and whether it takes one mask per layer type (``layer_types``)."""
    config = getattr(unwrap(model), "config", None)
    text = config.get_text_config() if config is not None else None
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None, False
    return int(window), "sliding_attention" in (getattr(text, "layer_types", None) or [])


def custom_mask_refusal(model: Any) -> str | None:
    """Why a custom 4-D mask (prefix sharing, packed rows) would change this model's numbers, or None.

    transformers uses a 4-D mask as given, with no sliding window added. Models with ``layer_types`` take a mask
    per layer type, so prefalign builds the windowed one (``kernel_mask``); any other windowed model (Mistral's
    style: one window for every layer) is refused and gets padded rows instead, as is a model with layers that
    mix tokens without attention (LFM2's convolutions), which would mix the sequences sharing a row."""
    method = prompt_learning(model)
    if method is not None:
        return f"PEFT {method} takes a 2-D padding mask only (it prepends its virtual tokens): rows are padded instead"
    config = getattr(unwrap(model), "config", None)
    types = set(getattr(config.get_text_config(), "layer_types", None) or []) if config is not None else set()
    mixing = sorted(types - {"full_attention", "sliding_attention"})
    if mixing:  # convolutions, recurrent or linear-attention layers mix neighbouring tokens, whatever the mask
        return (f"its {', '.join(mixing)} layers mix neighbouring tokens outside attention, so a row must hold one "
                "sequence: rows are padded instead")
    window, per_layer = _sliding_window(model)
    if window is not None and not per_layer:
        return (f"its sliding window ({window} tokens, every layer) cannot be carried by a custom attention mask, "
                "so rows are padded instead")
    return None


def kernel_mask(model: Any, mask: Tensor, position_ids: Tensor) -> Any:
    """A collator's boolean ``[R, 1, L, L]`` mask in the kernel's form (model_attention_mask). For a model with
    sliding-window layers, one mask per layer type: the sliding one also hides keys ``sliding_window`` or more
    positions back (by position id: the distance in the sequence the row's tokens come from), as transformers'
    own sliding mask does."""
    kind, dtype = mask_kind(model), compute_dtype(unwrap(model))  # autocast's dtype when the caller has it on
    window, per_layer = _sliding_window(model)
    if window is None or not per_layer:
        return model_attention_mask(mask, kind, dtype)
    distance = position_ids[:, :, None] - position_ids[:, None, :]
    sliding = mask & (distance < window)[:, None]
    return {"full_attention": model_attention_mask(mask, kind, dtype),
            "sliding_attention": model_attention_mask(sliding, kind, dtype)}


def model_attention_mask(mask: Tensor, kind: str | None, dtype: torch.dtype) -> Any:
    """A boolean ``[R, 1, L, L]`` mask (True = may attend) in the form the attention kernel takes.

    "float": additive, 0 or the dtype's minimum (``dtype``: the one attention runs in, autocast's when the caller
    runs under autocast, so an fp16 mask holds fp16's minimum), built once per batch (eager; SDPA too: given a
    boolean mask, SDPA converts it to this form in every layer and its kernels keep each copy for backward, 30 extra
    copies for SmolLM2). "bool": as is. "block": a flex-attention BlockMask whose mask_mod reads the boolean mask, so
    fully masked blocks (between packed pairs, rejected rows over chosen columns) are skipped rather than computed.
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


def segment_mask(cu_seq_lens: Tensor) -> Tensor:
    """The boolean ``[1, 1, T, T]`` causal mask of one row made of the spans ``cu_seq_lens`` (each sees itself)."""
    bounds = cu_seq_lens.long()
    owner = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=bounds.device), bounds[1:] - bounds[:-1])
    length = len(owner)
    causal = torch.ones(length, length, dtype=torch.bool, device=bounds.device).tril()
    return (causal & (owner[:, None] == owner[None, :]))[None, None]


def nll_mask(batch: dict[str, Tensor], nll_on_prompt: bool) -> Tensor:
    """Pair-layout tokens an NLL term covers: the chosen reply, plus the prompt after its first token if asked."""
    chosen = batch["chosen_mask"].bool()
    if not nll_on_prompt:
        return chosen
    covered = chosen | batch["prompt_mask"].bool()
    covered[:, 0] = False  # nothing predicts a sequence's first token
    return covered


def pair_logps(model: Any, batch: dict[str, Tensor], path: FastPath | None, *,
               nll_on_prompt: bool = False, log_sum_sq: bool = False) -> PairLogps:
    """The contract: per-pair log-probs of a collated batch under ``model`` (fast path, or plain with None);
    ``log_sum_sq`` also sums each reply's ``log sum_v p_v^2`` (WPO)."""
    nll = nll_mask(batch, nll_on_prompt)
    wanted = nll | batch["rejected_mask"].bool()
    stats = HeadStats("log_sum_sq") if log_sum_sq else None
    if path is None:
        tok, sq = plain_token_logps(model, batch, wanted, stats)
    else:
        mask = batch["attention_mask"]
        if mask.dim() == 4 and mask.dtype == torch.bool:  # the collators' boolean mask, in the kernel's form
            batch = {**batch, "attention_mask": kernel_mask(model, mask, batch["position_ids"])}
        tok, sq = fast_token_logps(model, batch, wanted, path, stats)
    chosen, rejected = batch["chosen_mask"].bool(), batch["rejected_mask"].bool()
    shared = torch.minimum(chosen.sum(-1), rejected.sum(-1))[:, None]
    return PairLogps(chosen=(tok * chosen).sum(-1), rejected=(tok * rejected).sum(-1),
                     chosen_tokens=chosen.sum(-1), rejected_tokens=rejected.sum(-1),
                     nll=(tok * nll).sum(-1), nll_tokens=nll.sum(-1),
                     chosen_shared=(tok * (chosen & (chosen.cumsum(-1) <= shared))).sum(-1),
                     rejected_shared=(tok * (rejected & (rejected.cumsum(-1) <= shared))).sum(-1),
                     chosen_log_sum_sq=None if sq is None else (sq * chosen).sum(-1),
                     rejected_log_sum_sq=None if sq is None else (sq * rejected).sum(-1))


def _scatter(wanted: Tensor, values: Tensor) -> Tensor:
    """Values of the ``wanted`` positions (in row-major order) into a pair-layout tensor, 0 elsewhere."""
    out = torch.zeros(wanted.shape, dtype=torch.promote_types(values.dtype, torch.float32), device=wanted.device)
    return out.masked_scatter(wanted, values)


def fast_token_logps(model: Any, batch: dict[str, Tensor], wanted: Tensor, path: FastPath,
                     stats: HeadStats | None = None) -> tuple[Tensor, Tensor | None]:
    """Pair-layout ``[B, P]`` log-probs of the ``wanted`` tokens (0 elsewhere), computed on the batch's rows with
    its ``attention_mask`` as given (pair_logps has turned a boolean 4-D mask into the kernel's form); and the
    same layout of ``log_sum_sq`` when ``stats`` asks for it."""
    ids = batch["input_ids"]
    flat = batch["pair_index"][wanted]
    rows, cols = flat // ids.shape[1], flat % ids.shape[1]
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
    picked = target_logps(model, inputs, rows, batch["predictor"][rows, cols], ids[rows, cols], path, stats)
    sq = _scatter(wanted, stats.get("log_sum_sq").to(ids.device)) if stats is not None else None
    return _scatter(wanted, picked), sq


def pair_token_ids(batch: dict[str, Tensor]) -> Tensor:
    """The batch's tokens in pair layout ``[B, P]`` (padding positions read row position 0: mask them)."""
    return batch["input_ids"].flatten()[batch["pair_index"]]


def plain_token_logps(model: Any, batch: dict[str, Tensor], wanted: Tensor,
                      stats: HeadStats | None = None) -> tuple[Tensor, Tensor | None]:
    """The obvious computation, for tests and debugging (``fast_path=False``): every pair as two right-padded
    sequences, prompt + chosen and prompt + rejected, one forward with a padding mask, full logits, log-softmax,
    gather of each next token, mask. Returns pair-layout ``[B, P]`` log-probs of the ``wanted`` tokens, and the same
    layout of ``log_sum_sq`` when ``stats`` asks for it."""
    ids = pair_token_ids(batch)
    p, c, r = (batch[k].sum(-1).tolist() for k in ("prompt_mask", "chosen_mask", "rejected_mask"))
    seqs = []  # pair i: rows 2i (prompt + chosen) and 2i + 1 (prompt + rejected)
    for i in range(ids.shape[0]):
        seqs.append(ids[i, :p[i] + c[i]])
        seqs.append(torch.cat([ids[i, :p[i]], ids[i, p[i] + c[i]:p[i] + c[i] + r[i]]]))
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), length, dtype=torch.long, device=ids.device)
    attention = torch.zeros(len(seqs), length, dtype=torch.long, device=ids.device)
    for j, s in enumerate(seqs):
        input_ids[j, :len(s)], attention[j, :len(s)] = s, 1
    logits = own_logits(model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits, input_ids)
    seq_logps = torch.zeros(input_ids.shape, dtype=torch.promote_types(logits.dtype, torch.float32),
                            device=ids.device)
    seq_logps[:, 1:] = gather_logps(logits[:, :-1], input_ids[:, 1:])

    def pair_layout(per_position: Tensor) -> Tensor:
        out = torch.zeros(wanted.shape, dtype=per_position.dtype, device=ids.device)
        for i in range(ids.shape[0]):
            chosen_seq, rejected_seq = per_position[2 * i], per_position[2 * i + 1]
            n = p[i] + c[i]
            out[i, :n] = chosen_seq[:n]  # prompt and chosen positions, as in pair layout
            out[i, n:n + r[i]] = rejected_seq[p[i]:p[i] + r[i]]
        return out * wanted

    if stats is None:
        return pair_layout(seq_logps), None
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    stats.observe(shifted, input_ids[:, 1:].reshape(-1))
    seq_sq = torch.zeros_like(seq_logps)
    seq_sq[:, 1:] = stats.get("log_sum_sq").reshape(len(seqs), -1)
    return pair_layout(seq_logps), pair_layout(seq_sq)


def lm_logps(model: Any, batch: dict[str, Tensor], path: FastPath | None,
             stats: HeadStats | None = None) -> Tensor:
    """Log-probs ``[T]`` of an LM batch's labelled tokens (data/collate.py's LMCollator: ``labels`` in row layout,
    each predicted by the position before it), in row-major order; ``stats`` collects per-token statistics.

    Fast path: the completion-only chunked head on the labelled positions only. Plain path (``path=None``): the
    model's full logits, log-softmax, gather: the oracle.
    """
    labels = batch["labels"]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    targets = labels[rows, cols]
    inputs = lm_inputs(model, batch)
    if path is not None:
        return target_logps(model, inputs, rows, cols - 1, targets, path, stats)
    logits = own_logits(model(**inputs, use_cache=False).logits, batch["input_ids"])[rows, cols - 1]
    if stats is not None:
        stats.observe(logits, targets)
    return gather_logps(logits, targets)


def own_logits(logits: Tensor, input_ids: Tensor) -> Tensor:
    """The logits of the sequence's own positions: PEFT prompt tuning / P-tuning put its virtual tokens' first."""
    return logits[:, logits.shape[1] - input_ids.shape[1]:]


def lm_inputs(model: Any, batch: dict[str, Tensor]) -> dict[str, Any]:
    """The model's forward inputs for an LM batch: ids, position ids, and its mask in the form the model's attention
    takes (span boundaries for attention that runs spans alone, a block mask otherwise). PEFT prompt learning takes
    ids and the rows' 2-D padding mask only (it ignores position ids; its collator pads rows)."""
    if prompt_learning(model) is not None:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["attention_mask"]
    segments: dict[str, Any] = {}
    if "cu_seq_lens" in batch:  # one packed row: spans for attention that takes them, else their block mask
        if getattr(unwrap(model).config, "_attn_implementation", None) == ATTENTION_NAME:
            cu = batch["cu_seq_lens"]
            longest = int((cu[1:] - cu[:-1]).max())
            segments = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        else:
            mask = segment_mask(batch["cu_seq_lens"])
    if mask.dim() == 4 and mask.dtype == torch.bool:  # the collator's boolean mask, in the kernel's form
        mask = kernel_mask(model, mask, batch["position_ids"])
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"],
            **segments}


def router_token_weights(batch: dict[str, Tensor], plain: bool, with_rejected: bool = True) -> Tensor:
    """Per-token weights ``[tokens]`` for the router's load-balancing loss (prefalign.router), in the token order of
    the forward that ``pair_logps`` runs on ``batch``: the plain path's sequences (``plain``) or the batch's rows.

    A weight is the number of TRL's sequences that hold the token: TRL's DPO layout runs prompt + chosen and
    prompt + rejected (``with_rejected``; KTO's main forward runs prompt + completion only), so a prompt token counts
    twice in a prefix-shared row, once per copy in a row of its own, and padding not at all."""
    prompt, chosen, rejected = (batch[k].bool() for k in ("prompt_mask", "chosen_mask", "rejected_mask"))
    if plain:  # plain_token_logps's rows: 2i = prompt + chosen, 2i + 1 = prompt + rejected, right-padded
        p, c, r = prompt.sum(-1), chosen.sum(-1), rejected.sum(-1)
        lengths = torch.stack([p + c, p + r], dim=1).reshape(-1)
        weights = (torch.arange(int(lengths.max())) < lengths[:, None].cpu()).float()
        if not with_rejected:
            weights[1::2] = 0
        return weights.to(prompt.device).reshape(-1)
    weights = torch.zeros(batch["input_ids"].numel(), device=prompt.device)
    index = batch["pair_index"]
    weights.index_put_((index[prompt],), torch.tensor(2.0 if with_rejected else 1.0, device=prompt.device),
                       accumulate=True)
    weights.index_put_((index[chosen],), torch.tensor(1.0, device=prompt.device), accumulate=True)
    if with_rejected:
        weights.index_put_((index[rejected],), torch.tensor(1.0, device=prompt.device), accumulate=True)
    return weights
