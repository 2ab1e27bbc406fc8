"""Checkpoints that are whole or absent, and a clean stop on SIGINT/SIGTERM that saves one.

transformers writes ``checkpoint-N`` in place, so a kill mid-write leaves a directory that `get_last_checkpoint`
would pick for resuming. `CheckpointMixin` writes into ``.tmp-checkpoint-N`` and renames it when complete.
`GracefulStop` turns the first SIGINT/SIGTERM into "save a checkpoint at the end of this step and stop".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest complete ``checkpoint-N`` in a run directory (temporary ``.tmp-*`` ones never count)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m[1]), p) for p in root.iterdir()
             if p.is_dir() and (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name))
             and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


class CheckpointMixin:
    """Mixed into a `transformers.Trainer`: stage each checkpoint under a temporary name, then rename it."""

    _staging_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = super()._get_output_dir(trial)  # type: ignore[misc]
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        staging = os.path.join(root, f".tmp-{name}")
        main = self.args.should_save  # type: ignore[attr-defined]
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # a leftover from a killed run
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_dir = None
        # every process has written its part (RNG state; FSDP / ZeRO shards) before the main one renames the folder
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        if main:
            final = os.path.join(root, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            state = self.state  # type: ignore[attr-defined]
            if state.best_model_checkpoint and state.best_model_checkpoint.startswith(staging):
                state.best_model_checkpoint = os.path.join(root, os.path.basename(state.best_model_checkpoint))
            rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit,  # type: ignore[attr-defined]
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. A second one interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signal = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore()
