"""prefalign: preference alignment (DPO, ORPO) for causal language models, with TRL's API."""

from .config import DPOConfig, ORPOConfig
from .data.load import load_preference_dataset
from .errors import ConfigError, DataError, PrefalignError
from .trainer import DPOTrainer, ORPOTrainer

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DPOConfig",
    "DPOTrainer",
    "DataError",
    "ORPOConfig",
    "ORPOTrainer",
    "PrefalignError",
    "load_preference_dataset",
]
