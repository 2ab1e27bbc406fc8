"""Prefix sharing: [prompt | chosen | rejected] in one row gives the log-probs of two separate sequences."""

from __future__ import annotations

import os

import pytest
import torch

from prefalign.data.collate import PairCollator, PrefixSharedCollator, pack_rows
from prefalign.data.tokenize import TokenizeSettings, tokenize_rows
from prefalign.logps import fast_token_logps, mask_kind, model_attention_mask, pair_logps, plain_token_logps
from prefalign.speed import FastPath
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, tiny_llama, token_logps


def pair_token_logps(model, batch, wanted, attention_mask=None):
    """The fast path on a collated batch with the given mask: pair-layout log-probs of the wanted tokens."""
    mask = batch["attention_mask"] if attention_mask is None else attention_mask
    return fast_token_logps(model, {**batch, "attention_mask": mask}, wanted.bool(), FastPath())[0]


def _rows():
    rows = conversational_rows(3)
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "user", "content": "Count to three, please, slowly and clearly."}],
                 "chosen": [{"role": "assistant", "content": "One, two, three."}],
                 "rejected": [{"role": "assistant", "content": "No." * 30}]})  # long: truncated below
    for word in ("Hi", "Yo"):  # short pairs: two of them fit in the longest pair's row when packing
        rows.append({"prompt": [{"role": "user", "content": word}], "chosen": [{"role": "assistant", "content": "Hey"}],
                     "rejected": [{"role": "assistant", "content": "Go away"}]})
    return rows


def _separate(model, examples):
    """Reference numbers: chosen and rejected as two right-padded sequences."""
    batch = PairCollator(0)(examples)
    tok = token_logps(model, batch["input_ids"], batch["attention_mask"], row_reply_mask(batch))
    n = len(examples)
    out = []
    for i, e in enumerate(examples):
        p = len(e["prompt_ids"])
        out.append((tok[i, p:p + len(e["chosen_ids"])], tok[n + i, p:p + len(e["rejected_ids"])]))
    return out


