"""prefalign: SFT and preference alignment (DPO, ORPO, CPO / SimPO, KTO) for causal language models, with TRL's API.

The public names are imported on first use (PEP 562), so ``import prefalign`` (and ``prefalign --help``) does not
import torch or transformers; ``from prefalign import DPOTrainer`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, PrefalignError

if TYPE_CHECKING:
    from .chat_format import setup_chat_format
    from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, SFTConfig, SimPOConfig
    from .data.load import load_preference_dataset
    from .data.unpaired import load_unpaired_dataset
    from .kto import KTOTrainer
    from .sft import SFTTrainer
    from .trainer import CPOTrainer, DPOTrainer, ORPOTrainer

__version__ = "0.1.0"
__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "ConfigError",
    "DPOConfig",
    "DPOTrainer",
    "DataError",
    "KTOConfig",
    "KTOTrainer",
    "ORPOConfig",
    "ORPOTrainer",
    "PrefalignError",
    "SFTConfig",
    "SFTTrainer",
    "SimPOConfig",
    "load_preference_dataset",
    "load_unpaired_dataset",
    "setup_chat_format",
]

_LAZY = {
    "DPOConfig": ".config",
    "ORPOConfig": ".config",
    "CPOConfig": ".config",
    "SimPOConfig": ".config",
    "SFTConfig": ".config",
    "SFTTrainer": ".sft",
    "DPOTrainer": ".trainer",
    "ORPOTrainer": ".trainer",
    "CPOTrainer": ".trainer",
    "KTOConfig": ".config",
    "KTOTrainer": ".kto",
    "load_unpaired_dataset": ".data.unpaired",
    "load_preference_dataset": ".data.load",
    "setup_chat_format": ".chat_format",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
