"""Scored completions become preference pairs: UltraFeedback, Argilla ratings, generic lists, binarized scores.

Many published preference sets hold several completions per prompt, each with a score, rather than pairs:
UltraFeedback (``instruction`` + ``completions[].response`` + ``overall_score``, Cui et al. 2023), Argilla / distilabel
(``generations`` + ``ratings``), or a generic ``completions: [{text|response, score}]``. Their binarized forms
(``chosen`` / ``rejected`` + ``score_chosen`` / ``score_rejected``) are pairs already, with scores to filter on.

Pairing strategies (``pairing``): ``best_worst`` (default; the highest against the lowest score, as
ultrafeedback_binarized), ``best_random`` (the highest against a random lower-scored one, seeded per row, as the
Zephyr recipe), ``all_pairs`` (every two completions whose scores differ). A pair is kept when its score difference
is positive and at least ``min_score_margin``; ties and pairs below the margin are skipped and counted, never
silently.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PAIRINGS = ("best_worst", "best_random", "all_pairs")
_TEXT_KEYS = ("text", "response", "content", "completion", "output")
_SCORE_KEYS = ("score", "overall_score", "rating")


@dataclass
class PairingReport:
    """What pairing did: rows read, pairs written, and every row or pair left out, by reason (row numbers)."""

    format: str = ""
    rows: int = 0
    pairs: int = 0
    ties: list[int] = field(default_factory=list)  # rows whose candidates all scored the same
    below_margin: list[int] = field(default_factory=list)  # rows (or binarized pairs) under min_score_margin
    too_few: list[int] = field(default_factory=list)  # rows with fewer than two scored completions
    unscored_completions: int = 0  # completions without a score (left out of pairing)

    def line(self) -> str:
        parts = [f"{self.rows} {self.format} rows → {self.pairs} pairs"]
        for name, rows in (("ties skipped", self.ties), ("below min_score_margin", self.below_margin),
                           ("with fewer than two scored completions", self.too_few)):
            if rows:
                parts.append(f"{len(rows)} rows {name}")
        if self.unscored_completions:
            parts.append(f"{self.unscored_completions} completions without a score left out")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "rows": self.rows, "pairs": self.pairs, "ties": len(self.ties),
                "ties_rows": self.ties, "below_margin": len(self.below_margin), "below_margin_rows": self.below_margin,
                "too_few": len(self.too_few), "too_few_rows": self.too_few,
                "unscored_completions": self.unscored_completions}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _completion(item: Any, score_key: str | None) -> tuple[Any, float | None] | None:
    """(text, score) of one completion entry; None when it holds no text."""
    if not isinstance(item, Mapping):
        return None
    text = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), (str, list))), None)
    if text is None:
        return None
    keys = (score_key,) if score_key else _SCORE_KEYS
    score = next((_number(item[k]) for k in keys if k in item and _number(item[k]) is not None), None)
    if score is None and isinstance(item.get("fine-grained_score"), (int, float)):
        score = float(item["fine-grained_score"])
    return text, score


def detect_scored(row: Mapping[str, Any]) -> str | None:
    """The scored format of a row: "UltraFeedback", "Argilla", "scored completions", "binarized", or None."""
    completions = row.get("completions")
    if isinstance(completions, list) and completions and all(isinstance(c, Mapping) for c in completions):
        return "UltraFeedback" if "instruction" in row and "prompt" not in row else "scored completions"
    if isinstance(row.get("generations"), list) and isinstance(row.get("ratings"), list):
        return "Argilla"
    if "chosen" in row and "rejected" in row and ("score_chosen" in row or "score_rejected" in row):
        return "binarized"
    return None


def _candidates(row: Mapping[str, Any], kind: str, score_key: str | None) -> tuple[Any, list[tuple[Any, float]], int]:
    """(prompt, [(text, score)], completions without a score) of a multi-completion row."""
    prompt = row.get("prompt", row.get("instruction"))
    if kind == "Argilla":
        pairs = list(zip(row["generations"], row["ratings"], strict=False))
        scored = [(g, _number(r)) for g, r in pairs if isinstance(g, (str, list))]
    else:
        scored = [c for c in (_completion(item, score_key) for item in row["completions"]) if c is not None]
    kept = [(t, s) for t, s in scored if s is not None]
    return prompt, kept, len(scored) - len(kept)


def _pairs(cands: list[tuple[Any, float]], pairing: str, margin: float, rng: random.Random
           ) -> tuple[list[tuple[int, int]], str | None]:
    """Index pairs (chosen, rejected) by the strategy, or a reason none was kept ("tie", "margin")."""
    scores = [s for _, s in cands]
    best = max(range(len(cands)), key=lambda i: scores[i])  # first of the best on ties: deterministic
    if pairing == "all_pairs":
        out = [(i, j) for i in range(len(cands)) for j in range(len(cands)) if scores[i] - scores[j] > 0
               and scores[i] - scores[j] >= margin]
    elif pairing == "best_random":
        lower = [j for j in range(len(cands)) if scores[j] < scores[best]]
        out = [(best, rng.choice(lower))] if lower else []
        out = [(i, j) for i, j in out if scores[i] - scores[j] >= margin]
    else:
        worst = min(range(len(cands)), key=lambda i: scores[i])
        out = [(best, worst)] if scores[best] > scores[worst] and scores[best] - scores[worst] >= margin else []
    if out:
        return out, None
    return [], "tie" if max(scores) == min(scores) else "margin"


def scored_to_pairs(rows: Sequence[Mapping[str, Any]], numbers: Sequence[int], *, pairing: str = "best_worst",
                    min_score_margin: float = 0.0, seed: int = 0, score_key: str | None = None
                    ) -> tuple[list[dict[str, Any]], list[int], PairingReport]:
    """Pairs (``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``) from scored rows, each
    numbered by its source row; rows of no scored format pass through unchanged. ``score_key`` picks the score
    field of a completion (default: score, overall_score or rating, then fine-grained_score)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not one of {', '.join(PAIRINGS)}")
    report = PairingReport()
    out, out_numbers = [], []
    for row, n in zip(rows, numbers, strict=True):
        kind = detect_scored(row)
        if kind is None:
            out.append(dict(row))
            out_numbers.append(n)
            continue
        report.format = report.format or kind
        report.rows += 1
        extra = {k: v for k, v in row.items() if k == "system"}
        if kind == "binarized":
            sc, sr = _number(row.get("score_chosen")), _number(row.get("score_rejected"))
            if sc is not None and sr is not None and sc == sr:
                report.ties.append(n)
                continue
            if sc is not None and sr is not None and sc - sr < min_score_margin:
                report.below_margin.append(n)
                continue
            out.append({k: v for k, v in row.items()})
            out_numbers.append(n)
            report.pairs += 1
            continue
        prompt, cands, unscored = _candidates(row, kind, score_key)
        report.unscored_completions += unscored
        if len(cands) < 2:
            report.too_few.append(n)
            continue
        chosen, why = _pairs(cands, pairing, min_score_margin, random.Random(seed * 1_000_003 + n))
        if why is not None:
            (report.ties if why == "tie" else report.below_margin).append(n)
        for i, j in chosen:
            out.append({"prompt": prompt, "chosen": cands[i][0], "rejected": cands[j][0],
                        "score_chosen": cands[i][1], "score_rejected": cands[j][1], **extra})
            out_numbers.append(n)
            report.pairs += 1
    return out, out_numbers, report
