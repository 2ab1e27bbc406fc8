"""Option resolution for ``prefalign train`` (and ``prefalign dpo|orpo|...``): config file < --set < flags, over the
CLI's defaults.

Each source becomes a `Layer`; `resolve_plan` merges them (unknown keys are errors with a suggestion), splits run
keys (model, dataset, ...) from config-class options, and coerces YAML values to the types the config dataclasses
declare, so a mistyped value fails here, on one line, before anything is loaded. `build_config` then builds the
`DPOConfig` / `ORPOConfig`, whose own checks catch out-of-range values.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import adapters, recipe, runs
from .errors import ConfigError, PrefalignError, one_line

if TYPE_CHECKING:
    from .config import TrainConfig

METHODS = ("dpo", "orpo", "cpo", "simpo", "kto", "sft")
RUN_KEYS = ("method", "model", "ref_model", "dataset", "split", "eval_dataset", "eval_split", "columns",
            "dataset_mixture", "eval_split_size", "dataset_config", "dataset_test_split", *recipe.MODEL_KEYS,
            *adapters.KEYS)  # the model keys and LoRA keys are TRL's (recipe.py, adapters.LoraOptions)
RUN_DEFAULTS: dict[str, Any] = {"method": "dpo", "split": "train", "eval_split": "test"}
# Config defaults of a CLI run that differ from the library's (the library stays TRL-like).
CLI_DEFAULTS: dict[str, Any] = {"logging_steps": 1, "report_to": "none", "save_strategy": "no",
                                "cpu_allocator_cache": True}  # the command's process is the run: keep the policy
# --flag → config key (flags that are not plain config keys are handled in _flag_layer).
FLAG_KEYS = {"model": "model", "ref_model": "ref_model", "dataset": "dataset", "eval_dataset": "eval_dataset",
             "split": "split", "output_dir": "output_dir", "max_steps": "max_steps",
             "learning_rate": "learning_rate", "batch_size": "per_device_train_batch_size",
             "max_length": "max_length", "seed": "seed"}


def parse_columns(spec: str | Mapping[str, Any] | None) -> dict[str, str] | None:
    """``"prompt=question,chosen=good"`` (or a mapping) → ``{"prompt": "question", "chosen": "good"}``."""
    if spec is None or isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()} if spec else None
    if not isinstance(spec, str):
        raise ConfigError(f"columns={spec!r} is not a mapping. Fix: write it as prompt=q,chosen=a,rejected=b")
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, column = part.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ConfigError(f"columns: cannot read {part!r}. Fix: write it as prompt=q,chosen=a,rejected=b")
        mapping[name.strip()] = column.strip()
    return mapping or None


def parse_template_kwargs(text: str | None) -> dict[str, Any] | None:
    """``--chat-template-kwargs '{"enable_thinking": false}'`` → the mapping (a one-line error otherwise)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--chat-template-kwargs {text!r} is not JSON ({e.msg}). Fix: write a JSON object, e.g. "
                          "'{\"enable_thinking\": false}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--chat-template-kwargs {text!r} is not a JSON object. Fix: write e.g. "
                          "'{\"enable_thinking\": false}'")
    return value


def config_class(method: str) -> type[TrainConfig]:
    """The config dataclass of a method; imported here, so resolving options is the first thing to load it."""
    from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, SFTConfig, SimPOConfig

    return {"dpo": DPOConfig, "orpo": ORPOConfig, "cpo": CPOConfig, "simpo": SimPOConfig, "kto": KTOConfig,
            "sft": SFTConfig}[method]


def config_fields(cls: type) -> dict[str, Any]:
    """The fields a user may set: init fields, without private ones."""
    return {f.name: f for f in fields(cls) if f.init and not f.name.startswith("_")}


@dataclass
class Layer:
    """Options from one source (config file, --set, flags), lowest precedence first."""

    origin: str
    values: dict[str, Any]


@dataclass
class TrainPlan:
    """A training run resolved from all sources, before anything is loaded."""

    method: str
    run: dict[str, Any]  # RUN_KEYS
    options: dict[str, Any]  # config-class keyword arguments, as resolved (what config.yaml records)
    overwrite: bool = False
    resume: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.options["output_dir"])

    def local_inputs(self) -> list[str]:
        """Inputs that may be local paths, which --overwrite must never delete."""
        paths = [str(v) for k in ("model", "ref_model", "dataset", "eval_dataset") if (v := self.run.get(k))]
        mixture = self.run.get("dataset_mixture")
        members = [m for k in ("datasets", "eval_datasets") for m in (mixture.get(k) or [])] \
            if isinstance(mixture, dict) else []
        return paths + [str(m[k]) for m in members if isinstance(m, dict) for k in ("path", "id") if m.get(k)]

    def resolved_config(self) -> dict[str, Any]:
        """Run keys (local paths made absolute, so the file works from anywhere) and the config options."""
        out: dict[str, Any] = {"method": self.method}
        for key in RUN_KEYS[1:]:
            value = self.run.get(key)
            if value is None or (key == "eval_split" and not self.run.get("eval_dataset")):
                continue
            if key in ("model", "ref_model", "dataset", "eval_dataset") and _is_local_path(str(value)):
                value = str(Path(str(value)).expanduser().resolve())
            if key == "dataset_mixture" and isinstance(value, dict):
                value = {**value, **{part: [_absolute_member(m) for m in value[part]]
                                     for part in ("datasets", "eval_datasets") if isinstance(value.get(part), list)}}
            out[key] = value
        out.update(sorted(self.options.items()))
        out["output_dir"] = str(self.output_dir.expanduser().resolve())  # a re-run must not write somewhere else
        return out


