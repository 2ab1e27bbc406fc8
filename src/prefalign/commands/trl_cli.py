"""``prefalign dpo|orpo|cpo|kto|sft [--config FILE.yaml] [--OPTION VALUE ...]``: TRL's command line (``trl dpo ...``).

TRL builds its parser from dataclasses (``TrlParser`` over ScriptArguments, the method's config and ModelConfig); so
does this module, from `ScriptArguments` and `ModelArguments` below (TRL's names and meanings),
`adapters.LoraOptions`, every field of the method's config class and prefalign's own run keys (`RunArguments`), so a
new config field is a new flag without a line here. Flags take TRL's forms: ``--name value``, ``--name=value``,
``--name-with-dashes``, a bool alone or with a value (``--no_name`` for a default-true one), a list as several values,
a dict as JSON. The ``--config`` YAML (its ``env:`` mapping set in the environment, as TRL does) and the flags are the
lower and upper layers of `options.resolve_plan`, TRL's names mapped by `recipe.rename_layer`, so the run is exactly a
``prefalign train`` run of the subcommand's method (`commands.train.train_plan`).
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field
from enum import Enum
from typing import Any

from .. import adapters, options
from ..errors import ConfigError
from . import PROG

COMMANDS = ("dpo", "orpo", "cpo", "kto", "sft")
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("yes", "true", "t", "y", "1")
_FALSE_WORDS = ("no", "false", "f", "n", "0")


@dataclass
class ScriptArguments:
    """TRL's script arguments (``trl.ScriptArguments``): which dataset and which splits."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Dataset to train on: a .jsonl/.json/.csv/.parquet file (optionally compressed), a saved dataset "
                "directory or a hub id."})
    dataset_config: str | None = field(default=None, metadata={
        "help": "The hub dataset's configuration name (load_dataset's name)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={
        "help": "Split evaluated when eval_strategy is not 'no' (as TRL's scripts do); given explicitly, also "
                "evaluated once after training."})
    dataset_streaming: bool = field(default=False, metadata={
        "help": "Refused when true: prefalign validates every row before training and does not stream."})
    ignore_bias_buffers: bool = field(default=False, metadata={
        "help": "A DDP debugging workaround of TRL's scripts; accepted, not applied."})


@dataclass
class ModelArguments:
    """TRL's model arguments (``trl.ModelConfig``) besides the LoRA and k-bit ones (`adapters.LoraOptions`)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Model to train: embedded name, local directory or hub id (default: smollm2-135m-instruct)."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) to load."})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype the weights load in: auto, bfloat16, float16 or float32."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention implementation: sdpa, eager (flash_attention_2 needs CUDA and flash_attn)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})


@dataclass
class RunArguments:
    """prefalign's run keys that TRL's command line has no name for (`options.RUN_KEYS`)."""

    ref_model: str | None = field(default=None, metadata={
        "help": "DPO / KTO reference model (default: a frozen copy of the model; with LoRA the adapter-disabled "
                "base)."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Evaluation data from another source than dataset_name (its split: eval_split)."})
    eval_split: str = field(default="test", metadata={"help": "Split of eval_dataset."})
    eval_split_size: int | float | None = field(default=None, metadata={
        "help": "Hold out this fraction (or number of rows) of the training split for evaluation."})
    columns: dict[str, str] | str | None = field(default=None, metadata={
        "help": "Map your column names onto prompt, chosen, rejected, system: prompt=q,chosen=a or JSON."})
    dataset_mixture: dict[str, Any] | None = field(default=None, metadata={
        "help": "Several datasets mixed, as JSON (the recipe key's shape, see the README)."})


@dataclass(frozen=True)
class _Kind:
    """How one field is read from the command line."""

    label: str  # the type as --help shows it
    convert: Callable[[str], Any]
    nargs: str | None = None
    single: bool = False  # a one-value list becomes the value (the field also takes a single value)


def _union_members(annotation: Any) -> tuple[list[Any], bool]:
    """``int | None`` → ([int], True)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    return [t for t in args if t is not type(None)], type(None) in args


def _converter(label: str, convert: Callable[[str], Any], nullable: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if nullable and text.strip().lower() in _NONE_WORDS:
            return None
        return convert(text)

    parse.__name__ = label
    return parse


def _to_bool(text: str, also_str: bool = False) -> bool | str:
    word = text.strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    if also_str:
        return text
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _to_number(text: str, integer: bool, either: bool = False) -> int | float:
    try:
        return int(text) if integer or either else float(text)
    except ValueError:
        if either:
            return _to_number(text, False)
        raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None


def _to_json(text: str, also_str: bool) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    if also_str:
        return text
    raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dtype\": \"bfloat16\"}}', got {text!r}")


def _to_choice(text: str, choices: Sequence[Any]) -> Any:
    for choice in choices:
        if text == str(choice):
            return choice
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")


