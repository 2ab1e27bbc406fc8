"""Check a preference dataset without training: every problem row, its format, token lengths and truncation.

:func:`check_dataset` is what ``prefalign data check`` prints. Where `load_preference_dataset` stops at the first
fatal problem, this reads on and lists them all: unreadable lines (`read_rows` with ``collect_errors``), rows that
fail validation (`validate_rows`), and, given a tokenizer, rows that fail tokenisation or whose prompt leaves no
room for a reply under ``max_length``. It also measures token lengths under the tokenizer's chat template, before
truncation, and lists the rows ``max_length`` / ``max_prompt_length`` would cut.

Every row number is the loader's: the line number for JSON Lines ("line N", blank lines counted), the data row
otherwise. (The trainer's own tokenisation report numbers the rows of the loaded dataset 1..n instead; the two
differ only for JSON Lines files with blank or unreadable lines.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError, DataError, PrefalignError, one_line, row_list
from .format import detect_format, to_example
from .load import (
    PREFERENCE_ROWS,
    Problem,
    RawData,
    convert_published_formats,
    map_columns,
    pair_scored_rows,
    read_rows,
    sharegpt_to_chatml,
    source_name,
    validate_rows,
)
from .tokenize import TokenizeSettings, has_chat_template, token_ids, tokenize_example, truncate

LENGTH_PARTS = ("prompt", "chosen", "rejected", "prompt+longest reply")
PERCENTILES = (50, 90, 99)


@dataclass
class Finding:
    """One problem, rendered with its location; ``fatal`` ones would stop training."""

    row: int | None
    text: str
    fatal: bool = True


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``lengths`` and ``cut`` hold row numbers in the loader's numbering."""

    source: str
    settings: TokenizeSettings
    tokenizer_name: str | None = None  # None: no tokenizer given, token lengths and truncation not measured
    kind: str = ""
    row_label: str = "row"
    rows: int = 0  # rows read, unreadable ones included
    format: str | None = None
    chat_template: bool | None = None
    text_format: str = "auto"
    pairing: str = "best_worst"
    min_score_margin: float = 0.0
    converted_from: str | None = None  # a published format the rows were converted from
    findings: list[Finding] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in LENGTH_PARTS})
    # Row numbers: prompt cut (max_prompt_length), a reply cut (max_length), rejected (prompt leaves no room).
    cut: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "reply": [], "no_room": []})
    # rows trained with the prompt split at the longest common token prefix: {"row", "field"} (see data/tokenize.py)
    rerendered: list[dict[str, Any]] = field(default_factory=list)
    # unpaired rows (KTO): label types over all rows, class balance over the valid ones, TRL's weight warning
    labels: dict[str, Any] | None = None
    sft_kind: str | None = None  # SFT rows (data/sft.py): text, messages, prompt_completion or preference

    @property
    def measured(self) -> bool:
        """Whether token lengths and truncation were measured (a tokenizer was given)."""
        return self.tokenizer_name is not None

    @property
    def ok(self) -> bool:
        """True if training would accept the data (warnings such as duplicates do not count)."""
        return not any(f.fatal for f in self.findings)

    @property
    def skipped_rows(self) -> list[int]:
        """The rows a run with on_invalid_row=skip would leave out (those with an error)."""
        return sorted({f.row for f in self.findings if f.fatal and f.row is not None})

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.fatal]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.fatal]

    def add_error(self, err: DataError, row: int | None = None) -> None:
        """Record a DataError; ``row`` locates one raised without a row (as tokenisation errors are here)."""
        text = one_line(err)
        if row is not None:
            text = f"{self.row_label} {row}, {text}" if err.field else f"{self.row_label} {row}: {text}"
        self.findings.append(Finding(row, text))

    def add_problem(self, problem: Problem) -> None:
        text = one_line(problem.as_error("", self.row_label))
        self.findings.append(Finding(problem.row, text, problem.fatal))

    def length_stats(self) -> dict[str, dict[str, int] | None]:
        """``{part: {"p50", "p90", "p99", "max"}}`` of the token lengths (None for a part with no measured row)."""
        return {part: ({f"p{p}": percentile(v, p) for p in PERCENTILES} | {"max": max(v)}) if v else None
                for part, v in self.lengths.items()}

    def render_text(self) -> str:
        fatal, warnings = self.errors, self.warnings
        bad_rows = {f.row for f in fatal if f.row is not None}
        s, label = self.settings, self.row_label
        lines = [f"source: {self.source}" + (f" ({self.kind})" if self.kind else ""),
                 f"format: {self.format or 'unknown (no valid row)'}",
                 f"rows: {self.rows} read, {self.rows - len(bad_rows)} without errors, "
                 f"{len(fatal)} error(s), {len(warnings)} warning(s)"]
        if self.labels is not None:
            b = self.labels
            types = ", ".join(f"{k} {v}" for k, v in b["label_types"].items())
            lines.append(f"labels: {b['desirable']} desirable (true), {b['undesirable']} undesirable (false) among "
                         f"rows without errors; label types over all rows: {types}")
            if b["weight_warning"]:
                lines.append(f"weights: {b['weight_warning']}")
        if not self.measured:
            lines.append("tokenizer: none given; token lengths and truncation not measured")
        else:
            lines.append(f"tokenizer: {self.tokenizer_name} (chat template: {'yes' if self.chat_template else 'no'})")
            stats = self.length_stats()
            first = next(iter(self.lengths.values()))
            if first:
                lines.append(f"token lengths over {len(first)} rows, before truncation:")
                lines.append(f"  {'':<22}" + "".join(f"{h:>8}" for h in [*(f"p{p}" for p in PERCENTILES), "max"]))
                for part, row in stats.items():
                    lines.append(f"  {part:<22}" + "".join(f"{c:>8}" for c in (row or {}).values()))
            cut = self.cut
            if self.sft_kind is not None:
                lines.append(f"truncation at max_length={s.max_length}: {len(cut['reply'])} sequence(s) cut"
                             f"{_shown_rows(cut['reply'], label)}, {len(cut['no_room'])} row(s) rejected (no loss "
                             f"token left){_shown_rows(cut['no_room'], label)}")
            else:
                lines.append(f"truncation at max_length={s.max_length}, max_prompt_length={s.max_prompt_length}: "
                             f"{len(cut['prompt'])} prompt(s) cut{_shown_rows(cut['prompt'], label)}, "
                             f"{len(cut['reply'])} row(s) with a reply cut{_shown_rows(cut['reply'], label)}, "
                             f"{len(cut['no_room'])} row(s) rejected (prompt leaves no room)"
                             f"{_shown_rows(cut['no_room'], label)}")
            if self.rerendered:
                shown = ", ".join(f"{r['row']} ({r['field']})" for r in self.rerendered[:10]) + (
                    " ..." if len(self.rerendered) > 10 else "")
                lines.append(f"prompt split: {len({r['row'] for r in self.rerendered})} row(s) whose templated "
                             "prompt is not a token prefix of prompt + reply (the chat template renders it "
                             "differently alone, or tokens merge at the boundary) are trained from the longest "
                             f"common prefix, as TRL >= 1.14: {label}s {shown}")
        if self.findings:
            lines.append(f"problems ({len(fatal)} error(s), {len(warnings)} warning(s)):")
            lines += [f"  {'error' if f.fatal else 'warning'}: {f.text}" for f in self.findings]
        skip = self.skipped_rows
        lines.append("result: OK, training would accept this data" if self.ok else
                     f"result: {len(fatal)} error(s); training would stop at the first. Fix or drop those rows"
                     + (f", or train with on_invalid_row: skip, which would skip {len(skip)} row(s)"
                        f"{_shown_rows(skip, label)}." if skip else "."))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what :meth:`to_json` writes); token fields are None when not measured."""
        measured = self.measured
        return {"source": self.source, "kind": self.kind, "format": self.format, "rows": self.rows,
                "row_label": self.row_label, "model": self.tokenizer_name, "chat_template": self.chat_template,
                "max_length": self.settings.max_length, "max_prompt_length": self.settings.max_prompt_length,
                "token_lengths": self.length_stats() if measured else None,
                "prompt_cut_rows": self.cut["prompt"] if measured else None,
                "reply_cut_rows": self.cut["reply"] if measured else None,
                "no_room_rows": self.cut["no_room"] if measured else None,
                "prompt_rerendered_rows": self.rerendered if measured else None,
                "problems": [{"row": f.row, "severity": "error" if f.fatal else "warning", "message": f.text}
                             for f in self.findings],
                "skip_would_leave_out_rows": self.skipped_rows,
                "labels": self.labels,
                "ok": self.ok}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _shown_rows(rows: Sequence[int], label: str) -> str:
    if not rows:
        return ""
    return f" ({label}s {row_list(rows)})"


def check_settings(max_length: int | None = 1024, max_prompt_length: int | None = None) -> TokenizeSettings:
    """Tokenisation settings for a check, validated by the config class so the rules live in one place.

    Raises `ConfigError` for values training would refuse (``max_length`` < 2, ``max_prompt_length`` >=
    ``max_length``, ...). Imports transformers (the config classes extend ``TrainingArguments``).
    """
    from ..config import PreferenceConfig

    try:
        PreferenceConfig(output_dir="unused", max_length=max_length, max_prompt_length=max_prompt_length,
                         use_cpu=True, report_to="none")
    except PrefalignError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid options: {one_line(e)}") from None
    chat = next(f.default for f in fields(PreferenceConfig) if f.name == "chat_template_for_text")
    return TokenizeSettings(max_length=max_length, max_prompt_length=max_prompt_length, chat=chat)


def _read(source: Any, split: str, report: CheckReport) -> RawData | None:
    """Rows as read; unreadable ones and file-level errors go into the report (None: nothing could be read)."""
    unreadable: list[Problem] = []
    try:
        raw = read_rows(source, split, collect_errors=unreadable)
    except DataError as err:
        report.add_error(err)
        return None
    report.source, report.kind, report.row_label = raw.source, raw.kind, raw.row_label
    report.rows = len(raw.rows) + len(unreadable)
    for problem in unreadable:
        report.add_problem(problem)
    return raw


def _validate(raw: RawData, columns: Mapping[str, str] | None,
              report: CheckReport) -> list[tuple[int, dict[str, Any]]]:
    """Rows without fatal problems, as (row number, row); every problem goes into the report."""
    from .sft import SFT_ROWS, row_kind
    from .unpaired import UNPAIRED_ROWS

    raw = sharegpt_to_chatml(raw, columns)
    present = {c for c in ("completion", "label", "chosen", "text", "messages", "input_ids")
               if (columns or {}).get(c, c) in raw.columns}
    unpaired = {"completion", "label"} <= present
    sft = not unpaired and "chosen" not in present and bool(present & {"text", "messages", "completion",
                                                                        "input_ids"})
    schema = UNPAIRED_ROWS if unpaired else SFT_ROWS if sft else PREFERENCE_ROWS
    try:
        raw = map_columns(pair_scored_rows(raw, report.pairing, report.min_score_margin), columns, schema)
        raw, problems = convert_published_formats(raw, report.text_format)
    except DataError as err:
        report.add_error(err)
        return []
    report.converted_from = raw.converted_from
    if raw.pairing:
        p = raw.pairing
        report.converted_from = (f"{p['format']} scored completions paired {report.pairing} ({p['rows']} rows → "
                                 f"{p['pairs']} pairs; {p['ties']} ties, {p['below_margin']} below "
                                 f"min_score_margin, {p['too_few']} with fewer than two scored completions left out)")
    problems = problems + (validate_rows(raw) if schema is PREFERENCE_ROWS else schema.validate(raw))
    for problem in problems:
        report.add_problem(problem)
    bad = {p.row for p in problems if p.fatal}
    kept = [(n, r) for n, r in zip(raw.row_numbers, raw.rows, strict=True) if n not in bad]
    if sft:
        report.sft_kind = next((row_kind(r) for _, r in kept), None)
    if unpaired:
        _label_report(raw, kept, report)
        # measured as pairs whose two replies are the completion (format, tokenisation and truncation are the same)
        kept = [(n, {**r, "chosen": r["completion"], "rejected": r["completion"]}) for n, r in kept]
    return kept


def _label_report(raw: RawData, kept: Sequence[tuple[int, dict[str, Any]]], report: CheckReport) -> None:
    """Unpaired rows: the label types of every row, the class balance of the valid ones, and TRL's warning for
    KTO's default weights (desirable_weight = undesirable_weight = 1) when the classes are unbalanced."""
    from collections import Counter

    from .load import _type_name
    from .unpaired import unpair_rows, weight_advice

    types = Counter("boolean" if isinstance(r.get("label"), bool) else _type_name(r.get("label")) for r in raw.rows)
    labels = [r["label"] for r in unpair_rows(replace(raw, rows=[r for _, r in kept])).rows]
    desirable = sum(1 for v in labels if v)
    report.labels = {"desirable": desirable, "undesirable": len(labels) - desirable, "label_types": dict(types),
                     "weight_warning": weight_advice(desirable, len(labels) - desirable) if labels else None}


