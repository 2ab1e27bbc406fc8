"""TRL's and alignment-handbook's recipe keys, read as prefalign's, so their recipes run with local paths.

Every key of a recipe either works as it is (a config field, a TrainingArguments field), is a TRL name that
`rename_layer` maps onto prefalign's (``model_name_or_path`` → ``model``, ``torch_dtype`` → ``dtype``, the old
``dataset_mixer`` / ``dataset_splits`` → ``dataset_mixture``), is a harmless no-op dropped with a note
(``dataset_num_proc``), or cannot be honoured here and fails at start, in `check_start`, with one line (k-bit
loading without bitsandbytes and CUDA, ``push_to_hub`` offline or without a token, a missing ``report_to``
package, a bitsandbytes optimizer). Nothing is ignored silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

logger = logging.getLogger("prefalign")

# TRL's model keys (trl.ModelConfig) that become from_pretrained keyword arguments, by their model_init_kwargs name.
MODEL_KEYS = {"model_revision": "revision", "dtype": "dtype", "attn_implementation": "attn_implementation",
              "trust_remote_code": "trust_remote_code"}
# Plain renames: TRL / handbook name → prefalign name.
RENAMES = {"model_name_or_path": "model", "torch_dtype": "dtype", "dataset_name": "dataset",
           "dataset_train_split": "split", "max_seq_length": "max_length", "evaluation_strategy": "eval_strategy"}
# Accepted and without effect here (documented in the README's recipe section).
NO_OPS = {"dataset_num_proc": "tokenisation runs in this process", "preprocessing_num_workers": "as dataset_num_proc",
          "overwrite_output_dir": "prefalign replaces a run directory only with --overwrite",
          "ignore_bias_buffers": "a DDP debugging workaround of TRL's scripts (boolean buffers left out of DDP's "
                                 "sync), not applied here"}
# Keys read here and nowhere else (after renaming), beyond options.RUN_KEYS and the config fields.
EXTRA_KEYS = ("model_name_or_path", "torch_dtype", "dataset_name", "dataset_train_split", "max_seq_length",
              "evaluation_strategy", "use_flash_attention_2", "warmup_ratio", "padding_free", "group_by_length",
              "dataset_mixer", "dataset_splits", "dataset_streaming", *NO_OPS)
_REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard", "comet_ml": "comet_ml", "mlflow": "mlflow",
              "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "codecarbon": "codecarbon",
              "swanlab": "swanlab", "trackio": "trackio", "azure_ml": "azureml", "dagshub": "dagshub"}


def is_trl_recipe(values: Mapping[str, Any]) -> bool:
    """A file naming its model with TRL's ``model_name_or_path``: TRL picks the trainer by subcommand, so such a
    recipe has no ``method`` and must be given one."""
    return "model_name_or_path" in values


def rename_layer(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """One source's keys with TRL / handbook names mapped onto prefalign's (see the module docstring)."""
    out: dict[str, Any] = {}
    named: dict[str, str] = {}  # the name each prefalign key was given by, for the message below

    def put(key: str, value: Any, source: str) -> None:
        if key in out and out[key] != value:
            first, other = sorted((named[key], source), key=lambda n: n == key)  # TRL's name first
            raise ConfigError(f"{first} and {other} are both given {origin} and disagree; {first} is TRL's name for "
                              f"{key}. Fix: keep one of them")
        out[key], named[key] = value, source

    for key, value in values.items():
        if key in NO_OPS:
            logger.info("%s %s is accepted and has no effect: %s", key, origin, NO_OPS[key])
        elif key in RENAMES:
            put(RENAMES[key], value, key)
        elif key == "use_flash_attention_2":
            if value:
                put("attn_implementation", "flash_attention_2", key)
        elif key == "warmup_ratio":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"warmup_ratio={value!r} {origin} is out of range: must be a fraction in [0, 1).")
            put("warmup_steps", value, key)  # transformers 5: warmup_steps below 1 is a fraction of the steps
        elif key == "group_by_length":  # transformers 4's flag; 5 names the sampler
            if value:
                put("train_sampling_strategy", "group_by_length", key)
        elif key == "padding_free":
            if value:
                put("packing", True, key)  # prefalign's packing is its padding-free layout; false changes nothing
        elif key == "dataset_streaming":
            if value:
                raise ConfigError(f"dataset_streaming: true {origin}: prefalign validates every row before training "
                                  "and does not stream. Fix: remove it")
        elif key in ("dataset_mixer", "dataset_splits"):
            if "dataset_mixer" not in values:
                raise ConfigError(f"dataset_splits {origin} goes with the old dataset_mixer. Fix: use split / "
                                  "dataset_train_split, or a dataset_mixture")
            if key == "dataset_mixer":
                put("dataset_mixture", _old_mixer(value, values.get("dataset_splits"), origin), key)
        else:
            put(key, value, key)
    return out


def _old_mixer(mixer: Any, splits: Any, origin: str) -> dict[str, Any]:
    """The old handbook's ``dataset_mixer: {id: fraction}`` + ``dataset_splits: [train_x, test_x]``: each dataset's
    train splits, that fraction of each, are the training mixture; its test splits, in full, the evaluation set."""
    if not isinstance(mixer, Mapping) or not mixer:
        raise ConfigError(f"dataset_mixer {origin} must map dataset ids to fractions, e.g. {{org/name: 1.0}}.")
    splits = ["train", "test"] if splits is None else [splits] if isinstance(splits, str) else splits
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise ConfigError(f"dataset_splits {origin} must be a list of split names, e.g. [train_prefs, test_prefs].")
    train = [s for s in splits if "train" in s]
    test = [s for s in splits if "test" in s]
    if not train or len(train) + len(test) != len(splits):
        raise ConfigError(f"dataset_splits={splits!r} {origin}: each split must name 'train' or 'test' (as the "
                          "handbook's mixer requires), and one must be a train split.")
    spec: dict[str, Any] = {"datasets": [{"id": str(i), "split": s, "weight": w} for i, w in mixer.items()
                                         for s in train]}
    if test:
        spec["eval_datasets"] = [{"id": str(i), "split": s} for i in mixer for s in test]
    return spec


def fold(run: dict[str, Any], options: dict[str, Any]) -> None:
    """After merging: TRL's model keys into ``model_init_kwargs``; ``dataset_test_split`` into an evaluation set."""
    init = dict(options.get("model_init_kwargs") or {})
    if "torch_dtype" in init:
        init.setdefault("dtype", init.pop("torch_dtype"))
    for key, name in MODEL_KEYS.items():
        value = run.pop(key, None)
        if value is None:
            continue
        if name in init and init[name] != value:
            raise ConfigError(f"{key}={value!r} and model_init_kwargs.{name}={init[name]!r} disagree. Fix: keep one")
        init[name] = value
    if init:
        options["model_init_kwargs"] = init
    test_split = run.pop("dataset_test_split", None)
    if test_split is not None:
        if run.get("dataset_mixture"):
            raise ConfigError("dataset_test_split names a split of dataset_name, but a dataset_mixture is given. Fix: "
                              "use dataset_mixture's test_split_size")
        run["eval_split"] = str(test_split)
        run["eval_dataset"] = run.get("eval_dataset") or run.get("dataset")


