"""Every option of TRL 1.16's configs has a home here (a config field, a run / recipe key, or a note), and the
options honoured with TRL's meaning behave so: truncation_mode, max_completion_length, pad_to_multiple_of 'auto',
selective checkpointing, eos_token / pad_token, SFT's shuffle_dataset / eval_packing / dataset_kwargs, TR-DPO for
KTO; use_liger_kernel accepted with its log line; every start-up refusal of a run reported at once."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from prefalign import DPOConfig, DPOTrainer, KTOConfig, SFTConfig, SFTTrainer, adapters, options, recipe
from prefalign.cli import main
from prefalign.config import CPOConfig, ORPOConfig
from prefalign.data.sft import SFTTokenizeSettings, tokenize_sft_rows
from prefalign.data.tokenize import TokenizeSettings, tokenize_rows
from prefalign.errors import ConfigError, DataError
from tiny import conversational_rows, save_tiny, smollm2_tokenizer, spy_from_pretrained, tiny_llama

COMMON = dict(report_to=[], use_cpu=True, bf16=False, max_length=128, seed=0, disable_tqdm=True)

# TRL fields with no prefalign field or run key of the same name, and where they are handled instead. Empty for
# TRL 1.16: a new TRL release that adds an option fails test_every_trl_field_has_a_home until it is given one.
ELSEWHERE: dict[str, str] = {}


def _trl_116():
    trl = pytest.importorskip("trl")
    from packaging.version import Version

    if Version(trl.__version__) < Version("1.16"):
        pytest.skip(f"the option walk reads TRL 1.16's configs; trl {trl.__version__} is installed (run with "
                    "PYTHONPATH=src:/tmp/trl116, or pip install 'trl==1.16.*')")
    return trl


def test_every_trl_field_has_a_home(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trl = _trl_116()
    from trl.experimental.cpo import CPOConfig as TrlCPO
    from trl.experimental.orpo import ORPOConfig as TrlORPO

    run_keys = set(options.RUN_KEYS) | set(recipe.EXTRA_KEYS)
    homeless = {}
    for method, cls in {"dpo": trl.DPOConfig, "sft": trl.SFTConfig, "kto": trl.KTOConfig, "orpo": TrlORPO,
                        "cpo": TrlCPO}.items():
        ours = set(options.config_fields(options.config_class(method)))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in ours | run_keys and f.name not in ELSEWHERE]
        if missing:
            homeless[method] = missing
    for cls in (trl.ModelConfig, trl.ScriptArguments):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in run_keys and f.name not in ELSEWHERE]
        if missing:
            homeless[cls.__name__] = missing
    assert homeless == {}
    # the ModelConfig keys are LoRA keys or model keys, and ScriptArguments' no-op is documented in NO_OPS
    assert "lora_target_parameters" in adapters.KEYS and "ignore_bias_buffers" in recipe.NO_OPS


def test_every_trl_config_field_is_a_constructor_argument(monkeypatch):
    """The Python form too: ``DPOConfig(**any TRL 1.16 DPOConfig field)`` must not be a TypeError (a run key of the
    command line is not enough: TRL users build configs in Python, e.g. with dataset_num_proc)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trl = _trl_116()
    from trl.experimental.cpo import CPOConfig as TrlCPO
    from trl.experimental.orpo import ORPOConfig as TrlORPO

    missing = {}
    for method, cls in {"dpo": trl.DPOConfig, "sft": trl.SFTConfig, "kto": trl.KTOConfig, "orpo": TrlORPO,
                        "cpo": TrlCPO}.items():
        ours = {f.name for f in dataclasses.fields(options.config_class(method)) if f.init}
        if gaps := [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ours]:
            missing[method] = gaps
    assert missing == {}


def test_trust_remote_code_dataset_num_proc_and_padding_free_in_python(tmp_path, monkeypatch, caplog):
    seen = spy_from_pretrained(monkeypatch)
    model_dir = save_tiny(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="prefalign"):
        args = DPOConfig(output_dir=str(tmp_path / "out"), **COMMON, trust_remote_code=True, dataset_num_proc=4,
                         padding_free=True, packing=False, max_steps=1, per_device_train_batch_size=2)
    assert args.packing is True  # padding_free is prefalign's packing
    assert sum("dataset_num_proc=4 is accepted" in r.getMessage() for r in caplog.records) == 1
    DPOTrainer(model_dir, args=args, train_dataset=conversational_rows(2))
    assert seen[0].get("trust_remote_code") is True
    plain = SFTConfig(output_dir=str(tmp_path / "o2"), **COMMON)
    assert (plain.trust_remote_code, plain.dataset_num_proc, plain.padding_free) == (False, None, False)


