"""layers.py: the lean MLP and RMSNorm match the stock modules (values, gradients) and keep fewer bytes."""

from __future__ import annotations

import pytest
import torch

from prefalign import layers
from tiny import smollm2_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    loss = (logits * weights).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patched_model_matches_stock_values_and_gradients(tok):
    model = tiny_llama(tok, seed=4)
    ids = torch.randint(0, tok.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    stock_loss, stock = _loss_and_grads(model, ids)
    n_layers = model.config.num_hidden_layers
    assert layers.apply(model) == n_layers + 2 * n_layers + 1  # MLPs, two norms per layer, the final norm
    assert layers.apply(model) == 0  # idempotent
    lean_loss, lean = _loss_and_grads(model, ids)
    assert lean_loss.item() == pytest.approx(stock_loss.item(), rel=1e-5)
    for name, g in stock.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (lean[name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    layers.restore(model)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_stock_module_in_its_dtype(tok, dtype):
    norm = tiny_llama(tok, seed=1).model.norm.to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(3)).to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    outs = []
    for patch in (False, True):
        if patch:
            assert layers.apply(norm) == 1
        xi = x.clone().requires_grad_()
        y = norm(xi)
        gx, gw = torch.autograd.grad(y, [xi, norm.weight], grad)
        outs.append((y, gx, gw))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(outs[0], outs[1], strict=True):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)


def test_lean_layers_keep_fewer_bytes_for_backward(tok):
    """Bytes autograd keeps during forward, counted with saved-tensor hooks: the lean version keeps per token and
    layer 2 x intermediate fewer floats (silu output and product) and 2 x 2 x hidden fewer (two norms)."""
    model = tiny_llama(tok, seed=4)
    cfg = model.config
    ids = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # one count per storage
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum()
        return sum(seen.values())

    stock = saved_bytes()
    layers.apply(model)
    lean = saved_bytes()
    tokens, n = ids.numel(), cfg.num_hidden_layers
    # per layer: MLP 2 x intermediate, two norms x (hidden kept by the stock weight-multiply); final norm: hidden
    expected = 4 * tokens * (n * (2 * cfg.intermediate_size + 2 * cfg.hidden_size) + cfg.hidden_size)
    assert stock - lean == expected


def test_unknown_or_different_modules_are_left_alone(tok):
    model = tiny_llama(tok, seed=0)
    mlp = model.model.layers[0].mlp
    mlp.act_fn = torch.nn.GELU()  # not SiLU: not Llama's MLP any more
    norm = model.model.layers[0].input_layernorm
    norm.forward = norm.forward  # someone else's patch: keep it
    layers.apply(model)
    assert "forward" not in vars(mlp)
    assert vars(norm)["forward"].__func__ is not layers._rmsnorm_forward
