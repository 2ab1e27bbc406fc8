"""TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656): every ``ref_model_sync_steps`` optimizer steps, ``ref <- alpha * policy + (1 - alpha) * ref``
(the paper's soft update; alpha = 1 is its hard update).

The reference is a separate model held for the whole run and run live each step (its log-probs change, so the
reference cache does not apply). Its weights travel with every checkpoint (``reference/weights.safetensors``: a
subfolder, so loaders that take every ``*.safetensors`` next to the model never mistake it for the policy), so a
resumed run continues from the reference it had, not from the initial one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import ConfigError
from .models import unwrap

logger = logging.getLogger("prefalign")
REFERENCE_FILE = "reference/weights.safetensors"


def blend_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``ref <- (1 - alpha) * ref + alpha * policy``, parameter by parameter, in place (TRL's update order; the add
    computes in the wider of the two dtypes and rounds once)."""
    policy_params = dict(unwrap(policy).named_parameters())
    with torch.no_grad():
        for name, ref_param in unwrap(reference).named_parameters():
            ref_param.mul_(1.0 - alpha).add_(policy_params[name].to(ref_param.device), alpha=alpha)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in unwrap(module).named_parameters()}


def check_pair(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """The reference must have the policy's parameters (names and shapes) to be blended with it."""
    ref, pol = _shapes(reference), _shapes(policy)
    if ref != pol:
        differing = sorted(set(ref) ^ set(pol)) or sorted(n for n in ref if ref[n] != pol[n])
        raise ConfigError(f"sync_ref_model needs a ref_model with the policy's parameters; they differ at "
                          f"{differing[0]}. Fix: pass no ref_model (a copy of the policy is the reference) or one of "
                          "the same architecture and size.")


class SyncReference(TrainerCallback):
    """Blends the policy into the reference after every ``ref_model_sync_steps``-th optimizer step."""

    def __init__(self, reference: torch.nn.Module, alpha: float, every: int) -> None:
        self.reference, self.alpha, self.every = reference, alpha, every

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            blend_into(self.reference, model, self.alpha)

    def save(self, checkpoint_dir: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(checkpoint_dir) / REFERENCE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in unwrap(self.reference).named_parameters()}
        save_file(tensors, str(path))

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        path = Path(checkpoint_dir) / REFERENCE_FILE
        if not path.exists():
            logger.warning("%s has no %s: the resumed run's reference starts again from the initial one "
                           "(sync_ref_model)", checkpoint_dir, REFERENCE_FILE)
            return
        from safetensors.torch import load_file

        saved = load_file(str(path))
        if _shapes(self.reference) != {n: tuple(t.shape) for n, t in saved.items()}:
            raise ConfigError(f"{path} holds another model's reference (its tensors differ from this run's). Fix: "
                              "resume with the model the checkpoint was trained from")
        with torch.no_grad():
            for name, param in unwrap(self.reference).named_parameters():
                param.copy_(saved[name])
