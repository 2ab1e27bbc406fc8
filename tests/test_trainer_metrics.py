"""compute_metrics and preprocess_logits_for_metrics: what each trainer's evaluation hands them (the shapes the
trainer docstrings promise), checked against the logged metrics and the full-logits oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefalign import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer, SFTConfig, SFTTrainer
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

COMMON = dict(per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=False, max_length=128, seed=0)


def _capture():
    seen = []

    def compute_metrics(pred):
        seen.append(pred)
        return {"my_metric": 0.123}

    return seen, compute_metrics


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_pair_trainers_give_per_pair_metrics(tmp_path, name):
    tok = smollm2_tokenizer()
    rows = conversational_rows(7)
    seen, compute_metrics = _capture()
    config, trainer_cls = {"dpo": (DPOConfig, DPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}[name]
    ref = {"ref_model": tiny_llama(tok, 2)} if name == "dpo" else {}  # another model: rewards that differ
    trainer = trainer_cls(tiny_llama(tok, 1), **ref, args=config(output_dir=str(tmp_path), **COMMON),
                          train_dataset=rows, eval_dataset=rows, processing_class=tok, compute_metrics=compute_metrics)
    out = trainer.evaluate()
    assert out["eval_my_metric"] == 0.123
    (pred,) = seen
    p = pred.predictions
    assert isinstance(p, dict)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert p[key].shape == (7,), key
    np.testing.assert_array_equal(pred.label_ids, np.zeros(7))
    # the arrays are the numbers behind the logged means (one process; batches of 3, 3, 1 pairs: mean of means)
    means = [p["logps/chosen"][i:i + 3].mean() for i in (0, 3, 6)]
    assert out["eval_logps/chosen"] == pytest.approx(float(np.mean(means)), rel=1e-5)
    assert len(set(p["rewards/margins"].round(6).tolist())) > 1
    accuracy = (np.argmax(np.stack([p["rewards/chosen"], p["rewards/rejected"]], 1), 1) == pred.label_ids)
    np.testing.assert_array_equal(accuracy, p["rewards/accuracies"].astype(bool))
    if name == "orpo":
        assert p["log_odds_ratio"].shape == (7,)


def test_dpo_compute_metrics_during_training_as_trl(tmp_path):
    """TRL's test_train_with_compute_metrics: the eval record before the train summary carries the metric."""
    tok = smollm2_tokenizer()
    rows = conversational_rows(6)
    seen, compute_metrics = _capture()
    args = DPOConfig(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=3, per_device_train_batch_size=2,
                     **COMMON)
    trainer = DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=rows, eval_dataset=rows[:4],
                         processing_class=tok, compute_metrics=compute_metrics)
    trainer.train()
    assert trainer.state.log_history[-2]["eval_my_metric"] == 0.123
    assert seen and seen[0].predictions["rewards/chosen"].shape == (4,)


def test_kto_gives_per_row_metrics_and_labels(tmp_path):
    tok = smollm2_tokenizer()
    rows = conversational_rows(3)  # unpaired: 3 desirable + 3 undesirable rows
    seen, compute_metrics = _capture()
    trainer = KTOTrainer(tiny_llama(tok, 1), args=KTOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         eval_dataset=rows, processing_class=tok, compute_metrics=compute_metrics)
    assert trainer.evaluate()["eval_my_metric"] == 0.123
    (pred,) = seen
    assert set(pred.predictions) == {"rewards", "logps", "kl"}
    assert pred.predictions["logps"].shape == (6,)
    assert sorted(pred.label_ids.tolist()) == [0, 0, 0, 1, 1, 1]
    assert np.all(pred.predictions["logps"] < 0)


def test_without_compute_metrics_no_predictions_are_built(tmp_path):
    tok = smollm2_tokenizer()
    rows = conversational_rows(3)
    trainer = DPOTrainer(tiny_llama(tok, 1), args=DPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         eval_dataset=rows, processing_class=tok)
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.eval_dataset.select_columns(
        ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]).to_list()))
    loss, preds, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
    assert preds is None and labels is None and loss.ndim == 0


