"""What TRL's own trainer tests (scripts/trl_tests_check.py) found missing, each fixed and checked here on tiny
models: the model-card tags, a caller's ref_model kept after train(), TRL's wording of the evaluate-after-training
error, and on_nonfinite='ignore' (TRL's behaviour)."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
from prefalign.errors import ConfigError
from tiny import smollm2_tokenizer, text_rows, tiny_llama

COMMON = dict(
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    report_to=[],
    use_cpu=True,
    bf16=False,
    max_length=64,
    seed=0,
    learning_rate=1e-2,
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def rows(n: int = 4, start: int = 0) -> list[dict]:
    return text_rows(n + start)[start:]


@pytest.mark.parametrize(
    "cls,config,method",
    [(DPOTrainer, DPOConfig, "dpo"), (KTOTrainer, KTOConfig, "kto"), (SFTTrainer, SFTConfig, "sft")],
)
def test_model_card_tags_are_trls_and_ours(tok, tmp_path, cls, config, method):
    """TRL tags the model "trl" and the method (the hub's filters and the model card read them); prefalign adds its
    own name."""
    tr = cls(
        tiny_llama(tok, 1), args=config(output_dir=str(tmp_path), **COMMON), train_dataset=rows(2), processing_class=tok
    )
    assert tr.model.model_tags == ["trl", method, "prefalign"]


@pytest.mark.parametrize("cls,config", [(DPOTrainer, DPOConfig), (KTOTrainer, KTOConfig)])
def test_callers_ref_model_kept_after_train(tok, tmp_path, cls, config):
    """A ref_model passed as a model object stays trainer.ref_model after train() (precomputed reference or not), is
    never trained, and gives a new eval set its reference log-probs after training (as TRL)."""
    ref = tiny_llama(tok, 1)
    before = {n: p.clone() for n, p in ref.named_parameters()}
    tr = cls(
        tiny_llama(tok, 1),
        ref_model=ref,
        args=config(output_dir=str(tmp_path), max_steps=2, **COMMON),
        train_dataset=rows(4),
        processing_class=tok,
    )
    assert tr.args.precompute_ref_log_probs is True
    tr.train()
    assert tr.ref_model is ref
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())
    metrics = tr.evaluate(rows(2, 4))
    assert math.isfinite(metrics["eval_loss"])


def test_evaluate_after_training_error_uses_trls_words(tok, tmp_path):
    tr = DPOTrainer(
        tiny_llama(tok, 1),
        args=DPOConfig(output_dir=str(tmp_path), max_steps=1, **COMMON),
        train_dataset=rows(4),
        processing_class=tok,
    )
    tr.train()
    with pytest.raises(ConfigError, match="^Cannot compute reference log-probs for a dataset passed to evaluate"):
        tr.evaluate(rows(2, 4))


@pytest.mark.parametrize("policy", ["ignore", "stop"])
def test_on_nonfinite_ignore_steps_on_as_trl(tok, tmp_path, policy):
    """'ignore' is TRL's behaviour: a NaN loss is stepped on (the run finishes, the weights go NaN); 'stop' (the
    default) refuses it."""
    tr = DPOTrainer(
        tiny_llama(tok, 1),
        args=DPOConfig(output_dir=str(tmp_path), max_steps=2, on_nonfinite=policy, **COMMON),
        train_dataset=rows(4),
        processing_class=tok,
    )
    real = tr.pair_losses

    def poisoned(model, inputs):
        losses, metrics = real(model, inputs)
        return losses * float("nan"), metrics

    tr.pair_losses = poisoned
    if policy == "stop":
        with pytest.raises(Exception, match="non-finite loss at step 1"):
            tr.train()
        return
    tr.train()
    assert tr.state.global_step == 2
    assert math.isnan(tr.state.log_history[0]["grad_norm"])  # the logged loss is filtered (logging_nan_inf_filter)
    assert not all(torch.isfinite(p).all() for p in tr.model.parameters())
    with pytest.raises(ConfigError, match="must be 'stop', 'skip' or 'ignore'"):
        DPOConfig(output_dir=str(tmp_path), on_nonfinite="go")


def test_sft_labels_column_as_trls(tok, tmp_path):
    """SFT's prepared ``labels`` column is TRL's: the tokens where the loss is (the first one included, as TRL keeps
    it), -100 elsewhere; a pre-tokenized row's own labels are taken as they are."""
    import datasets

    pretokenized = datasets.Dataset.from_list(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, -100], "assistant_masks": [1, 1, 1, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "assistant_masks": [1, 1]},
        ]
    )
    tr = SFTTrainer(
        tiny_llama(tok, 1),
        args=SFTConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=pretokenized,
        processing_class=tok,
    )
    assert tr.train_dataset["labels"] == [[1, -100, 3, -100], [-100, 6]]
    assert tr.train_dataset["loss_mask"] == [[0, 0, 1, 0], [0, 1]]  # nothing predicts a first token
    text = SFTTrainer(
        tiny_llama(tok, 1),
        args=SFTConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=[{"text": "Simple is better than complex."}],
        processing_class=tok,
    )
    assert text.train_dataset["labels"][0] == text.train_dataset["input_ids"][0]


@pytest.mark.parametrize("cls,config", [(SFTTrainer, SFTConfig), (DPOTrainer, DPOConfig)])
def test_with_transform_refused(tok, tmp_path, cls, config):
    """A Dataset.with_transform() function would run once here, not at every access: refused in TRL's words."""
    import datasets

    dataset = datasets.Dataset.from_list(rows(2)).with_transform(lambda batch: batch)
    with pytest.raises(ConfigError, match=r"Dataset\.with_transform\(\).*skip_prepare_dataset.*trainer-ready"):
        cls(
            tiny_llama(tok, 1),
            args=config(output_dir=str(tmp_path), **COMMON),
            train_dataset=dataset,
            processing_class=tok,
        )


def test_encoder_decoder_refused_at_construction(tok, tmp_path):
    """TRL's experimental ORPO / CPO take T5; prefalign trains causal LMs only and says so before anything runs."""
    from transformers import T5Config, T5ForConditionalGeneration

    from prefalign import ORPOConfig, ORPOTrainer

    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=16,
            d_ff=32,
            d_kv=4,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=tok.pad_token_id,
        )
    )
    with pytest.raises(ConfigError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        ORPOTrainer(
            t5, args=ORPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows(2), processing_class=tok
        )
