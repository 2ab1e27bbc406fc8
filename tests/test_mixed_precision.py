"""Mixed precision through the fast path: bf16 autocast over float32 weights (TrainingArguments bf16=True) and bf16
weights, for every method; the lean layers and fused head under autocast against plain autograd under autocast;
evaluate() against TRL under bf16; the reference cache keyed by precision; fp16 on CPU refused in one line; fp16
weights whose gradient norm overflows fp16 (issue 27's StopIteration)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import trl
from transformers import TrainerCallback

from prefalign import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    SFTConfig,
    SFTTrainer,
)
from prefalign.errors import ConfigError
from prefalign.speed import layers
from prefalign.speed.head import chunked_head_logps, gather_logps
from prefalign.trainer import nonfinite_part
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama, token_logps

BF16_TOL = 3e-2  # relative, for numbers computed through bf16 matmuls along two different routes


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = BF16_TOL) -> None:
    """a and b agree to ``tol`` relative to b's size (bf16 keeps 8 bits of mantissa)."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).norm() <= tol * b.norm() + 1e-6, ((a - b).norm().item(), b.norm().item())


def _ids(tok, n: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, len(tok), (n, length), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(model, ids, autocast: bool):
    """A weighted sum of the logits, computed under CPU bf16 autocast (or not); backward outside autocast, as the
    Trainer runs it (accelerate's autocast wraps the forward only)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits.float() * weights).sum().backward()
    return logits.float(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("weights", ["float32+autocast", "bfloat16"])
def test_lean_layers_match_plain_autograd_under_bf16(tok, weights):
    """The lean MLP and RMSNorm under bf16 (autocast over fp32 weights, or bf16 weights) give the stock modules'
    values and gradients, each gradient in its parameter's dtype; before the fix backward raised a dtype error."""
    autocast = weights == "float32+autocast"
    dtype = torch.float32 if autocast else torch.bfloat16
    ids = _ids(tok)
    stock = tiny_llama(tok, seed=1).to(dtype)
    lean = tiny_llama(tok, seed=1).to(dtype)
    patched = layers.apply(lean)
    assert len(patched) == 7  # 2 MLPs, 5 norms
    try:
        ref_logits, ref_grads = _loss_and_grads(stock, ids, autocast)
        logits, grads = _loss_and_grads(lean, ids, autocast)
    finally:
        layers.restore(patched)
    _close(logits, ref_logits)
    for name, g in ref_grads.items():
        assert grads[name].dtype == g.dtype == dtype, name
        _close(grads[name], g)
    # the comparison is not between two float32 computations: autocast really ran the MLP in bf16
    fp32_logits, _ = _loss_and_grads(tiny_llama(tok, seed=1), ids, autocast=False)
    assert (ref_logits - fp32_logits).abs().max() > 1e-4


def _head_case(rows: int = 40, vocab: int = 300, hidden: int = 16, bias: bool = False):
    g = torch.Generator().manual_seed(11)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    h = torch.randn(rows, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    return head, h, targets, upstream


@pytest.mark.parametrize("chunk_rows", [7, 64])  # several chunks (recomputed logits), one chunk (kept softmax)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_under_autocast_matches_plain_autograd_under_autocast(chunk_rows, bias):
    """The fused head under bf16 autocast: bf16 logits as nn.Linear gives them, the log-softmax in float32, and the
    gradients of float32 weights and hidden states, as plain autograd under the same autocast."""
    results = []
    for fused in (True, False):
        head, h, targets, upstream = _head_case(bias=bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (chunked_head_logps(head, h, targets, chunk_rows) if fused
                   else gather_logps(head(h), targets))
        assert out.dtype == torch.float32
        (out * upstream).sum().backward()  # outside autocast, as in the Trainer
        results.append((out, h.grad, head.weight.grad, head.bias.grad if bias else None))
    (out, gh, gw, gb), (ref, ref_gh, ref_gw, ref_gb) = results
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # same bf16 logits, same float32 log-softmax
    _close(gh, ref_gh)
    _close(gw, ref_gw)
    if bias:
        _close(gb, ref_gb)
    head, h, targets, _ = _head_case(bias=bias)
    exact = chunked_head_logps(head, h, targets, chunk_rows)  # float32 throughout: autocast did change the numbers
    assert (exact - out).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_fast_forward_under_autocast_matches_full_logits_under_autocast(tok, tied):
    """The whole fast forward (captured hidden states, fused head, tied-embedding gradient) under bf16 autocast
    against the model's own full logits under the same autocast: values and every gradient."""
    ids = _ids(tok)
    mask = torch.ones_like(ids)
    upstream = torch.randn(ids.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for full in (False, True):
        model = tiny_llama(tok, seed=1, tie_word_embeddings=tied, attn_implementation="sdpa")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = token_logps(model, ids, mask, mask, force_full_logits=full, chunk_rows=16)
        (lp * upstream).sum().backward()
        results.append((lp, {n: p.grad for n, p in model.named_parameters()}))
    (lp, grads), (ref, ref_grads) = results
    _close(lp, ref, 1e-3)
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.float32
        _close(grads[name], g)


# ----- trainers ------------------------------------------------------------------------------------------------------
def _rows(n: int = 4) -> list[dict]:
    return conversational_rows(n)


def _sft_rows(n: int = 4) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in conversational_rows(n)]


METHODS = {  # name: (trainer, config, extra options, rows)
    "dpo": (DPOTrainer, DPOConfig, {"beta": 0.5}, _rows),
    "orpo": (ORPOTrainer, ORPOConfig, {}, _rows),
    "cpo": (CPOTrainer, CPOConfig, {}, _rows),
    "kto": (KTOTrainer, KTOConfig, {}, _rows),
    "sft": (SFTTrainer, SFTConfig, {}, _sft_rows),
}
COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
              lr_scheduler_type="constant", max_length=96)


def _train(method: str, tmp_path, tok, precision: str, fast: bool, steps: int, lr: float = 5e-3,
           callbacks: list | None = None) -> tuple[list[float], object, object]:
    cls, conf, extra, rows = METHODS[method]
    model = tiny_llama(tok, 1, attn_implementation="sdpa")
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    args = conf(output_dir=str(tmp_path / f"{method}-{precision}-{fast}"), bf16=precision == "bf16-autocast",
                fast_path=fast, max_steps=steps, per_device_train_batch_size=2, learning_rate=lr, **COMMON, **extra)
    trainer = cls(model, args=args, train_dataset=rows(), processing_class=tok, callbacks=callbacks)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses, trainer, model


class _Dtypes(TrainerCallback):
    """The dtype the first MLP's gate projection produced during training (autocast actually on)."""

    def __init__(self, model):
        self.seen: set = set()
        model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype))


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_bf16_through_the_fast_path(tmp_path, tok, method, precision):
    """bf16 (autocast over float32 weights, or bf16 weights) trains every method through the fast path (prefix
    sharing, packing, fused head, lean layers, grouped SDPA, precomputed reference): finite losses that fall on a
    tiny set, the fast path's first losses equal to the plain path's under the same precision, and the speed
    machinery both on during training and gone after it."""
    seen: dict[str, object] = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["lean"] = sum("forward" in vars(m) for m in model.model.modules())
            seen["attention"] = model.config._attn_implementation
            seen["dtype"] = next(model.model.layers[0].mlp.parameters()).dtype

    losses, trainer, model = _train(method, tmp_path, tok, precision, True, 8, callbacks=[Look()])
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.05, losses
    assert seen["lean"] == 7 and seen["attention"] == "prefalign_grouped_sdpa"
    assert seen["dtype"] == (torch.float32 if precision == "bf16-autocast" else torch.bfloat16)
    assert trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16-autocast" else "no")
    assert not any("forward" in vars(m) for m in model.model.modules())  # nothing left behind (the root's
    assert model.config._attn_implementation == "sdpa"  # forward is accelerate's autocast wrapper, not ours)
    plain, _, _ = _train(method, tmp_path, tok, precision, False, 3)
    assert losses[:3] == pytest.approx(plain, rel=BF16_TOL, abs=2e-2)


