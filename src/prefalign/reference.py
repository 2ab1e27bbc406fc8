"""Reference log-probs computed once, cached on disk, and reused across epochs and runs.

DPO's reference model is frozen, so its log-probs of each pair never change: computing them once before training
removes the reference forward pass from every step and lets the reference model leave memory. The cache key covers
everything the numbers depend on: the reference weights, the tokenised pairs (which already reflect the chat
template and truncation settings) and the log-prob code's version.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .models import prefalign_home

CACHE_VERSION = 1


def model_fingerprint(model: torch.nn.Module, skip: str | None = None) -> str:
    """Hash of a model's config and every parameter and buffer (name, dtype, shape, bytes).

    ``skip``: leave out tensors whose name contains it (``"lora_"``: a PEFT model's reference is its base).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if skip and skip in name:
            continue
        t = tensor.detach()
        t = (t.to_local() if hasattr(t, "to_local") else t).to("cpu").contiguous()  # a DTensor: this process's shard
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def data_fingerprint(pairs: Sequence[dict[str, Sequence[int]]]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([list(p["prompt_ids"]), list(p["chosen_ids"]), list(p["rejected_ids"])]).encode())
    return h.hexdigest()[:24]


def cache_path(model_key: str, data_key: str) -> Path:
    return prefalign_home() / "cache" / "ref-logps" / f"v{CACHE_VERSION}-{model_key}-{data_key}.pt"


def batched_pair_logps(logps_fn: Callable[[dict[str, torch.Tensor]], Any], pairs: Sequence[dict[str, Any]],
                       collate: Callable[[list], dict[str, torch.Tensor]], batch_size: int, device: torch.device,
                       progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs ``(chosen [N], rejected [N])``, batch by batch, without grad; ``logps_fn`` maps a
    collated batch to its `prefalign.logps.PairLogps`."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(pairs[start:start + batch_size])).items()}
            out = logps_fn(batch)
            chosen.append(out.chosen.float().cpu())
            rejected.append(out.rejected.float().cpu())
            if progress:
                progress(len(chosen[-1]))
    return torch.cat(chosen), torch.cat(rejected)


def shared_pair_logps(logps_fn: Callable[[dict[str, torch.Tensor]], Any], pairs: Sequence[dict[str, Any]],
                      collate: Callable[[list], dict[str, torch.Tensor]], batch_size: int, device: torch.device,
                      rank: int, world: int, gather: Callable[[Any], list[Any]],
                      progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batched_pair_logps`` over ``world`` processes: batch i (the same batches one process would run, so the same
    numbers) is scored by process ``i % world``, and ``gather`` (all processes' values, in rank order) gives every
    process every result. Every process runs the same number of forwards, since a sharded model's forward is a
    collective call: one with fewer batches repeats its first one and drops the result."""
    starts = list(range(0, len(pairs), batch_size))
    mine = starts[rank::world]
    rounds = -(-len(starts) // world)
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(rounds):
            start = mine[i] if i < len(mine) else starts[0]
            batch = {k: v.to(device) for k, v in collate(list(pairs[start:start + batch_size])).items()}
            out = logps_fn(batch)
            if i < len(mine):
                results[start] = (out.chosen.float().cpu(), out.rejected.float().cpu())
            if progress:  # the rows every process scored this round
                progress(sum(min(batch_size, len(pairs) - s) for s in starts[i * world:(i + 1) * world]))
    every = {start: values for part in gather(results) for start, values in part.items()}
    return torch.cat([every[s][0] for s in starts]), torch.cat([every[s][1] for s in starts])


def read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached log-probs, or None where the file is missing or damaged (then recomputed, never trusted)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["chosen"], data["rejected"]
    except Exception:
        return None


def write_cache(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Written atomically (a temporary file renamed), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"chosen": chosen, "rejected": rejected}, tmp)
    os.replace(tmp, path)


def load_or_compute(path: Path, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """Cached log-probs if present, else computed and written atomically. Returns (values, was_cached)."""
    cached = read_cache(path)
    if cached is not None:
        return cached, True
    chosen, rejected = compute()
    write_cache(path, chosen, rejected)
    return (chosen, rejected), False
