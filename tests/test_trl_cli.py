"""`prefalign dpo|orpo|cpo|kto|sft`: TRL's command line (flag forms, --config, --help, errors) and the smol-course's
`trl sft` / `trl dpo` commands run with `trl` replaced by `prefalign`.

The course commands below are those of huggingface/smol-course (units/en, unit 1 SFT and unit 2 DPO; the `hf jobs uv
run ... trl/scripts/sft.py|dpo.py` ones taken from the script path on), with only what needs the network changed:
model and dataset ids are a tiny random model (SmolLM2 tokenizer) and local fixtures in the published shape
(smoltalk2's `messages` + `source` with train / test splits; Anthropic/hh-rlhf's `chosen` / `rejected` dialogue
text), `--push_to_hub` dropped, `--report_to trackio` made `none`, and `--max_steps 1000` made 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from prefalign import options
from prefalign.cli import main
from prefalign.commands import trl_cli
from tiny import conversational_rows, save_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny model and the course's two datasets' shapes, saved as DatasetDicts with train and test splits."""
    import datasets

    root = tmp_path_factory.mktemp("trl-cli")
    rows = conversational_rows(8)
    chats = [{"messages": r["prompt"] + r["chosen"], "source": "everyday-conversations"} for r in rows]
    hh = [{"chosen": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['chosen'][0]['content']}",
           "rejected": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['rejected'][0]['content']}"}
          for r in rows]
    for name, table in (("smoltalk", chats), ("hh", hh)):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(table[:6]),
                              "test": datasets.Dataset.from_list(table[6:])}).save_to_disk(str(root / name))
    return {"model": save_tiny(root / "model"), "smoltalk": str(root / "smoltalk"), "hh": str(root / "hh")}


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(capsys: pytest.CaptureFixture[str], prog: str = "prefalign dpo") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith((f"{prog}: error: ", "prefalign: error: ")), lines[0]
    return lines[0]


# ----- the course's commands -------------------------------------------------------------------------------------
# units/en/unit1/3.md (SFT with Trackio), unit1/5.md (TRL's sft.py on Jobs; the same flags), unit1/5.md (LoRA on Jobs)
UNIT1_SFT = ("sft --model_name_or_path {model} --dataset_name {smoltalk} --output_dir {out} "
             "--per_device_train_batch_size 4 --learning_rate 5e-5 --max_steps 2 --logging_steps 50 --save_steps 200 "
             "--report_to none --hub_model_id your-username/smollm3-custom")
UNIT1_LORA = ("sft --model_name_or_path {model} --dataset_name {smoltalk} --output_dir {out} "
              "--per_device_train_batch_size 4 --learning_rate 5e-5 --max_steps 2 --report_to none "
              "--hub_model_id your-username/smollm3-lora-sft --use_peft --lora_r 8 --lora_alpha 16 "
              "--lora_dropout 0.05 --lora_target_modules all-linear")
# units/en/unit1/4.md, Exercise 4 (the TRL CLI)
UNIT1_CLI = ("sft --model_name_or_path {model} --dataset_name {smoltalk} --output_dir {out} "
             "--per_device_train_batch_size 4 --gradient_accumulation_steps 2 --learning_rate 5e-5 "
             "--num_train_epochs 1 --max_length 2048 --logging_steps 10 --save_steps 500 --warmup_steps 100 "
             "--bf16 True --hub_model_id your-username/smollm3-sft-cli")
# units/en/unit2/3.md (TRL's dpo.py on Jobs) and unit2/4.md (the submission command: no --output_dir)
UNIT2_DPO = ("dpo --model_name_or_path {model} --dataset_name {hh} --learning_rate 5e-7 "
             "--per_device_train_batch_size 2 --gradient_accumulation_steps 8 --max_steps 2 --beta 0.1 "
             "--max_prompt_length 512 --max_length 1024 --output_dir {out} "
             "--hub_model_id your-username/smollm3-dpo-aligned --report_to none")
UNIT2_SUBMIT = ("dpo --model_name_or_path {model} --dataset_name {hh} --learning_rate 5e-7 --beta 0.1 --max_steps 2 "
                "--hub_model_id your-username/smollm3-dpo-aligned --report_to none")