def _absolute_member(member: Any) -> Any:
    """A mixture member with its local path (``path``, or a local ``id``) made absolute."""
    if not isinstance(member, dict):
        return member
    return {**member, **{k: str(Path(str(member[k])).expanduser().resolve()) for k in ("path", "id")
                         if member.get(k) and _is_local_path(str(member[k]))}}


def _is_local_path(value: str) -> bool:
    """A path on disk, as opposed to an embedded model name or a hub id (embedded names win, as in models.py)."""
    from .models import EMBEDDED_MODELS

    return value.lower() not in EMBEDDED_MODELS and Path(value).expanduser().exists()


def config_file_layer(path: str | None) -> Layer:
    """A YAML config file's keys as a layer (no file: an empty one); unreadable or non-mapping files are errors."""
    if path is None:
        return Layer("", {})
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file '{path}': {e.strerror or e}. Fix: check the path") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file '{path}': invalid YAML{where}: {problem}.") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' is a YAML {type(values).__name__}, not a mapping. Fix: write one "
                          "'key: value' per line")
    return Layer(f"in {path}", {str(k): v for k, v in values.items()})


def set_layer(pairs: Sequence[str]) -> Layer:
    """``--set key=value`` pairs as a layer, each value parsed as YAML (``true``, ``0.1``, ``[a, b]``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set beta=0.2")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: VALUE is not valid YAML ({getattr(e, 'problem', e)}).") from None
    return Layer("in --set", values)


def _flag_layer(args: argparse.Namespace, method: str) -> Layer:
    values = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.max_length is None and "max_length" in getattr(args, "explicit", ()):  # --max-length none
        values["max_length"] = None
    if args.method is not None:
        values["method"] = args.method
    if args.columns is not None:
        values["columns"] = args.columns
    if args.beta is not None:
        values["orpo_alpha" if method == "orpo" else "beta"] = args.beta
    return Layer("from the flags", values)


def _resolve_method(layers: Sequence[Layer], args: argparse.Namespace, trl_recipe: bool = False) -> str:
    method = args.method
    if method is None:
        for layer in layers:
            method = layer.values.get("method", method)
    if method is None and trl_recipe:
        raise ConfigError(f"{layers[0].origin.removeprefix('in ')} is a TRL / alignment-handbook recipe "
                          "(model_name_or_path) with no method; TRL picks it by subcommand. Fix: pass --method "
                          f"{' / '.join(METHODS)} (e.g. --method dpo for a DPO recipe), or add 'method: dpo'")
    method = RUN_DEFAULTS["method"] if method is None else str(method).lower()
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not supported. Fix: use one of {', '.join(METHODS)}")
    return str(method)


def unknown_key_error(key: str, origin: str, method: str, valid: Sequence[str] = ()) -> ConfigError:
    """The one-line error for a key no config, run key or recipe key of ``method`` knows, with the closest name
    (among ``valid`` where given: the names a command line takes)."""
    valid = list(valid) or list(config_fields(config_class(method))) + list(RUN_KEYS) + list(recipe.EXTRA_KEYS)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"Did you mean '{close[0]}'?" if close else (
        f"Fix: use a run key ({', '.join(RUN_KEYS)}) or a field of {config_class(method).__name__}")
    other = [m for m in METHODS if m != method and key in config_fields(config_class(m))]
    if other:
        hint = f"It is an option of method {other[0]}; set method: {other[0]}."
    return ConfigError(f"unknown option '{key}' {origin} for method {method}. {hint}")


def _merge(layers: Sequence[Layer], method: str) -> dict[str, Any]:
    """Later layers win; unknown keys are errors with a suggestion."""
    known = set(config_fields(config_class(method))) | set(RUN_KEYS)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if key not in known:
                raise unknown_key_error(key, layer.origin, method)
            merged[key] = value
    flags = layers[-1].values
    if method == "orpo" and "orpo_alpha" in flags and "beta" not in flags:
        merged.pop("beta", None)  # --beta set orpo_alpha; a TRL-style `beta` from the config file would disagree
    return merged


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each init field's annotation, resolved to real types (``int | None``, ``list[str] | str``) from the class."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in config_fields(cls)}


def _accepted_types(annotation: Any) -> frozenset[Any]:
    """What a field takes besides None: ``int | None`` → {int}; ``list[str] | str`` → {list[str], str}."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if is_union else (annotation,)
    return frozenset(t for t in members if t is not type(None))