def _measure_sft(rows: Sequence[tuple[int, dict[str, Any]]], tokenizer: Any, report: CheckReport) -> None:
    """SFT rows: sequence and loss-token lengths (before truncation), and what max_length would cut or reject."""
    from .sft import SFTTokenizeSettings, tokenize_sft_row

    s = report.settings
    report.lengths = {"sequence": [], "loss tokens": []}
    kw = s.chat_template_kwargs
    whole = SFTTokenizeSettings(max_length=None, chat=s.chat, chat_template_kwargs=kw)
    limited = SFTTokenizeSettings(max_length=s.max_length, max_prompt_length=s.max_prompt_length, chat=s.chat,
                                  chat_template_kwargs=kw)
    for n, row in rows:
        rerendered: list[str] = []
        try:
            example, _ = tokenize_sft_row(row, tokenizer, whole, rerendered=rerendered)
        except DataError as err:
            report.add_error(err, n)
            continue
        report.rerendered.extend({"row": n, "field": f} for f in rerendered)
        report.lengths["sequence"].append(len(example["input_ids"]))
        report.lengths["loss tokens"].append(sum(example["loss_mask"]))
        try:
            _, cut = tokenize_sft_row(row, tokenizer, limited)
        except DataError as err:  # nothing left to train on under max_length
            report.add_error(err, n)
            report.cut["no_room"].append(n)
            continue
        if cut:
            report.cut["reply"].append(n)