def test_autocast_is_on_in_training_and_the_fast_path_follows_it(tmp_path, tok):
    """bf16=True really runs the forward in bf16 (the MLPs' projections give bf16), with float32 weights kept."""
    model = tiny_llama(tok, 1, attn_implementation="sdpa")
    look = _Dtypes(model)
    args = DPOConfig(output_dir=str(tmp_path), bf16=True, max_steps=1, per_device_train_batch_size=2, **COMMON)
    DPOTrainer(model, args=args, train_dataset=_rows(), processing_class=tok).train()
    assert look.seen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_reference_runs_in_the_policys_precision_and_is_cached_per_precision(tmp_path, tok, monkeypatch):
    """The precomputed reference runs under the same autocast as the policy: evaluating the untrained policy gives
    rewards of exactly 0 under bf16 (a float32 reference would differ by bf16 rounding). The cache key names the
    autocast dtype: an fp32 cache is not read under bf16 nor the reverse, and a second bf16 run reads its own."""
    monkeypatch.setenv("PREFALIGN_HOME", str(tmp_path / "home"))
    rows = conversational_rows(6)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True), ("bf16-again", True)):
        args = DPOConfig(output_dir=str(tmp_path / name), bf16=bf16, per_device_eval_batch_size=3, **COMMON)
        trainer = DPOTrainer(tiny_llama(tok, 1, attn_implementation="sdpa"), args=args, train_dataset=rows,
                             eval_dataset=rows, processing_class=tok)
        runs[name] = (trainer.reference_cache["train"], trainer.evaluate())
    (fp32_how, fp32_path), fp32_metrics = runs["fp32"]
    (bf16_how, bf16_path), bf16_metrics = runs["bf16"]
    assert fp32_how == bf16_how == "computed" and fp32_path != bf16_path and "amp-bfloat16" in bf16_path
    assert "amp" not in fp32_path
    assert runs["bf16-again"][0] == ("read", bf16_path)
    assert runs["bf16-again"][1]["eval_logps/chosen"] == bf16_metrics["eval_logps/chosen"]
    assert bf16_metrics["eval_rewards/margins"] == 0.0 and bf16_metrics["eval_rewards/chosen"] == 0.0
    # the two precisions do differ: the bf16 log-probs are not the float32 ones
    assert bf16_metrics["eval_logps/chosen"] != fp32_metrics["eval_logps/chosen"]
    assert bf16_metrics["eval_logps/chosen"] == pytest.approx(fp32_metrics["eval_logps/chosen"], rel=BF16_TOL)