@pytest.mark.parametrize("command, expected, expected_steps", [
    (UNIT1_SFT, {"learning_rate": 5e-5, "per_device_train_batch_size": 4, "logging_steps": 50, "save_steps": 200,
                 "save_strategy": "steps", "report_to": "none"}, 2),
    (UNIT1_CLI, {"gradient_accumulation_steps": 2, "num_train_epochs": 1, "max_length": 2048, "warmup_steps": 100,
                 "bf16": True, "logging_steps": 10, "save_steps": 500}, 1),  # 6 rows / (4 x 2) a step
    (UNIT1_LORA, {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                  "lora_target_modules": "all-linear"}, 2),
    (UNIT2_DPO, {"beta": 0.1, "learning_rate": 5e-7, "gradient_accumulation_steps": 8, "max_prompt_length": 512,
                 "max_length": 1024}, 2),
], ids=["unit1-sft", "unit1-cli", "unit1-lora-jobs", "unit2-dpo-jobs"])
def test_course_command_trains_a_prefalign_run(command, expected, expected_steps, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = command.format(out=out, **data).split()
    assert main(argv) == 0, capsys.readouterr().err
    assert f"run saved to {out}" in capsys.readouterr().out
    saved = _config(out)
    assert saved["method"] == argv[0] and saved["model"] == data["model"]
    assert saved["dataset"] == data["smoltalk" if argv[0] == "sft" else "hh"] and saved["split"] == "train"
    assert {k: saved[k] for k in expected} == expected
    records = _metrics(out)
    (final,) = [r for r in records if "train_loss" in r]
    assert 0 < final["train_loss"] < 20 and final["step"] == expected_steps
    assert (out / "report.html").is_file() and (out / "data_report.json").is_file()
    weights = "adapter_model.safetensors" if "--use_peft" in argv else "model.safetensors"
    assert (out / weights).is_file()
    if argv[0] == "dpo":
        assert any("rewards/accuracies" in r for r in records)


def test_course_submission_command_without_output_dir(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(UNIT2_SUBMIT.format(**data).split()) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").glob("dpo-*")
    assert _config(run)["beta"] == 0.1 and _config(run)["max_steps"] == 2 and (run / "metrics.jsonl").is_file()


# units/en/unit1/4.md: sft_config.yaml, run as `trl sft --config sft_config.yaml`
SFT_CONFIG_YAML = """\
# Model and dataset
model_name_or_path: {model}
dataset_name: {smoltalk}
output_dir: {out}

# Training hyperparameters
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 3e-5
num_train_epochs: 2
max_length: 4096

# Optimization
warmup_steps: 200
weight_decay: 0.01
optim: adamw_torch
lr_scheduler_type: cosine

# Memory and performance
bf16: true
dataloader_num_workers: 4
group_by_length: true
remove_unused_columns: false

# Logging and evaluation
logging_steps: 25
eval_steps: 250
save_steps: 500
eval_strategy: steps
load_best_model_at_end: true
metric_for_best_model: eval_loss

# Hub integration
push_to_hub: false
hub_model_id: your-username/smollm3-advanced
hub_strategy: every_save
"""


def test_course_sft_config_yaml_trains_and_evaluates_on_the_test_split(data, tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "sft_config.yaml"
    path.write_text(SFT_CONFIG_YAML.format(out=out, **data), encoding="utf-8")
    assert main(["sft", "--config", str(path)]) == 0, capsys.readouterr().err
    saved = _config(out)
    assert saved["learning_rate"] == 3e-5 and saved["num_train_epochs"] == 2 and saved["bf16"] is True
    assert saved["train_sampling_strategy"] == "group_by_length"  # transformers 4's group_by_length: true
    assert saved["save_strategy"] == "steps" and saved["load_best_model_at_end"] is True
    assert saved["eval_dataset"] == data["smoltalk"] and saved["eval_split"] == "test"  # TRL: eval_strategy → test
    records = _metrics(out)
    assert sum("train_loss" in r for r in records) == 1 and any("eval_loss" in r for r in records)
    assert max(r.get("step", 0) for r in records) == 2  # 6 rows / (2 x 4) per step: one step per epoch, two epochs


# ----- the flag forms --------------------------------------------------------------------------------------------
def _values(*argv: str, command: str = "dpo") -> dict:
    return trl_cli.parse_args(command, list(argv)).values


@pytest.mark.parametrize("argv", [["--learning_rate", "1e-5"], ["--learning_rate=1e-5"], ["--learning-rate", "1e-5"],
                                  ["--learning-rate=1e-5"]])
def test_value_flag_forms(argv):
    assert _values(*argv) == {"learning_rate": 1e-5}


@pytest.mark.parametrize("argv, value", [
    (["--bf16"], True), (["--bf16", "false"], False), (["--bf16", "True"], True), (["--bf16=no"], False),
    (["--bf16", "1"], True), (["--no_remove_unused_columns"], None), (["--no-remove-unused-columns"], None)])
def test_bool_flag_forms(argv, value):
    if value is None:
        assert _values(*argv) == {"remove_unused_columns": False}
    else:
        assert _values(*argv, "--max_steps", "3") == {"bf16": value, "max_steps": 3}


def test_list_dict_and_none_values():
    values = _values("--lora_target_modules", "q_proj", "v_proj", "--report_to", "none", "--loss_type", "sigmoid",
                     "hinge", "--loss_weights", "1", "0.5", "--model_init_kwargs", '{"dtype": "bfloat16"}',
                     "--max_length", "none", "--use_peft")
    assert values == {"lora_target_modules": ["q_proj", "v_proj"], "report_to": "none",
                      "loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, 0.5],
                      "model_init_kwargs": {"dtype": "bfloat16"}, "max_length": None, "use_peft": True}
    assert _values("--loss_type", "ipo") == {"loss_type": "ipo"}  # one value of a list-or-string field: the string


def test_trl_names_map_onto_a_prefalign_train_plan(tmp_path):
    args = trl_cli.parse_args("dpo", [
        "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--dataset_config", "cfg", "--dataset_train_split",
        "train_prefs", "--dataset_test_split", "test_prefs", "--model_revision", "v2", "--dtype", "bfloat16",
        "--attn_implementation", "eager", "--use_peft", "--lora_r", "4", "--lora_modules_to_save", "lm_head",
        "--use_rslora", "--ignore_bias_buffers", "--output_dir", str(tmp_path / "o"), "--precompute_ref_log_probs",
        "false"])
    plan, env = trl_cli.resolve(args)
    assert plan.method == "dpo" and env == {}
    assert {k: plan.run[k] for k in ("model", "dataset", "dataset_config", "split", "eval_dataset", "eval_split",
                                     "use_peft", "lora_r", "lora_modules_to_save", "use_rslora")} == {
        "model": "m", "dataset": "d.jsonl", "dataset_config": "cfg", "split": "train_prefs",
        "eval_dataset": "d.jsonl", "eval_split": "test_prefs", "use_peft": True, "lora_r": 4,
        "lora_modules_to_save": ["lm_head"], "use_rslora": True}
    assert plan.options["model_init_kwargs"] == {"revision": "v2", "dtype": "bfloat16", "attn_implementation": "eager"}
    assert plan.options["precompute_ref_log_probs"] is False and plan.options["report_to"] == "none"


@pytest.mark.parametrize("command, argv, key, value", [
    ("orpo", ["--beta", "0.25"], "beta", 0.25), ("cpo", ["--loss_type", "simpo", "--simpo_gamma", "0.7"],
                                                  "simpo_gamma", 0.7),
    ("kto", ["--desirable_weight", "1.5"], "desirable_weight", 1.5), ("sft", ["--packing", "false"], "packing", False),
    ("dpo", ["--beta", "0.3"], "beta", 0.3)])
def test_every_method_resolves_its_own_config_fields(command, argv, key, value):
    plan, _ = trl_cli.resolve(trl_cli.parse_args(command, ["--dataset_name", "d.jsonl", *argv]))
    assert plan.method == command and plan.options[key] == value
    options.build_config(plan)  # the method's config class takes them


# ----- --config --------------------------------------------------------------------------------------------------
def test_config_yaml_values_are_defaults_that_flags_override(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFALIGN_TRL_CLI_TEST", raising=False)
    path = tmp_path / "dpo.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nlearning_rate: 3.0e-5\nbeta: 0.2\n"
                    "lora_target_modules: [q_proj]\nuse_peft: true\nenv:\n  PREFALIGN_TRL_CLI_TEST: 7\n")
    plan, env = trl_cli.resolve(trl_cli.parse_args("dpo", ["--config", str(path), "--learning-rate", "1e-5",
                                                           "--lora_target_modules", "k_proj", "v_proj"]))
    assert plan.options["learning_rate"] == 1e-5 and plan.options["beta"] == 0.2  # flag wins; the file's stays
    assert plan.run["lora_target_modules"] == ["k_proj", "v_proj"] and plan.run["model"] == "m"
    assert env == {"PREFALIGN_TRL_CLI_TEST": "7"} and "PREFALIGN_TRL_CLI_TEST" not in os.environ  # set by run()


def test_config_env_is_set_before_training(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFALIGN_TRL_CLI_TEST", raising=False)
    path = tmp_path / "dpo.yaml"
    path.write_text(f"model_name_or_path: {data['model']}\ndataset_name: {data['hh']}\nmax_steps: 1\n"
                    f"per_device_train_batch_size: 2\nenv:\n  PREFALIGN_TRL_CLI_TEST: set-by-config\n")
    seen = {}
    from prefalign.commands import train

    monkeypatch.setattr(train, "train_plan", lambda plan: seen.update(env=os.environ.get("PREFALIGN_TRL_CLI_TEST"),
                                                                      lr=plan.options["learning_rate"]) or 0)
    assert main(["dpo", "--config", str(path), "--learning_rate", "2e-6"]) == 0
    assert seen == {"env": "set-by-config", "lr": 2e-6}


@pytest.mark.parametrize("text, message", [
    ("method: orpo\ndataset_name: d.jsonl\n", "run 'prefalign orpo'"),
    ("dataset_name: d.jsonl\nlerning_rate: 1\n", "Did you mean 'learning_rate'?"),
    ("dataset_name: d.jsonl\nenv: [A]\n", "env in"),
    ("learning_rate: 1e-5\n", "pass --dataset_name SRC")])
def test_config_file_errors_are_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["dpo", "--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    assert message in _one_line(capsys) and not (tmp_path / "out").exists()


# ----- errors on the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1e-5"], "unknown option 'lerning_rate' on the command line for method dpo. Did you mean "
                                 "'learning_rate'?"),
    (["--lora-alpah=8"], "unknown option 'lora_alpah' on the command line for method dpo. Did you mean 'lora_alpha'?"),
    (["--learning_rate", "abc"], "argument --learning_rate/--learning-rate: expected a number, got 'abc'"),
    (["--max_steps", "2.5"], "argument --max_steps/--max-steps: expected an integer, got '2.5'"),
    (["--bf16", "maybe"], "argument --bf16: expected true or false, got 'maybe'"),
    (["--model_init_kwargs", "dtype=bf16"], "argument --model_init_kwargs/--model-init-kwargs: expected a JSON"),
    (["--lora_target_modules"], "argument --lora_target_modules/--lora-target-modules: expected at least one"),
    (["stray"], "unexpected argument 'stray'"),
    (["--packing_strategy", "bfd"], "unknown option 'packing_strategy'")])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(argv, message, data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["dpo", "--model_name_or_path", data["model"], "--dataset_name", data["hh"], "--output_dir", str(out),
                 *argv])
    assert code == 2
    line = _one_line(capsys)
    assert message in line and line.endswith("(see 'prefalign dpo --help')")
    assert not out.exists()


def test_an_option_of_another_method_says_which(capsys):
    assert main(["dpo", "--dataset_name", "d.jsonl", "--orpo_alpha", "0.2"]) == 2
    assert "It is an option of method orpo" in _one_line(capsys)


# ----- --help ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, own", [("dpo", "--beta"), ("orpo", "--orpo_alpha"), ("cpo", "--simpo_gamma"),
                                          ("kto", "--desirable_weight"), ("sft", "--dataset_text_field")])