def _measure(rows: Sequence[tuple[int, dict[str, Any]]], tokenizer: Any, report: CheckReport) -> None:
    """Token lengths (before truncation) and what the settings would cut or reject, per row."""
    if report.sft_kind is not None:
        _measure_sft(rows, tokenizer, report)
        return
    settings = report.settings
    chat = settings.chat and bool(report.chat_template)
    for n, row in rows:
        rerendered: list[str] = []
        try:
            pair = token_ids(row, tokenizer, row=n) if row.get("chosen_ids") is not None else tokenize_example(
                to_example(row, chat=chat), tokenizer, settings, rerendered=rerendered)
        except DataError as err:
            report.add_error(err, n)
            continue
        report.rerendered.extend({"row": n, "field": f} for f in rerendered)
        lp, lc, lr = (len(pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        for part, length in zip(LENGTH_PARTS, (lp, lc, lr, lp + max(lc, lr)), strict=True):
            report.lengths[part].append(length)
        try:
            _, cut = truncate(pair, settings)
        except DataError as err:  # the prompt leaves no room for a reply: training would refuse the row
            report.add_error(err, n)
            report.cut["no_room"].append(n)
            continue
        if "prompt" in cut:
            report.cut["prompt"].append(n)
        if cut & {"chosen", "rejected"}:
            report.cut["reply"].append(n)


def check_dataset(
    source: str | os.PathLike | Any,
    *,
    tokenizer: Any = None,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    tokenizer_name: str | None = None,
    text_format: str = "auto",
    pairing: str = "best_worst",
    min_score_margin: float = 0.0,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> CheckReport:
    """Check a preference dataset as training would read it, listing every problem instead of the first.

    ``source``, ``split`` and ``columns`` are as for `load_preference_dataset`. With a ``tokenizer``, rows are
    tokenised as training would (chat template included) to measure token lengths and count what ``max_length`` /
    ``max_prompt_length`` (validated by `PreferenceConfig`'s rules; the defaults are its defaults) would cut or
    reject; ``tokenizer=None`` skips that. ``tokenizer_name`` labels the tokenizer in the report (default: its
    ``name_or_path``). ``chat_template_kwargs``: the run's (a row's own are merged over them).

    Problems with the data never raise: they are findings in the report (``report.ok`` says whether training would
    accept the data). Invalid ``max_length`` / ``max_prompt_length`` raise `ConfigError`.
    """
    settings = check_settings(max_length, max_prompt_length)
    settings.chat_template_kwargs = chat_template_kwargs
    report = CheckReport(source_name(source), settings, text_format=text_format, pairing=pairing,
                         min_score_margin=min_score_margin)
    if tokenizer is not None:
        report.tokenizer_name = tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        report.chat_template = has_chat_template(tokenizer)
    raw = _read(source, split, report)
    if raw is not None:
        rows = _validate(raw, columns, report)
        if rows and report.sft_kind is not None:
            report.format = f"SFT rows: {report.sft_kind.replace('_', ' + ')}"
        elif rows and rows[0][1].get("chosen_ids") is not None:
            report.format = "pre-tokenized pairs (prompt_ids, chosen_ids, rejected_ids)"
        elif rows:
            report.format = detect_format(rows[0][1]).describe()
            if report.converted_from:
                report.format = f"{report.converted_from}, converted to {report.format}"
        if tokenizer is not None:
            _measure(rows, tokenizer, report)
        if report.labels is not None:  # unpaired: one reply per row
            report.lengths = {"prompt": report.lengths["prompt"], "completion": report.lengths["chosen"],
                              "prompt+completion": report.lengths["prompt+longest reply"]}
            if report.format:
                report.format = "unpaired (prompt, completion, label), " + report.format.split(", ", 1)[0]
    report.findings.sort(key=lambda f: (f.row is not None, f.row or 0))
    return report
