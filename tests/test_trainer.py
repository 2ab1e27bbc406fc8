"""Trainer behaviour: references, PEFT, accumulation, logging, training actually moves the loss."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import LoraConfig

from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer
from tiny import conversational_rows, row_reply_mask, save_tiny, smollm2_tokenizer, tiny_llama, token_logps


def _cfg(tmp_path, cls=DPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                report_to=[], use_cpu=True, max_length=128, logging_steps=1, save_strategy="no", seed=0)
    base.update(kw)
    return cls(**base)


def test_default_reference_is_a_frozen_copy_in_the_policy_dtype(tmp_path):
    tok = smollm2_tokenizer()
    policy = tiny_llama(tok, 1).to(torch.bfloat16)
    tr = DPOTrainer(policy, args=_cfg(tmp_path, precompute_ref_log_probs=False), train_dataset=conversational_rows(4),
                    processing_class=tok)
    ref_params = list(tr.ref_model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref_params)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref_params, tr.model.parameters(), strict=True))
    assert not tr.ref_model.training


def test_training_lowers_the_dpo_loss_and_logs_jsonl(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(8))
    tr = DPOTrainer(tiny_llama(tok, 1), args=_cfg(tmp_path, learning_rate=5e-3, max_steps=8), train_dataset=ds,
                    eval_dataset=ds, processing_class=tok)
    before = tr.evaluate()["eval_loss"]
    assert before == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 0: loss is log 2
    tr.train()
    after = tr.evaluate()
    assert after["eval_loss"] < before - 0.05
    assert after["eval_rewards/accuracies"] > 0.5
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert len(train_logs) == 8 and all("rewards/accuracies" in r for r in train_logs)


def test_peft_reference_is_the_adapter_disabled_base(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tr = DPOTrainer(tiny_llama(tok, 1), args=_cfg(tmp_path, precompute_ref_log_probs=False), train_dataset=ds,
                    eval_dataset=ds, processing_class=tok, peft_config=lora)
    assert tr.ref_model is None
    examples = [tr.eval_dataset[i] for i in range(4)]
    ref = torch.cat(tr._reference_logps(tr.model, tr.data_collator(examples)))  # the trainer's (prefix-shared) layout
    base = tiny_llama(tok, 1)
    from prefalign.data.collate import PairCollator

    batch = PairCollator(tok.pad_token_id)(examples)
    mask = row_reply_mask(batch)
    expected = (token_logps(base, batch["input_ids"], batch["attention_mask"], mask) * mask).sum(-1)
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=0)  # sums of ~16 tokens at ~-11 each
    with torch.no_grad():
        policy = (token_logps(tr.model, batch["input_ids"], batch["attention_mask"], mask) * mask).sum(-1)
    assert (policy - expected).abs().max() > 1e-4  # the (non-zero) adapter is active for the policy


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    weights = []
    for bs, accum in ((4, 1), (2, 2)):
        tr = DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                        args=_cfg(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                                  learning_rate=1e-2, max_steps=1, lr_scheduler_type="constant"),
                        train_dataset=ds, processing_class=tok)
        tr.train()
        weights.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-6, rtol=1e-5)


def test_model_by_path_and_orpo_training(tmp_path):
    path = save_tiny(tmp_path / "model", seed=3)
    ds = datasets.Dataset.from_list(conversational_rows(8))
    tr = ORPOTrainer(path, args=_cfg(tmp_path, ORPOConfig, learning_rate=5e-3, max_steps=6), train_dataset=ds,
                     eval_dataset=ds)
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    assert after["eval_nll_loss"] < before["eval_nll_loss"]
    assert after["eval_loss"] < before["eval_loss"]


def test_orpo_trl_beta_name_sets_orpo_alpha():
    cfg = ORPOConfig(output_dir="unused", beta=0.3, report_to=[])
    assert cfg.orpo_alpha == 0.3 and cfg.orpo_beta == 1.0


@pytest.mark.parametrize("cls", [DPOTrainer, ORPOTrainer])
def test_packing_changes_rows_not_numbers(tmp_path, cls):
    """Mixed-length pairs: packed rows (fewer than pairs) give the same loss and metrics as one row per pair."""
    tok = smollm2_tokenizer()
    rows = conversational_rows(4) + [{"prompt": [{"role": "user", "content": "Write a long list of fruits. " * 6}],
                                      "chosen": [{"role": "assistant", "content": "Apple, pear, plum, fig. " * 5}],
                                      "rejected": [{"role": "assistant", "content": "No."}]}]
    results = []
    for packing in (False, True):
        config = ORPOConfig if cls is ORPOTrainer else DPOConfig
        tr = cls(tiny_llama(tok, 2), args=_cfg(tmp_path, config, packing=packing, per_device_eval_batch_size=5),
                 train_dataset=rows, eval_dataset=rows, processing_class=tok)
        batch = tr.data_collator([tr.eval_dataset[i] for i in range(5)])
        assert batch["input_ids"].shape[0] == (3 if packing else 5)  # four short pairs in two rows, the long one alone
        results.append(tr.evaluate())
    off, on = results
    assert set(off) == set(on) and any("logps" in k for k in on)
    for key in off:
        if not any(w in key for w in ("runtime", "per_second", "_time")):
            assert on[key] == pytest.approx(off[key], abs=1e-5), key


@pytest.mark.parametrize("cls,cfg_cls", [(DPOTrainer, DPOConfig), (ORPOTrainer, ORPOConfig)])
def test_memory_mode_logs_the_same_losses(tmp_path, cls, cfg_cls, monkeypatch):
    """Memory mode (gradient_checkpointing recomputes activations in backward; release_cpu_memory_every hands free
    heap pages back after every layer; small LM-head chunks) must not change a number, and the recompute must see the
    same tensor shapes as the forward (the grouped-K/V SDPA switch holds for the whole of train(), so it does)."""
    import prefalign.speed.allocator

    released: list[int] = []
    monkeypatch.setattr(prefalign.speed.allocator, "release_freed_memory", lambda: released.append(1))
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(8))
    losses = []
    modes = ({}, {"gradient_checkpointing": True},
             {"gradient_checkpointing": True, "release_cpu_memory_every": 1, "logprob_chunk_rows": 2},
             {"release_cpu_memory_every": 2})
    for i, mode in enumerate(modes):
        args = _cfg(tmp_path / str(i), cfg_cls, learning_rate=5e-3, max_steps=3, per_device_train_batch_size=2,
                    **mode)
        tr = cls(tiny_llama(tok, 1), args=args, train_dataset=ds, processing_class=tok)
        released.clear()
        tr.train()
        gc = mode.get("gradient_checkpointing", False)
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in tr.model.modules()) == gc
        every = mode.get("release_cpu_memory_every", 0)
        # each hooked layer, every step: after its forward and when backward reaches it (checkpointing's recompute
        # stops early, before the layer's forward hooks)
        assert len(released) == (3 * 2 * (2 // every) if every else 0), mode
        losses.append([r["loss"] for r in tr.state.log_history if "loss" in r])
    assert len(losses[0]) == 3
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], abs=1e-5)


def test_tokenizer_is_accepted_as_trls_older_name_for_processing_class(tmp_path):
    from prefalign import ORPOConfig, ORPOTrainer
    from prefalign.errors import ConfigError

    tok = smollm2_tokenizer()
    args = _cfg(tmp_path, ORPOConfig)
    tr = ORPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=conversational_rows(2), tokenizer=tok)
    assert tr.processing_class is tok
    tr = DPOTrainer(tiny_llama(tok, 1), args=_cfg(tmp_path), train_dataset=conversational_rows(2), tokenizer=tok)
    assert tr.processing_class is tok
    with pytest.raises(ConfigError, match="both processing_class and tokenizer"):
        DPOTrainer(tiny_llama(tok, 1), args=_cfg(tmp_path), train_dataset=conversational_rows(2), tokenizer=tok,
                   processing_class=smollm2_tokenizer())


def test_setup_chat_format_gives_a_base_model_chatml(tmp_path):
    """As the course's ORPO notebook: a model without a template gets ChatML, its tokens and resized embeddings."""
    from transformers import AutoTokenizer

    from prefalign import ORPOConfig, ORPOTrainer, setup_chat_format
    from prefalign.errors import ConfigError

    base = smollm2_tokenizer()
    base.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = None
    model = tiny_llama(tok, 1)
    n = model.get_input_embeddings().weight.shape[0]
    model, tok = setup_chat_format(model, tok, resize_to_multiple_of=64)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and tok.pad_token == "<|im_end|>"
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0 and model.config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= n
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tr = ORPOTrainer(model, args=_cfg(tmp_path, ORPOConfig, max_steps=1), train_dataset=conversational_rows(2),
                     tokenizer=tok)
    tr.train()  # conversational data trains on the new template
    with pytest.raises(ConfigError, match="already has a chat template"):
        setup_chat_format(tiny_llama(base, 1), smollm2_tokenizer())
