"""The ``prefalign`` command line: a thin layer over the library.

``prefalign train [CONFIG.yaml] [--set key=value ...] [flags]`` trains with DPO or ORPO and writes a run directory
(see `prefalign.runs`); ``prefalign data check SOURCE`` reports a preference dataset's format, problems and token
lengths without training. User errors print ``prefalign: error: <one line>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from . import runs
from .errors import ConfigError, PrefalignError, one_line

if TYPE_CHECKING:
    from .config import PreferenceConfig

PROG = "prefalign"
METHODS = ("dpo", "orpo")
RUN_KEYS = ("method", "model", "ref_model", "dataset", "split", "eval_dataset", "eval_split", "columns")
RUN_DEFAULTS: dict[str, Any] = {"method": "dpo", "split": "train", "eval_split": "test"}
# Config defaults of a CLI run that differ from the library's (the library stays TRL-like).
CLI_DEFAULTS: dict[str, Any] = {"logging_steps": 1, "report_to": "none", "save_strategy": "no"}
# --flag → config key (flags that are not plain config keys are handled in _flag_layer).
FLAG_KEYS = {"model": "model", "ref_model": "ref_model", "dataset": "dataset", "eval_dataset": "eval_dataset",
             "split": "split", "output_dir": "output_dir", "max_steps": "max_steps",
             "learning_rate": "learning_rate", "batch_size": "per_device_train_batch_size",
             "max_length": "max_length", "seed": "seed"}


# ----- errors and parsing ----------------------------------------------------------------------------------------
def print_error(message: object) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error, like every other prefalign error, and no abbreviated options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _int_or_none(text: str) -> int | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Preference alignment (DPO, ORPO) for causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train_parser(sub)
    _add_data_parser(sub)
    _add_eval_parser(sub)
    _add_demo_parser(sub)
    return parser


TRAIN_EPILOG = """\
CONFIG.yaml is a flat mapping of run keys (method, model, ref_model, dataset, split, eval_dataset, eval_split,
columns) and any field of DPOConfig / ORPOConfig (which extend transformers.TrainingArguments), e.g.

  method: orpo
  model: smollm2-135m-instruct
  dataset: pairs.jsonl
  columns: {prompt: question, chosen: good, rejected: bad}
  learning_rate: 5.0e-6
  max_length: 512