def test_trl_choices_are_accepted(monkeypatch):
    """Each option TRL 1.16 gives choices for takes every one of them here (or refuses it with a reason)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trl = _trl_116()
    from transformers import TrainingArguments

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}  # transformers' own, not TRL's
    for ours, theirs in ((DPOConfig, trl.DPOConfig), (SFTConfig, trl.SFTConfig), (KTOConfig, trl.KTOConfig)):
        for f in dataclasses.fields(theirs):
            for choice in [] if f.name in trainer_fields else f.metadata.get("choices", []):
                kwargs = {f.name: choice}
                ours(output_dir="/tmp/unused", **COMMON, **kwargs)  # raises if a TRL choice were refused


# ----- truncation ----------------------------------------------------------------------------------------------------
def _long_pair():
    return {"prompt": [{"role": "user", "content": "Tell me about the sea, the sky and the stars in the night."}],
            "chosen": [{"role": "assistant", "content": "The sea is deep and blue, the sky is wide and the stars "
                                                        "shine bright above them all."}],
            "rejected": [{"role": "assistant", "content": "No."}]}


def test_truncation_mode_keep_start_and_keep_end_on_real_tokens():
    tok = smollm2_tokenizer()
    (full,), _ = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=None))
    p, c, r = full["prompt_ids"], full["chosen_ids"], full["rejected_ids"]
    limit = len(p) + len(c) - 10
    (start,), rep = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=limit))
    assert start == {"prompt_ids": p, "chosen_ids": c[:len(c) - 10], "rejected_ids": r}
    assert (rep.prompt_truncated, rep.chosen_truncated) == ([], [1])
    (end,), rep = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=limit, truncation_mode="keep_end"))
    # the shared prompt loses its first 10 tokens, so prompt + the longer reply fits; every reply is whole
    assert end == {"prompt_ids": p[10:], "chosen_ids": c, "rejected_ids": r}
    assert (rep.prompt_truncated, rep.chosen_truncated) == ([1], [])
    # a reply longer than max_length keeps its end, after one prompt token (the one predicting it)
    (tight,), _ = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=8, truncation_mode="keep_end"))
    assert tight == {"prompt_ids": p[-1:], "chosen_ids": c[-7:], "rejected_ids": r}
    # keep_start with a prompt leaving no room is still an error (TRL drops such rows; prefalign names them)
    with pytest.raises(DataError, match="leaving no room"):
        tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=len(p)))


def test_max_completion_length_cuts_each_reply_and_counts_it():
    tok = smollm2_tokenizer()
    (full,), _ = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=None))
    (cut,), rep = tokenize_rows([_long_pair()], tok, TokenizeSettings(max_length=None, max_completion_length=5))
    assert cut == {"prompt_ids": full["prompt_ids"], "chosen_ids": full["chosen_ids"][:5],
                   "rejected_ids": full["rejected_ids"][:5]}
    assert rep.chosen_truncated == [1] and rep.rejected_truncated == ([1] if len(full["rejected_ids"]) > 5 else [])
    assert ORPOConfig(output_dir="/tmp/unused", **COMMON, max_completion_length=5).max_completion_length == 5
    with pytest.raises(ConfigError, match="is_encoder_decoder: true"):
        CPOConfig(output_dir="/tmp/unused", **COMMON, is_encoder_decoder=True)


def test_sft_truncation_mode_keeps_the_end():
    tok = smollm2_tokenizer()
    rows = [{"text": "one two three four five six seven eight nine ten eleven twelve"}]
    (full,), _ = tokenize_sft_rows(rows, tok, SFTTokenizeSettings(max_length=None))
    (start,), rep = tokenize_sft_rows(rows, tok, SFTTokenizeSettings(max_length=5))
    (end,), rep_end = tokenize_sft_rows(rows, tok, SFTTokenizeSettings(max_length=5, truncation_mode="keep_end"))
    assert start["input_ids"] == full["input_ids"][:5] and end["input_ids"] == full["input_ids"][-5:]
    assert end["input_ids"][-1] == tok.eos_token_id and end["loss_mask"] == [0, 1, 1, 1, 1]
    assert rep.sequence_truncated == rep_end.sequence_truncated == [1]


# ----- config values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [("auto", None), ("8", 8), (8, 8), ("none", None), (None, None)])
def test_pad_to_multiple_of_takes_trl_values(value, expected):
    assert DPOConfig(output_dir="/tmp/unused", **COMMON, pad_to_multiple_of=value).pad_to_multiple_of == expected


def test_pad_to_multiple_of_auto_trains(tmp_path):
    """TRL 1.16's default 'auto' once reached the collator as a string (a TypeError mid-run)."""
    tok = smollm2_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), **COMMON, max_steps=1, per_device_train_batch_size=2,
                     pad_to_multiple_of="auto")
    tr = DPOTrainer(tiny_llama(tok, 1), args=args, train_dataset=conversational_rows(2), processing_class=tok)
    assert tr.train().training_loss == pytest.approx(0.6931, abs=1e-3)  # the first DPO step: log 2


