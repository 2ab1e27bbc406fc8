"""token_logps on a tiny Llama: the chunked LM-head path against full logits, values and gradients."""

from __future__ import annotations

import types

import pytest
import torch

from prefalign.data.collate import PairCollator
from prefalign.data.tokenize import TokenizeSettings, tokenize_rows
from prefalign.speed.forward import can_chunk
from prefalign.speed.head import chunked_head_logps
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, tiny_llama, token_logps

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    """A real right-padded DPO batch: 3 pairs, chosen rows then rejected rows, completion_mask as the target mask."""
    pairs, _ = tokenize_rows(conversational_rows(3), tok, TokenizeSettings())
    b = PairCollator(pad_token_id=tok.pad_token_id)(pairs)
    assert (b["attention_mask"] == 0).any()  # there is padding
    return b


@pytest.fixture()
def model(tok):
    return tiny_llama(tok, seed=0)


def naive_logps(model, input_ids, attention_mask, target_mask) -> torch.Tensor:
    """out[i, t] = log softmax(logits[i, t - 1])[input_ids[i, t]] where target_mask[i, t], from the full logits."""
    logp = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
    out = torch.zeros(input_ids.shape)
    for i in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if target_mask[i, t]:
                out[i, t] = logp[i, t - 1, input_ids[i, t]]
    return out


def _inputs(batch):
    return batch["input_ids"], batch["attention_mask"], row_reply_mask(batch)


def test_token_logps_matches_full_logits(model, batch):
    ids, attn, target = _inputs(batch)
    assert can_chunk(model)
    with torch.no_grad():
        ref = naive_logps(model, ids, attn, target)
        chunked = token_logps(model, ids, attn, target, chunk_rows=3)
        full = token_logps(model, ids, attn, target, force_full_logits=True)
        default = token_logps(model, ids, attn, target)
    assert chunked.shape == ids.shape and chunked.dtype == torch.float32
    assert torch.allclose(chunked, ref, atol=TOL, rtol=0)
    assert torch.allclose(full, ref, atol=TOL, rtol=0)
    assert torch.allclose(default, ref, atol=TOL, rtol=0)
    # zero exactly off the target mask (prompt, padding, position 0); negative on it
    assert (chunked[target == 0] == 0).all()
    assert (chunked[:, 1:][target[:, 1:] == 1] < 0).all()
    # a random model over ~49k tokens: per-token log-probs near -log(49152) = -10.8
    assert chunked[target.bool()].mean().item() == pytest.approx(-10.8, abs=0.5)


def test_token_logps_with_a_sparse_target_mask(model, batch):
    ids, attn, _ = _inputs(batch)
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(ids.shape, generator=gen) < 0.3).long() * attn  # any subset of real tokens
    with torch.no_grad():
        ref = naive_logps(model, ids, attn, target)
        got = token_logps(model, ids, attn, target, chunk_rows=5)
    assert torch.allclose(got, ref, atol=TOL, rtol=0)


