"""A compare recipe: the base recipe of every run plus ``grid:``, one mapping of option lists per method.

    model: smollm2-135m-instruct
    dataset: train.jsonl
    eval_dataset: heldout_pairs.jsonl     # scored by compare against the base model (evaluate_runs: true: and
                                          # evaluated in training too, each run's metrics.jsonl eval_* numbers)
    eval_prompts: heldout_prompts.jsonl   # optional: generated, judged, KL from the base
    judge: demo                           # optional
    output_dir: runs/compare
    grid:
      dpo:  {beta: [0.05, 0.1, 0.5]}
      orpo: {orpo_alpha: [0.05, 0.2]}

Each method's runs are the cartesian product of its lists (a scalar is a one-value list; an option whose value is
itself a list, such as ``loss_type``, is written as a list of lists). A base key applies to every run whose
method has it. Every run is resolved through `prefalign.options.resolve_plan`, so a bad name or value fails here,
on one line, before anything is written.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipe as recipes
from ..errors import ConfigError
from ..options import (
    METHODS,
    RUN_KEYS,
    Layer,
    TrainPlan,
    build_config,
    config_class,
    config_fields,
    config_file_layer,
    no_flags,
    resolve_plan,
    set_layer,
    unknown_key_error,
)

# Keys of the compare itself, not of any run.
COMPARE_KEYS = ("grid", "eval_prompts", "judge", "pass_threshold", "max_new_tokens", "reward_beta", "edge_cases",
                "samples", "evaluate_runs")
DEFAULTS: dict[str, Any] = {"judge": None, "pass_threshold": None, "max_new_tokens": 48, "reward_beta": 0.1,
                            "edge_cases": True, "samples": 6, "evaluate_runs": False}


@dataclass
class RunSpec:
    """One run of the grid: its directory name, method, the swept values that name it, and its resolved plan."""

    name: str
    method: str
    swept: dict[str, Any]
    plan: TrainPlan

    @property
    def label(self) -> str:
        """The swept values, for a table cell and a plot label: ``beta=0.05``."""
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.swept.items()) or "defaults"


@dataclass
class CompareSpec:
    """Everything a compare needs, resolved: where it writes, the base model, the held-out data, the runs."""

    source: str
    output_dir: Path
    model: str
    eval_dataset: str | None
    eval_prompts: str | None
    runs: list[RunSpec]
    settings: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> list[str]:
        """Local inputs that an --overwrite must never delete."""
        paths = [self.model, self.eval_dataset, self.eval_prompts]
        return [str(p) for p in paths if p] + [i for r in self.runs for i in r.plan.local_inputs()]


def format_value(value: Any) -> str:
    """A swept value as text: ``0.05``, ``sigmoid+sft`` for a list."""
    if isinstance(value, list | tuple):
        return "+".join(format_value(v) for v in value)
    return str(value)


def run_name(method: str, swept: Mapping[str, Any]) -> str:
    """A readable, path-safe directory name: ``dpo-beta0.05``, ``dpo-beta0.1-learning_rate1e-05``."""
    name = "-".join([method, *(f"{k}{format_value(v)}" for k, v in swept.items())])
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def expand(method: str, options: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The cartesian product of one method's option lists, in the order written; a scalar is one value."""
    axes = []
    for key, values in options.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{where}: grid.{method}.{key} is an empty list. Fix: give at least one value, e.g. "
                              f"{key}: [value]")
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def _known(method: str) -> set[str]:
    return set(config_fields(config_class(method))) | set(RUN_KEYS) | set(recipes.EXTRA_KEYS)


def load_spec(path: str, set_pairs: Sequence[str] = (), *, overwrite: bool = False) -> CompareSpec:
    """Read and check a compare recipe (``--set`` pairs over it); every run resolved, nothing written."""
    values = {**config_file_layer(path).values, **set_layer(list(set_pairs)).values}
    grid = values.pop("grid", None)
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid must be a non-empty mapping of method to options, e.g. grid: {{dpo: {{beta: "
                          "[0.1, 0.5]}}}.")
    for key in ("method", "stages"):
        if key in values:
            raise ConfigError(f"{path}: '{key}' is set outside grid. Fix: name methods as the keys of grid")
    settings = {k: values.pop(k, DEFAULTS[k]) for k in COMPARE_KEYS if k not in ("grid", "eval_prompts")}
    eval_prompts = values.pop("eval_prompts", None)
    eval_dataset = values.pop("eval_dataset", None)
    out = Path(str(values.pop("output_dir", None) or "runs/compare"))
    model = str(values.get("model") or _default_model())
    values["model"] = model
    if not eval_dataset and not eval_prompts:
        raise ConfigError(f"{path}: nothing to score the runs on. Fix: give eval_dataset (held-out pairs), "
                          "eval_prompts (held-out prompts), or both")
    if not isinstance(settings["evaluate_runs"], bool) or (settings["evaluate_runs"] and not eval_dataset):
        raise ConfigError(f"{path}: evaluate_runs={settings['evaluate_runs']!r}: true gives every run the held-out "
                          "pairs as its eval_dataset, so it needs eval_dataset. Fix: set eval_dataset, or "
                          "evaluate_runs: false")
    # evaluate_runs: each run also evaluates the held-out pairs in training (its metrics.jsonl's eval_* numbers)
    run_eval = {"eval_dataset": str(eval_dataset)} if settings["evaluate_runs"] else {}
    methods = []
    for method, options in grid.items():
        if str(method).lower() not in METHODS:
            raise ConfigError(f"{path}: grid: method '{method}' is not one of {', '.join(METHODS)}.")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{path}: grid.{method} must be a mapping of options to lists, e.g. {{beta: [0.1]}}.")
        if options and ("output_dir" in options or "method" in options):
            raise ConfigError(f"{path}: grid.{method} sets output_dir or method, which compare sets. Fix: remove it")
        methods.append((str(method).lower(), options or {}))
    for key in values:  # a base key must mean something to at least one method of the grid
        if not any(key in _known(m) for m, _ in methods):
            raise unknown_key_error(key, f"in {path}", methods[0][0])
    runs: list[RunSpec] = []
    for method, options in methods:
        where = f"in {path} (grid.{method})"
        base = {k: v for k, v in values.items() if k in _known(method)}
        combos = expand(method, options, path)
        varying = [k for k, v in options.items() if isinstance(v, list) and len(v) > 1]
        for combo in combos:
            swept = {k: combo[k] for k in varying}
            name = run_name(method, swept)
            recipe = {**base, **run_eval, **combo, "method": method, "output_dir": str(out / name)}
            plan = resolve_plan(no_flags(overwrite=overwrite), Layer(where, recipe))
            build_config(plan)  # range errors now, before any run starts
            runs.append(RunSpec(name, method, swept, plan))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two runs would share a directory name ({names}). Fix: make the grid's values "
                          "distinct")
    # the runs' chat_template_kwargs (a base key) render the held-out data too, as the runs rendered their data
    kwargs = runs[0].plan.options.get("chat_template_kwargs") if runs else None
    settings["chat_template_kwargs"] = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    return CompareSpec(path, out, model, str(eval_dataset) if eval_dataset else None,
                       str(eval_prompts) if eval_prompts else None, runs, settings)


def _default_model() -> str:
    from ..models import DEFAULT_MODEL

    return DEFAULT_MODEL
