"""TRL / alignment-handbook recipes through `prefalign train`: model keys, LoRA from YAML, chat_template, and the
keys this machine cannot honour failing at start with one line.

The recipes below are real handbook recipes (zephyr-7b-beta DPO full and LoRA, zephyr-141b ORPO) with the model and
dataset ids replaced by local tiny fixtures, and what a CPU without network cannot do changed, as the README's
recipe section says: ``push_to_hub: false``, ``attn_implementation: sdpa``, ``report_to: [tensorboard]`` (wandb
is not installed), sizes that fit eight rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.cli import main
from prefalign.data.mixture import load_mixture
from prefalign.errors import ConfigError
from prefalign.options import resolve_plan
from tiny import conversational_rows, save_tiny, save_tiny_base, spy_from_pretrained

ZEPHYR_TEMPLATE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
                   "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
                   "'<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
                   "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("recipe-model") / "model")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("recipe-base") / "base")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(8)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ultrafeedback_binarized's shape: a saved DatasetDict with train_prefs / test_prefs splits."""
    import datasets

    rows = conversational_rows(8)
    path = tmp_path_factory.mktemp("recipe-prefs") / "ultrafeedback"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows[:6]),
                          "test_prefs": datasets.Dataset.from_list(rows[6:])}).save_to_disk(str(path))
    return path


def _recipe(tmp_path: Path, text: str, **values: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(**values), encoding="utf-8")
    return path


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("prefalign: error")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


SHORT = ["--max-steps", "1", "--batch-size", "2"]

# recipes/zephyr-7b-beta/dpo/config_full.yaml
ZEPHYR_DPO_FULL = """\
# Model arguments
model_name_or_path: {model}
torch_dtype: null

# Data training arguments
dataset_mixture:
  datasets:
    - id: {data}
      config: default
      split: train
      columns:
        - chosen
        - rejected
        - prompt
      weight: 1.0
  test_split_size: 2
  seed: 0
dataset_num_proc: 12

# DPOTrainer arguments
bf16: false
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: zephyr-7b-dpo-full
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: adamw_torch
output_dir: {out}
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
push_to_hub: false
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
"""

# recipes/zephyr-141b-A35b/orpo/config_full.yaml
ZEPHYR_ORPO = """\
# Model arguments
model_name_or_path: {model}
model_revision: main
torch_dtype: float32
attn_implementation: sdpa

# Data training arguments
chat_template: {template}
dataset_name: {data}
dataset_train_split: train
dataset_num_proc: 8

# ORPOTrainer arguments
bf16: false
beta: 0.05
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
hub_model_id: zephyr-orpo-141b-A35b
learning_rate: 5.0e-6
log_level: info
logging_steps: 10
lr_scheduler_type: inverse_sqrt
max_length: 2048
max_prompt_length: 1792
num_train_epochs: 3
optim: adamw_torch
output_dir: {out}
per_device_train_batch_size: 1
push_to_hub: false
report_to:
- tensorboard
save_strategy: "no"
seed: 42
warmup_steps: 100
"""

# recipes/zephyr-7b-beta/dpo/config_lora.yaml (the old dataset_mixer / dataset_splits form)
ZEPHYR_DPO_LORA = """\
# Model arguments
model_name_or_path: {model}
torch_dtype: auto

# LORA
use_peft: true
lora_r: 4
lora_alpha: 16
lora_dropout: 0.1
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj
merge_adapter: true

# Data training arguments

dataset_mixer:
  {data}: 1.0
dataset_splits:
- train_prefs
- test_prefs
preprocessing_num_workers: 12

# DPOTrainer arguments
bf16: false
beta: 0.1
do_eval: true
evaluation_strategy: epoch
eval_steps: 100
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: zephyr-7b-dpo-lora
learning_rate: 1.0e-2
log_level: info
logging_steps: 10
lr_scheduler_type: linear
max_length: 1024
max_prompt_length: 512
num_train_epochs: 3
optim: rmsprop
output_dir: {out}
per_device_train_batch_size: 2
per_device_eval_batch_size: 4
push_to_hub: false
save_strategy: "no"
save_total_limit: null
seed: 42
warmup_ratio: 0.1
"""


