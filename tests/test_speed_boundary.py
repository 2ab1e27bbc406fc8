"""The speed boundary leaves nothing changed behind the user: after train() / evaluate() return, or raise, the model
has its own classes, forwards, hooks and attention implementation, and the process its environment and malloc
settings (never touched unless asked for)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from prefalign import DPOConfig, DPOTrainer, ORPOConfig, ORPOTrainer, speed
from prefalign.speed import allocator
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama


def _model_state(model: torch.nn.Module) -> dict:
    """Everything the speed machinery could leave on a model."""
    modules = {}
    for name, m in model.named_modules():
        modules[name] = (type(m), vars(m).get("forward"), tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                         tuple(m._backward_hooks), tuple(getattr(m, "_backward_pre_hooks", {})),
                         sorted(k for k in vars(m) if "prefalign" in k))
    return {"modules": modules, "attention": model.config._attn_implementation,
            "params": [(n, type(p), p.requires_grad) for n, p in model.named_parameters()]}


def _process_state() -> dict:
    return {"env": dict(os.environ), "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(),
            "dtype": torch.get_default_dtype()}


@pytest.fixture()
def mallopt_log(monkeypatch):
    """Record every malloc parameter the speed machinery sets (glibc cannot read them back), without setting it,
    from a process that has not asked for the policy."""
    log: list[dict[int, int]] = []
    real = allocator._mallopt

    def recording(values):
        log.append(dict(values))
        return real is not None  # the test process keeps glibc's own settings

    monkeypatch.setattr(allocator, "_mallopt", recording)
    monkeypatch.setattr(allocator, "_process_wide", False)
    return log


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom inside train()")


def _trainer(method, tmp_path, tok, **extra):
    cfg, cls = (DPOConfig, DPOTrainer) if method == "dpo" else (ORPOConfig, ORPOTrainer)
    args = cfg(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=2,
               save_strategy="no", disable_tqdm=True, learning_rate=1e-3, max_length=96,
               release_cpu_memory_every=1, **extra)
    model = tiny_llama(tok, 1, attn_implementation="sdpa")
    return model, lambda callbacks=None: cls(model, args=args, train_dataset=conversational_rows(4),
                                             eval_dataset=conversational_rows(2), processing_class=tok,
                                             callbacks=callbacks)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_nothing_changed_after_train_evaluate_and_an_exception(tmp_path, mallopt_log, method):
    tok = smollm2_tokenizer()
    model, make = _trainer(method, tmp_path, tok)
    before, process = _model_state(model), _process_state()
    trainer = make()
    assert _model_state(model) == before  # building a trainer (DPO: and its reference precompute) leaves nothing

    seen = {}

    class Look(TrainerCallback):  # inside train(): the machinery is on
        def on_step_end(self, args, state, control, **kwargs):
            seen["lean"] = sum("forward" in vars(m) for m in model.modules())
            seen["attention"] = model.config._attn_implementation
            seen["hooks"] = sum(len(layer._forward_hooks) for layer in model.model.layers)

    trainer.add_callback(Look())
    trainer.train()
    assert seen == {"lean": 7, "attention": "prefalign_grouped_sdpa", "hooks": 2}  # it was on, and used
    assert _model_state(model) == before and _process_state() == process

    trainer.evaluate()
    assert _model_state(model) == before and _process_state() == process

    failing = make([Boom()])
    with pytest.raises(RuntimeError, match="boom inside train"):
        failing.train()
    assert _model_state(model) == before and _process_state() == process and failing._speed is None
    assert mallopt_log == []  # malloc is never touched unless asked for (cpu_allocator_cache)


def test_the_allocator_policy_is_applied_only_when_asked_and_then_kept(tmp_path, mallopt_log):
    tok = smollm2_tokenizer()
    _, make = _trainer("orpo", tmp_path, tok, cpu_allocator_cache=True)
    make().train()
    if allocator._libc_function("mallopt") is not None:
        assert mallopt_log == [{allocator._M_MMAP_MAX: 0, allocator._M_TRIM_THRESHOLD: 2**31 - 1}]  # set once
        assert allocator._process_wide  # and kept: asked for, for the life of the process
    mallopt_log.clear()
    make().train()
    assert mallopt_log == []  # already applied: not set again, never undone


def test_fast_path_off_switches_nothing_on_and_gives_the_same_losses(tmp_path, mallopt_log):
    tok = smollm2_tokenizer()
    losses = {}
    for fast in (True, False):
        model, make = _trainer("dpo", tmp_path / str(fast), tok, fast_path=fast, loss_type=["sigmoid", "sft"])
        seen = []

        class Look(TrainerCallback):
            def __init__(self, model, seen):
                self.model, self.seen = model, seen

            def on_step_end(self, args, state, control, **kwargs):
                self.seen.append(sum("forward" in vars(m) for m in self.model.modules()))

        trainer = make([Look(model, seen)])
        mallopt_log.clear()
        trainer.train()
        losses[fast] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert seen == ([7, 7] if fast else [0, 0])
        assert mallopt_log == []
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_enable_undoes_what_it_did_when_it_fails_halfway(monkeypatch):
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 1, attn_implementation="sdpa")
    before = _model_state(model)

    def broken(_model):
        raise RuntimeError("attention switch failed")

    monkeypatch.setattr(speed, "use_grouped_sdpa", broken)
    with pytest.raises(RuntimeError, match="attention switch failed"):
        speed.enable(model, DPOConfig(output_dir="unused", use_cpu=True, release_cpu_memory_every=1))
    assert _model_state(model) == before  # lean patches and release hooks removed again
