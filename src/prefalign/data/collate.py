"""Batch tokenised pairs for the model: padded pairs, or prefix-shared (and packed) rows.

Both collators describe their batch in the same two views (logps.py): the rows the model runs on (``input_ids``,
``attention_mask``, ``position_ids``, ``predictor``) and the pairs the loss reads (``pair_index``, ``prompt_mask``,
``chosen_mask``, ``rejected_mask`` in pair layout ``[B, P]``, each pair as ``[prompt | chosen | rejected]``).
Precomputed reference log-probs ride along. Nothing downstream needs to know which collator built a batch.
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
    """Chosen rows first, then rejected rows, right-padded: ``[2B, L]``, TRL's DPO layout, for attention kernels
    that take no custom mask (flash attention). The prompt is computed twice."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = len(examples)
        seqs = [list(ex["prompt_ids"]) + list(ex[part]) for part in ("chosen_ids", "rejected_ids") for ex in examples]
        length = _round_up(max(len(s) for s in seqs), self.pad_to_multiple_of)
        sizes = [(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        longest = max(p + c + r for p, c, r in sizes)
        pair_index = torch.zeros((b, longest), dtype=torch.long)
        pair_part = torch.full((b, longest), 3, dtype=torch.long)
        for i, (p, c, r) in enumerate(sizes):
            pair_index[i, :p + c] = i * length + torch.arange(p + c)
            pair_index[i, p + c:p + c + r] = (b + i) * length + torch.arange(p, p + r)
            pair_part[i, :p + c + r] = torch.tensor([0] * p + [1] * c + [2] * r)
        batch = {
            "input_ids": _pad(seqs, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, length),
            "position_ids": torch.arange(length).repeat(2 * b, 1),
            "predictor": (torch.arange(length) - 1).clamp(min=0).repeat(2 * b, 1),
            "pair_index": pair_index,
            **_part_masks(pair_part),
        }
        return _with_reference(batch, examples)


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def _part_masks(pair_part: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"prompt_mask": (pair_part == 0).long(), "chosen_mask": (pair_part == 1).long(),
            "rejected_mask": (pair_part == 2).long()}


def _with_reference(batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
    return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows of at most ``capacity`` tokens (ties keep
    input order, so the packing is deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return rows


@dataclass
class PrefixSharedCollator:
    """Each pair as one segment ``[prompt | chosen | rejected]``: the prompt is computed once instead of twice.

    A boolean ``[R, 1, L, L]`` attention mask lets rejected tokens see their prompt and themselves but not the chosen
    tokens; position ids restart after the prompt for the rejected reply; ``predictor`` says which position's hidden
    state predicts each token (the first rejected token is predicted from the last prompt token). With ``pack``,
    shorter segments share a row (first-fit decreasing, rows no longer than the batch's longest segment, a
    block-diagonal mask between segments), so a batch of mixed lengths needs fewer rows than pairs and never longer
    ones: less padding, same attention cost per row.

    Model inputs are in row layout (``[R, L]``); ``pair_index`` ``[B, P]`` maps each pair's tokens to flat row
    positions, and ``prompt_mask`` / ``chosen_mask`` / ``rejected_mask`` ``[B, P]`` are in pair layout. Log-probs
    equal those of two separate sequences (tests/test_prefix_sharing.py).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    pack: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        totals = [p + c + r for p, c, r in lengths]
        longest = max(totals)
        length = _round_up(longest, self.pad_to_multiple_of)
        rows = pack_rows(totals, longest) if self.pack else [[i] for i in range(len(examples))]
        n_rows, b = len(rows), len(examples)
        input_ids = torch.full((n_rows, length), self.pad_token_id, dtype=torch.long)
        segment = torch.full((n_rows, length), -1, dtype=torch.long)  # which pair owns the position; -1 padding
        part = torch.full((n_rows, length), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
        position_ids = torch.zeros((n_rows, length), dtype=torch.long)
        predictor = (torch.arange(length) - 1).clamp(min=0).repeat(n_rows, 1)
        pair_index = torch.zeros((b, longest), dtype=torch.long)
        pair_part = torch.full((b, longest), 3, dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                e, (p, c, rej) = examples[i], lengths[i]
                n = p + c + rej
                span = slice(start, start + n)
                input_ids[r, span] = torch.tensor(list(e["prompt_ids"]) + list(e["chosen_ids"])
                                                  + list(e["rejected_ids"]), dtype=torch.long)
                segment[r, span] = i
                part[r, span] = torch.tensor([0] * p + [1] * c + [2] * rej)
                position_ids[r, start:start + p + c] = torch.arange(p + c)
                position_ids[r, start + p + c:start + n] = torch.arange(p, p + rej)
                predictor[r, start] = start  # a pair's first token has no predictor (never a target)
                if rej:  # an empty rejected part (KTO without its KL term) has no first token to predict
                    predictor[r, start + p + c] = start + p - 1
                pair_index[i, :n] = r * length + torch.arange(start, start + n)
                pair_part[i, :n] = part[r, span]
                start += n
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        q_seg, k_seg = segment.unsqueeze(2), segment.unsqueeze(1)
        q_part, k_part = part.unsqueeze(2), part.unsqueeze(1)
        allowed = causal & (q_seg == k_seg) & (k_seg >= 0) & ~((q_part == 2) & (k_part == 1))
        pad_rows = (segment < 0).unsqueeze(2) & torch.eye(length, dtype=torch.bool)  # padding sees itself: no NaN
        batch = {
            "input_ids": input_ids,
            "attention_mask": (allowed | pad_rows).unsqueeze(1),
            "position_ids": position_ids,
            "predictor": predictor,
            "pair_index": pair_index,
            **_part_masks(pair_part),
        }
        return _with_reference(batch, examples)


@dataclass
class LMCollator:
    """SFT batches: each example's ``input_ids`` with ``labels`` (the token where ``loss_mask`` is 1, else -100, as
    the Trainer counts them for ``num_items_in_batch``) in row layout; a position's label is predicted by the
    position before it in the same row.

    With ``pack``, examples share rows (first-fit decreasing into rows no longer than the batch's longest example):
    a boolean ``[R, 1, L, L]`` block-diagonal causal mask keeps every example to its own tokens and position ids
    restart at each example, so an example's loss is the same alone and packed (tests/test_sft.py). With ``flat``
    as well, all examples go into one row with no padding, described by ``cu_seq_lens`` (the span boundaries, as
    flash-attention's variable-length kernels take them) instead of a mask: for attention that runs each span on its
    own (speed/attention.py), where a dense mask would cost the row's length squared. Without ``pack``,
    right-padded rows with a 2-D padding mask (attention kernels that take no custom mask).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    pack: bool = True
    flat: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        flat = self.pack and self.flat
        longest = sum(lengths) if flat else max(lengths)
        length = _round_up(longest, self.pad_to_multiple_of)
        if flat:
            rows = [list(range(len(examples)))]
        else:
            rows = pack_rows(lengths, longest) if self.pack else [[i] for i in range(len(examples))]
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        segment = torch.full((len(rows), length), -1, dtype=torch.long)  # which example owns the position
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                ids = torch.tensor(list(examples[i]["input_ids"]), dtype=torch.long)
                keep = torch.tensor(list(examples[i]["loss_mask"]), dtype=torch.bool)
                span = slice(start, start + len(ids))
                input_ids[r, span] = ids
                labels[r, span] = ids.masked_fill(~keep, -100)
                labels[r, start] = -100  # nothing in this example predicts its first token
                segment[r, span] = i
                position_ids[r, span] = torch.arange(len(ids))
                start += len(ids)
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                 "token_count": torch.tensor(sum(lengths)), "token_mask": (segment >= 0).long()}
        if flat:  # one row; padding from pad_to_multiple_of is a span of its own
            ends = torch.tensor([0, *lengths, length - sum(lengths)]).cumsum(0)
            batch["cu_seq_lens"] = ends.unique_consecutive().to(torch.int32)
            batch["attention_mask"] = torch.ones((1, length), dtype=torch.long)
        elif self.pack:
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(1) >= 0)
            pad_rows = (segment < 0).unsqueeze(2) & torch.eye(length, dtype=torch.bool)  # padding sees itself
            batch["attention_mask"] = ((causal & same) | pad_rows).unsqueeze(1)
        else:
            batch["attention_mask"] = (segment >= 0).long()
        return batch
