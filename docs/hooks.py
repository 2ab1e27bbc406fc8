"""MkDocs hook: the options and CLI references, generated from the code at build time (nothing generated is committed).

A page holding the line ``<!-- generated: options -->`` gets the options reference, built from the config dataclasses
(`prefalign.options.config_fields` / `field_types` over DPOConfig ... SFTConfig) and the run keys; a page holding
``<!-- generated: cli -->`` gets every subcommand of `prefalign.cli.build_parser()` with its usage and options. A new
config field or subcommand therefore appears in the docs without anyone editing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"

METHODS = ("dpo", "orpo", "cpo", "simpo", "kto", "sft")
MARKERS = {"<!-- generated: options -->": "options", "<!-- generated: cli -->": "cli"}


def _use_checkout() -> None:
    """Import prefalign from this checkout's src/, not from whatever copy the environment installed (an editable
    install of another checkout would otherwise document that one's options). MkDocs restores sys.path after loading
    a hook, so this runs when the references are generated."""
    if sys.path[:1] != [str(SRC)]:
        sys.path.insert(0, str(SRC))
    loaded = sys.modules.get("prefalign")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(SRC)):
        for name in [n for n in sys.modules if n == "prefalign" or n.startswith("prefalign.")]:
            del sys.modules[name]


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each generation marker with the reference it names."""
    _use_checkout()
    for marker, kind in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, options_reference() if kind == "options" else cli_reference())
    return markdown


# ----- table helpers -----------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line; pipes, angle and square brackets, asterisks escaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    for char in "|[]*_`":
        text = text.replace(char, "\\" + char)
    return text


def _code(text: str) -> str:
    """Inline code inside a table cell (pipes escaped; backticks in the value avoided)."""
    text = " ".join(str(text).split()).replace("`", "'")
    return f"`{text}`".replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    """``int | None``, ``list[str] | str``, ``IntervalStrategy | str``: readable, without module prefixes."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return repr(getattr(value, "value", value))  # enums as their value
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "required"


# ----- options reference -------------------------------------------------------------------------------------------
def options_reference() -> str:
    """Tables of every option: prefalign's fields (with the methods taking them), run keys, TrainingArguments'."""
    from transformers import TrainingArguments

    from prefalign import adapters, options

    classes = {m: options.config_class(m) for m in METHODS}
    base = options.config_fields(TrainingArguments)
    base_types = typing.get_type_hints(TrainingArguments)
    # name -> method -> (type, default, help)
    seen: dict[str, dict[str, tuple[str, str, str]]] = {}
    for method, cls in classes.items():
        types_ = options.field_types(cls)
        for name, field in options.config_fields(cls).items():
            info = (_type_name(types_[name]), _default(field), field.metadata.get("help", ""))
            seen.setdefault(name, {})[method] = info

    def own(name: str) -> bool:
        """prefalign's field, or a TrainingArguments field whose default or help prefalign changes."""
        if name not in base:
            return True
        inherited = (_type_name(base_types[name]), _default(base[name]), base[name].metadata.get("help", ""))
        return any(info[:2] != inherited[:2] or info[2] != inherited[2] for info in seen[name].values())

    lines = [
        "## prefalign's options",
        "",
        "Fields the config classes add to `transformers.TrainingArguments`, or whose default or meaning they change. "
        "Where a method's default or help differs, each method's is given.",
        "",
        "| option | help |",
        "|---|---|",
    ]
    for name in sorted((n for n in seen if own(n)), key=lambda n: (-len(seen[n]), n)):
        lines.append(_option_row(name, seen[name]))
    lines += [
        "",
        "## Run keys",
        "",
        "What a run loads, read by `prefalign train` from YAML, `--set` or flags (`prefalign.options.RUN_KEYS`); "
        "not config fields. The LoRA and quantization keys are TRL's (`prefalign.adapters.LoraOptions`); see "
        "[LoRA](../guides/lora.md).",
        "",
        "| key | help |",
        "|---|---|",
    ]
    lora = {f.name: f for f in dataclasses.fields(adapters.LoraOptions)}
    lora_types = typing.get_type_hints(adapters.LoraOptions)
    for key in options.RUN_KEYS:
        if key in lora:
            f = lora[key]
            lines.append(_row(key, _cell(_type_name(lora_types[key])), _code(_default(f)), None,
                              _cell(f.metadata.get("help", ""))))
        else:
            default = options.RUN_DEFAULTS.get(key)
            lines.append(_row(key, "", _code(repr(default)) if default is not None else "", None,
                              _cell(RUN_KEY_HELP.get(key, ""))))
    cli_defaults = ", ".join(f"`{k}: {v!r}`" for k, v in options.CLI_DEFAULTS.items())
    lines += [
        "",
        f"The `prefalign` command's defaults that differ from the library's: {cli_defaults} "
        "(`prefalign.options.CLI_DEFAULTS`).",
        "",
        "## Inherited from TrainingArguments",
        "",
        "Every method takes these, with transformers' meaning and default "
        "([transformers' documentation](https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments)).",
        "",
        "| option | help |",
        "|---|---|",
    ]
    for name in sorted(n for n in base if n in seen and not own(n)):
        f = base[name]
        lines.append(_row(name, _cell(_type_name(base_types[name])), _code(_default(f)), None,
                          _cell(f.metadata.get("help", ""))))
    return "\n".join(lines) + "\n"


RUN_KEY_HELP = {
    "method": "Training method: dpo, orpo, cpo, simpo, kto or sft.",
    "model": "Embedded model name, local directory or hub id (default: smollm2-135m-instruct).",
    "ref_model": "DPO / KTO reference model (default: the untrained policy, or the adapter-disabled base with LoRA).",
    "dataset": "Training data: a file (.jsonl .json .csv .parquet, optionally compressed), saved dataset or hub id.",
    "split": "Split of the dataset to train on.",
    "eval_dataset": "Evaluation data, evaluated during / after training.",
    "eval_split": "Split of eval_dataset.",
    "columns": "Map your column names onto prompt, chosen, rejected, system (prompt=q,chosen=a,...).",
    "dataset_mixture": "Several datasets with weights and a held-out test split (alignment-handbook's or TRL's shape).",
    "eval_split_size": "Hold out this fraction (or row count) of a single dataset as the eval set.",
    "dataset_config": "The hub dataset's configuration (TRL's dataset_config).",
    "dataset_test_split": "An eval set from the same dataset's split (TRL's dataset_test_split).",
}


def _option_row(name: str, per_method: dict[str, tuple[str, str, str]]) -> str:
    """One table row; type, default and help merged across methods where they agree."""
    methods = [m for m in METHODS if m in per_method]
    method_text = "all" if len(methods) == len(METHODS) else ", ".join(methods)

    def merged(index: int, render: Any) -> str:
        values = {m: per_method[m][index] for m in methods}
        if len(set(values.values())) == 1:
            return render(next(iter(values.values())))
        groups: dict[str, list[str]] = {}
        for m, v in values.items():
            groups.setdefault(v, []).append(m)
        return "<br>".join(f"{'/'.join(ms)}: {render(v)}" for v, ms in groups.items())

    type_text = merged(0, _cell)
    default_text = merged(1, _code)
    help_text = merged(2, _cell)
    return _row(name, type_text, default_text, method_text, help_text)


def _row(name: str, type_text: str, default_text: str, methods: str | None, help_text: str) -> str:
    """Two columns, so the help has room: the option's name, type, default (and methods) stacked, then its help."""
    facts = [f"<span id=\"{name}\"></span>**{_code(name)}**"]
    facts += [t for t in (type_text, f"default: {default_text}" if default_text else "",
                          f"methods: {methods}" if methods else "") if t]
    return f"| {'<br>'.join(facts)} | {help_text} |"


# ----- CLI reference -----------------------------------------------------------------------------------------------
def cli_reference() -> str:
    """Every (sub)command of the parser: description, usage, options table, epilog."""
    from prefalign.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps usage to the terminal width; fix it for a stable page
    try:
        parser = build_parser()
        sections: list[str] = []
        _command_section(parser, "prefalign", sections, level=1)
        return "\n".join(sections)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            out += [(name, helps.get(name) or "", sub) for name, sub in action.choices.items()]
    return out


def _command_section(parser: argparse.ArgumentParser, name: str, out: list[str], level: int) -> None:
    subs = _subparsers(parser)
    if level > 1:
        out.append(f"{'#' * level} {name}\n")
    if parser.description:
        out.append(_cell(parser.description) + "\n")
    out.append("```text\n" + parser.format_usage().strip() + "\n```\n")
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
        if action.option_strings and action.nargs != 0:
            flags += f" {action.metavar or action.dest.upper()}"
        default = action.default
        show_default = default not in (None, False, [], argparse.SUPPRESS) and not action.required
        extra = []
        if action.choices and not isinstance(action.choices, dict):
            extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if action.required and action.option_strings:
            extra.append("required")
        help_text = _cell(action.help or "")
        if extra:
            help_text += " (" + "; ".join(extra) + ")"
        if show_default:
            help_text += f" Default: {_code(repr(default))}."
        rows.append(f"| {_code(flags)} | {help_text} |")
    if rows:
        out.append("| argument | help |\n|---|---|\n" + "\n".join(rows) + "\n")
    if parser.epilog:
        out.append("```text\n" + parser.epilog.strip() + "\n```\n")
    if subs:
        out.append("| command | what it does |\n|---|---|\n" + "\n".join(
            f"| [`{name} {sub_name}`](#{_anchor(f'{name} {sub_name}')}) | {_cell(help_)} |"
            for sub_name, help_, _ in subs) + "\n")
    for sub_name, _, sub in subs:
        _command_section(sub, f"{name} {sub_name}", out, level=level + 1)


def _anchor(title: str) -> str:
    """The id MkDocs' toc extension gives a heading `` `title` ``."""
    return re.sub(r"[^\w\- ]", "", title).strip().lower().replace(" ", "-")
