"""``prefalign data prepare``: a cleaned, normalised conversational JSONL from any supported source, with a report.

The seeds' best practice, "filter larger datasets to keep only high-quality examples or ones related to your use
case", as one step in the data path: read (any format, compressed, HH-RLHF text, scored completions paired),
validate, then drop, each counted by reason with its source row: invalid rows, exact duplicates, optionally
prompt-level duplicates, rows whose prompt does (``keep``) or does not (``drop``) match a regular expression, and
rows longer than the length limits under the model's chat template. The rows that remain are written as
conversations (``prompt`` / ``chosen`` / ``rejected`` messages), which ``prefalign train`` reads with no further
options; with a held-out file, a seeded, prompt-disjoint part of them goes there instead (``split_prepared``). The
output and its report appear whole (a temporary file, then a rename) or not at all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .format import to_example
from .load import read_valid_rows, skipped_entries
from .tokenize import TokenizeSettings, has_chat_template, tokenize_example


@dataclass
class PrepareSettings:
    """What ``prepare`` keeps. ``keep`` / ``drop``: regular expressions searched in the prompt's text."""

    columns: dict[str, str] | None = None
    split: str = "train"
    text_format: str = "auto"
    pairing: str = "best_worst"
    min_score_margin: float = 0.0
    seed: int = 0
    dedupe_prompts: bool = False
    keep: str | None = None
    drop: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None


@dataclass
class PrepareReport:
    """Counts and source rows of everything ``prepare`` read, converted, paired, dropped and wrote."""

    source: str
    output: str = ""
    rows_read: int = 0
    converted_from: str | None = None
    pairing: dict[str, Any] | None = None
    written: int = 0
    dropped: dict[str, list[Any]] = field(default_factory=dict)  # reason -> source rows (invalid: with why)
    split: dict[str, Any] | None = None  # with a held-out file: which part this is, both parts' rows, the seed

    def drop(self, reason: str, item: Any) -> None:
        self.dropped.setdefault(reason, []).append(item)

    def line(self) -> str:
        parts = [f"{self.rows_read} rows read"]
        if self.converted_from:
            parts.append(f"converted from {self.converted_from}")
        if self.pairing:
            parts.append(f"{self.pairing['pairs']} pairs from {self.pairing['rows']} scored rows")
        parts += [f"{len(v)} dropped ({k})" for k, v in self.dropped.items()]
        if self.split:
            return ", ".join(parts) + (f"; {self.split['train']} written to {self.output}, {self.split['heldout']} "
                                       f"held out (prompt-disjoint, seed {self.split['seed']}) to "
                                       f"{self.split['heldout_output']}")
        return ", ".join(parts) + f"; {self.written} written to {self.output}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "output": self.output, "rows_read": self.rows_read,
                "converted_from": self.converted_from, "pairing": self.pairing, "written": self.written,
                "dropped": {k: len(v) for k, v in self.dropped.items()}, "dropped_rows": self.dropped,
                **({"split": self.split} if self.split else {})}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content", "")) for m in value or [])


def _regex(pattern: str | None, name: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--{name} {pattern!r} is not a regular expression ({e}). Fix: escape special "
                          "characters, e.g. 'C\\+\\+'") from None


def prepare_rows(source: Any, settings: PrepareSettings, tokenizer: Any = None
                 ) -> tuple[list[dict[str, Any]], PrepareReport]:
    """The cleaned conversational rows (each with its ``source_row``) and the report; nothing is written."""
    keep, drop = _regex(settings.keep, "keep"), _regex(settings.drop, "drop")
    limits = settings.max_length is not None or settings.max_prompt_length is not None
    if limits and tokenizer is None:
        raise ConfigError("length limits need the model's tokenizer. Fix: pass --model")
    raw, _ = read_valid_rows(source, settings.split, settings.columns, text_format=settings.text_format,
                             on_invalid_row="skip", pairing=settings.pairing,
                             min_score_margin=settings.min_score_margin, seed=settings.seed)
    report = PrepareReport(raw.source, rows_read=raw.rows_read, converted_from=raw.converted_from,
                           pairing=raw.pairing)
    for entry in skipped_entries(raw):
        report.drop("invalid", entry)
    chat = tokenizer is None or has_chat_template(tokenizer)
    tok_settings = TokenizeSettings(max_length=None, max_prompt_length=None, chat=chat)
    seen_pairs: set[str] = set()
    seen_prompts: set[str] = set()
    out = []
    for row, n in zip(raw.rows, raw.row_numbers, strict=True):
        ex = to_example(row, chat=True, row_number=n, source=raw.source, row_label=raw.row_label)
        key = json.dumps([ex.prompt, ex.chosen, ex.rejected], sort_keys=True)
        prompt_key = json.dumps(ex.prompt, sort_keys=True)
        prompt_text = _text([m for m in ex.prompt if m["role"] != "system"])
        if key in seen_pairs:
            report.drop("duplicate", n)
            continue
        if settings.dedupe_prompts and prompt_key in seen_prompts:
            report.drop("duplicate prompt", n)
            continue
        if keep is not None and not keep.search(prompt_text):
            report.drop("no match for --keep", n)
            continue
        if drop is not None and drop.search(prompt_text):
            report.drop("matched --drop", n)
            continue
        if limits:
            try:
                ids = tokenize_example(ex, tokenizer, tok_settings, row=n, source=raw.source,
                                       row_label=raw.row_label)
            except DataError as e:
                report.drop("invalid", {"row": n, "field": e.field, "reason": e.message})
                continue
            prompt_len = len(ids["prompt_ids"])
            longest = prompt_len + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
            if ((settings.max_prompt_length is not None and prompt_len > settings.max_prompt_length)
                    or (settings.max_length is not None and longest > settings.max_length)):
                report.drop("longer than the length limits", n)
                continue
        seen_pairs.add(key)
        seen_prompts.add(prompt_key)
        kwargs = {"chat_template_kwargs": dict(ex.chat_template_kwargs)} if ex.chat_template_kwargs else {}
        out.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected, **kwargs, "source_row": n})
    report.written = len(out)
    return out, report


def split_prepared(rows: Sequence[dict[str, Any]], report: PrepareReport, size: Any, seed: int, heldout: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], PrepareReport, PrepareReport]:
    """``(train, heldout, train_report, heldout_report)``: ``size`` rows (a fraction or a count) held out with
    ``seed``, prompt-disjoint (rows opening with the same user message stay together, `mixture.held_out_indices`)."""
    from .mixture import held_out_indices

    test = held_out_indices(rows, size, seed, "--heldout-size")
    train = [r for i, r in enumerate(rows) if i not in test]
    held = [r for i, r in enumerate(rows) if i in test]
    split = {"train": len(train), "heldout": len(held), "seed": seed, "heldout_output": str(heldout),
             "by": "the conversation's opening user message"}
    return (train, held, replace(report, written=len(train), split={"part": "train", **split}),
            replace(report, written=len(held), split={"part": "heldout", **split}))


def write_prepared(rows: Sequence[dict[str, Any]], report: PrepareReport, output: str | os.PathLike) -> Path:
    """Write the rows (JSON Lines) and ``<output>.report.json``, each through a temporary file and a rename."""
    path = Path(output)
    report.output = str(path)
    report_path = path.with_name(path.name + ".report.json")
    texts = {path: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
             report_path: json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"}
    tmps = {p: p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in texts}
    try:
        for p, text in texts.items():
            tmps[p].write_text(text, encoding="utf-8")
        for p in reversed(texts):  # the data file last: it appears only once its report is there
            os.replace(tmps[p], p)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
    return report_path