def test_use_liger_kernel_is_accepted_with_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="prefalign"):
        args = DPOConfig(output_dir="/tmp/unused", **COMMON, use_liger_kernel=True)
    assert args.use_liger_kernel is False  # the Trainer must not try to load Liger
    assert [r.getMessage() for r in caplog.records if "use_liger_kernel" in r.getMessage()] == [
        "use_liger_kernel: true is accepted; prefalign's own fused, chunked LM head (fast_path) does the work Liger's "
        "kernels would (log-probs without full logits), so Liger is not loaded"]


def test_selective_checkpointing_checks_its_options():
    with pytest.raises(ConfigError, match="needs gradient_checkpointing: true"):
        SFTConfig(output_dir="/tmp/unused", **COMMON, gradient_checkpointing_kwargs={"selective": True})
    with pytest.raises(ConfigError, match="needs non-reentrant"):
        SFTConfig(output_dir="/tmp/unused", **COMMON, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"selective": True, "use_reentrant": True})


def _sft_losses(tmp_path, name, **extra):
    tok = smollm2_tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i + 3))}]} for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path / name), **COMMON, max_steps=3, per_device_train_batch_size=2,
                     learning_rate=1e-2, logging_steps=1, **extra)
    model = tiny_llama(tok, 3)
    seen = []
    tr = SFTTrainer(model, args=args, train_dataset=rows, processing_class=tok)
    from transformers import TrainerCallback

    class Look(TrainerCallback):
        def on_step_end(self, *a, **k):
            func = getattr(model.model.layers[0], "_gradient_checkpointing_func", None)
            seen.append(getattr(func, "keywords", {}).get("context_fn") is not None)

    tr.add_callback(Look())
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return losses, seen, model


def test_selective_checkpointing_trains_like_no_checkpointing(tmp_path):
    plain, _, _ = _sft_losses(tmp_path, "plain")
    selective, seen, model = _sft_losses(tmp_path, "sac", gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs={"selective": True})
    assert len(plain) == 3 and plain[0] > plain[-1]
    assert selective == pytest.approx(plain, rel=1e-5)
    assert seen == [True, True, True]  # the policy context reached torch's checkpoint on every step
    assert "gradient_checkpointing_enable" not in vars(model)  # the wrapper is gone after train()


def test_eos_token_and_pad_token_are_set_on_the_tokenizer(tmp_path):
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 1)
    args = SFTConfig(output_dir=str(tmp_path), **COMMON, eos_token="<|endoftext|>", pad_token="<|im_start|>")
    tr = SFTTrainer(model, args=args, train_dataset=[{"text": "Hello there"}], processing_class=tok)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|im_start|>"
    eos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tr.train_dataset[0]["input_ids"][-1] == eos_id  # text rows end with the new EOS
    assert model.config.eos_token_id == eos_id and eos_id in model.generation_config.eos_token_id
    assert tr.data_collator.pad_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ConfigError, match="not in the tokenizer's vocabulary"):
        SFTTrainer(tiny_llama(tok, 1), args=SFTConfig(output_dir=str(tmp_path), **COMMON, pad_token="<nope>"),
                   train_dataset=[{"text": "Hello"}], processing_class=smollm2_tokenizer())


def test_router_aux_loss_coef_is_refused_without_router_logits(tmp_path):
    tok = smollm2_tokenizer()
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts model"):
        DPOTrainer(tiny_llama(tok, 1), args=DPOConfig(output_dir=str(tmp_path), **COMMON, router_aux_loss_coef=0.01),
                   train_dataset=conversational_rows(2), processing_class=tok)


def test_sft_dataset_kwargs_shuffle_and_eval_packing(tmp_path):
    tok = smollm2_tokenizer()
    rows = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}, {"input_ids": [5, 6, 7]},
            {"input_ids": [8, 9], "labels": [-100, 9]}]
    args = SFTConfig(output_dir=str(tmp_path), **COMMON, dataset_kwargs={"skip_prepare_dataset": True})
    tr = SFTTrainer(tiny_llama(tok, 1), args=args, train_dataset=rows, processing_class=tok)
    assert tr.train_dataset["labels"] == [[-100, -100, 3, 4], [-100, 6, 7], [-100, 9]]  # TRL's column
    assert tr.train_dataset.select_columns(["input_ids", "loss_mask"]).to_list() == [
                                         {"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]},
                                          {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
                                          {"input_ids": [8, 9], "loss_mask": [0, 1]}]
    text = [{"text": f"row {i}"} for i in range(8)]
    kept = SFTTrainer(tiny_llama(tok, 1), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=text,
                      processing_class=tok).train_dataset["input_ids"]
    args = SFTConfig(output_dir=str(tmp_path), **COMMON, shuffle_dataset=True, eval_packing=False)
    tr = SFTTrainer(tiny_llama(tok, 1), args=args, train_dataset=text, eval_dataset=text, processing_class=tok)
    shuffled = tr.train_dataset["input_ids"]
    assert shuffled != kept and sorted(shuffled) == sorted(kept)
    assert tr.data_collator.pack and not tr.get_eval_dataloader().collate_fn.pack
    assert tr.data_collator.pack  # training's collator is back


def test_kto_takes_tr_dpo_reference_sync(tmp_path):
    from prefalign.kto import KTOTrainer

    tok = smollm2_tokenizer()
    args = KTOConfig(output_dir=str(tmp_path), **COMMON, max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    assert args.precompute_ref_log_probs is False
    tr = KTOTrainer(tiny_llama(tok, 1), args=args, train_dataset=conversational_rows(4), processing_class=tok)
    start = {n: p.detach().clone() for n, p in tr.ref_model.named_parameters()}
    tr.train()
    policy = dict(tr.model.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = tr.ref_model.get_parameter(name)
    assert not torch.equal(moved, start[name]) and not torch.equal(moved, policy[name].detach())
    assert tr.reference_sync is not None


# ----- start-up checks -----------------------------------------------------------------------------------------------
def test_every_start_refusal_is_reported_at_once(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(4)), encoding="utf-8")
    model = save_tiny(tmp_path / "model")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"model_name_or_path: {model}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "eval_strategy: steps\nreport_to: [wandb]\nattn_implementation: flash_attention_2\n"
                   "lr_scheduler_type: cosine_with_min_lr\noptim: schedule_free_adamw\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(cfg), "--method", "dpo", "--max-steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("prefalign: error: ") for line in lines), lines
    for part in ("flash_attn", "report_to wandb", "eval_strategy: steps", "schedulefree", "cosine_with_min_lr"):
        assert sum(part in line for line in lines) == 1, (part, lines)
    assert not (tmp_path / "out").exists()


def test_dropped_keys_say_trl_dropped_them(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("model_name_or_path: x\ndataset_name: y\nhub_model_revision: main\n", encoding="utf-8")
    assert main(["train", str(cfg), "--method", "dpo"]) == 2
    assert "TRL dropped it" in capsys.readouterr().err
    # transformers 4's group_by_length (the course's sft_config.yaml) is read as train_sampling_strategy: test_trl_cli


def test_packing_strategy_ffd_is_read_as_first_fit(caplog):
    # TRL's earlier name (alignment-handbook's SmolLM3 SFT recipe sets it); prefalign's packing is first-fit decreasing
    with caplog.at_level(logging.INFO, logger="prefalign"):
        args = SFTConfig(output_dir="/tmp/unused", **COMMON, packing=True, packing_strategy="ffd")
    assert args.packing_strategy == "bfd"
    assert sum("packing_strategy: ffd" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="packing_strategy='fifo' is out of range"):
        SFTConfig(output_dir="/tmp/unused", **COMMON, packing_strategy="fifo")