def test_help_lists_every_option_by_group_with_type_and_default(command, own, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    titles = ["script arguments (TRL's ScriptArguments)", "model arguments (TRL's ModelConfig)",
              f"{options.config_class(command).__name__} arguments", "prefalign run arguments"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    script, model, config, run = (text[a:b] for a, b in zip(positions, [*positions[1:], len(text)], strict=True))
    assert "--dataset_name STR" in script and "--dataset_train_split STR" in script
    assert "[str, default: 'train']" in script
    assert "--lora_r INT" in model and "--lora_target_modules STR [STR ...]" in model and "--use_peft [BOOL]" in model
    assert own in config and "--learning_rate FLOAT, --learning-rate FLOAT" in config
    lr = options.config_fields(options.config_class(command))["learning_rate"].default
    flat = " ".join(config.split())
    assert f"[float, default: {lr!r}]" in flat
    assert "--logging_steps FLOAT, --logging-steps FLOAT Log metrics every N optimizer steps. [float, default: 1]" \
        in flat
    assert "[str ..., default: 'none']" in flat  # the CLI's defaults (logging_steps 1, report_to none), as train's
    assert "--ref_model STR" in run and "--columns JSON" in run
    for name in options.config_fields(options.config_class(command)):
        assert f"--{name} " in config, name  # every field of the method's config class


def test_a_new_config_field_is_a_new_flag(monkeypatch):
    base = options.config_class("dpo")

    @dataclass
    class WithNewField(base):  # type: ignore[misc, valid-type]
        brand_new_option: float = field(default=0.5, metadata={"help": "Added to the config later."})

    monkeypatch.setattr(options, "config_class", lambda method: WithNewField)
    parser = trl_cli.build_parser("dpo")
    assert "Added to the config later. [float, default: 0.5]" in " ".join(parser.format_help().split())
    assert trl_cli.parse_args("dpo", ["--brand-new-option", "0.75"]).values == {"brand_new_option": 0.75}


def test_top_level_help_lists_the_trl_commands_and_python_m_works(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"    {name} " in text for name in trl_cli.COMMANDS)
    result = subprocess.run([sys.executable, "-m", "prefalign", "kto", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and "KTOConfig arguments" in result.stdout and "--desirable_weight" in result.stdout
