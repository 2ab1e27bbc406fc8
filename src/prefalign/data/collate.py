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


@dataclass
class PrefixSharedCollator:
    """One row per pair, ``[prompt | chosen | rejected]``: the prompt is computed once instead of twice.

    A boolean ``[B, 1, L, L]`` attention mask lets rejected tokens see the prompt and themselves but not the chosen
    tokens; position ids restart after the prompt for the rejected reply; ``predictor`` says which position's hidden
    state predicts each token (the first rejected token is predicted from the last prompt token). Log-probs equal
    those of two separate sequences (tests/test_prefix_sharing.py).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        length = max(p + c + r for p, c, r in lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(examples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        segment = torch.full((b, length), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
        position_ids = torch.zeros((b, length), dtype=torch.long)
        predictor = (torch.arange(length) - 1).clamp(min=0).repeat(b, 1)
        for i, (e, (p, c, r)) in enumerate(zip(examples, lengths, strict=True)):
            ids = list(e["prompt_ids"]) + list(e["chosen_ids"]) + list(e["rejected_ids"])
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            segment[i, :p], segment[i, p:p + c], segment[i, p + c:p + c + r] = 0, 1, 2
            position_ids[i, : p + c] = torch.arange(p + c)
            position_ids[i, p + c:p + c + r] = torch.arange(p, p + r)
            predictor[i, p + c] = p - 1
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        q, k = segment.unsqueeze(2), segment.unsqueeze(1)
        allowed = causal & ~((q == 2) & (k == 1)) & (k != 3) & (q != 3)
        pad_rows = (segment == 3).unsqueeze(2) & torch.eye(length, dtype=torch.bool)  # padding sees itself: no NaN
        batch = {
            "input_ids": input_ids,
            "attention_mask": (allowed | pad_rows).unsqueeze(1),
            "position_ids": position_ids,
            "predictor": predictor,
            "prompt_mask": (segment == 0).long(),
            "chosen_mask": (segment == 1).long(),
            "rejected_mask": (segment == 2).long(),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch
