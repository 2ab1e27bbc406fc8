"""Batch pairs into padded tensors: chosen rows first, then rejected rows, right-padded.

Layout (as TRL's DPO collator, so batches can be compared one to one): ``input_ids`` and ``attention_mask`` of
shape ``[2B, L]``, and ``completion_mask`` marking reply tokens. Precomputed reference log-probs ride along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@dataclass
class PairCollator:
    """Collate ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` examples into one padded batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, completion = [], []
        for part in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                seqs.append(list(ex["prompt_ids"]) + list(ex[part]))
                completion.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[part]))
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad(seqs, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, length),
            "completion_mask": _pad(completion, 0, length),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch
