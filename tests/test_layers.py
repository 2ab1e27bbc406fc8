"""speed/layers.py: the lean MLP and RMSNorm match the stock modules (values, gradients) and keep fewer bytes."""

from __future__ import annotations

import pytest
import torch

from prefalign import speed
from prefalign.speed import layers
from tiny import smollm2_tokenizer, tiny_llama, token_logps


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    loss = (logits * weights).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_model_matches_stock_values_and_gradients(tok):
    model = tiny_llama(tok, seed=4)
    ids = torch.randint(0, tok.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    stock_loss, stock = _loss_and_grads(model, ids)
    n_layers = model.config.num_hidden_layers
    assert len(layers.apply(model)) == n_layers + 2 * n_layers + 1  # MLPs, two norms per layer, the final norm
    assert len(layers.apply(model)) == 0  # idempotent
    lean_loss, lean = _loss_and_grads(model, ids)
    assert lean_loss.item() == pytest.approx(stock_loss.item(), rel=1e-5)
    for name, g in stock.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (lean[name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    layers.restore(model.modules())
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
            assert len(layers.apply(norm)) == 1
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


def _recipe_log(monkeypatch):
    """Wrap layers._pack/_unpack: the recipes made (saved tensors stored as _SavedView), the bytes of the storages
    still kept as tensors (one count per storage), and the recipes unpacked in backward."""
    log = {"recipes": [], "kept": {}, "unpacked": []}
    pack, unpack = layers._pack, layers._unpack

    def counting_pack(t):
        saved = pack(t)
        if isinstance(saved, layers._SavedView):
            log["recipes"].append(saved)
        else:
            log["kept"][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return saved

    def counting_unpack(saved):
        if isinstance(saved, layers._SavedView):
            log["unpacked"].append(saved)
        return unpack(saved)

    monkeypatch.setattr(layers, "_pack", counting_pack)
    monkeypatch.setattr(layers, "_unpack", counting_unpack)
    return log


def _saved_bytes_and_grads(model, ids):
    """_loss_and_grads, with the bytes of the storages autograd saves (one count per storage) counted by a hook."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = _loss_and_grads(model, ids)
    return sum(seen.values()), loss, grads


def test_rebuilt_norm_outputs_give_identical_gradients_and_keep_fewer_bytes(tok, monkeypatch):
    """Inside recompute_norm_outputs a patched norm's output saved by the layers it feeds is a recipe: per decoder
    layer q, k and v save the input norm's output (3 recipes, one rebuild) and gate and up the post-attention norm's
    (2 recipes, one rebuild); the LM head saves the final norm's. Rebuilt by the same ops, so bit-identical."""
    model = tiny_llama(tok, seed=4)
    layers.apply(model)
    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    ids = torch.randint(0, tok.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    log = _recipe_log(monkeypatch)
    plain_loss, plain = _loss_and_grads(model, ids)
    assert log == {"recipes": [], "kept": {}, "unpacked": []}  # outside the context: no hook, nothing changes
    plain_bytes, loss_again, _ = _saved_bytes_and_grads(model, ids)
    assert torch.equal(loss_again, plain_loss)

    with layers.recompute_norm_outputs():
        lean_loss, lean = _loss_and_grads(model, ids)
    assert torch.equal(lean_loss, plain_loss)
    for name, g in plain.items():
        assert torch.equal(lean[name], g), name
    assert len(log["recipes"]) == 5 * n + 1 == 11
    assert len({id(r.out) for r in log["recipes"]}) == 2 * n + 1  # one recorded output per norm
    assert sorted(map(id, log["unpacked"])) == sorted(map(id, log["recipes"]))  # each one used once, in backward
    assert all(tuple(r.size) == (ids.numel(), hidden) for r in log["recipes"])  # the projections' 2-D views
    # bytes kept: 2 norm outputs per layer and the final one, each [tokens, hidden] float32, fewer
    assert plain_bytes - sum(log["kept"].values()) == 4 * ids.numel() * hidden * (2 * n + 1)

    log["recipes"].clear()
    _loss_and_grads(model, ids)  # after the block: nothing recorded any more
    assert log["recipes"] == [] and getattr(layers._recording, "outputs", None) is None


def test_unpatched_model_is_unaffected_by_the_context(tok, monkeypatch):
    """Only patched norms record their outputs: a stock model's saved tensors all stay tensors, same gradients."""
    model = tiny_llama(tok, seed=4)
    ids = torch.randint(0, tok.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    plain_loss, plain = _loss_and_grads(model, ids)
    log = _recipe_log(monkeypatch)
    with layers.recompute_norm_outputs():
        loss, grads = _loss_and_grads(model, ids)
    assert log["recipes"] == [] and log["unpacked"] == [] and log["kept"]  # the hook ran, made no recipe
    assert torch.equal(loss, plain_loss)
    for name, g in plain.items():
        assert torch.equal(grads[name], g), name


def test_fast_path_rebuilds_norm_outputs_only_inside_the_boundary_that_patched_the_model(tok, monkeypatch):
    """The speed boundary patches the model and tells the fast path (FastPath.rebuild_norm_outputs) to rebuild norm
    outputs: with grad enabled only (nothing is saved under no_grad); never for an unpatched or restored model."""

    model = tiny_llama(tok, seed=4)
    ids = torch.randint(0, tok.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    mask, target = torch.ones_like(ids), torch.ones_like(ids)
    log = _recipe_log(monkeypatch)
    token_logps(model, ids, mask, target).sum().backward()
    assert log["recipes"] == [] and log["kept"] == {}  # outside the boundary: the context is not entered at all
    with speed.enable(model, None) as handle:
        assert handle.lean_modules == 7 and handle.path.rebuild_norm_outputs  # 2 MLPs, 2 x 2 norms, final norm
        with torch.no_grad():
            ref = token_logps(model, ids, mask, target, path=handle.path)
        assert log["recipes"] == [] and log["kept"] == {}
        model.zero_grad(set_to_none=True)
        out = token_logps(model, ids, mask, target, path=handle.path)
        n = model.config.num_hidden_layers
        # 5 per layer; the final norm's last position, read by the LM head at logits_to_keep=1 (unused in backward)
        assert len(log["recipes"]) == 5 * n + 1
        assert torch.equal(out.detach(), ref)
        out.sum().backward()
        assert len(log["unpacked"]) == 5 * n
        path = handle.path
    assert all("forward" not in vars(m) for m in model.modules())  # undone
    log["recipes"].clear()
    token_logps(model, ids, mask, target, path=path)
    assert log["recipes"] == []


def _lora_model(tok, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tok, seed=4)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero: make the adapters count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lean_mlp_under_lora_matches_peft_and_keeps_fewer_bytes(tok):
    """A LoRA-wrapped down projection: the lean MLP computes base(h) and A(h) in one function that keeps gate and up
    only; values and adapter gradients equal PEFT's own forward, and two [tokens, intermediate] tensors per layer
    fewer are kept (h, and silu(gate)); with the adapter disabled it is the base model again."""
    model = _lora_model(tok)
    model.eval()
    ids = torch.randint(0, tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    stock_bytes, stock_loss, stock = _saved_bytes_and_grads(model, ids)
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    mlps = [m for m in layers.apply(model) if type(m).__name__ == "LlamaMLP"]
    assert len(mlps) == model.config.num_hidden_layers
    lean_bytes, lean_loss, lean = _saved_bytes_and_grads(model, ids)
    assert lean_loss.item() == pytest.approx(stock_loss.item(), rel=1e-5)
    assert set(lean) == set(stock) and any("down_proj.lora_A" in n for n in lean)
    assert all("lora_" in n for n in lean)
    for name, g in stock.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (lean[name] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    cfg = model.config
    tokens, n = ids.numel(), cfg.num_hidden_layers
    assert stock_bytes - lean_bytes >= 4 * tokens * n * 2 * cfg.intermediate_size
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)  # the stock path, adapter off
    layers.restore(model.modules())


def test_lean_mlp_under_lora_with_dropout_is_the_stock_computation(tok):
    model = _lora_model(tok, dropout=0.1)
    model.train()
    ids = torch.randint(0, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    _, stock_loss, stock = _saved_bytes_and_grads(model, ids)
    layers.apply(model)
    torch.manual_seed(5)  # the same dropout masks: the patched MLP defers to PEFT's forward
    _, lean_loss, lean = _saved_bytes_and_grads(model, ids)
    assert lean_loss.item() == pytest.approx(stock_loss.item(), rel=1e-5)  # the lean norms round differently
    for name, g in stock.items():
        assert (lean[name] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), 1.0), name


def test_lean_mlp_under_bf16_autocast_over_float32_weights(tok):
    """TrainingArguments' bf16 on float32 weights is autocast around the forward only (the Trainer's backward runs
    outside it): the lean MLP's backward gets a bf16 gradient and float32 weights, and must give float32 weight
    gradients close to the stock module's under the same autocast."""
    model = tiny_llama(tok, seed=4)
    ids = torch.randint(0, tok.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    grads = []
    for patch in (False, True):
        if patch:
            layers.apply(model)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(logits.dtype)
        (logits * weights).float().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    layers.restore(model.modules())
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name].dtype == g.dtype == torch.float32, name
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (grads[1][name] - g).abs().max().item() <= 5e-2 * scale, name