Precedence: CONFIG.yaml < --set < the explicit flags. Defaults that differ from the library: logging_steps 1,
report_to none, save_strategy no (the final model is saved anyway), use_cpu when there is no CUDA.
The run directory gets the model + tokenizer, config.yaml (the resolved config: `prefalign train config.yaml`
repeats the run), metrics.jsonl and data_report.json."""


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model on preference pairs (DPO or ORPO)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a causal LM on preference pairs and write a run directory.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML file of options (see below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_pairs",
                   help="set any option; VALUE is read as YAML (numbers, true/false, [lists]). Repeatable")
    p.add_argument("--method", choices=METHODS, help="training method (default: dpo)")
    p.add_argument("--model", help="embedded model name, local directory or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--ref-model", help="DPO reference model (default: a frozen copy of --model)")
    p.add_argument("--dataset", metavar="SRC", help=".jsonl/.json/.csv/.parquet file, saved dataset dir or hub id")
    p.add_argument("--eval-dataset", metavar="SRC", help="evaluation pairs, evaluated once after training "
                                                         "(split: eval_split, default test)")
    p.add_argument("--columns", metavar="prompt=q,chosen=a,...", help="map your column names onto prompt, chosen, "
                                                                      "rejected, system")
    p.add_argument("--split", help="dataset split to train on (default: train)")
    p.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<method>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--beta", type=float, metavar="B",
                   help="DPO: beta (KL strength). ORPO: sets orpo_alpha, the odds-ratio weight (TRL's ORPO beta)")
    p.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate")
    p.add_argument("--batch-size", type=int, metavar="N", help="pairs per device per step "
                                                               "(per_device_train_batch_size)")
    p.add_argument("--max-length", type=_int_or_none, metavar="N", help="max tokens of prompt + reply ('none': no "
                                                                        "limit)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", action="store_true", help="continue from the output directory's latest complete "
                                                         "checkpoint (same config; exact: weights, optimizer, RNG, "
                                                         "data order)")
    p.set_defaults(func=cmd_train)


def _add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect preference datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser, required=True)
    p = data_sub.add_parser("check", help="report format, problems and token lengths of a dataset",
                            description="Report a dataset's format, every problem row, and token lengths under the "
                                        "model's chat template. Exit code 0 if training would accept it, else 2.")
    p.add_argument("source", metavar="SOURCE", help="file, saved dataset directory or hub id")
    p.add_argument("--model", help="model whose tokenizer and chat template to use (default: smollm2-135m-instruct)")
    p.add_argument("--split", default="train", help="split to check (default: train)")
    p.add_argument("--columns", metavar="prompt=q,chosen=a,...", help="map your column names onto prompt, chosen, "
                                                                      "rejected, system")
    p.add_argument("--max-length", type=_int_or_none, metavar="N", help="count rows this would cut or reject "
                                                                        "(default: the config default)")
    p.add_argument("--max-prompt-length", type=_int_or_none, metavar="N", help="count prompts this would cut")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_check)

    g = data_sub.add_parser("generate", help="sample replies, score them with a judge, write (best, worst) pairs",
                            description="On-policy pair generation: sample K replies per prompt from the model, "
                                        "score each (and the row's optional 'reference' reply) with the judge, and "
                                        "write (best, worst) as (chosen, rejected) with their scores. Ties are "
                                        "skipped and counted.")
    g.add_argument("--model", help="model to sample from (default: smollm2-135m-instruct)")
    g.add_argument("--prompts", required=True, metavar="FILE", help="rows with 'prompt' (text or messages) and "
                                                                     "optionally 'reference'; other fields are kept")
    g.add_argument("--judge", required=True, metavar="SPEC", help=JUDGE_HELP)
    g.add_argument("--samples", type=int, default=4, metavar="K", help="replies sampled per prompt (default: 4)")
    g.add_argument("--output", required=True, metavar="FILE.jsonl", help="where to write the pairs")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit (default: 48)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.set_defaults(func=cmd_data_generate)


JUDGE_HELP = ("a judge name ('demo': the bundled task's judge; packages add more under the prefalign.judges entry "
              "points), 'module:function' (f(prompt, reply) -> float or None), or 'reward-model:PATH' (a "
              "sequence-classification model)")


def _add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="compare a model with its reference on held-out pairs and prompts",
                       description="Held-out evaluation: reward accuracy and margin on pairs (policy vs reference), "
                                   "judged greedy generations on prompts (pass rate, mean score, win rate, length), "
                                   "and edge-case prompts. Writes eval.json and eval.md.")
    p.add_argument("--model", required=True, help="the trained model (run directory, hub id or embedded name)")
    p.add_argument("--ref", help="reference model (default: smollm2-135m-instruct)")
    p.add_argument("--pairs", metavar="FILE", help="held-out preference pairs")
    p.add_argument("--prompts", metavar="FILE", help="held-out prompts (rows with 'prompt')")
    p.add_argument("--judge", default="demo", metavar="SPEC", help=JUDGE_HELP + " (default: demo)")
    p.add_argument("--pass-threshold", type=float, help="score that counts as a pass (default: 1.0; reward models 0)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward on pairs (default: 0.1)")
    p.add_argument("--output-dir", default=None, help="where to write eval.json/eval.md (default: the model dir, "
                                                      "or runs/eval)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-edge-cases", action="store_true", help="skip the built-in edge-case prompts")
    p.set_defaults(func=cmd_eval)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="base vs DPO vs ORPO on the bundled task, judged on held-out data",
                       description="Train DPO and ORPO from the embedded model on the bundled task and compare them "
                                   "with the base model on held-out pairs and prompts; prints one table.")
    p.add_argument("--output-dir", default="runs/demo", help="where reports and models go (default: runs/demo)")
    p.add_argument("--model", help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


# ----- train: resolving the options ------------------------------------------------------------------------------
def config_class(method: str) -> type[PreferenceConfig]:
    from .config import DPOConfig, ORPOConfig

    return {"dpo": DPOConfig, "orpo": ORPOConfig}[method]


def config_fields(cls: type) -> dict[str, Any]:
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
        return [str(v) for k in ("model", "ref_model", "dataset", "eval_dataset") if (v := self.run.get(k))]

    def resolved_config(self) -> dict[str, Any]:
        """Run keys (local paths made absolute, so the file works from anywhere) and the config options."""
        out: dict[str, Any] = {"method": self.method}
        for key in RUN_KEYS[1:]:
            value = self.run.get(key)
            if value is None or (key == "eval_split" and not self.run.get("eval_dataset")):
                continue
            if key in ("model", "ref_model", "dataset", "eval_dataset") and _is_local_path(str(value)):
                value = str(Path(str(value)).expanduser().resolve())
            out[key] = value
        out.update(sorted(self.options.items()))
        out["output_dir"] = str(self.output_dir.expanduser().resolve())  # a re-run must not write somewhere else
        return out


def _is_local_path(value: str) -> bool:
    """A path on disk, as opposed to an embedded model name or a hub id (embedded names win, as in models.py)."""
    from .models import EMBEDDED_MODELS

    return value.lower() not in EMBEDDED_MODELS and Path(value).expanduser().exists()


def _config_file_layer(path: str | None) -> Layer:
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


def _set_layer(pairs: Sequence[str]) -> Layer:
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


def _resolve_method(layers: Sequence[Layer], args: argparse.Namespace) -> str:
    method = args.method
    if method is None:
        for layer in layers:
            method = layer.values.get("method", method)
    method = RUN_DEFAULTS["method"] if method is None else str(method).lower()
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not supported. Fix: use one of {', '.join(METHODS)}")
    return str(method)


def _unknown_key_error(key: str, origin: str, method: str) -> ConfigError:
    valid = list(config_fields(config_class(method))) + list(RUN_KEYS)
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
                raise _unknown_key_error(key, layer.origin, method)
            merged[key] = value
    flags = layers[-1].values
    if method == "orpo" and "orpo_alpha" in flags and "beta" not in flags:
        merged.pop("beta", None)  # --beta set orpo_alpha; a TRL-style `beta` from the config file would disagree
    return merged


def _type_names(annotation: Any) -> set[str]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "").replace("Optional[", "").replace("]", "")
    return {t.strip() for t in text.split("|")}


def coerce_option(cls: type, key: str, value: Any) -> Any:
    """Make YAML values fit numeric/bool fields: YAML 1.1 reads ``1e-5`` as a string, for instance."""
    f = config_fields(cls).get(key)
    if f is None or value is None:
        return value
    names = _type_names(f.type)
    if names <= {"bool", "None"} and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false.")
    if isinstance(value, str) and names <= {"int", "float", "None"} and names & {"int", "float"}:
        integer = "int" in names and "float" not in names
        try:
            return int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not {'an integer' if integer else 'a number'}.") from None
    if isinstance(value, bool) and names <= {"int", "float", "None"}:
        raise ConfigError(f"{key}={value!r} must be a number.")
    return value


def resolve_plan(args: argparse.Namespace) -> TrainPlan:
    """Config file < --set < flags, with CLI defaults underneath; checks names and types, not ranges."""
    lower = [_config_file_layer(args.config), _set_layer(args.set_pairs)]
    method = _resolve_method(lower, args)
    merged = _merge([*lower, _flag_layer(args, method)], method)
    run = {key: merged.pop(key, None) for key in RUN_KEYS}
    run = {key: RUN_DEFAULTS.get(key) if value is None else value for key, value in run.items()}
    run["method"] = method
    run["columns"] = parse_columns(run["columns"])
    if not run.get("dataset"):
        raise ConfigError("no dataset given. Fix: pass --dataset SRC or put 'dataset: SRC' in the config file")
    if run.get("model") is None:
        from .models import DEFAULT_MODEL

        run["model"] = DEFAULT_MODEL
    run.update({k: str(run[k]) for k in ("model", "ref_model", "split", "eval_split") if run[k] is not None})
    if method != "dpo" and run.get("ref_model") is not None:
        raise ConfigError(f"ref_model is a DPO option; method {method} uses no reference model. Fix: remove it")
    options = {**CLI_DEFAULTS, **merged}
    options.setdefault("output_dir", str(runs.default_run_dir(method)))
    cls = config_class(method)
    options = {k: coerce_option(cls, k, v) for k, v in options.items()}
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume contradict each other. Fix: pass one of them.")
    return TrainPlan(method, run, options, overwrite=args.overwrite, resume=args.resume)


def build_config(plan: TrainPlan) -> PreferenceConfig:
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


# ----- train: running --------------------------------------------------------------------------------------------
def load_train_data(plan: TrainPlan) -> tuple[Any, Any]:
    from .data.load import load_preference_dataset

    columns = plan.run["columns"]
    train = load_preference_dataset(plan.run["dataset"], plan.run["split"], columns)
    evaluation = None
    if plan.run.get("eval_dataset"):
        evaluation = load_preference_dataset(plan.run["eval_dataset"], plan.run["eval_split"], columns)
    return train, evaluation


def make_trainer(plan: TrainPlan, config: PreferenceConfig, train: Any, evaluation: Any) -> Any:
    """Load the model(s) and tokenize the data; remove the output directory again if this fails after creating it."""
    from .trainer import DPOTrainer, ORPOTrainer

    out = plan.output_dir
    existed = out.exists()
    common = {"model": plan.run["model"], "args": config, "train_dataset": train, "eval_dataset": evaluation}
    try:
        if plan.method == "dpo":
            return DPOTrainer(ref_model=plan.run.get("ref_model"), **common)
        return ORPOTrainer(**common)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def train_or_report(trainer: Any, out: Path, resume_from: Path | None = None) -> int:
    """Run training; on failure keep what the Trainer wrote, log the traceback there and print one line."""
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if trainer.eval_dataset is not None:
            trainer.evaluate()
    except PrefalignError:
        raise
    except KeyboardInterrupt:
        print_error(f"interrupted at step {trainer.state.global_step}; partial output left in {out}")
        return 130
    except Exception as e:
        log = out / runs.ERROR_LOG_FILE
        with contextlib.suppress(OSError):
            out.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc(), encoding="utf-8")
        detail = type(e).__name__ + (f": {str(e).strip().splitlines()[0]}" if str(e).strip() else "")
        print_error(f"training failed at step {trainer.state.global_step}: {detail} (partial output left in {out}; "
                    f"traceback in {log})")
        return 1
    return 0


def save_run(trainer: Any, plan: TrainPlan, out: Path) -> None:
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    runs.write_config(out, plan.resolved_config())
    runs.write_data_report(out, trainer.data_reports)


def summary_line(trainer: Any, out: Path) -> str:
    m = runs.final_metrics(trainer.state.log_history)
    parts = [f"{trainer.state.global_step} steps"]
    for key, label in (("loss", "final loss"), ("rewards/accuracies", "reward accuracy"),
                       ("eval_loss", "eval loss"), ("eval_rewards/accuracies", "eval reward accuracy")):
        if key in m:
            parts.append(f"{label} {m[key]:.4f}")
    return f"{PROG}: run saved to {out} ({', '.join(parts)})"


def cmd_train(args: argparse.Namespace) -> int:
    plan = resolve_plan(args)
    config = build_config(plan)
    out = plan.output_dir
    from .checkpoints import latest_checkpoint

    resume_from = latest_checkpoint(out) if plan.resume else None
    if plan.resume and resume_from is None:
        raise ConfigError(f"--resume: '{out}' holds no complete checkpoint. Fix: set save_steps (--set save_steps=N "
                          "--set save_strategy=steps) when training, or drop --resume.")
    if not plan.resume:
        runs.check_output_dir(out, plan.overwrite, keep=plan.local_inputs())
    train, evaluation = load_train_data(plan)
    trainer = make_trainer(plan, config, train, evaluation)
    from .progress import use_progress_bar

    progress = use_progress_bar(trainer)
    if plan.overwrite and trainer.is_world_process_zero():
        runs.clear_dir(out)  # only now that every input has loaded: a bad input leaves the old run intact
    try:
        code = train_or_report(trainer, out, resume_from)
    finally:
        progress.close()  # so an error line never lands on the bar's line
    if code:
        return code
    if trainer.graceful_stop.signal is not None:
        if trainer.is_world_process_zero():
            runs.write_config(out, plan.resolved_config())
        name = signal.Signals(trainer.graceful_stop.signal).name
        print_error(f"stopped by {name} at step {trainer.state.global_step}; checkpoint saved in "
                    f"{latest_checkpoint(out)}. Continue with: prefalign train {out / runs.CONFIG_FILE} --resume")
        return 128 + trainer.graceful_stop.signal
    save_run(trainer, plan, out)
    if trainer.is_world_process_zero():
        print(summary_line(trainer, out))
    return 0


# ----- data check ------------------------------------------------------------------------------------------------
def cmd_data_check(args: argparse.Namespace) -> int:
    """Print `prefalign.data.check.check_dataset`'s report; exit code 2 if training would refuse the data."""
    from .data.check import check_dataset, check_settings
    from .models import DEFAULT_MODEL, load_tokenizer

    # --max-length not given: check_dataset's default, which is the config default.
    limits = {"max_length": args.max_length} if "max_length" in args.explicit else {}
    limits["max_prompt_length"] = args.max_prompt_length
    check_settings(**limits)  # bad options fail before the tokenizer loads
    columns = parse_columns(args.columns)
    model = args.model or DEFAULT_MODEL
    report = check_dataset(args.source, tokenizer=load_tokenizer(model), tokenizer_name=model, split=args.split,
                           columns=columns, **limits)
    print(report.to_json() if args.json else report.render_text())
    return 0 if report.ok else 2


