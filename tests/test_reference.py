"""Precomputed, disk-cached reference log-probs: same numbers as a live reference, computed once."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig

from prefalign import DPOConfig, DPOTrainer
from prefalign import reference as reference_mod
from prefalign.errors import ConfigError
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, tiny_llama, token_logps


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _args(tmp_path, **kw):
    return DPOConfig(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
                     max_length=128, seed=0, **kw)


def _trainer(tmp_path, precompute: bool, ds, **kw):
    tok = smollm2_tokenizer()
    return DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                      args=_args(tmp_path, precompute_ref_log_probs=precompute, beta=0.3), train_dataset=ds,
                      eval_dataset=ds, processing_class=tok, **kw)


def test_precomputed_reference_matches_live_and_frees_the_model(tmp_path, home):
    ds = datasets.Dataset.from_list(conversational_rows(7))
    live = _trainer(tmp_path, False, ds)
    cached = _trainer(tmp_path, True, ds)
    assert "ref_chosen_logps" in cached.train_dataset.column_names
    a, b = live.evaluate(), cached.evaluate()
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/chosen", "eval_logps/rejected"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert abs(a["eval_rewards/margins"]) > 1e-3
    # the reference is kept until training starts (as TRL: evaluate() may bring new sets); a ref_model passed as a
    # model object is the caller's and stays after (as TRL), only one prefalign made or loaded is freed
    assert cached.ref_model is not None
    cached.args.max_steps = 1
    cached.train()
    assert live.ref_model is not None and cached.ref_model is not None
    assert len(list((home / "cache" / "ref-logps").iterdir())) == 1  # train and eval are the same pairs: one file


def test_cache_is_reused_across_runs_and_keyed_by_weights(tmp_path, home, monkeypatch):
    ds = datasets.Dataset.from_list(conversational_rows(5))
    calls = []
    real = reference_mod.batched_pair_logps

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reference_mod, "batched_pair_logps", counting)
    first = _trainer(tmp_path, True, ds)
    assert len(calls) == 1  # computed for train; eval found it in the cache
    second = _trainer(tmp_path, True, ds)
    assert len(calls) == 1  # a new run reads the cache
    assert list(first.train_dataset["ref_chosen_logps"]) == list(second.train_dataset["ref_chosen_logps"])
    tok = smollm2_tokenizer()
    DPOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 9), args=_args(tmp_path), train_dataset=ds,
               processing_class=tok)
    assert len(calls) == 2  # different reference weights: a different key


def test_damaged_cache_file_is_recomputed(tmp_path, home):
    ds = datasets.Dataset.from_list(conversational_rows(4))
    good = list(_trainer(tmp_path, True, ds).train_dataset["ref_chosen_logps"])
    (path,) = (home / "cache" / "ref-logps").iterdir()
    path.write_bytes(b"not a torch file")
    assert list(_trainer(tmp_path, True, ds).train_dataset["ref_chosen_logps"]) == pytest.approx(good, abs=1e-6)


def test_new_eval_dataset_after_freeing_the_reference_is_a_clear_error(tmp_path, home):
    # no ref_model: the reference prefalign makes from the policy is its own, freed when train() starts (a ref_model
    # passed as a model object is the caller's and stays, test above)
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    tr = DPOTrainer(tiny_llama(tok, 1), args=_args(tmp_path, precompute_ref_log_probs=True, beta=0.3),
                    train_dataset=ds, eval_dataset=ds, processing_class=tok)
    assert tr.evaluate(conversational_rows(6)[4:])["eval_loss"] > 0  # before train(): ref_model is still held
    tr.args.max_steps = 1
    tr.train()
    with pytest.raises(ConfigError, match="precompute_ref_log_probs=False"):
        tr.evaluate(conversational_rows(7)[4:])


def test_peft_reference_precompute_uses_the_adapter_disabled_base(tmp_path, home):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tr = DPOTrainer(tiny_llama(tok, 1), args=_args(tmp_path), train_dataset=ds, processing_class=tok,
                    peft_config=lora)
    from prefalign.data.collate import PairCollator

    batch = PairCollator(tok.pad_token_id)([{k: tr.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids",
                                                                              "rejected_ids")} for i in range(4)])
    mask = row_reply_mask(batch)
    base = (token_logps(tiny_llama(tok, 1), batch["input_ids"], batch["attention_mask"], mask) * mask).sum(-1)
    stored = torch.tensor(list(tr.train_dataset["ref_chosen_logps"]) + list(tr.train_dataset["ref_rejected_logps"]))
    torch.testing.assert_close(stored, base, atol=1e-4, rtol=0)
    # A new dataset can still be evaluated: the base model is recoverable by disabling the adapter.
    assert "eval_loss" in tr.evaluate(conversational_rows(6)[4:])


def test_without_ref_model_the_untrained_policy_is_the_reference_and_no_copy_is_kept(tmp_path, home, monkeypatch):
    import copy as copy_mod

    copies = []
    real_deepcopy = copy_mod.deepcopy
    monkeypatch.setattr(copy_mod, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or
                        real_deepcopy(obj, *a))
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(conversational_rows(4))
    tr = DPOTrainer(tiny_llama(tok, 1), args=_args(tmp_path, learning_rate=1e-2, max_steps=3,
                                                   per_device_train_batch_size=4),
                    train_dataset=ds, eval_dataset=ds, processing_class=tok)
    assert tr.ref_model is None and "LlamaForCausalLM" not in copies
    from prefalign.data.collate import PairCollator

    batch = PairCollator(tok.pad_token_id)([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                            for r in tr.train_dataset])
    mask = row_reply_mask(batch)
    sums = (token_logps(tiny_llama(tok, 1), batch["input_ids"], batch["attention_mask"], mask) * mask).sum(-1)
    expected_chosen = sums[:4]
    assert list(tr.train_dataset["ref_chosen_logps"]) == pytest.approx(expected_chosen.tolist(), abs=1e-4)
    assert tr.evaluate()["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    tr.train()
    assert tr.evaluate()["eval_rewards/margins"] > 0  # measured against the initial policy, which is gone


@pytest.mark.parametrize(("max_steps", "warned"), [(1, True), (2, False), (-1, False)])
def test_a_run_that_sees_under_half_the_rows_is_told_before_the_precompute(tmp_path, home, caplog, max_steps, warned):
    ds = datasets.Dataset.from_list(conversational_rows(8))
    with caplog.at_level("WARNING", logger="prefalign"):
        DPOTrainer(
            tiny_llama(smollm2_tokenizer(), 1), args=_args(tmp_path, precompute_ref_log_probs=True, max_steps=max_steps,
                                                           per_device_train_batch_size=2),
            train_dataset=ds, processing_class=smollm2_tokenizer())
    lines = [r.getMessage() for r in caplog.records if "sees" in r.getMessage()]
    assert lines == (["precompute_ref_log_probs: scoring the reference on all 8 training rows, but max_steps=1 sees 2 "
                      "of them. To score only the rows trained on, set precompute_ref_log_probs: false (the reference "
                      "then runs live on each batch, held in memory beside the policy)"] if warned else [])
