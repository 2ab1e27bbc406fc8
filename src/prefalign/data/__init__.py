"""The data path: load.py (rows) → format.py (examples) → tokenize.py (ids) → collate.py (batches)."""

from .load import load_preference_dataset

__all__ = ["load_preference_dataset"]