# ----- whole recipes -----------------------------------------------------------------------------------------------
def test_handbook_dpo_recipe_runs_with_method_flag(model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    path = _recipe(tmp_path, ZEPHYR_DPO_FULL, model=model_dir, data=pairs, out=out)
    assert main(["train", str(path), *SHORT]) == 2  # TRL picks the trainer by subcommand: the method is asked for
    assert "--method dpo" in _one_error(capsys) and not out.exists()
    assert main(["train", str(path), "--method", "dpo", *SHORT]) == 0, capsys.readouterr().err
    assert "eval reward accuracy" in capsys.readouterr().out  # the mixture's test_split_size became the eval set
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "dpo" and saved["model"] == str(Path(model_dir).resolve())
    assert "model_init_kwargs" not in saved and saved["warmup_steps"] == 0.1  # torch_dtype: null = the default
    assert "model_name_or_path" not in saved and "dataset_num_proc" not in saved
    assert main(["train", str(out / "config.yaml"), "--output-dir", str(tmp_path / "again"), *SHORT]) == 0


def test_handbook_orpo_recipe_runs(model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    path = _recipe(tmp_path, ZEPHYR_ORPO, model=model_dir, data=pairs, out=out, template=json.dumps(ZEPHYR_TEMPLATE))
    assert main(["train", str(path), "--method", "orpo", *SHORT]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model_init_kwargs"] == {"revision": "main", "dtype": "float32", "attn_implementation": "sdpa"}
    assert saved["beta"] == 0.05 and saved["dataset"] == str(pairs.resolve())
    assert AutoTokenizer.from_pretrained(out).chat_template == ZEPHYR_TEMPLATE  # the recipe's template, saved


def test_model_keys_reach_from_pretrained(model_dir, pairs, tmp_path, monkeypatch, capsys):
    seen = spy_from_pretrained(monkeypatch)
    path = _recipe(tmp_path, "model_name_or_path: {m}\nmodel_revision: main\ndtype: bfloat16\n"
                   "attn_implementation: eager\ntrust_remote_code: false\ndataset_name: {d}\n", m=model_dir, d=pairs)
    assert main(["train", str(path), "--method", "orpo", "--output-dir", str(tmp_path / "run"), *SHORT]) == 0, \
        capsys.readouterr().err
    assert {k: seen[0].get(k) for k in ("revision", "dtype", "attn_implementation", "trust_remote_code")} == \
        {"revision": "main", "dtype": torch.bfloat16, "attn_implementation": "eager", "trust_remote_code": False}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").dtype == torch.bfloat16


def test_trl_mixture_shape_and_old_mixer(pairs, prefs_dir):
    train, test = load_mixture({"datasets": [{"path": "json", "data_files": str(pairs), "split": "train",
                                              "name": None, "fraction": 0.5, "columns": ["prompt", "chosen",
                                                                                         "rejected"]}],
                                "streaming": False, "test_split_size": 0.25, "seed": 1})
    assert (len(train), len(test)) == (3, 1)
    from prefalign.recipe import rename_layer

    spec = rename_layer({"dataset_mixer": {str(prefs_dir): 0.5}, "dataset_splits": ["train_prefs", "test_prefs"]},
                        "in r.yaml")["dataset_mixture"]
    train, test = load_mixture(spec)
    assert (len(train), len(test)) == (3, 2)


# ----- LoRA ------------------------------------------------------------------------------------------------------
def test_lora_dpo_recipe_saves_adapter_and_merged_model(model_dir, prefs_dir, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "run"
    path = _recipe(tmp_path, ZEPHYR_DPO_LORA, model=model_dir, data=prefs_dir, out=out)
    assert main(["train", str(path), "--method", "dpo", "--max-steps", "2"]) == 0, capsys.readouterr().err
    assert "eval reward accuracy" in capsys.readouterr().out  # test_prefs became the evaluation set
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16 and set(adapter["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.tensor([list(range(5, 25))])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    assert not torch.allclose(reloaded, base_logits, atol=1e-4)  # the adapter trained
    torch.testing.assert_close(merged, reloaded, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template


def test_lora_dpo_reference_is_the_adapter_disabled_base(model_dir, pairs, tmp_path, monkeypatch):
    import copy
    import types

    from prefalign.commands.train import load_train_data, make_trainer
    from prefalign.options import build_config
    from prefalign.trainer import _is_peft

    def no_model_copy(value, *args):
        assert not isinstance(value, torch.nn.Module), "the policy was copied for a reference"
        return copy.deepcopy(value, *args)

    monkeypatch.setattr("prefalign.trainer.copy", types.SimpleNamespace(deepcopy=no_model_copy))
    args = _args(tmp_path, f"method: dpo\nmodel: {model_dir}\ndataset: {pairs}\nuse_peft: true\nlora_r: 2\n"
                 "precompute_ref_log_probs: false\n")
    plan = resolve_plan(args)
    config = build_config(plan)
    trainer = make_trainer(plan, config, *load_train_data(plan, config))
    assert trainer.ref_model is None and _is_peft(trainer.model)


@pytest.mark.parametrize("method", ["orpo", "cpo"])
def test_lora_from_the_command_line_for_every_method(method, model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", method, "--model", model_dir, "--dataset", str(pairs), "--output-dir", str(out),
            "--set", "use_peft=true", "--set", "lora_r=2", "--set", "lora_target_modules=all-linear", *SHORT]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and not (out / "merged").exists()


# ----- chat_template ---------------------------------------------------------------------------------------------
def test_chatml_gives_a_base_model_a_chat_format(base_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "orpo", "--model", base_dir, "--dataset", str(pairs), "--output-dir", str(out),
            *SHORT]
    assert main(argv) == 2
    assert "chat_template: chatml" in _one_error(capsys) and not out.exists()
    assert main([*argv, "--set", "chat_template=chatml"]) == 0, capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert (out / "chat_template.jinja").is_file()
    assert len(tokenizer) == 402 and model.get_input_embeddings().weight.shape[0] == 402  # 400 + 2 ChatML tokens


@pytest.mark.parametrize("form", ["string", "file"])
def test_jinja_chat_template_string_and_file(form, model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    if form == "string":
        setting = ["--set", f"chat_template={json.dumps(ZEPHYR_TEMPLATE)}"]
    else:
        (tmp_path / "zephyr.jinja").write_text(ZEPHYR_TEMPLATE, encoding="utf-8")
        setting = ["--set", f"chat_template_path={tmp_path / 'zephyr.jinja'}"]
    argv = ["train", "--method", "orpo", "--model", model_dir, "--dataset", str(pairs), "--output-dir", str(out)]
    assert main([*argv, *setting, *SHORT]) == 0, capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(out).chat_template == ZEPHYR_TEMPLATE


# ----- what fails at start ---------------------------------------------------------------------------------------
def _args(tmp_path: Path, text: str, *sets: str) -> argparse.Namespace:
    from prefalign.cli import build_parser

    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    args = build_parser().parse_args(["train", str(path), "--output-dir", str(tmp_path / "run"),
                                      *[a for s in sets for a in ("--set", s)]])
    args.explicit = set()
    return args


@pytest.mark.parametrize(("extra", "message"), [
    ("lora_rank: 8", "unknown option 'lora_rank'"),
    ("use_peft: true\nlora_r: -1", "lora_r=-1 is out of range"),
    ("lora_r: 8", "use_peft is not true"),
    ("merge_adapter: true", "use_peft is not true"),
    ("use_peft: true\nlora_r: eight", "lora_r='eight' is not an integer"),
    ("chat_template: missing.jinja", "chat_template='missing.jinja': no such file"),
    ("use_peft: true\nload_in_4bit: true", "load_in_4bit: true needs bitsandbytes and a CUDA GPU"),
    ("use_peft: true\nload_in_4bit: true\nload_in_8bit: true", "both true"),
    ("optim: paged_adamw_32bit", "bitsandbytes optimizer"),
    ("report_to: [wandb]", "report_to wandb needs the wandb package"),
    ("attn_implementation: flash_attention_2", "needs the flash_attn package"),
    ("use_flash_attention_2: true", "needs the flash_attn package"),
    ("torch_dtype: bfloat16\ndtype: float16", "torch_dtype and dtype are both given"),
    ("dataset_streaming: true", "does not stream"),
    ("warmup_ratio: 1.5", "warmup_ratio=1.5"),
    ("dataset_splits: [train]", "goes with the old dataset_mixer"),
    ("chat_template: chatml\nref_model: {model}", "ref_model would lack"),
    ("push_to_hub: true\nhub_model_id: me/model", "the hub is offline"),
])
def test_bad_recipe_keys_fail_at_start(extra, message, model_dir, pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(f"method: dpo\nmodel_name_or_path: {model_dir}\ndataset_name: {pairs}\noutput_dir: {out}\n"
                    + extra.format(model=model_dir) + "\n", encoding="utf-8")
    assert main(["train", str(path), *SHORT]) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


def test_push_to_hub_without_a_token_fails_at_start(model_dir, pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token there
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--dataset", str(pairs), "--output-dir", str(out), "--set",
            "push_to_hub=true", *SHORT]
    assert main(argv) == 2
    assert "no Hugging Face token" in _one_error(capsys) and not out.exists()


def test_hub_keys_without_push_are_inert_and_said_so(model_dir, pairs, tmp_path):
    plan = resolve_plan(_args(tmp_path, f"method: dpo\nmodel: {model_dir}\ndataset: {pairs}\nhub_model_id: me/x\n"))
    from prefalign.recipe import check_start

    check_start(plan)  # a warning, not an error: nothing is pushed
    with pytest.raises(ConfigError, match="dataset_test_split names a split"):
        resolve_plan(_args(tmp_path, f"method: dpo\nmodel: {model_dir}\ndataset_test_split: test\n"
                           f"dataset_mixture: {{datasets: [{{path: {pairs}}}]}}\n"))


# recipes/smollm2/sft/config.yaml, verbatim but for the model, the dataset, the output directory, flash attention
# (no CPU kernel) and push_to_hub (no network here: its failure at start is tested above)
SMOLLM2_SFT = """\
# Model arguments
model_name_or_path: {model}
model_revision: main
torch_dtype: bfloat16
attn_implementation: sdpa

# Data training arguments
chat_template: {template}
dataset_name: {data}
dataset_config: all
dataset_train_split: train
dataset_test_split: test
dataset_num_proc: 24

# SFT trainer config
bf16: true
do_eval: true
eval_strategy: epoch
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: smollm2-1.7B-sft
hub_strategy: every_save
learning_rate: 3.0e-04
log_level: info
logging_steps: 5
logging_strategy: steps
lr_scheduler_type: cosine
max_length: 8192
max_steps: -1
num_train_epochs: 2
output_dir: {out}
overwrite_output_dir: true
per_device_eval_batch_size: 4
per_device_train_batch_size: 4
push_to_hub: false
remove_unused_columns: true
report_to:
- tensorboard
save_strategy: "no"
seed: 42
warmup_ratio: 0.1
"""
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def test_handbook_sft_recipe_runs(model_dir, tmp_path, capsys):
    """smoltalk's shape (a `messages` column, train / test splits) under the SmolLM2 SFT recipe: trains on the
    train split, evaluates on the test split, saves the recipe's chat template."""
    import datasets

    chats = [r["prompt"] + r["chosen"] for r in conversational_rows(8)]
    data = tmp_path / "smoltalk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": m} for m in chats[:6]]),
                          "test": datasets.Dataset.from_list([{"messages": m} for m in chats[6:]])}
                         ).save_to_disk(str(data))
    out = tmp_path / "run"
    path = _recipe(tmp_path, SMOLLM2_SFT, model=model_dir, data=data, out=out, template=json.dumps(SMOL_TEMPLATE))
    assert main(["train", str(path), "--method", "sft", "--max-steps", "1"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and any("train_loss" in r for r in records)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "sft" and saved["eval_split"] == "test" and saved["bf16"] is True
    assert saved["model_init_kwargs"] == {"revision": "main", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert AutoTokenizer.from_pretrained(out).chat_template == SMOL_TEMPLATE
    assert list((out / "runs").glob("**/events.out.tfevents.*")) or list(out.glob("**/events.out.tfevents.*"))
