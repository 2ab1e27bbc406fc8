"""The model families TRL's tests train (Qwen2/3, Qwen3-MoE, GPT-OSS, Cohere2, Olmo3, LFM2, Gemma 1/2/3): the fast
path gives the plain path's numbers, or falls back where it cannot; MoE models get TRL 1.16's router aux loss."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch

from prefalign import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from prefalign.errors import ConfigError
from prefalign.kto import KTOTrainer
from prefalign.router import find_router, load_balancing_loss
from tiny import FAMILIES, conversational_rows, smollm2_tokenizer, tiny_family, tiny_llama

COMMON = dict(report_to=[], use_cpu=True, bf16=False, seed=0, per_device_train_batch_size=2,
              per_device_eval_batch_size=3, max_steps=1, learning_rate=1e-3, logging_steps=1, save_strategy="no")
MOE = ["qwen3_moe", "gpt_oss"]


def _dpo(tok, model, tmp_path, **cfg) -> DPOTrainer:
    return DPOTrainer(model, args=DPOConfig(output_dir=str(tmp_path), **{**COMMON, **cfg}),
                      train_dataset=conversational_rows(4), eval_dataset=conversational_rows(3), processing_class=tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_path_equals_plain_path(family, tmp_path):
    """Pair log-probs of a default (prefix-shared where allowed) batch, fast vs plain; then one DPO step's loss with
    fast_path on and off. Sliding windows (8 tokens) are shorter than the sequences, so a mask without them fails."""
    tok = smollm2_tokenizer()
    trainer = _dpo(tok, tiny_family(family, tok, 1), tmp_path, precompute_ref_log_probs=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] > 8
    with torch.no_grad():
        plain = trainer.batch_logps(trainer.model, batch, policy=True)
        plain_aux = trainer._aux_loss
        with trainer.fast():
            fast = trainer.batch_logps(trainer.model, batch, policy=True)
            fast_aux = trainer._aux_loss
    torch.testing.assert_close(fast.chosen, plain.chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast.rejected, plain.rejected, atol=1e-4, rtol=1e-5)
    assert plain.chosen.abs().min() > 1  # real log-probs, not zeros
    if family in MOE:  # prefix-shared rows weigh the shared prompt twice: TRL's number on TRL's layout
        torch.testing.assert_close(fast_aux, plain_aux, atol=1e-5, rtol=1e-5)
    else:
        assert plain_aux is None and not trainer.aux_loss_enabled
    losses = []
    for fast_path in (True, False):
        t = _dpo(tok, tiny_family(family, tok, 1), tmp_path / str(fast_path), fast_path=fast_path)
        t.train()
        losses.append(t.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_layouts_and_fallbacks_are_named_once(caplog, monkeypatch):
    """Sliding windows get a windowed mask per layer type; LFM2's convolutions and soft-capped or scaled logits
    fall back (rows padded / full logits), each with one line naming the reason."""
    from prefalign import speed
    from prefalign.logps import custom_mask_refusal
    from prefalign.speed.forward import chunk_refusal

    tok = smollm2_tokenizer()
    assert custom_mask_refusal(tiny_family("lfm2", tok)) is not None
    assert custom_mask_refusal(tiny_family("gpt_oss", tok)) is None  # windowed masks per layer type instead
    assert "soft-capped" in chunk_refusal(tiny_family("gemma2", tok))
    assert "logit_scale" in chunk_refusal(tiny_family("cohere2", tok))
    assert chunk_refusal(tiny_family("gemma3", tok, final_logit_softcapping=None)) is None
    for family in ("qwen3_moe", "gpt_oss", "olmo3", "lfm2", "qwen2"):
        assert chunk_refusal(tiny_family(family, tok)) is None, family
    model = tiny_family("gemma2", tok)
    args = DPOConfig(output_dir="unused", report_to=[], use_cpu=True)
    monkeypatch.setattr(speed, "_TOLD", set())  # once per process: an earlier test may have told it already
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        speed.enable(model, args).undo()
        speed.enable(model, args).undo()
    assert sum("final_logit_softcapping" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("family", MOE)
def test_aux_loss_equals_the_models_own_on_a_padded_batch(family):
    tok = smollm2_tokenizer()
    model = tiny_family(family, tok, 2)
    texts = ["Hello there, how are you doing today?", "Hi", "A somewhat longer sentence about routers and experts."]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()
    router = find_router(model)
    with torch.no_grad():
        own = model(**enc, output_router_logits=True).aux_loss
        with router.collect(model) as logits:
            model(**enc)
    ours = load_balancing_loss(logits, enc["attention_mask"], router.num_experts, router.top_k)
    assert len(logits) == model.config.num_hidden_layers
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-6)
    # padding matters: counting it gives another number
    assert abs(load_balancing_loss(logits, torch.ones_like(enc["attention_mask"]), router.num_experts,
                                   router.top_k) - own) > 1e-4


def test_aux_loss_is_added_with_its_coefficient_and_logged(tmp_path):
    tok = smollm2_tokenizer()
    results = {}
    for coef in (None, 0.0, 0.5):
        t = _dpo(tok, tiny_family("qwen3_moe", tok, 1), tmp_path / str(coef), router_aux_loss_coef=coef,
                 precompute_ref_log_probs=False)
        results[coef] = (t, t.evaluate())
    auto, off, half = (results[c] for c in (None, 0.0, 0.5))
    assert auto[0].router_aux_loss_coef == 0.01 and auto[0].aux_loss_enabled  # the config's own coefficient
    assert not off[0].aux_loss_enabled and "eval_aux_loss" not in off[1]
    aux = half[1]["eval_aux_loss"]
    assert aux == pytest.approx(auto[1]["eval_aux_loss"]) and aux > 1.0
    assert half[1]["eval_loss"] == pytest.approx(off[1]["eval_loss"] + 0.5 * aux, abs=1e-5)
    assert auto[1]["eval_loss"] == pytest.approx(off[1]["eval_loss"] + 0.01 * aux, abs=1e-5)
    half[0].train()
    assert "aux_loss" in half[0].state.log_history[0]


def test_sft_and_kto_add_the_aux_loss(tmp_path):
    tok = smollm2_tokenizer()
    sft_rows = [{"messages": r["prompt"] + r["chosen"]} for r in conversational_rows(4)]
    losses = {}
    for coef in (0.0, 1.0):
        t = SFTTrainer(tiny_family("qwen3_moe", tok, 1), args=SFTConfig(output_dir=str(tmp_path / f"s{coef}"),
                       **{**COMMON, "per_device_eval_batch_size": 4}, router_aux_loss_coef=coef),
                       train_dataset=sft_rows, eval_dataset=sft_rows, processing_class=tok)  # one eval batch
        losses[coef] = t.evaluate()
    assert losses[1.0]["eval_loss"] == pytest.approx(losses[0.0]["eval_loss"] + losses[1.0]["eval_aux_loss"],
                                                     abs=1e-5)
    kto_rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
                for i, r in enumerate(conversational_rows(4))]
    from prefalign.config import KTOConfig

    t = KTOTrainer(tiny_family("qwen3_moe", tok, 1), args=KTOConfig(output_dir=str(tmp_path / "k"), **COMMON,
                   router_aux_loss_coef=0.5), train_dataset=kto_rows, processing_class=tok)
    t.train()
    assert t.state.log_history[0]["aux_loss"] > 1.0


def test_nonzero_coefficient_on_a_dense_model_is_one_line(tmp_path):
    tok = smollm2_tokenizer()
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts model") as err:
        _dpo(tok, tiny_llama(tok, 1), tmp_path, router_aux_loss_coef=0.1)
    assert "\n" not in str(err.value)
    t = _dpo(tok, tiny_family("qwen3", tok, 1), tmp_path)  # None on a dense model: nothing to add
    assert not t.aux_loss_enabled and t.router_aux_loss_coef == 0.0


def test_dpo_evaluate_matches_trl_116_on_qwen3_moe(tmp_path):
    """TRL 1.16's DPOTrainer on the same tiny Qwen3-MoE, reference and eval set: loss (with the aux loss at the
    config's coefficient) and aux_loss."""
    import trl

    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(5))
    cfg = dict(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=False,
               max_length=256, seed=0, router_aux_loss_coef=0.25)
    ours = DPOTrainer(tiny_family("qwen3_moe", tok, 1), ref_model=tiny_family("qwen3_moe", tok, 2),
                      args=DPOConfig(**cfg), train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    theirs = trl.DPOTrainer(tiny_family("qwen3_moe", tok, 1), ref_model=tiny_family("qwen3_moe", tok, 2),
                            args=trl.DPOConfig(**cfg, gradient_checkpointing=False), train_dataset=ds,
                            eval_dataset=ds, processing_class=tok).evaluate()
    for key in ("eval_loss", "eval_aux_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


@pytest.mark.parametrize("family", ["olmo3", "qwen3_moe"])
def test_packed_sft_step_equals_padded_rows(family, tmp_path):
    """SFT on a model with 8-token sliding windows (olmo3): packed rows with the fast path (one row of spans) and
    with the plain path (a 4-D mask: logps.kernel_mask's windowed one per layer type) give the loss of padded rows,
    where transformers builds every mask; the MoE one with its aux loss too (padding not counted)."""
    tok = smollm2_tokenizer()
    rows = [{"messages": r["prompt"] + r["rejected"]} for r in conversational_rows(4)]
    coef = 0.5 if family in MOE else None
    losses = []
    for fast_path, packing in ((True, True), (False, True), (False, False)):
        args = SFTConfig(output_dir=str(tmp_path / f"{fast_path}{packing}"), **COMMON, packing=packing,
                         fast_path=fast_path, router_aux_loss_coef=coef)
        t = SFTTrainer(tiny_family(family, tok, 1), args=args, train_dataset=rows, processing_class=tok)
        t.train()
        losses.append(t.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[2], abs=1e-4)
    assert losses[1] == pytest.approx(losses[2], abs=1e-4)