def _shared(model, examples, mask_kind="bool", pack=False):
    batch = PrefixSharedCollator(0, pack=pack)(examples)
    if pack:
        assert batch["input_ids"].shape[0] < len(examples)  # the case packs: fewer rows than pairs
    mask = batch["attention_mask"]
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    tok = pair_token_logps(model, batch, batch["chosen_mask"] | batch["rejected_mask"], attention_mask=mask)
    out = []
    for i, e in enumerate(examples):
        p, c, r = len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
        out.append((tok[i, p:p + c], tok[i, p + c:p + c + r]))
    return out


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_rows_match_separate_sequences_per_token(attn, pack):
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 3, attn_implementation=attn)
    examples, report = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    assert report.rejected_truncated == [4]  # truncation is part of the case
    # Different lengths per row, so both layouts pad.
    assert len({len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples}) > 1
    sep = _separate(model, examples)
    shared = _shared(model, examples, "bool" if attn == "sdpa" else "float", pack=pack)
    for (c1, r1), (c2, r2) in zip(sep, shared, strict=True):
        torch.testing.assert_close(c2, c1, atol=1e-5, rtol=0)
        torch.testing.assert_close(r2, r1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pack", [False, True])
def test_shared_rows_give_the_same_gradients(pack):
    tok = smollm2_tokenizer()
    examples, _ = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    grads = []
    for fn in (_separate, lambda m, e: _shared(m, e, pack=pack)):
        model = tiny_llama(tok, 3).double()
        loss = sum(c.sum() * 0.7 - r.sum() * 1.3 for c, r in fn(model, examples))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    biggest = max(g.abs().max().item() for g in grads[0].values())
    assert biggest > 1e-2  # the comparison is not between near-zero gradients
    for name in grads[0]:
        # float64 model, but Llama's RMSNorm computes in float32: agreement is to fp32 rounding, not fp64.
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_mask_and_positions_layout():
    ex = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
          {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [10, 11]}]
    b = PrefixSharedCollator(0, pack=False)(ex)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 7, 10, 11, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2]  # rejected restarts after the prompt
    assert b["predictor"][0, 5].item() == 1 and b["predictor"][1, 2].item() == 0  # first rejected <- last prompt
    m = b["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, False, False, False, True]  # rejected sees prompt + itself, not chosen
    assert m[4].tolist() == [True, True, True, True, True, False]
    pad = b["attention_mask"][1, 0]
    assert pad[4].tolist() == [False, False, False, False, True, False]  # padding sees only itself (no NaN)


def test_packed_layout_keeps_pairs_apart():
    ex = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},  # 6 tokens: the row length
          {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [11]},  # 3
          {"prompt_ids": [4], "chosen_ids": [8], "rejected_ids": [12]}]  # 3: packs with the previous one
    b = PrefixSharedCollator(0)(ex)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 7, 11, 4, 8, 12]]
    assert b["position_ids"][1].tolist() == [0, 1, 1, 0, 1, 1]  # each pair restarts at 0
    assert b["predictor"][1].tolist() == [0, 0, 0, 3, 3, 3]  # second pair's tokens read from its own prompt
    m = b["attention_mask"][1, 0]
    assert m[3].tolist() == [False, False, False, True, False, False]  # a pair never sees the one before it
    assert m[5].tolist() == [False, False, False, True, False, True]  # rejected: own prompt and itself
    assert b["pair_index"].tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 0, 0, 0], [9, 10, 11, 0, 0, 0]]
    assert b["chosen_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert b["rejected_mask"][2].tolist() == [0, 0, 1, 0, 0, 0]


@pytest.mark.parametrize(("lengths", "rows"), [([6, 3, 3], [[0], [1, 2]]), ([4, 4, 4], [[0], [1], [2]]),
                                               ([2, 5, 3, 1], [[1], [2, 0], [3]]), ([1, 1, 2], [[2], [0, 1]])])
def test_pack_rows_is_first_fit_decreasing(lengths, rows):
    assert pack_rows(lengths, max(lengths)) == rows


def test_flex_attention_block_mask_matches_separate_sequences():
    """flex_attention takes the same layout as a BlockMask. PyTorch runs it forward-only on CPU (its backward is
    GPU-only), so this checks the numbers without gradients; training on CPU is refused with a clear error."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    tok = smollm2_tokenizer()
    examples, _ = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    sep = _separate(tiny_llama(tok, 3), examples)
    model = tiny_llama(tok, 3, attn_implementation="flex_attention")
    batch = PrefixSharedCollator(0)(examples)
    mask = model_attention_mask(batch["attention_mask"], "block", torch.float32)
    assert type(mask).__name__ == "BlockMask"
    try:
        with torch.no_grad():
            tok_pairs = pair_token_logps(model, batch, batch["chosen_mask"] | batch["rejected_mask"],
                                         attention_mask=mask)
    except Exception as exc:  # flex attention compiles a kernel; a machine without a C++ compiler cannot
        if "compil" in str(exc).lower() or "cpp" in str(exc).lower():
            pytest.skip(f"flex attention could not compile here: {str(exc)[:200]}")
        raise
    for i, (c1, r1) in enumerate(sep):
        p, c, r = (len(examples[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        torch.testing.assert_close(tok_pairs[i, p:p + c], c1, atol=1e-5, rtol=0)
        torch.testing.assert_close(tok_pairs[i, p + c:p + c + r], r1, atol=1e-5, rtol=0)


def test_flex_attention_training_on_cpu_is_refused(tmp_path):
    from prefalign import DPOConfig, DPOTrainer
    from prefalign.errors import ConfigError

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 3, attn_implementation="flex_attention")
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="flex_attention' cannot train on CPU"):
        DPOTrainer(model, args=args, train_dataset=conversational_rows(2), processing_class=tok)


def _record_sdpa(monkeypatch, fail: bool = False) -> list:
    """Wrap torch's SDPA (looked up per call): per call (query heads, key heads, value heads, enable_gqa)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], value.shape[1], kwargs.get("enable_gqa", False)))
        if fail:
            raise RuntimeError("boom")
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_sdpa_keeps_grouped_kv_heads_with_a_4d_mask_on_cpu(monkeypatch, kind):
    """Inside the speed boundary, SDPA with a custom 4-D mask on CPU gets the 2 key/value heads as they are
    (enable_gqa) instead of copies repeated to the 4 query heads: same log-probs and gradients as without, the
    environment untouched, and the model's attention implementation back to "sdpa" afterwards."""
    from prefalign import speed

    tok = smollm2_tokenizer()
    examples, _ = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    batch = PrefixSharedCollator(0)(examples)
    wanted = (batch["chosen_mask"] | batch["rejected_mask"]).bool()
    weights = torch.randn(wanted.shape, generator=torch.Generator().manual_seed(5))
    calls = _record_sdpa(monkeypatch)
    env = dict(os.environ)
    results = {}
    for grouped in (True, False):
        model = tiny_llama(tok, 3, attn_implementation="sdpa")
        cfg = model.config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)  # grouped-query attention
        assert mask_kind(model) == "float"  # what the fast path builds for SDPA: one additive mask per batch
        mask = model_attention_mask(batch["attention_mask"], kind, model.dtype)
        assert mask.dim() == 4
        calls.clear()
        handle = speed.enable(model, None) if grouped else speed.Speed(FastPath(), [])
        with handle:
            assert handle.grouped_attention is grouped
            out = pair_token_logps(model, batch, wanted, attention_mask=mask)
            (out * weights).sum().backward()
        results[grouped] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(calls))
        assert cfg._attn_implementation == "sdpa" and dict(os.environ) == env
    layers = cfg.num_hidden_layers
    assert results[True][2] == [(4, 2, 2, True)] * layers  # grouped heads
    assert results[False][2] == [(4, 4, 4, False)] * layers  # repeated heads
    (on, grads_on, _), (off, grads_off, _) = results[True], results[False]
    assert (on[wanted] < 0).all()
    torch.testing.assert_close(on, off, atol=1e-6, rtol=0)
    assert max(g.abs().max().item() for g in grads_off.values()) > 1e-2  # not near-zero gradients
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, atol=1e-5, rtol=0)


def test_grouped_sdpa_leaves_padding_masks_eager_and_errors_alone(monkeypatch):
    """A 2-D padding mask still gets transformers' own mask; eager attention is never switched; a forward that
    raises inside the boundary still leaves the model as it was."""
    from prefalign import speed

    tok = smollm2_tokenizer()
    examples, _ = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    sep = PairCollator(0)(examples)
    model = tiny_llama(tok, 3, attn_implementation="sdpa")
    with torch.no_grad():
        plain = pair_logps(model, sep, FastPath())
        with speed.enable(model, None):
            grouped = pair_logps(model, sep, FastPath())
    torch.testing.assert_close(grouped.chosen, plain.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.rejected, plain.rejected, atol=1e-5, rtol=0)

    eager = tiny_llama(tok, 3, attn_implementation="eager")
    with speed.enable(eager, None) as handle:
        assert not handle.grouped_attention and eager.config._attn_implementation == "eager"

    batch = PrefixSharedCollator(0)(examples)
    calls = _record_sdpa(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="boom"), speed.enable(model, None):
        pair_logps(model, batch, FastPath())
    assert calls == [(4, 2, 2, True)] and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("collate", ["padded", "shared", "packed"])
def test_plain_path_is_the_oracle_for_every_layout(collate):
    """pair_logps without a FastPath (full logits of two ordinary sequences per pair) equals the fast path, for every
    collator, with the NLL's prompt tokens too (TRL's ORPO)."""
    tok = smollm2_tokenizer()
    examples, _ = tokenize_rows(_rows(), tok, TokenizeSettings(max_length=90))
    make = {"padded": PairCollator(0), "shared": PrefixSharedCollator(0, pack=False),
            "packed": PrefixSharedCollator(0)}[collate]
    batch = make(examples)
    model = tiny_llama(tok, 3).double()
    with torch.no_grad():
        fast = pair_logps(model, batch, FastPath(chunk_rows=5), nll_on_prompt=True)
        plain = pair_logps(model, batch, None, nll_on_prompt=True)
    for name in ("chosen", "rejected", "nll"):
        assert (getattr(plain, name) < 0).all()
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), atol=1e-6, rtol=0)
    for name in ("chosen_tokens", "rejected_tokens", "nll_tokens"):
        assert getattr(fast, name).tolist() == getattr(plain, name).tolist()
    p, c = (len(examples[0][k]) for k in ("prompt_ids", "chosen_ids"))
    assert fast.nll_tokens[0].item() == p - 1 + c  # the prompt after its first token, and the chosen reply
    wanted = batch["chosen_mask"].bool()
    torch.testing.assert_close(plain_token_logps(model, batch, wanted)[0].sum(-1), plain.chosen, atol=0, rtol=0)
