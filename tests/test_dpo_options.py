"""DPO options beyond the loss: WPO weighting (use_weighting) and TR-DPO's moving reference (sync_ref_model):
refusals, the reference cache switched off, resume carrying the synced reference. Parity with TRL is in
test_parity.py."""

from __future__ import annotations

import json
import logging
import signal

import datasets
import pytest
import torch
from peft import LoraConfig

from prefalign import DPOConfig, DPOTrainer, checkpoints
from prefalign.cli import main
from prefalign.errors import ConfigError
from prefalign.ref_sync import REFERENCE_FILE, blend_into
from tiny import conversational_rows, save_tiny, smollm2_tokenizer, tiny_llama

COMMON = dict(report_to=[], use_cpu=True, bf16=False, max_length=128, seed=0, disable_tqdm=True)


def test_blend_into_is_the_soft_update():
    tok = smollm2_tokenizer()
    ref, policy = tiny_llama(tok, 1), tiny_llama(tok, 2)
    before = {n: p.clone() for n, p in ref.named_parameters()}
    blend_into(ref, policy, 0.25)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * dict(policy.named_parameters())[name])


def test_sync_ref_model_turns_the_cache_off_and_says_so(tmp_path, caplog):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    args = DPOConfig(output_dir=str(tmp_path), **COMMON, sync_ref_model=True, ref_model_sync_steps=2)
    assert args.precompute_ref_log_probs is False
    with caplog.at_level(logging.INFO, logger="prefalign"):
        tr = DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=ds, processing_class=tok)
    assert [r for r in caplog.records if "sync_ref_model (TR-DPO)" in r.getMessage()]
    assert tr.reference_cache == {} and tr.ref_model is not None and tr.ref_model is not tr.model
    assert "ref_chosen_logps" not in tr.train_dataset.column_names


@pytest.mark.parametrize("options, message", [
    (dict(use_weighting=True, loss_type=["sigmoid", "aot"], loss_weights=[1.0, 1.0]), "cannot weight loss_type aot"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha=1.5 is out of range"),
    (dict(sync_ref_model=True, ref_model_sync_steps=0), "ref_model_sync_steps=0 is out of range"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(output_dir=str(tmp_path), **COMMON, **options)


def test_sync_ref_model_is_refused_with_peft_and_with_a_different_reference(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    args = DPOConfig(output_dir=str(tmp_path), **COMMON, sync_ref_model=True)
    with pytest.raises(ConfigError, match="sync_ref_model cannot be used with PEFT"):
        DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=ds, processing_class=tok,
                   peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="differ at"):
        DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2, num_hidden_layers=1), args=args,
                   train_dataset=ds, processing_class=tok)


def _argv(model, data, out):
    return ["train", "--method", "dpo", "--model", model, "--dataset", data, "--output-dir", str(out),
            "--max-steps", "4", "--batch-size", "2", "--learning-rate", "1e-2", "--seed", "0", "--max-length", "96",
            "--set", "sync_ref_model=true", "--set", "ref_model_sync_steps=1", "--set", "save_strategy=steps",
            "--set", "save_steps=1"]


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tr_dpo_resume_continues_from_the_synced_reference(tmp_path, monkeypatch, capsys):
    """A run stopped after step 2 and resumed logs the same losses as one that ran through: the checkpoint carries
    the reference as it was after two syncs (without it, steps 3 and 4 would see the initial reference)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(8)))
    model = save_tiny(tmp_path / "model", seed=3)
    assert main(_argv(model, str(data), tmp_path / "through")) == 0
    assert (tmp_path / "through" / "checkpoint-2" / REFERENCE_FILE).exists()

    real = checkpoints.GracefulStop.on_step_end

    def stop_at_step_2(self, args, state, control, **kw):
        if state.global_step == 2:
            self.signal = signal.SIGTERM
        return real(self, args, state, control, **kw)

    monkeypatch.setattr(checkpoints.GracefulStop, "on_step_end", stop_at_step_2)
    out = tmp_path / "stopped"
    assert main(_argv(model, str(data), out)) == 128 + signal.SIGTERM
    monkeypatch.setattr(checkpoints.GracefulStop, "on_step_end", real)
    assert main(["train", str(out / "config.yaml"), "--resume"]) == 0
    through = _losses(tmp_path / "through")
    assert len(through) == 4 and len(set(through)) == 4
    assert _losses(out) == pytest.approx(through, abs=1e-6)


def test_a_checkpoint_of_another_models_reference_is_refused(tmp_path):
    from prefalign.ref_sync import SyncReference

    tok = smollm2_tokenizer()
    SyncReference(tiny_llama(tok, 1), 0.6, 1).save(tmp_path)
    same = tiny_llama(tok, 2)
    SyncReference(same, 0.6, 1).load(tmp_path)
    torch.testing.assert_close(same.lm_head.weight, tiny_llama(tok, 1).lm_head.weight)
    with pytest.raises(ConfigError, match="holds another model's reference"):
        SyncReference(tiny_llama(tok, 2, num_hidden_layers=1), 0.6, 1).load(tmp_path)
