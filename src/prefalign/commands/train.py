"""``prefalign train``: resolve the options (`prefalign.options`), train (SFT, DPO, ORPO, CPO, SimPO, KTO; with LoRA
when ``use_peft``), write a run directory; a recipe with ``stages:`` runs as a pipeline."""

from __future__ import annotations

import argparse
import contextlib
import signal
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import runs
from ..errors import ConfigError, PrefalignError
from ..options import TrainPlan, build_config, resolve_plan
from . import PROG, print_error

if TYPE_CHECKING:
    from ..config import TrainConfig


def load_train_data(plan: TrainPlan, config: TrainConfig) -> tuple[Any, Any]:
    """The training and (optional) evaluation rows, loaded before the model so a bad file fails fast."""
    from ..data.load import load_preference_dataset
    from ..data.mixture import load_mixture, load_with_split
    from ..data.unpaired import load_unpaired_dataset
    from ..trainer import row_options

    rows = row_options(config)
    if plan.method == "sft":
        from ..data.sft import SFT_ROWS

        rows["schema"] = SFT_ROWS
    load = load_unpaired_dataset if plan.method == "kto" else load_preference_dataset  # KTO: unpaired rows or pairs
    columns = plan.run["columns"]
    hub_config = plan.run.get("dataset_config")  # TRL's dataset_config: the hub dataset's configuration name
    if plan.run.get("dataset_mixture") is not None:
        train, evaluation = load_mixture(plan.run["dataset_mixture"], options=rows)
    elif plan.run.get("eval_split_size") is not None:
        train, evaluation = load_with_split(plan.run["dataset"], plan.run["split"], columns,
                                            plan.run["eval_split_size"], rows["seed"], rows, config=hub_config)
    else:
        train = load(plan.run["dataset"], plan.run["split"], columns, config=hub_config, **rows)
        evaluation = None
    if plan.run.get("eval_dataset"):
        same = plan.run["eval_dataset"] == plan.run.get("dataset")
        evaluation = load(plan.run["eval_dataset"], plan.run["eval_split"], columns,
                          config=hub_config if same else None, **rows)
    return train, evaluation


def make_trainer(plan: TrainPlan, config: TrainConfig, train: Any, evaluation: Any) -> Any:
    """Load the model(s) and tokenize the data; remove the output directory again if this fails after creating it."""
    from ..adapters import lora_config, lora_options, quantization_config
    from ..sft import SFTTrainer
    from ..trainer import CPOTrainer, DPOTrainer, ORPOTrainer

    out = plan.output_dir
    existed = out.exists()
    lora = lora_options(plan.run)
    init = dict(config.model_init_kwargs or {})
    if lora.quantized:  # reached only with bitsandbytes and CUDA (recipe.check_start)
        config.model_init_kwargs = {**init, "quantization_config": quantization_config(lora, init.get("dtype"))}
    common = {"model": plan.run["model"], "args": config, "train_dataset": train, "eval_dataset": evaluation,
              "peft_config": lora_config(lora)}
    try:
        hub_kwargs = {k: init[k] for k in ("revision", "trust_remote_code") if init.get(k) is not None}
        if hub_kwargs:  # the tokenizer from the same revision / remote code as the model
            from ..models import load_tokenizer

            common["processing_class"] = load_tokenizer(plan.run["model"], **hub_kwargs)
        if plan.method == "dpo":
            return DPOTrainer(ref_model=plan.run.get("ref_model"), **common)
        if plan.method == "kto":
            from ..kto import KTOTrainer

            return KTOTrainer(ref_model=plan.run.get("ref_model"), **common)
        trainers = {"orpo": ORPOTrainer, "sft": SFTTrainer, "cpo": CPOTrainer, "simpo": CPOTrainer}
        return trainers[plan.method](**common)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _checkpoint_to_resume(plan: TrainPlan, config: Any, out: Path) -> Path | None:
    """``--resume`` (the run directory's latest checkpoint), or TRL's ``resume_from_checkpoint`` option, which TRL's
    scripts pass to ``train()``: a checkpoint directory, or true for the run directory's latest."""
    from ..checkpoints import latest_checkpoint

    given = config.resume_from_checkpoint
    if isinstance(given, str) and given.strip().lower() in ("true", "false"):
        given = given.strip().lower() == "true"
    if plan.resume or given is True:
        found = latest_checkpoint(out)
        if found is None:
            what = "--resume" if plan.resume else "resume_from_checkpoint: true"
            raise ConfigError(f"{what}: '{out}' holds no complete checkpoint. Fix: set save_steps (--set "
                              "save_steps=N --set save_strategy=steps) when training, or drop it.")
        return found
    if not given:
        return None
    path = Path(str(given)).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint: '{given}' is not a complete checkpoint (no trainer_state.json). "
                          "Fix: name a checkpoint-N directory of an earlier run, or true for this run's latest")
    return path


def evaluated_at_last_step(trainer: Any) -> bool:
    """Whether training's own evaluation ran at its last step (``eval_steps`` divides the step count): the final
    evaluation would repeat it, on a CPU minutes for a few hundred held-out pairs."""
    step = trainer.state.global_step
    return any(r.get("step") == step and any(k.startswith("eval_") for k in r) for r in trainer.state.log_history)


def train_or_report(trainer: Any, out: Path, resume_from: Path | None = None) -> int:
    """Run training; on failure keep what the Trainer wrote, log the traceback there and print one line."""
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if trainer.eval_dataset is not None and not evaluated_at_last_step(trainer):
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
    """Model (with LoRA: the adapter, and with merge_adapter the merged model in merged/), tokenizer, resolved
    config, data report and report.html: everything a finished run directory holds."""
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out))
    if plan.run.get("merge_adapter"):
        from ..adapters import save_merged

        save_merged(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out)
    runs.write_config(out, plan.resolved_config())
    runs.write_data_report(out, trainer.data_reports)
    from ..report.write import write_report_or_warn

    write_report_or_warn(out)  # report.html + plots/*.png; a plotting failure is a warning, the run is complete


def summary_line(trainer: Any, out: Path) -> str:
    """The one line a successful run prints: where it went and how it ended."""
    m = runs.final_metrics(trainer.state.log_history)
    parts = [f"{trainer.state.global_step} steps"]
    for name, report in trainer.data_reports.items():
        if report.skipped:
            parts.append(f"{len(report.skipped)} invalid {name} rows skipped, listed in {runs.DATA_REPORT_FILE}")
        split = {r["row"] for r in getattr(report, "prompt_rerendered", [])}
        if split:
            parts.append(f"{len(split)} {name} rows with the prompt split at the common token prefix (the template "
                         f"renders it differently alone), listed in {runs.DATA_REPORT_FILE}")
    for key, label in (("loss", "final loss"), ("rewards/accuracies", "reward accuracy"),
                       ("eval_loss", "eval loss"), ("eval_rewards/accuracies", "eval reward accuracy")):
        if key in m:
            parts.append(f"{label} {m[key]:.4f}")
    return f"{PROG}: run saved to {out} ({', '.join(parts)})"


def run(args: argparse.Namespace) -> int:
    """Resolve the options, load everything, train, and write the run directory (see `prefalign.runs`); a recipe
    with ``stages:`` runs as a pipeline (`prefalign.pipeline`)."""
    from .. import pipeline

    recipe = pipeline.read_recipe(args.config)
    if recipe is not None:
        return pipeline.run(args, recipe)
    return train_plan(resolve_plan(args), getattr(args, "progress_desc", "training"))


def train_plan(plan: TrainPlan, progress_desc: str = "training", config: TrainConfig | None = None) -> int:
    """Train one resolved run and write its run directory: `prefalign train`'s whole path after option resolution,
    shared by ``prefalign compare``; returns the exit code (bad input raises a `PrefalignError`)."""
    from ..recipe import check_start

    refused: list[str] = []
    if config is None:
        try:
            config = build_config(plan)
        except ConfigError as e:  # reported with every other start-up refusal below
            refused.append(str(e))
    # what this machine cannot honour (k-bit, push_to_hub offline, ...): all of it, before any load
    check_start(plan, config, refused)
    assert config is not None  # check_start raised otherwise
    out = plan.output_dir
    resume_from = _checkpoint_to_resume(plan, config, out)
    if resume_from is None or not resume_from.resolve().is_relative_to(out.resolve()):
        runs.check_output_dir(out, plan.overwrite, keep=plan.local_inputs())
    train, evaluation = load_train_data(plan, config)
    trainer = make_trainer(plan, config, train, evaluation)
    from ..progress import use_progress_bar

    progress = use_progress_bar(trainer, progress_desc)
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
        from ..checkpoints import latest_checkpoint

        name = signal.Signals(trainer.graceful_stop.signal).name
        print_error(f"stopped by {name} at step {trainer.state.global_step}; checkpoint saved in "
                    f"{latest_checkpoint(out)}. Continue with: prefalign train {out / runs.CONFIG_FILE} --resume")
        return 128 + trainer.graceful_stop.signal
    save_run(trainer, plan, out)
    if trainer.is_world_process_zero():
        print(summary_line(trainer, out))
    return 0
