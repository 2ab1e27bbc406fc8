"""Non-finite guard: a NaN loss or gradient stops training naming the step, or is skipped and counted."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import TrainerCallback

from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer
from prefalign.errors import ConfigError, NonFiniteError
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama


def _args(tmp_path, cls=DPOConfig, **kw):
    return cls(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
               report_to=[], use_cpu=True, max_length=128, seed=0, save_strategy="steps", save_steps=1,
               logging_steps=1, disable_tqdm=True, **kw)


class PoisonAfterStep(TrainerCallback):
    """Corrupt a weight once step ``step`` is done and checkpointed, as a bad update would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tok = smollm2_tokenizer()
    tr = ORPOTrainer(tiny_llama(tok, 1), args=_args(tmp_path, ORPOConfig), processing_class=tok,
                     train_dataset=datasets.Dataset.from_list(conversational_rows(6)),
                     callbacks=[PoisonAfterStep(1)])
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2") as e:
        tr.train()
    assert "\n" not in str(e.value)
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the kept checkpoint is a good one


def test_skip_drops_the_bad_step_and_goes_on(tmp_path):
    tok = smollm2_tokenizer()
    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    tr = DPOTrainer(tiny_llama(tok, 1), args=_args(tmp_path, on_nonfinite="skip"), processing_class=tok,
                    train_dataset=datasets.Dataset.from_list(conversational_rows(6)), callbacks=[Snap()])
    real = tr.pair_losses
    calls = []

    def poisoned(model, inputs):
        calls.append(1)
        loss, metrics = real(model, inputs)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    tr.pair_losses = poisoned
    tr.train()
    assert tr.nonfinite_skipped == [2] and tr.state.global_step == 3
    for k in snapshots[1]:
        torch.testing.assert_close(snapshots[2][k], snapshots[1][k], atol=0, rtol=0)  # step 2 changed nothing
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in snapshots[3].values())


def test_on_nonfinite_value_is_checked():
    with pytest.raises(ConfigError, match="on_nonfinite"):
        DPOConfig(output_dir="unused", on_nonfinite="continue", report_to=[])


def test_inf_gradient_with_a_finite_loss_is_caught_and_named(tmp_path):
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 1)
    target = model.model.layers[1].mlp.down_proj.weight
    target.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    tr = DPOTrainer(model, args=_args(tmp_path), processing_class=tok,
                    train_dataset=datasets.Dataset.from_list(conversational_rows(6)))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of model\.layers\.1\.mlp\.down_proj\.weight "
                                             r"at step 1"):
        tr.train()
