"""Exact resume after SIGTERM, and checkpoints that are whole or absent."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from prefalign import checkpoints
from prefalign.checkpoints import latest_checkpoint
from prefalign.cli import main
from tiny import conversational_rows, save_tiny


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(8)))
    return save_tiny(root / "model", seed=4), str(data)


def _argv(model, data, out, method):
    return ["train", "--method", method, "--model", model, "--dataset", data, "--output-dir", str(out),
            "--max-steps", "4", "--batch-size", "2", "--learning-rate", "1e-3", "--seed", "0", "--max-length", "96",
            "--set", "save_strategy=steps", "--set", "save_steps=1"]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_signal_then_resume_equals_an_uninterrupted_run(tmp_path, inputs, monkeypatch, capsys, method):
    model, data = inputs
    assert main(_argv(model, data, tmp_path / "straight", method)) == 0

    real = checkpoints.GracefulStop.on_step_end
    sent = []
    sig = signal.SIGTERM if method == "dpo" else signal.SIGINT

    def interrupt_at_step_2(self, args, state, control, **kw):
        if state.global_step == 2 and not sent:
            sent.append(1)
            os.kill(os.getpid(), sig)
        return real(self, args, state, control, **kw)

    monkeypatch.setattr(checkpoints.GracefulStop, "on_step_end", interrupt_at_step_2)
    out = tmp_path / "interrupted"
    assert main(_argv(model, data, out, method)) == 128 + sig
    err = capsys.readouterr().err
    assert f"stopped by {sig.name} at step 2" in err and "--resume" in err
    assert latest_checkpoint(out).name == "checkpoint-2" and not (out / "model.safetensors").exists()
    monkeypatch.setattr(checkpoints.GracefulStop, "on_step_end", real)
    assert main(["train", str(out / "config.yaml"), "--resume"]) == 0

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a[k], load_file(out / "checkpoint-2" / "model.safetensors")[k]) for k in a)
    straight, resumed = dict(_losses(tmp_path / "straight")), dict(_losses(out))
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6)


def test_a_kill_mid_checkpoint_leaves_no_checkpoint_that_looks_valid(tmp_path, inputs, monkeypatch, capsys):
    model, data = inputs
    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler
    calls = []

    def die_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed after the weights were written, before the optimizer state
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", die_on_second_save)
    out = tmp_path / "killed"
    assert main(_argv(model, data, out, "dpo")) == 130
    assert ".tmp-checkpoint-2" in calls[1]  # the write went to a temporary name
    assert not (out / "checkpoint-2").exists() and latest_checkpoint(out).name == "checkpoint-1"
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    assert main(["train", *(_argv(model, data, out, "dpo")[1:]), "--resume"]) == 0
    assert not list(out.glob(".tmp-*"))  # the leftover is cleaned by the next save


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, inputs, capsys):
    model, data = inputs
    (tmp_path / "empty").mkdir()
    assert main(_argv(model, data, tmp_path / "empty", "dpo") + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0]


def test_resume_from_checkpoint_option_continues_from_that_checkpoint(tmp_path, inputs, capsys):
    # TRL's scripts pass resume_from_checkpoint to train(): a checkpoint directory (here another run's), or true
    model, data = inputs
    straight = tmp_path / "straight"
    assert main(_argv(model, data, straight, "dpo")) == 0
    out = tmp_path / "continued"
    argv = _argv(model, data, out, "dpo") + ["--set", f"resume_from_checkpoint={straight / 'checkpoint-2'}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(dict(_losses(out))) == [3, 4]  # steps 1-2 came from the checkpoint
    for step, loss in _losses(out):
        assert loss == pytest.approx(dict(_losses(straight))[step], abs=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    capsys.readouterr()
    bad = _argv(model, data, tmp_path / "bad", "dpo") + ["--set", f"resume_from_checkpoint={tmp_path / 'nowhere'}"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a complete checkpoint" in err[0] and not (tmp_path / "bad").exists()
