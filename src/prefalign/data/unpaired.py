"""Unpaired feedback rows for KTO: ``prompt`` + ``completion`` + ``label`` (true: desirable, false: undesirable).

The same line as pairs, with its own schema (`UNPAIRED_ROWS`, read and validated by data/load.py): rows are read,
validated once, and preference pairs (``prompt``, ``chosen``, ``rejected``, after HH-RLHF conversion and scored
pairing) become two unpaired rows each that keep the pair's source row number (`unpair_rows`; TRL's
``unpair_preference_dataset`` order, so the numbers match TRL's). Tokenisation reuses data/tokenize.py
(`tokenize_replies`, `truncate`); each row also gets its **KL completion**: the completion of the row before it in
its chunk of ``per_device_train_batch_size`` rows (the first gets the chunk's last), as TRL 1.13's KTOTrainer. That
pairs the row's own prompt with another prompt's completion, the mismatched pair KTO's reference point is estimated
from. Token rows are stored in the pair layout's names so every collator, the fast path and the reference cache work
unchanged: ``chosen_ids`` is the completion, ``rejected_ids`` the KL completion (empty when no KL term is used).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import DataError, row_list
from .format import is_messages, to_example
from .load import (
    _ALIASES,
    Problem,
    RawData,
    RowSchema,
    _check_messages,
    _type_name,
    as_dataset,
    log_kept,
    read_valid_rows,
    template_kwargs_problems,
    tools_problems,
    validate_rows,
)
from .tokenize import (
    TokenizeReport,
    TokenizeSettings,
    has_chat_template,
    template_kwargs,
    tokenize_replies,
    truncate,
)

logger = logging.getLogger("prefalign")

UNPAIRED_COLUMNS = ("prompt", "completion", "label", "system", "chosen", "rejected", "chat_template_kwargs",
                    "tools")
UNPAIRED_ALIASES = {**_ALIASES, "completion": ("response", "output", "answer", "generation"),
                    "label": ("desirable", "thumbs_up", "is_good", "kto_label", "feedback")}
_LABEL_FIX = "write label as true (desirable) or false (undesirable), the JSON booleans"
_CSV_LABELS = {"true": True, "false": False}  # CSV has no booleans: its text true / false are read as them
UNPAIR_BLOCK = 1000  # TRL's unpair_preference_dataset: a batched map of 1000 pairs, chosen rows then rejected rows


def is_paired(raw: RawData) -> bool:
    """Whether the rows are preference pairs (to be split) rather than unpaired rows."""
    return not {"completion", "label"} <= set(raw.columns) and {"chosen", "rejected"} <= set(raw.columns)


def _label(value: Any, kind: str) -> bool | None:
    if isinstance(value, bool):
        return value
    if kind == "csv" and isinstance(value, str):
        return _CSV_LABELS.get(value.strip().lower())
    return None


def validate_unpaired(raw: RawData) -> list[Problem]:
    """Every problem in every row: preference pairs as pairs (validate_rows); unpaired rows: a prompt, a text or
    message completion (empty: a warning), a boolean label, one format across rows; duplicates and the same
    completion labelled both ways are warnings."""
    if is_paired(raw):
        return validate_rows(raw)
    problems: list[Problem] = []
    seen: dict[str, tuple[int, bool]] = {}
    first_kind: tuple[int, bool] | None = None
    for r, n in zip(raw.rows, raw.row_numbers, strict=True):
        row_problems: list[Problem] = []
        for name in ("prompt", "completion", "system"):
            v = r.get(name)
            if v is None:
                if name != "system":
                    row_problems.append(Problem(n, name, "is missing." if name not in r else "is null.",
                                                f"give the {name}" + (" the completion answers" if name == "prompt"
                                                                      else "") + ", or drop the row"))
                continue
            if isinstance(v, str):
                if name == "completion" and not v.strip():
                    row_problems.append(Problem(n, name, "is empty; trained on as an empty reply (its end-of-turn "
                                                "token).", "write the completion, or drop the row", fatal=False))
            elif is_messages(v) and name != "system":
                row_problems.extend(_check_messages(v, n, name))
            else:
                want = "text" if name == "system" else "text or a list of {role, content} messages"
                row_problems.append(Problem(n, name, f"is {_type_name(v)}; expected {want}.",
                                            f"store {name} as {want}"))
        if "label" not in r or r["label"] is None:
            row_problems.append(Problem(n, "label", "is missing." if "label" not in r else "is null.", _LABEL_FIX))
        elif _label(r["label"], raw.kind) is None:
            v = r["label"]
            shown = f"the text {v!r}" if isinstance(v, str) else f"{_type_name(v)} ({json.dumps(v)})" \
                if isinstance(v, (int, float)) else _type_name(v)
            row_problems.append(Problem(n, "label", f"is {shown}; expected true (desirable) or false (undesirable).",
                                        _LABEL_FIX + (" (in CSV: the text true or false)" if raw.kind == "csv"
                                                      else ", not text or numbers")))
        row_problems.extend(template_kwargs_problems(r, n) + tools_problems(r, n))
        if not any(p.fatal for p in row_problems):
            if is_messages(r["prompt"]) and not is_messages(r["completion"]):
                row_problems.append(Problem(n, None, "mixes a message-list prompt with a text completion.",
                                            "use text everywhere or messages everywhere in a row"))
        if not any(p.fatal for p in row_problems):
            is_msgs = is_messages(r["completion"])
            if first_kind is None:
                first_kind = (n, is_msgs)
            elif is_msgs != first_kind[1]:
                kinds = ("text", "messages") if first_kind[1] else ("messages", "text")
                row_problems.append(Problem(n, "completion", f"is {kinds[0]} but {raw.row_label} {first_kind[0]} "
                                            f"is {kinds[1]}; a dataset must use one format.",
                                            "convert all rows to text or all rows to messages"))
        if not any(p.fatal for p in row_problems):
            key = json.dumps([r.get("system"), r["prompt"], r["completion"]], sort_keys=True)
            label = bool(_label(r["label"], raw.kind))
            if key in seen:
                other, other_label = seen[key]
                text = f"duplicates {raw.row_label} {other}." if other_label == label else (
                    f"duplicates {raw.row_label} {other} with the opposite label (labelled both ways).")
                row_problems.append(Problem(n, None, text, "deduplicate, or decide which label is right",
                                            fatal=False))
            else:
                seen[key] = (n, label)
        problems.extend(row_problems)
    return problems


UNPAIRED_ROWS = RowSchema("unpaired", UNPAIRED_COLUMNS, (("completion", "label"), ("chosen", "rejected")),
                          validate_unpaired, UNPAIRED_ALIASES,
                          "unpaired rows with prompt, completion and label fields (or preference pairs)")


def unpair_rows(raw: RawData) -> RawData:
    """Validated rows as unpaired rows. Preference pairs become a desirable row (the chosen reply) and an
    undesirable one (the rejected reply), both with the pair's source row number, in TRL's order (per block of 1000
    pairs: the chosen rows, then the rejected rows); an implicit prompt (shared by chosen and rejected) is split off
    first, as for DPO. CSV labels (text) become booleans. Unpaired rows are otherwise returned as they are."""
    if not is_paired(raw):
        if raw.kind != "csv":
            return raw
        rows = [{**r, "label": _label(r["label"], "csv")} for r in raw.rows]
        return replace(raw, rows=rows, skipped=list(raw.skipped))
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    for start in range(0, len(raw.rows), UNPAIR_BLOCK):
        block = list(zip(raw.rows[start:start + UNPAIR_BLOCK], raw.row_numbers[start:start + UNPAIR_BLOCK],
                         strict=True))
        split = [(_split_prompt(r, n, raw), n) for r, n in block]
        for label, part in ((True, "chosen"), (False, "rejected")):
            for r, n in split:
                rows.append({"prompt": r["prompt"], "completion": r[part], "label": label,
                             **{k: r[k] for k in ("system", "chat_template_kwargs", "tools") if r.get(k) is not None}})
                numbers.append(n)
    note = f"preference pairs, each split into a desirable and an undesirable row ({len(raw.rows)} pairs → " \
           f"{len(rows)} rows)"
    converted = f"{raw.converted_from}; {note}" if raw.converted_from else note
    columns = ["prompt", "completion", "label"] + [k for k in ("system", "chat_template_kwargs", "tools")
                                                   if any(k in r for r in rows)]
    logger.info("%s: %s", raw.source, note)
    return replace(raw, rows=rows, row_numbers=numbers, columns=columns, converted_from=converted,
                   skipped=list(raw.skipped))


def _split_prompt(row: Mapping[str, Any], number: int, raw: RawData) -> dict[str, Any]:
    """A pair with its prompt explicit: an implicit one (the shared start of chosen and rejected) split off by
    data/format.py's rule, as TRL's extract_prompt."""
    if row.get("prompt") not in (None, [], ""):
        return dict(row)
    ex = to_example({"chosen": row["chosen"], "rejected": row["rejected"]}, chat=False, row_number=number,
                    source=raw.source, row_label=raw.row_label)
    return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected, "system": row.get("system")}


@dataclass
class UnpairedReport(TokenizeReport):
    """TokenizeReport for unpaired rows: ``chosen_truncated`` lists the completions cut, ``kl_truncated`` the KL
    completions (another row's completion after this row's prompt) cut to fit; plus the class balance."""

    desirable: int = 0
    undesirable: int = 0
    kl_truncated: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [line.replace("chosen replies", "completions") for line in super().lines()]
        if self.kl_truncated:
            out.append(f"{len(self.kl_truncated)} of {self.rows} KL completions (another row's completion after "
                       f"this row's prompt) cut to max_length (rows {row_list(self.kl_truncated)})")
        return out


def tokenize_unpaired(rows: Sequence[dict[str, Any]], tokenizer: Any, settings: TokenizeSettings, *,
                      kl_chunk: int | None, source: str | None = None, row_numbers: Sequence[int] | None = None,
                      row_label: str = "row", skip_invalid: bool = False) -> tuple[list[dict[str, Any]],
                                                                                    UnpairedReport]:
    """Token rows ``{prompt_ids, chosen_ids (the completion), rejected_ids (the KL completion), label}``.

    The chat template and truncation are the pairs' (data/tokenize.py): the completion is cut to fit ``max_length``
    after its prompt; a prompt leaving no room is an error (or, with ``skip_invalid``, a skipped row listed with
    its ``index`` in ``report.skipped``). ``kl_chunk``: rows per KL chunk (``per_device_train_batch_size``; None: no
    KL completions). The rotation happens after rows are skipped and before truncation, so each KL completion is
    cut against its own row's prompt, as TRL's collator does."""
    chat = settings.chat and has_chat_template(tokenizer)
    report = UnpairedReport(rows=len(rows))
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    kept: list[tuple[int, dict[str, Any], bool]] = []  # (source row, untruncated ids, label)
    for i, (r, n) in enumerate(zip(rows, numbers, strict=True)):
        where = {"source": source, "row": n, "row_label": row_label}
        try:
            ex = to_example({"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"],
                             "system": r.get("system"), "chat_template_kwargs": r.get("chat_template_kwargs"),
                             "tools": r.get("tools")},
                            chat=chat, row_number=n, source=source, row_label=row_label)
            rerendered: list[str] = []
            ids = tokenize_replies(ex.prompt, {"chosen": ex.chosen}, ex.conversational, tokenizer,
                                   fields={"chosen": "completion"}, rerendered=rerendered,
                                   template_kwargs=template_kwargs(settings.chat_template_kwargs,
                                                                   ex.chat_template_kwargs, ex.tools), **where)
            if not ids["prompt_ids"]:
                raise DataError("the prompt tokenizes to no tokens, so nothing predicts the completion's first "
                                "token.", **where, field="prompt",
                                fix="give a prompt, or use a tokenizer that adds a BOS token or a chat template")
            truncate({**ids, "rejected_ids": []}, settings, **where)  # a prompt leaving no room raises here
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped.append({"row": n, "field": e.field, "reason": e.message, "index": i})
            continue
        kept.append((n, ids, bool(r["label"])))
        report.prompt_rerendered.extend({"row": n, "field": f} for f in rerendered)
    completions = [ids["chosen_ids"] for _, ids, _ in kept]
    kl = kl_completions(completions, kl_chunk) if kl_chunk else [[] for _ in kept]
    out = []
    for (n, ids, label), kl_ids in zip(kept, kl, strict=True):
        pair, cut = truncate({**ids, "rejected_ids": kl_ids}, settings, row=n, source=source, row_label=row_label)
        for name, rows_cut in (("prompt", report.prompt_truncated), ("chosen", report.chosen_truncated),
                               ("rejected", report.kl_truncated)):
            if name in cut:
                rows_cut.append(n)
        out.append({**pair, "label": label})
        report.desirable += label
        report.undesirable += not label
    return out, report


def kl_completions(completions: Sequence[list[int]], chunk: int) -> list[list[int]]:
    """Each row's KL completion: the previous row's completion within its chunk of ``chunk`` rows, the chunk's
    first row taking its last: ``(x1, y1) ... (xn, yn) → (x1, yn), (x2, y1), ..., (xn, yn-1)`` (TRL 1.13)."""
    out: list[list[int]] = []
    for start in range(0, len(completions), chunk):
        block = list(completions[start:start + chunk])
        out.extend(block[-1:] + block[:-1])
    return out


def weight_advice(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> str | None:
    """TRL's check on the class balance: with unequal counts, ``desirable_weight · n_D / (undesirable_weight · n_U)``
    should lie in [1, 4/3] (the KTO paper, Eq. 8). Returns the warning (with the ranges that would satisfy it), or
    None when the counts are equal or either weight is in its range. Counts of 0 count as 1, as in TRL."""
    n_d, n_u = max(desirable, 1), max(undesirable, 1)
    if n_d == n_u:
        return None
    d_lo, d_hi = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_lo <= desirable_weight <= d_hi or u_lo <= undesirable_weight <= u_hi:
        return None
    return (f"{desirable} desirable and {undesirable} undesirable rows, but desirable_weight={desirable_weight} and "
            f"undesirable_weight={undesirable_weight} are outside the KTO paper's recommended range (Eq. 8); set "
            f"EITHER desirable_weight in [{d_lo}, {d_hi}] OR undesirable_weight in [{u_lo}, {u_hi}] (not both)")


def load_unpaired_dataset(source: str | os.PathLike | Any, split: str = "train",
                          columns: Mapping[str, str] | None = None, *, text_format: str = "auto",
                          on_invalid_row: str = "error", pairing: str = "best_worst", min_score_margin: float = 0.0,
                          seed: int = 0, config: str | None = None) -> Any:
    """Load unpaired feedback as a `datasets.Dataset` with columns prompt / completion / label (and system).

    As `load_preference_dataset` (same sources, column mapping, HH-RLHF conversion, scored pairing and invalid-row
    policy), for rows with a boolean ``label``; preference pairs are accepted and split (`unpair_rows`). Rows keep
    their source number (a split pair: both rows the pair's), so KTOTrainer takes the dataset as it is."""
    raw, problems = read_valid_rows(source, split, columns, text_format=text_format, on_invalid_row=on_invalid_row,
                                    pairing=pairing, min_score_margin=min_score_margin, seed=seed,
                                    schema=UNPAIRED_ROWS, config=config)
    log_kept(raw, problems)
    return as_dataset(unpair_rows(raw), UNPAIRED_ROWS)