def _sft_rows(n: int = 5) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "completion": [{"role": "assistant", "content": f"{2 * i}." + " more" * i}]} for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_gives_full_logits_and_labels_as_trl(tmp_path, packing):
    """Logits ``[rows, L, V]`` and labels in row layout: TRL's token-accuracy compute_metrics, run on them, gives
    the logged mean_token_accuracy (same tokens, same argmax); and the logits are the model's own."""
    tok = smollm2_tokenizer()
    rows = _sft_rows()
    seen = []

    def token_accuracy(pred):
        seen.append(pred)
        logits, labels = pred.predictions, pred.label_ids
        hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
        return {"token_accuracy": float(hits.mean())}

    args = SFTConfig(output_dir=str(tmp_path), packing=packing, **{**COMMON, "per_device_eval_batch_size": 5})
    model = tiny_llama(tok, 1)
    trainer = SFTTrainer(model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tok,
                         compute_metrics=token_accuracy)
    out = trainer.evaluate()
    (pred,) = seen
    assert pred.predictions.ndim == 3 and pred.predictions.shape[-1] == model.config.vocab_size
    assert pred.predictions.shape[:2] == pred.label_ids.shape
    labelled = int((pred.label_ids != -100).sum())
    completion_tokens = sum(int(sum(r["loss_mask"])) for r in trainer.eval_dataset)
    assert labelled == completion_tokens
    assert out["eval_token_accuracy"] == pytest.approx(out["eval_mean_token_accuracy"], abs=1e-6)
    if not packing:  # row i is example i, right-padded: its logits are the model's on that example alone
        ids = torch.tensor(trainer.eval_dataset[0]["input_ids"])[None]
        with torch.no_grad():
            want = model(input_ids=ids).logits[0]
        np.testing.assert_allclose(pred.predictions[0, :ids.shape[1]], want.numpy(), atol=1e-4)


def test_preprocess_logits_for_metrics_sees_the_predictions(tmp_path):
    tok = smollm2_tokenizer()
    rows = _sft_rows(4)
    calls = []

    def preprocess(logits, labels):
        calls.append((tuple(logits.shape), tuple(labels.shape)))
        return logits.argmax(-1)

    seen, compute_metrics = _capture()
    trainer = SFTTrainer(tiny_llama(tok, 1), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         eval_dataset=rows, processing_class=tok, compute_metrics=compute_metrics,
                         preprocess_logits_for_metrics=preprocess)
    trainer.evaluate()
    assert len(calls) == 2 and calls[0][0][:2] == calls[0][1]
    assert seen[0].predictions.ndim == 2 and seen[0].predictions.shape == seen[0].label_ids.shape

    def keep_chosen(predictions, labels):
        calls.append(sorted(predictions))
        return predictions["rewards/chosen"]

    seen.clear()
    pairs = conversational_rows(4)
    dpo = DPOTrainer(tiny_llama(tok, 1), args=DPOConfig(output_dir=str(tmp_path / "d"), **COMMON),
                     train_dataset=pairs, eval_dataset=pairs, processing_class=tok, compute_metrics=compute_metrics,
                     preprocess_logits_for_metrics=keep_chosen)
    dpo.evaluate()
    assert "rewards/chosen" in calls[-1] and seen[0].predictions.shape == (4,)


# ----- PEFT prompt learning ------------------------------------------------------------------------------------------
def _prompt_configs():
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {"prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
            "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
            "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)}


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_sft_prompt_learning_loss_is_peft_own(tmp_path, method, caplog):
    """The evaluation loss of one row is PEFT's own causal-LM loss (its virtual tokens accounted for), and training
    moves only the prompt parameters."""
    tok = smollm2_tokenizer()
    rows = _sft_rows(3)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2,
                     **{**COMMON, "per_device_eval_batch_size": 1})
    with caplog.at_level("WARNING", logger="prefalign"):
        trainer = SFTTrainer(tiny_llama(tok, 1), args=args, train_dataset=rows, eval_dataset=rows[:1],
                             processing_class=tok, peft_config=_prompt_configs()[method])
        loss = trainer.evaluate()["eval_loss"]
    model = trainer.model
    ex = trainer.eval_dataset[0]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert any("fast_path: off for PEFT" in r.message for r in caplog.records)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("prompt_encoder" in n for n in moved)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_dpo_prompt_learning_rewards_are_adapter_against_base(tmp_path, method):
    """DPO's reference is the base model (adapter disabled); the policy's log-probs are PEFT's forward's, with
    the virtual tokens' logits left out: rewards/chosen = beta * (policy - base) log-prob of the chosen reply."""
    tok = smollm2_tokenizer()
    pairs = conversational_rows(2)
    seen, compute_metrics = _capture()
    args = DPOConfig(output_dir=str(tmp_path), **{**COMMON, "per_device_eval_batch_size": 2})
    trainer = DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=pairs, eval_dataset=pairs,
                         processing_class=tok, peft_config=_prompt_configs()[method], compute_metrics=compute_metrics)
    trainer.evaluate()
    model = trainer.model
    ex = trainer.eval_dataset[1]
    ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
    n = len(ex["chosen_ids"])

    def reply_logp(m):
        with torch.no_grad():
            logits = m(input_ids=ids).logits[:, -ids.shape[1]:]
        logps = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        return logps[-n:].sum().item()

    policy = reply_logp(model)
    with model.disable_adapter():
        base = reply_logp(model)
    p = seen[0].predictions
    assert abs(policy - base) > 1e-3  # the virtual tokens change the numbers
    assert p["logps/chosen"][1] == pytest.approx(policy, abs=1e-4)
    assert p["rewards/chosen"][1] == pytest.approx(args.beta * (policy - base), abs=1e-4)
