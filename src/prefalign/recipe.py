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
from collections.abc import Mapping, Sequence
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
          "ignore_bias_buffers": "TRL's scripts then hide boolean buffers from DDP's broadcast; prefalign leaves DDP's "
                                 "buffers as they are (it matters only for models with boolean buffers under DDP)"}
# Keys TRL / transformers themselves no longer take: refused with what replaced them.
DROPPED = {"hub_model_revision": "the alignment-handbook's hub_model_revision: TRL dropped it (push_to_hub pushes to "
                                 "the main branch); fix: remove it, or set hub_revision"}
# Keys read here and nowhere else (after renaming), beyond options.RUN_KEYS and the config fields.
EXTRA_KEYS = ("model_name_or_path", "torch_dtype", "dataset_name", "dataset_train_split", "max_seq_length",
              "evaluation_strategy", "use_flash_attention_2", "warmup_ratio", "padding_free", "group_by_length",
              "dataset_mixer", "dataset_splits", "dataset_streaming", *NO_OPS, *DROPPED)
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
        elif key == "group_by_length":  # transformers 4's flag (the course's sft_config.yaml); 5 names the sampler
            if value:
                put("train_sampling_strategy", "group_by_length", key)
        elif key in DROPPED:
            raise ConfigError(f"{key} {origin} is not an option any more: {DROPPED[key]}")
        elif key == "padding_free":
            if value:
                logger.info("padding_free: true %s is accepted as packing: true: prefalign's padding-free layout is "
                            "prefix sharing plus packing (rows of several examples, masked from each other)", origin)
                put("packing", True, key)
            else:
                logger.info("padding_free: false %s changes nothing: packing alone decides the layout", origin)
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


def check_start(plan: Any, config: Any = None, refused: Sequence[str] = ()) -> None:
    """What this machine cannot honour, refused before any data or model is loaded: every refusal of the run at
    once (``refused``: those found already, e.g. the config's own), one line each, exit code 2."""
    problems = list(refused) + start_refusals(plan, config)
    if problems:
        raise StartRefusals(problems)


class StartRefusals(ConfigError):
    """Every start-up refusal of a run; the CLI prints one line each."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__(" | ".join(lines))
        self.lines = list(lines)


def start_refusals(plan: Any, config: Any = None) -> list[str]:
    """The one-line reasons this run cannot start here (see check_start); ``config`` (the built config, when it
    could be built) lets the optimizer and scheduler be tried."""
    from .adapters import check_quantization, lora_options

    problems: list[str] = []

    def check(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except ConfigError as e:
            problems.append(str(e))

    check(lambda: check_quantization(lora_options(plan.run)))
    options = plan.options
    init = options.get("model_init_kwargs") or {}
    attn = str(init.get("attn_implementation") or "")
    if attn.startswith("flash_attention"):
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            problems.append(f"attn_implementation={attn!r} needs the flash_attn package and a CUDA GPU, which this "
                            "machine lacks. Fix: attn_implementation: sdpa")
    optim = str(options.get("optim") or "")
    bnb = ("8bit" in optim or "bnb" in optim or optim.startswith("paged_")) and not importlib.util.find_spec(
        "bitsandbytes")
    if bnb:
        problems.append(f"optim={optim!r} is a bitsandbytes optimizer, and bitsandbytes is not installed. Fix: "
                        "optim: adamw_torch")
    reporters = options.get("report_to")
    for name in [reporters] if isinstance(reporters, str) else list(reporters or []):
        module = _REPORTERS.get(str(name))
        if module and importlib.util.find_spec(module) is None:
            problems.append(f"report_to {name} needs the {module} package, which is not installed. Fix: report_to: "
                            "none (metrics.jsonl is written anyway), or install it")
    check(_check_hub, options)
    check(_check_eval_set, plan, config)
    if config is not None:
        if not bnb:
            check(_check_optimizer, config)
        check(_check_scheduler, config)
    return problems


def _has_eval_set(run: Mapping[str, Any]) -> bool:
    mixture = run.get("dataset_mixture")
    in_mixture = isinstance(mixture, Mapping) and bool(mixture.get("eval_datasets") or mixture.get("test_split_size"))
    return bool(run.get("eval_dataset") or run.get("eval_split_size") is not None or in_mixture)


def _check_eval_set(plan: Any, config: Any) -> None:
    """Evaluating during training needs held-out data; the Trainer finds out only when train() starts."""
    strategy = str(getattr(config, "eval_strategy", None) or plan.options.get("eval_strategy") or "no")
    strategy = strategy.split(".")[-1].lower()  # an IntervalStrategy member prints as IntervalStrategy.STEPS
    if strategy != "no" and not _has_eval_set(plan.run):
        raise ConfigError(f"eval_strategy: {strategy} evaluates during training, but no evaluation set is given. "
                          "Fix: add eval_dataset (or dataset_test_split, eval_split_size, a mixture's "
                          "eval_datasets), or eval_strategy: no")


def _check_optimizer(config: Any) -> None:
    """An ``optim`` whose package is missing fails when the Trainer builds it, after loading: ask now."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(config, None)
    except ImportError as e:
        raise ConfigError(f"optim={config.optim.value if hasattr(config.optim, 'value') else config.optim!r} needs "
                          f"a package this machine lacks: {e}. Fix: optim: adamw_torch, or install it") from None
    except ValueError as e:
        if "install" in str(e).lower():
            raise ConfigError(f"optim={getattr(config.optim, 'value', config.optim)!r} needs a package this machine "
                              f"lacks: {e}. Fix: optim: adamw_torch, or install it") from None


def _check_scheduler(config: Any) -> None:
    """A scheduler missing its lr_scheduler_kwargs fails at the first step: build it once on a dummy optimizer."""
    import torch
    from transformers import get_scheduler

    name = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                      scheduler_specific_kwargs=config.lr_scheduler_kwargs or {})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lr_scheduler_type={name!r} cannot be built: {e}. Fix: give what it needs in "
                          "lr_scheduler_kwargs, or choose another lr_scheduler_type") from None


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
