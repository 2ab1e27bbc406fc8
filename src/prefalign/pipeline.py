"""Pipelines: ``stages:`` in a recipe, e.g. SFT then DPO, each stage's output the next stage's model.

    output_dir: runs/sft-dpo
    model: smollm2-135m-instruct      # keys outside `stages` apply to every stage
    max_steps: 20
    stages:
      - {method: sft, dataset: sft.jsonl}
      - {method: dpo, dataset: pairs.jsonl, beta: 0.1}

Each stage is a normal `prefalign train` run in ``<output_dir>/<i>-<method>/``, resolved from the recipe written to
``<output_dir>/stages/<i>-<method>.yaml`` (the shared keys, then the stage's own, then --set and the flags). From the
second stage on, the model is the previous stage's run directory (unless the stage names one), so DPO's reference,
the untrained policy, is the SFT output, as in the DPO paper. A stage that fails stops the pipeline with its error;
``--resume`` reuses finished stages and continues the first unfinished one at its latest checkpoint.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from . import runs
from .errors import ConfigError, PrefalignError, one_line
from .options import METHODS

STAGES_DIR = "stages"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin")


def read_recipe(path: str | None) -> dict[str, Any] | None:
    """The recipe's mapping if it has ``stages:``; None for a single-run config (or no file)."""
    if path is None:
        return None
    try:
        values = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # the single-run path reports unreadable files with their own message
    if not isinstance(values, dict) or "stages" not in values:
        return None
    return values


def stage_plans(recipe: dict[str, Any], path: str, output_dir: str | None,
                model: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The pipeline's output directory and each stage's own recipe (shared keys, then the stage's); ``model``
    (--model) is the first stage's."""
    stages = recipe["stages"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: stages must be a non-empty list of mappings, e.g. [{{method: sft}}, "
                          "{method: dpo}].")
    shared = {k: v for k, v in recipe.items() if k != "stages"}
    if "method" in shared:
        raise ConfigError(f"{path}: 'method' is set outside stages. Fix: give each stage its own method")
    out = Path(output_dir or shared.pop("output_dir", None) or runs.default_run_dir("pipeline"))
    shared.pop("output_dir", None)
    plans = []
    for i, stage in enumerate(stages, 1):
        where = f"{path}: stage {i}"
        if not isinstance(stage, dict):
            raise ConfigError(f"{where} is a {type(stage).__name__}, not a mapping. Fix: write it as {{method: sft, "
                              "...}")
        method = str(stage.get("method", "")).lower()
        if method not in METHODS:
            raise ConfigError(f"{where}: method={stage.get('method')!r} is not one of {', '.join(METHODS)}.")
        if "output_dir" in stage:
            raise ConfigError(f"{where}: output_dir is set by the pipeline (<output_dir>/{i}-{method}). Fix: remove "
                              "it")
        merged = {**copy.deepcopy(shared), **stage, "method": method, "output_dir": str(out / f"{i}-{method}")}
        if i == 1 and model is not None:
            merged["model"] = model
        if i > 1 and "model" not in stage:
            merged["model"] = plans[-1]["output_dir"]  # the previous stage's output
        if method != "dpo" and "ref_model" not in stage:
            merged.pop("ref_model", None)  # a shared ref_model is for the DPO stages
        plans.append(merged)
    return out, plans


def is_finished(run_dir: Path) -> bool:
    """A run directory that `prefalign train` completed: its resolved config and final weights are there."""
    return (run_dir / runs.CONFIG_FILE).is_file() and any((run_dir / f).is_file() for f in WEIGHT_FILES)


def run(args: argparse.Namespace, recipe: dict[str, Any]) -> int:
    """Run every stage in order (see the module docstring); returns the exit code of the first that fails."""
    from .checkpoints import latest_checkpoint
    from .commands import PROG, print_error
    from .commands import train as train_command

    if args.method is not None:
        raise ConfigError("--method is given, but the recipe has stages, each with its own method. Fix: drop "
                          "--method, or set it in the stages")
    # --set output_dir / --set model mean the pipeline's, not every stage's
    sets = [pair for pair in args.set_pairs if pair.partition("=")[0].strip() not in ("output_dir", "model")]
    given = dict(pair.partition("=")[::2] for pair in args.set_pairs if pair not in sets)
    out, plans = stage_plans(recipe, args.config, args.output_dir or given.get("output_dir"),
                             args.model or given.get("model"))
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other. Fix: pass one of them.")
    if not args.resume:
        inputs = [str(p[k]) for p in plans for k in ("model", "dataset", "eval_dataset") if p.get(k)]
        runs.check_output_dir(out, args.overwrite, keep=[i for i in inputs if Path(i).exists()])
    (out / STAGES_DIR).mkdir(parents=True, exist_ok=True)
    total = len(plans)
    for i, plan in enumerate(plans, 1):
        stage_dir = Path(plan["output_dir"])
        label = f"stage {i}/{total} ({plan['method']})"
        if args.resume and is_finished(stage_dir):
            print(f"{PROG}: {label}: finished earlier, reused {stage_dir}")
            continue
        recipe_file = out / STAGES_DIR / f"{i}-{plan['method']}.yaml"
        recipe_file.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True), encoding="utf-8")
        resume = args.resume and latest_checkpoint(stage_dir) is not None
        # resuming a stage that never saved a checkpoint starts it again (its leftovers are replaced)
        overwrite = args.overwrite or (args.resume and not resume and stage_dir.exists())
        stage_args = argparse.Namespace(**{**vars(args), "config": str(recipe_file), "output_dir": None, "model": None,
                                           "set_pairs": sets, "resume": resume, "overwrite": overwrite,
                                           "progress_desc": label})
        try:
            code = train_command.run(stage_args)
        except PrefalignError as e:
            print_error(f"pipeline stopped at {label}: {one_line(str(e))}")
            return 2
        if code:
            print_error(f"pipeline stopped at {label} (exit code {code}); finished stages are kept. Continue with: "
                        f"{PROG} train {args.config} --resume")
            return code
    print(f"{PROG}: pipeline finished: {total} stages in {out} (final model: {plans[-1]['output_dir']})")
    return 0