def check_start(plan: Any) -> None:
    """What this machine cannot honour, refused before any data or model is loaded (one line, exit code 2)."""
    from .adapters import check_quantization, lora_options

    opts = lora_options(plan.run)
    check_quantization(opts)
    options = plan.options
    init = options.get("model_init_kwargs") or {}
    attn = str(init.get("attn_implementation") or "")
    if attn.startswith("flash_attention"):
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"attn_implementation={attn!r} needs the flash_attn package and a CUDA GPU, which this "
                              "machine lacks. Fix: attn_implementation: sdpa")
    optim = str(options.get("optim") or "")
    if ("8bit" in optim or "bnb" in optim or optim.startswith("paged_")) and not importlib.util.find_spec(
            "bitsandbytes"):
        raise ConfigError(f"optim={optim!r} is a bitsandbytes optimizer, and bitsandbytes is not installed. Fix: "
                          "optim: adamw_torch")
    reporters = options.get("report_to")
    for name in [reporters] if isinstance(reporters, str) else list(reporters or []):
        module = _REPORTERS.get(str(name))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to {name} needs the {module} package, which is not installed. Fix: report_to: "
                              "none (metrics.jsonl is written anyway), or install it")
    _check_hub(options)


def _check_hub(options: Mapping[str, Any]) -> None:
    """``push_to_hub`` needs the hub and a token: refuse it now rather than after training."""
    hub_keys = [k for k in ("hub_model_id", "hub_strategy", "hub_private_repo") if options.get(k) is not None]
    if not options.get("push_to_hub"):
        if hub_keys:
            logger.warning("%s is set but push_to_hub is not: nothing will be pushed (the run stays local)",
                           ", ".join(hub_keys))
        return
    from .models import _hub_offline

    if _hub_offline():
        raise ConfigError("push_to_hub: true, but the hub is offline (HF_HUB_OFFLINE is set), so the model could "
                          "not be pushed after training. Fix: push_to_hub: false (the run directory keeps it)")
    from huggingface_hub import get_token

    if not options.get("hub_token") and not os.environ.get("HF_TOKEN") and get_token() is None:
        raise ConfigError("push_to_hub: true, but no Hugging Face token is set, so the model could not be pushed "
                          "after training. Fix: log in (hf auth login) or set HF_TOKEN, or push_to_hub: false")