def _grads(model, batch, weights, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids, attn, target = _inputs(batch)
    logps = token_logps(model, ids, attn, target, **kw)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_chunked_gradients_match_full_logits(tok, batch):
    n_targets = int(row_reply_mask(batch)[:, 1:].sum())
    assert n_targets > 3 * 5  # several chunks of 3 rows
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    # float64 weights, so the two paths differ only in how they compute, not in float32 rounding (the log-softmax
    # itself runs in float32 on both paths)
    model = tiny_llama(tok, seed=0).double()
    v_chunk, g_chunk = _grads(model, batch, weights, chunk_rows=3)
    v_full, g_full = _grads(model, batch, weights, force_full_logits=True)
    assert torch.allclose(v_chunk, v_full, atol=TOL, rtol=0)
    assert set(g_chunk) == set(g_full) and len(g_full) > 10
    for name, g in g_full.items():
        assert torch.allclose(g_chunk[name], g, atol=TOL, rtol=0), name
    # the gradient is not trivially zero: every layer and the head get a signal
    assert g_full["lm_head.weight"].abs().sum() > 0
    assert g_full["model.embed_tokens.weight"].abs().sum() > 0
    assert all(g.abs().sum() > 0 for n, g in g_full.items() if "layers" in n)


def test_chunked_gradients_match_full_logits_float32(model, batch):
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    _, g_chunk = _grads(model, batch, weights, chunk_rows=3)
    _, g_full = _grads(model, batch, weights, force_full_logits=True)
    for name, g in g_full.items():
        # float32: d hidden = sum_v p_v W_v - W_target cancels over 49k vocabulary rows, so summation order (a 3-row
        # matmul vs a batched one) moves the trunk's gradients by ~6e-6 of their scale; bound it at 3e-5 of the scale
        scale = max(1.0, g.abs().max().item())
        assert (g_chunk[name] - g).abs().max().item() <= 3e-5 * scale, name


class UnknownLM(torch.nn.Module):
    """A causal LM prefalign does not know: must take the full-logits path (and never get logits_to_keep)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = types.SimpleNamespace(model_type="my_custom_lm")
        self.seen_kwargs: list[set[str]] = []

    def forward(self, **kw):
        self.seen_kwargs.append(set(kw))
        return self.inner(**kw)


class DDPLike(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def test_unknown_model_type_falls_back_to_full_logits(model, batch):
    ids, attn, target = _inputs(batch)
    unknown = UnknownLM(model)
    assert not can_chunk(unknown)
    assert not can_chunk(torch.nn.Linear(2, 2))
    with torch.no_grad():
        got = token_logps(unknown, ids, attn, target, chunk_rows=3)
        ref = naive_logps(model, ids, attn, target)
    assert torch.allclose(got, ref, atol=TOL, rtol=0)
    assert unknown.seen_kwargs and all("logits_to_keep" not in kw for kw in unknown.seen_kwargs)


def test_wrapped_model_is_unwrapped(model, batch):
    ids, attn, target = _inputs(batch)
    wrapped = DDPLike(model)
    assert can_chunk(wrapped)
    with torch.no_grad():
        got = token_logps(wrapped, ids, attn, target, chunk_rows=4)
        ref = naive_logps(model, ids, attn, target)
    assert torch.allclose(got, ref, atol=TOL, rtol=0)


class RecordingHead(torch.nn.Module):
    """Wraps an LM head and records the shape of every input it sees."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.head(x)


def test_chunked_head_logps_never_holds_more_than_chunk_rows(model):
    head = RecordingHead(model.lm_head)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (10,), generator=gen)
    out = chunked_head_logps(head, hidden, targets, chunk_rows=3)
    assert head.shapes == [(3, 32), (3, 32), (3, 32), (1, 32)]
    ref = model.lm_head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(out, ref, atol=TOL, rtol=0)
    # backward recomputes each chunk's logits (checkpointing) instead of keeping them: again at most 3 rows at a time
    head.shapes.clear()
    out.sum().backward()
    assert sorted(head.shapes) == sorted([(3, 32), (3, 32), (3, 32), (1, 32)])
    ref_grad = torch.autograd.grad(ref.sum(), hidden)[0]
    assert torch.allclose(hidden.grad, ref_grad, atol=TOL, rtol=0)
    # no-grad: one pass, same chunks
    head.shapes.clear()
    with torch.no_grad():
        chunked_head_logps(head, hidden, targets, chunk_rows=4)
    assert head.shapes == [(4, 32), (4, 32), (2, 32)]
    empty = chunked_head_logps(head, hidden[:0], targets[:0], chunk_rows=4)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_token_logps_runs_the_head_in_chunks(model, batch):
    ids, attn, target = _inputs(batch)
    head = RecordingHead(model.lm_head)
    model.lm_head = head
    assert model.get_output_embeddings() is head
    n_targets = int(target[:, 1:].sum())
    with torch.no_grad():
        token_logps(model, ids, attn, target, chunk_rows=7)
    # the model's own forward runs the head on the last position only (logits_to_keep=1) ...
    assert head.shapes[0] == (ids.shape[0], 1, 32)
    # ... and prefalign then runs it on the target rows, at most 7 at a time
    rows = [s[0] for s in head.shapes[1:]]
    assert all(len(s) == 2 for s in head.shapes[1:])
    assert max(rows) == 7 and sum(rows) == n_targets and len(rows) == -(-n_targets // 7)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_head_matches_log_softmax_and_its_gradients(bias):
    """The fused path (plain nn.Linear head) against autograd through a full log_softmax, in float64."""
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(11, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=gen)
    upstream = torch.randn(11, generator=gen, dtype=torch.float64)
    out = chunked_head_logps(head, hidden, targets, chunk_rows=4)  # chunks of 4, 4, 3
    assert out.grad_fn is not None and "LinearHeadLogps" in type(out.grad_fn).__name__
    ref = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    got = torch.autograd.grad((out * upstream).sum(), params)
    want = torch.autograd.grad((ref * upstream).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-12, rtol=0)
        assert w.abs().sum() > 0
    # a repeated target row and a frozen head: only the hidden gradient is produced
    head.requires_grad_(False)
    targets[1] = targets[0]
    out = chunked_head_logps(head, hidden, targets, chunk_rows=4)
    (gh,) = torch.autograd.grad(out.sum(), [hidden])
    ref = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(gh, torch.autograd.grad(ref.sum(), [hidden])[0], atol=1e-12, rtol=0)


def test_fused_linear_head_in_bfloat16_computes_the_log_softmax_in_float32():
    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(9, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (9,), generator=gen)
    out = chunked_head_logps(head, hidden, targets, chunk_rows=4)
    ref = head(hidden).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6, rtol=0)
    out.sum().backward()
    ref_grad = torch.autograd.grad(ref.sum(), [hidden])[0]
    assert hidden.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden.grad.float(), ref_grad.float(), atol=2e-2, rtol=0)


def test_fused_head_reuses_the_softmax_when_one_chunk_holds_every_row():
    """One chunk: backward uses forward's softmax (no second logits matmul); several: it recomputes. Same gradients."""
    gen = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=gen)
    upstream = torch.randn(7, generator=gen, dtype=torch.float64)
    calls = []
    original = torch.mm

    def counting_mm(a, b, **kw):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, **kw)

    grads = {}
    for chunk_rows in (None, 7, 3):
        torch.mm = counting_mm
        try:
            out = chunked_head_logps(head, hidden, targets, chunk_rows=chunk_rows)
            grads[chunk_rows] = torch.autograd.grad((out * upstream).sum(), [hidden, head.weight])
        finally:
            torch.mm = original
        logits_mms = [c for c in calls if c[1] == (16, 50)]  # hidden @ W^T: forward, and backward's recompute
        assert len(logits_mms) == (1 if chunk_rows in (None, 7) else 2 * 3), chunk_rows
        calls.clear()
    for g3, g7 in zip(grads[3], grads[7], strict=True):
        assert torch.allclose(g3, g7, atol=1e-12, rtol=0)


@pytest.mark.parametrize("padding_idx", [None, "pad"])
def test_tied_embedding_gets_the_same_dense_gradient(tok, batch, padding_idx):
    """Tied input/output embeddings (as SmolLM2): the sparse-row embedding gradient summed into the LM head's equals
    nn.Embedding's dense one, padding row included, and the weight's .grad stays dense."""
    model = tiny_llama(tok, seed=0, tie_word_embeddings=True).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens.padding_idx = tok.pad_token_id if padding_idx else None
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    _, g_sparse = _grads(model, batch, weights, chunk_rows=4)
    _, g_full = _grads(model, batch, weights, force_full_logits=True)
    grad = model.lm_head.weight.grad
    assert grad.layout == torch.strided and not grad.is_sparse
    for name, g in g_full.items():
        assert torch.allclose(g_sparse[name], g, atol=TOL, rtol=0), name
    if padding_idx:  # the pad token is in the batch as input, yet its row only gets the LM head's share
        assert (batch["input_ids"] == tok.pad_token_id).any()


def test_tied_embedding_adds_its_rows_into_the_head_gradient_in_place(tok, batch):
    """No second [vocab, hidden] tensor in backward: autograd's own dense + sparse sum of the tied weight's two
    gradients is out of place; the embedding adds its rows into the head's gradient instead, which becomes .grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_llama(tok, seed=0, tie_word_embeddings=True)
    weight = model.lm_head.weight
    ids, attn, target = _inputs(batch)
    logps = token_logps(model, ids, attn, target, chunk_rows=4)
    made: list[tuple[str, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == weight.shape and out.layout == torch.strided:
                made.append((func.overloadpacket.__name__, out.untyped_storage().data_ptr()))
            return out

    with Record():
        logps.sum().backward()
    names = [n for n, _ in made]
    assert names.count("empty_like") == 1 and "index_add_" in names, names  # one buffer; the rows go into it
    assert not {"add", "clone", "_to_copy", "copy_"} & set(names), names
    buffer = made[names.index("empty_like")][1]
    assert weight.grad.untyped_storage().data_ptr() == buffer and not weight.grad.is_sparse