def _scalar_kind(members: list[Any], nullable: bool) -> _Kind:
    """A bool, number, choice or string field."""
    if bool in members:
        also_str = str in members
        return _Kind("bool", _converter("bool", lambda t: _to_bool(t, also_str), nullable), "?")
    if members and typing.get_origin(members[0]) is typing.Literal:
        choices = typing.get_args(members[0])
        return _Kind("|".join(map(str, choices)), _converter("choice", lambda t: _to_choice(t, choices), nullable))
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], Enum):
        values = [e.value for e in members[0]]
        return _Kind("|".join(map(str, values)), _converter("choice", lambda t: _to_choice(t, values), nullable))
    if members and set(members) <= {int, float}:
        integer, either = float not in members, len(members) == 2
        label = "number" if either else "int" if integer else "float"
        return _Kind(label, _converter(label, lambda t: _to_number(t, integer, either), nullable))
    return _Kind("str", _converter("str", str, nullable and str not in members))


def field_kind(annotation: Any) -> _Kind:
    """How a field of this annotation is read, as TRL's HfArgumentParser reads it: lists take several values
    (``nargs='+'``), dicts JSON, bools an optional true/false, ``T | None`` also 'none'."""
    members, nullable = _union_members(annotation)
    lists = [t for t in members if typing.get_origin(t) is list]
    if lists:
        inner = _scalar_kind(list(typing.get_args(lists[0])[:1]) or [str], False)
        return _Kind(f"{inner.label} ...", inner.convert, "+", single=len(members) > 1)
    if any(t is dict or typing.get_origin(t) is dict for t in members):
        also_str = str in members
        return _Kind("JSON", _converter("JSON", lambda t: _to_json(t, also_str), nullable))
    return _scalar_kind(members, nullable)


def _default(f: Field, overrides: dict[str, Any]) -> Any:
    if f.name in overrides:
        return overrides[f.name]
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def option_groups(command: str) -> list[tuple[str, list[tuple[Field, Any, Any]]]]:
    """The options of ``prefalign COMMAND``, grouped as --help shows them: (title, [(field, annotation, default)]).

    Each name appears once; a config field wins over a TRL model or script argument of the same name."""
    cls = options.config_class(command)
    sources: list[tuple[str, list[type]]] = [
        ("script arguments (TRL's ScriptArguments)", [ScriptArguments]),
        ("model arguments (TRL's ModelConfig)", [ModelArguments, adapters.LoraOptions]),
        (f"{cls.__name__} arguments (the method's config; transformers' TrainingArguments included)", [cls]),
        ("prefalign run arguments", [RunArguments])]
    claimed = set(options.config_fields(cls))
    shown = {**options.CLI_DEFAULTS, "output_dir": f"runs/{command}-<YYYYmmdd-HHMMSS>"}
    groups = []
    for title, classes in sources:
        rows = []
        for source in classes:
            hints = options.field_types(source)
            for name, f in options.config_fields(source).items():
                if source is not cls and name in claimed:
                    continue
                claimed.add(name)
                rows.append((f, hints[name], _default(f, shown if source is cls else {})))
        groups.append((title, rows))
    return groups


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=44, width=120)


def _epilog(command: str) -> str:
    return f"""\
--config FILE.yaml holds the same names (TRL's recipe keys work too); its values are defaults that the flags
override, and its env: mapping is set in the environment before training.
Forms: --name value, --name=value, --name-with-dashes, a bool alone (true) or with a value (--bf16 false),
--no_name for a default-true bool, lists as several values (--lora_target_modules q_proj v_proj), dicts as JSON
(--model_init_kwargs '{{"dtype": "bfloat16"}}'), 'none' for an empty optional number.
Defaults that differ from the library (as prefalign train): logging_steps 1, report_to none, save_strategy no (steps
when save_steps is given, TRL's default), use_cpu without CUDA. The run directory is a prefalign train run's:
model + tokenizer, config.yaml (`prefalign train config.yaml` repeats the run), metrics.jsonl, report.html.
Example: {PROG} {command} --model_name_or_path DIR --dataset_name data.jsonl --learning_rate 5e-7 --max_steps 10"""


