"""Progress bars on stderr: training steps (with loss and reward accuracy), and plain item counts."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def make_progress_callback(desc: str = "training") -> Any:
    """A tqdm bar on stderr (step/total, loss, reward accuracy) replacing transformers' progress printing.

    The class is built on first use so that importing the CLI (``prefalign --help``) does not import transformers.
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressBarCallback(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.desc = desc

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, unit="step", desc=self.desc, file=sys.stderr,
                                dynamic_ncols=True, disable=args.disable_tqdm)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs and self.bar is not None:
                self.bar.set_postfix(_short_metrics(logs, ""), refresh=True)
            elif "eval_loss" in logs:
                line = ", ".join(f"{k} {v}" for k, v in _short_metrics(logs, "eval_").items())
                tqdm.write(f"prefalign: eval at step {state.global_step}: {line}", file=sys.stderr)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressBarCallback()


def _short_metrics(logs: Mapping[str, Any], prefix: str) -> dict[str, str]:
    names = {"loss": "loss", "rewards/accuracies": "acc"}
    return {short: f"{logs[prefix + key]:.4g}" for key, short in names.items() if prefix + key in logs}


def use_progress_bar(trainer: Any, desc: str = "training") -> Any:
    """Swap transformers' ProgressCallback/PrinterCallback for ours; returns ours (``close()`` it on failure)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (ProgressCallback, PrinterCallback):
        while any(isinstance(cb, cls) for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(cls)
    progress = make_progress_callback(desc)
    trainer.add_callback(progress)
    return progress


def counter(desc: str, total: int) -> Any:
    """A transient stderr bar counting ``total`` items (generations, pairs); ``.update(n)``, then ``.close()``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