# ----- parity with TRL under bf16 -----------------------------------------------------------------------------------
def test_dpo_evaluate_matches_trl_under_bf16(tmp_path, tok):
    """evaluate() against TRL 1.13's under bf16 autocast, policy and reference different models."""
    from test_parity import DPO_METRICS, _dpo_both, _multi_turn_rows

    ds = datasets.Dataset.from_list(_multi_turn_rows())
    cfg = dict(per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=True, max_length=256, seed=0,
               output_dir=str(tmp_path), beta=0.5, precompute_ref_log_probs=True)
    ours, theirs = _dpo_both(tok, ds, cfg)
    for name in DPO_METRICS:
        key = f"eval_{name}"
        assert ours[key] == pytest.approx(theirs[key], rel=BF16_TOL, abs=2e-2), key
    assert abs(ours["eval_rewards/margins"]) > 0.1


def test_orpo_evaluate_matches_trl_under_bf16(tmp_path, tok):
    from test_parity import ORPO_METRICS, _multi_turn_rows
    from trl.experimental.orpo import ORPOConfig as TrlORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TrlORPOTrainer

    ds = datasets.Dataset.from_list(_multi_turn_rows())
    cfg = dict(per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=True, max_length=256, seed=0,
               output_dir=str(tmp_path), beta=0.25)
    ours = ORPOTrainer(tiny_llama(tok, 1), args=ORPOConfig(**cfg, trl_compat=True), train_dataset=ds,
                       eval_dataset=ds, processing_class=tok).evaluate()
    theirs = TrlORPOTrainer(tiny_llama(tok, 1), args=TrlORPOConfig(**cfg, gradient_checkpointing=False),
                            train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    for name in ORPO_METRICS:
        key = f"eval_{name}"
        assert ours[key] == pytest.approx(theirs[key], rel=BF16_TOL, abs=2e-2), key
    assert trl.__version__  # the oracle is the installed TRL


# ----- fp16 -----------------------------------------------------------------------------------------------------------
def test_fp16_autocast_on_cpu_is_refused_in_one_line(tmp_path, tok, capsys):
    """accelerate runs fp16=True on CPU as plain float32 without saying so: refused before the model loads."""
    from prefalign.cli import main

    args = DPOConfig(output_dir=str(tmp_path / "lib"), fp16=True, **COMMON)
    with pytest.raises(ConfigError, match="fp16 mixed precision does not run on CPU.*bf16: true"):
        DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=_rows(), processing_class=tok)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    code = main(["train", "--dataset", str(data), "--output-dir", str(tmp_path / "cli"), "--set", "fp16=true",
                 "--set", "use_cpu=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fp16 mixed precision does not run on CPU" in err[0]
    assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())


def test_fp16_gradients_whose_norm_overflows_are_not_called_nonfinite():
    """Issue 27: with float16 weights the fused gradient norm can overflow (fp16 tops out at 65504) while every
    gradient is finite; the check then raised StopIteration. Now it confirms tensor by tensor."""
    model = torch.nn.Sequential(torch.nn.Linear(100, 100, bias=False), torch.nn.Linear(100, 100, bias=False)).half()
    for p in model.parameters():
        p.grad = torch.full_like(p, 500.0)  # each finite; the norm, 500 * sqrt(20000) = 70711, overflows fp16
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    loss = torch.tensor(1.0, dtype=torch.float16)
    assert nonfinite_part(loss, model) is None
    model[1].weight.grad[3, 4] = float("inf")
    assert nonfinite_part(loss, model) == "gradient of 1.weight"
    assert nonfinite_part(torch.tensor(float("nan")), model) == "loss"


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_float16_weights_train_through_the_fast_path(tmp_path, tok, method):
    """A model loaded in float16 (no autocast) trains through the fast path as through the plain path. Only two
    steps: pure-fp16 AdamW (eps 1e-8 is 0 in fp16) diverges after three or four steps on this tiny set whichever
    path computes the log-probs."""
    runs = []
    for fast in (True, False):
        cls, conf, extra, rows = METHODS[method]
        model = tiny_llama(tok, 1, attn_implementation="sdpa").half()
        args = conf(output_dir=str(tmp_path / str(fast)), max_steps=2, per_device_train_batch_size=2,
                    learning_rate=1e-3, fast_path=fast, **COMMON, **extra)
        trainer = cls(model, args=args, train_dataset=rows(), processing_class=tok)
        trainer.train()
        runs.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
        assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert len(runs[0]) == 2 and all(torch.isfinite(torch.tensor(runs[0])))
    assert runs[0][1] < runs[0][0]
    assert runs[0] == pytest.approx(runs[1], rel=BF16_TOL)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_says_so_once(tmp_path, tok, monkeypatch, caplog, has_bf16):
    import logging

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=conversational_rows(2), processing_class=tok)
    lines = [r.getMessage() for r in caplog.records if "bf16 matrix instructions" in r.getMessage()]
    assert len(lines) == (0 if has_bf16 else 1)
    if lines:
        assert "bf16: false trains faster" in lines[0]


@pytest.mark.parametrize(("has_bf16", "bf16", "weights", "hinted"), [
    (True, False, torch.float32, True),     # fp32 weights, no autocast, bf16 hardware: the hint
    (False, False, torch.float32, False),   # no bf16 hardware: nothing to suggest
    (True, True, torch.float32, False),     # already bf16
    (True, False, torch.bfloat16, False),   # bf16 weights: already fast
])
def test_a_float32_run_on_a_cpu_with_bf16_hardware_gets_one_hint(tmp_path, tok, monkeypatch, caplog, has_bf16,
                                                                 bf16, weights, hinted):
    import logging

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_bf16)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=bf16, max_steps=1)
    with caplog.at_level(logging.INFO, logger="prefalign"):
        DPOTrainer(tiny_llama(tok, 1).to(weights), args=args, train_dataset=conversational_rows(2),
                   processing_class=tok)
    lines = [r.getMessage() for r in caplog.records if "multiplies bf16 in hardware" in r.getMessage()]
    assert len(lines) == (1 if hinted else 0)
    if lines:
        assert "bf16: true" in lines[0] and "keeps float32 unless asked" in lines[0]