# ----- entry point -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """Show the library's warnings (truncation counts, duplicates) as ``prefalign: ...`` lines while a command runs."""

    class _Stderr(logging.StreamHandler):
        @property  # type: ignore[override]
        def stream(self) -> Any:  # the current sys.stderr, so captured streams in tests stay valid
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{PROG}: {record.levelname.lower()}: {one_line(record.getMessage())}"

    handler = _Stderr()
    handler.setFormatter(_Format())
    logger = logging.getLogger("prefalign")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' own bars ("Loading weights", "Writing model shards"); hub download bars stay."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5.x; without it the bars just show
    if set_hook is None:
        yield
        return
    previous = set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_hook(previous)


def _explicit_options(argv: Sequence[str]) -> set[str]:
    """Which --options were typed, so 'none' can be told from 'not given'."""
    return {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    args.explicit = _explicit_options(argv)
    try:
        with cli_logging(), quiet_transformers_bars():
            return func(args)
    except PrefalignError as e:
        print_error(e)
        return e.exit_code


def _bar(desc: str, total: int) -> Callable[[int], None]:
    from .progress import counter

    return counter(desc, total).update


def cmd_data_generate(args: argparse.Namespace) -> int:
    """Sample, judge and write pairs; refuses to replace an existing file without --overwrite."""
    from .generate import generate_pairs, read_prompt_rows, write_jsonl_atomic
    from .judges import as_score_fn, load_judge
    from .models import load_model, load_tokenizer

    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples} is out of range: must be >= 1.")
    if Path(args.output).exists() and not args.overwrite:
        raise ConfigError(f"{args.output} already exists. Fix: choose another --output or pass --overwrite.")
    rows = read_prompt_rows(args.prompts)
    judge = load_judge(args.judge)
    tok, model = load_tokenizer(args.model), load_model(args.model)
    pairs, stats = generate_pairs(model, tok, rows, as_score_fn(judge), samples=args.samples,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  batch_size=args.batch_size, seed=args.seed, progress=_bar("generating", len(rows)))
    write_jsonl_atomic(args.output, pairs)
    print(f"{PROG}: wrote {args.output}: {stats.line()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Load policy and reference, evaluate, write eval.json and eval.md, print the Markdown."""
    from .data.load import load_preference_dataset
    from .evaluate import evaluate_models
    from .generate import EDGE_CASE_PROMPTS, read_prompt_rows
    from .judges import load_judge
    from .models import DEFAULT_MODEL, load_model, load_tokenizer

    if not args.pairs and not args.prompts:
        raise ConfigError("nothing to evaluate. Fix: give --pairs FILE, --prompts FILE, or both.")
    pairs = load_preference_dataset(args.pairs).to_list() if args.pairs else []
    prompts = read_prompt_rows(args.prompts) if args.prompts else []
    judge = load_judge(args.judge, args.pass_threshold)
    ref_name = args.ref or DEFAULT_MODEL
    tok = load_tokenizer(args.model)
    policy, reference = load_model(args.model), load_model(ref_name)
    report = evaluate_models(policy, reference, tok, judge, policy_name=args.model, reference_name=ref_name,
                             pair_rows=pairs, prompt_rows=prompts, beta=args.beta,
                             edge_cases=() if args.no_edge_cases or not prompts else EDGE_CASE_PROMPTS,
                             max_new_tokens=args.max_new_tokens, progress=_bar)
    out = args.output_dir or (args.model if Path(args.model).is_dir() else "runs/eval")
    js, md = report.write(out)
    print(report.to_markdown())
    print(f"{PROG}: wrote {js} and {md}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoSettings, run_demo
    from .models import DEFAULT_MODEL

    run_demo(DemoSettings(model=args.model or DEFAULT_MODEL, output_dir=args.output_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