def build_parser(command: str, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    """The parser of ``prefalign COMMAND``: every option defaults to absent, so only what was typed is a layer."""
    method = options.config_class(command).__name__.removesuffix("Config")
    parser = parser_class(prog=f"{PROG} {command}", usage=f"{PROG} {command} [--config FILE.yaml] [--OPTION VALUE ...]",
                          allow_abbrev=False, formatter_class=_formatter,
                          epilog=_epilog(command), argument_default=argparse.SUPPRESS,
                          description=f"Train with {method} from TRL's command line (`trl {command} ...`) and write "
                                      "a prefalign run directory.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (see below)")
    taken = {"--config", "--help", "-h"}
    for title, rows in option_groups(command):
        group = parser.add_argument_group(title)
        for f, annotation, default in rows:
            kind = field_kind(annotation)
            names = [f"--{f.name}", f"--{f.name.replace('_', '-')}"][:1 + ("_" in f.name)]
            negative = [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
            negate = kind.label == "bool" and default is True and not taken & set(negative)
            text = f.metadata.get("help", "").strip()
            text += f" [{kind.label}, default: {default!r}{'; --no_' + f.name + ' sets false' if negate else ''}]"
            extra: dict[str, Any] = {"nargs": kind.nargs} if kind.nargs else {}
            if kind.label == "bool":
                extra["const"] = True
            group.add_argument(*names, dest=f.name, type=kind.convert, metavar=kind.label.split()[0].upper(),
                               help=text.replace("%", "%%"), **extra)
            taken.update(names)
            if negate:
                group.add_argument(*negative, dest=f.name, action="store_false", help=argparse.SUPPRESS)
                taken.update(negative)
    group = parser.add_argument_group("prefalign run directory")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    group.add_argument("--resume", action="store_true", help="continue from output_dir's latest complete checkpoint")
    return parser


def parse_args(command: str, argv: Sequence[str], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
               ) -> argparse.Namespace:
    """``argv`` (after the subcommand) → a namespace for `run`: ``values`` holds the typed options that were given.

    --help, an unknown option (with the closest name) and a value of the wrong type exit through the parser."""
    parser = build_parser(command, parser_class)
    known, extra = parser.parse_known_args(list(argv))
    if extra:
        parser.error(_unknown_message(extra, command, parser))
    values = vars(known)
    singles = {f.name for _, rows in option_groups(command) for f, annotation, _ in rows
               if field_kind(annotation).single}
    for name in singles & set(values):
        if isinstance(values[name], list) and len(values[name]) == 1:
            values[name] = values[name][0]  # --report_to none: the string, as the YAML form would give
    return argparse.Namespace(func=run, command=command, config=values.pop("config", None),
                              overwrite=values.pop("overwrite", False), resume=values.pop("resume", False),
                              values=values)


def _unknown_message(extra: list[str], command: str, parser: argparse.ArgumentParser) -> str:
    option = next((a for a in extra if a.startswith("-")), None)
    if option is None:
        return f"unexpected argument {extra[0]!r}: every option is --name value"
    key = option.split("=", 1)[0].lstrip("-").replace("-", "_")
    valid = sorted({a.dest for a in parser._actions if a.option_strings and a.dest != "help"})
    return str(options.unknown_key_error(key, "on the command line", command, valid))


def resolve(args: argparse.Namespace) -> tuple[options.TrainPlan, dict[str, str]]:
    """The run's plan (config file < flags, through `options.resolve_plan`) and the config file's ``env:``."""
    file_layer = options.config_file_layer(args.config)
    values = dict(file_layer.values)
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"env {file_layer.origin} must map variable names to values, e.g. env: {{WANDB_MODE: "
                          "offline}}.")
    method = str(values.pop("method", command := args.command)).lower()
    if method != command:
        raise ConfigError(f"method: {method} {file_layer.origin}, but this is '{PROG} {command}'. Fix: run "
                          f"'{PROG} {method}', or remove method from the file")
    flags = dict(args.values)
    given = {**values, **flags}
    if not any(given.get(k) for k in ("dataset_name", "dataset", "dataset_mixture", "dataset_mixer")):
        raise ConfigError("no dataset given. Fix: pass --dataset_name SRC (a file, saved dataset directory or hub "
                          "id), or put 'dataset_name: SRC' in the --config file")
    strategy = given.get("eval_strategy", given.get("evaluation_strategy"))
    held_out = ("dataset_test_split", "eval_dataset", "dataset_mixture", "dataset_mixer", "eval_split_size")
    if strategy not in (None, "no") and not any(k in given for k in held_out):
        flags["dataset_test_split"] = "test"  # TRL's scripts evaluate dataset[dataset_test_split] with eval_strategy
    if "save_steps" in given and "save_strategy" not in given:
        flags["save_strategy"] = "steps"  # TRL's default: save_steps alone must not be dropped by the CLI's "no"
    plan = options.resolve_plan(options.no_flags(method=command, overwrite=args.overwrite, resume=args.resume),
                                recipe_layer=options.Layer(file_layer.origin, values),
                                command_layer=options.Layer("on the command line", flags))
    return plan, {str(k): str(v) for k, v in env.items()}


def run(args: argparse.Namespace) -> int:
    """Resolve, set the config file's ``env:``, and train as ``prefalign train`` does."""
    from .train import train_plan

    plan, env = resolve(args)
    os.environ.update(env)
    return train_plan(plan)


__all__ = ["COMMANDS", "ModelArguments", "RunArguments", "ScriptArguments", "build_parser", "field_kind",
           "option_groups", "parse_args", "resolve", "run"]