def _enum_has(cls: Any, value: str) -> bool:
    return isinstance(cls, type) and issubclass(cls, enum.Enum) and value in {m.value for m in cls}


def coerce_option(cls: type, key: str, value: Any) -> Any:
    """Make a YAML value fit a bool or numeric field: YAML 1.1 reads ``1e-5`` as a string, for instance.

    Only bool and int/float fields are checked; other values go to the config class as they are.
    """
    annotation = field_types(cls).get(key)
    if annotation is None or value is None:
        return value
    accepted = _accepted_types(annotation)
    if value is False and bool not in accepted and any(_enum_has(t, "no") for t in accepted):
        return "no"  # YAML 1.1 reads an unquoted `no` (eval_strategy: no, --set save_strategy=no) as false
    if accepted == {bool} and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false.")
    if not accepted or not accepted <= {int, float}:
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number.")
    if isinstance(value, str):
        integer = float not in accepted
        try:
            return int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not {'an integer' if integer else 'a number'}.") from None
    return value


def no_flags(**values: Any) -> argparse.Namespace:
    """The arguments of a ``prefalign train`` given no flags (``values`` set some), for commands that resolve runs
    of their own, such as ``prefalign compare``, through `resolve_plan`."""
    flags = {flag: None for flag in FLAG_KEYS} | {"method": None, "columns": None, "beta": None}
    return argparse.Namespace(**{"config": None, "set_pairs": [], "overwrite": False, "resume": False,
                                 "explicit": set(), **flags, **values})


def resolve_plan(args: argparse.Namespace, recipe_layer: Layer | None = None,
                 command_layer: Layer | None = None) -> TrainPlan:
    """Config file < --set < flags, with CLI defaults underneath; checks names and types, not ranges.

    ``recipe_layer`` takes the config file's place: a recipe built in memory (a compare grid's run).
    ``command_layer`` sits above --set: the options of ``prefalign dpo|orpo|...`` (`commands.trl_cli`), TRL's names
    mapped like the config file's."""
    given = [recipe_layer or config_file_layer(args.config), set_layer(args.set_pairs)]
    given += [command_layer] if command_layer is not None else []
    lower = [Layer(layer.origin, recipe.rename_layer(layer.values, layer.origin)) for layer in given]
    method = _resolve_method(lower, args, recipe.is_trl_recipe(given[0].values))
    merged = _merge([*lower, _flag_layer(args, method)], method)
    run = {key: merged.pop(key, None) for key in RUN_KEYS}
    run.update({k: coerce_option(adapters.LoraOptions, k, run[k]) for k in adapters.KEYS})
    recipe.fold(run, merged)
    adapters.lora_options(run)  # checks the LoRA keys now, before anything loads
    run = {key: RUN_DEFAULTS.get(key) if value is None else value for key, value in run.items()}
    run["method"] = method
    run["columns"] = parse_columns(run["columns"])
    if not run.get("dataset") and not run.get("dataset_mixture"):
        raise ConfigError("no dataset given. Fix: pass --dataset SRC or put 'dataset: SRC' (or a dataset_mixture) in "
                          "the config file")
    if run.get("dataset") and run.get("dataset_mixture"):
        raise ConfigError("both dataset and dataset_mixture are given. Fix: keep one of them")
    if run.get("eval_split_size") is not None and (run.get("eval_dataset") or run.get("dataset_mixture")):
        raise ConfigError("eval_split_size holds part of a single dataset out, but "
                          f"{'eval_dataset' if run.get('eval_dataset') else 'dataset_mixture'} is given. Fix: use "
                          "eval_dataset, or dataset_mixture's test_split_size, or eval_split_size alone")
    if run.get("model") is None:
        from .models import DEFAULT_MODEL

        run["model"] = DEFAULT_MODEL
    run.update({k: str(run[k]) for k in ("model", "ref_model", "split", "eval_split") if run[k] is not None})
    if method not in ("dpo", "kto") and run.get("ref_model") is not None:
        raise ConfigError(f"ref_model is a DPO / KTO option; method {method} uses no reference model. Fix: remove it")
    if merged.get("chat_template") == "chatml" and run.get("ref_model") is not None:
        raise ConfigError("chat_template: chatml adds tokens to the policy, which ref_model would lack. Fix: drop "
                          "ref_model (the untrained policy is the reference), or give it the same chat format")
    options = {**CLI_DEFAULTS, **merged}
    options.setdefault("output_dir", str(runs.default_run_dir(method)))
    cls = config_class(method)
    options = {k: coerce_option(cls, k, v) for k, v in options.items()}
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other. Fix: pass one of them.")
    return TrainPlan(method, run, options, overwrite=args.overwrite, resume=args.resume)


def build_config(plan: TrainPlan) -> TrainConfig:
    """The config object; range errors from the config class and TrainingArguments become one-line errors."""
    import torch

    kwargs = dict(plan.options)
    if "use_cpu" not in kwargs and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # a runtime default, not recorded in config.yaml
    try:
        return config_class(plan.method)(**kwargs)
    except PrefalignError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid options: {one_line(str(e).strip().splitlines()[0] if str(e) else e)}") from None

