"""A model's raw numbers on the held-out data, the same data for every run: what the summary table is computed from.

`Scores` keeps per-item values (each pair's summed log-probs, each reply and its judge score, each reply's log-probs
under the policy and the reference), so every metric can be recomputed from the run directory's ``scores.json``.
The KL of the policy from the reference is estimated on the policy's own greedy replies to the held-out prompts:
the mean over reply tokens of ``log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)`` (tokens as the chat template
renders the reply, its end-of-turn tokens included), one no-grad pass of each model through `sequence_logps`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..evaluate import run_generations, sequence_logps

SCORES_FILE = "scores.json"
BASE_SCORES_FILE = "base_scores.json"


@dataclass
class Scores:
    """One model's per-item results on the held-out pairs and prompts (None: that part was not scored)."""

    pair_chosen: list[float] | None = None
    pair_rejected: list[float] | None = None
    replies: list[str] | None = None
    scores: list[float | None] | None = None
    edge_replies: list[str] = field(default_factory=list)
    reply_logps: list[float] | None = None  # the policy's replies under the policy
    reply_ref_logps: list[float] | None = None  # ... and under the reference
    reply_tokens: list[int] | None = None

    def kl(self) -> float | None:
        """Mean per-token KL estimate of the policy from the reference on the policy's replies (see module)."""
        if self.reply_logps is None or not self.reply_tokens:
            return None
        return (sum(self.reply_logps) - sum(self.reply_ref_logps or [])) / sum(self.reply_tokens)


def reply_logps(model: Any, tokenizer: Any, prompts: Sequence[Any], replies: Sequence[str], *, max_length: int,
                progress: Callable[[int], None] | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
                prompt_kwargs: Sequence[Mapping[str, Any] | None] | None = None) -> tuple[list[float], list[int]]:
    """Summed log-probs of each reply under ``model`` and its token count, through the pairs fast path (each reply
    as both sides of a pair, so nothing new is needed to score it). Prompts are text or messages;
    ``chat_template_kwargs`` / ``prompt_kwargs``: the run's and each prompt row's, as generation used them."""
    from ..data.tokenize import TokenizeSettings, tokenize_rows

    rows = [{"prompt": p, "chosen": r, "rejected": r, "chat_template_kwargs": kw}
            for p, r, kw in zip(prompts, replies, prompt_kwargs or [None] * len(prompts), strict=True)]
    summed, _ = sequence_logps(model, tokenizer, rows, max_length=max_length, progress=progress,
                               chat_template_kwargs=chat_template_kwargs)
    ids, _ = tokenize_rows(rows, tokenizer, TokenizeSettings(max_length=max_length,
                                                              chat_template_kwargs=chat_template_kwargs))
    return summed.tolist(), [len(pair["chosen_ids"]) for pair in ids]


@dataclass
class Heldout:
    """The held-out data and how it is scored, shared by every model of a compare."""

    pairs: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    judge: Any
    edge_cases: Sequence[str] = ()
    max_new_tokens: int = 48
    max_length: int = 1024
    batch_size: int = 16
    chat_template_kwargs: dict[str, Any] | None = None  # the recipe's, for every rendering

    def prompt_list(self) -> list[Any]:
        return [r["prompt"] for r in self.prompts]

    def prompt_kwargs(self) -> list[Any]:
        return [r.get("chat_template_kwargs") for r in self.prompts]

    def key(self, model: str) -> dict[str, Any]:
        """What a cached ``scores.json`` depends on: the reference model, the data, the judge and lengths."""
        digest = hashlib.sha256(json.dumps([self.pairs, self.prompts, list(self.edge_cases)], sort_keys=True,
                                           default=str).encode()).hexdigest()
        return {"reference": model, "data": digest, "judge": getattr(self.judge, "name", None),
                "pass_threshold": getattr(self.judge, "pass_threshold", None), "max_new_tokens": self.max_new_tokens,
                "max_length": self.max_length, "chat_template_kwargs": self.chat_template_kwargs}


Progress = Callable[[str, int], Callable[[int], None] | None]


def _none(desc: str, total: int) -> None:
    return None


def score_model(model: Any, tokenizer: Any, held: Heldout, *, reference: Any = None,
                progress: Progress = _none) -> Scores:
    """Score ``model`` on the held-out pairs and prompts; with ``reference``, also the KL estimate on its replies."""
    out = Scores()
    if held.pairs:
        chosen, rejected = sequence_logps(model, tokenizer, held.pairs, max_length=held.max_length,
                                          progress=progress("scoring held-out pairs", len(held.pairs)),
                                          chat_template_kwargs=held.chat_template_kwargs)
        out.pair_chosen, out.pair_rejected = chosen.tolist(), rejected.tolist()
    if held.prompts:
        run = run_generations(model, tokenizer, held.prompt_list(), held.judge, edge_cases=held.edge_cases,
                              max_new_tokens=held.max_new_tokens, batch_size=held.batch_size,
                              progress=progress("generating held-out replies", len(held.prompts)),
                              chat_template_kwargs=held.chat_template_kwargs, prompt_kwargs=held.prompt_kwargs())
        out.replies, out.scores, out.edge_replies = run.replies, run.scores, run.edge_replies
        if reference is not None:
            add_kl(out, model, reference, tokenizer, held, progress)
    return out


def add_kl(scores: Scores, model: Any, reference: Any, tokenizer: Any, held: Heldout,
           progress: Progress = _none) -> None:
    """Fill in the KL terms of ``scores`` from its replies (the demo reuses replies it already generated)."""
    prompts, replies = held.prompt_list(), scores.replies or []
    kw = {"chat_template_kwargs": held.chat_template_kwargs, "prompt_kwargs": held.prompt_kwargs()}
    scores.reply_logps, scores.reply_tokens = reply_logps(
        model, tokenizer, prompts, replies, max_length=held.max_length, progress=progress("KL: policy", len(replies)),
        **kw)
    scores.reply_ref_logps, _ = reply_logps(reference, tokenizer, prompts, replies, max_length=held.max_length,
                                            progress=progress("KL: reference", len(replies)), **kw)


def write_scores(path: Path, scores: Scores, key: Mapping[str, Any]) -> None:
    """``scores.json`` with the key it was computed under, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": dict(key), "scores": asdict(scores)}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_scores(path: Path, key: Mapping[str, Any] | None = None) -> Scores | None:
    """The cached scores if present, readable and (when ``key`` is given) computed under the same key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if key is not None and data["key"] != json.loads(json.dumps(dict(key))):
            return None
        return Scores(**data["scores"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
