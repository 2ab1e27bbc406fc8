"""Dataset mixtures and held-out splits, in alignment-handbook's recipe shape.

    dataset_mixture:
      datasets:
        - id: HuggingFaceH4/ultrafeedback_binarized   # or path: local/file.jsonl.gz
          split: train_prefs
          config: null
          columns: [prompt, chosen, rejected]          # or a mapping {chosen: good, rejected: bad}
          weight: 0.5                                  # half of that dataset's rows, drawn with the seed
        - path: my_pairs.jsonl
      seed: 0
      test_split_size: 0.1                             # held out as the eval dataset

TRL's mixture shape reads the same: a member's ``path`` (a hub id or a local path), ``name`` (= ``config``),
``fraction`` (= ``weight``), ``data_files`` (one local file, with ``path`` a builder such as ``json``), and
``streaming: false``. ``eval_datasets`` (members as above, taken in full) gives the evaluation set instead of
``test_split_size``: the old handbook's ``dataset_mixer`` + ``dataset_splits`` becomes that (`prefalign.recipe`).

Each member is read and validated as a single dataset would be (its errors name its own file and line); when
members differ in format, text pairs become conversations (a user turn and assistant replies, as the chat template
renders text rows anyway); ``weight``
draws that fraction of its rows, without replacement, shuffled with the seed; the members are concatenated and
shuffled with the seed; ``test_split_size`` (a fraction, or a row count) holds that many rows out. Same seed, same
rows. ``split_rows`` gives the same held-out split for a single dataset (``eval_split_size``).

Held-out splits are prompt-disjoint: rows whose conversations open with the same user message (the same prompt, for
single-turn rows; the same first question, for HH-RLHF's dialogues that branch from it) stay on one side, so no
held-out pair has a prompt the model trained on. Where every opening differs, the split is the plain seeded row
split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..errors import ConfigError
from .format import is_messages, to_example
from .load import PREFERENCE_ROWS, Problem, RawData, as_dataset, read_valid_rows

_MEMBER_KEYS = {"id", "path", "split", "config", "columns", "weight"}
_TRL_MEMBER_KEYS = {"name": "config", "fraction": "weight"}  # TRL's DatasetConfig names
_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets.load_dataset builders that data_files go with


def _member_columns(columns: Any, where: str) -> tuple[dict[str, str] | None, list[str] | None]:
    """``(mapping, selection)``: prefalign's mapping onto canonical names, or alignment-handbook's list of the
    columns to keep (its ``select_columns``: the others are dropped before anything reads them)."""
    if columns is None:
        return None, None
    if isinstance(columns, Mapping):
        return {str(k): str(v) for k, v in columns.items()}, None
    if isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns):
        return None, list(columns)
    raise ConfigError(f"{where}: columns={columns!r} is neither a list of column names nor a mapping. Fix: write "
                      "columns: [prompt, chosen, rejected] or columns: {chosen: good, rejected: bad}")


def _fraction_or_count(value: Any, total: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is not a number. Fix: give a fraction in (0, 1) or a row count")
    if 0 < value < 1:
        return max(1, math.floor(value * total))
    if float(value).is_integer() and 1 <= value < total:
        return int(value)
    raise ConfigError(f"{name}={value!r} is out of range for {total} rows. Fix: give a fraction in (0, 1) or a "
                      f"row count from 1 to {total - 1}")


def opening(row: Mapping[str, Any]) -> str | None:
    """The user message a row's conversation opens with (a text prompt as it is), whitespace-trimmed; None when the
    row has none to compare (then it is a group of its own)."""
    for key in ("prompt", "messages", "chosen"):
        value = row.get(key)
        if isinstance(value, str) and key == "prompt":
            return value.strip()
        if is_messages(value):
            first = next((m.get("content") for m in value if m.get("role") == "user"), None)
            if isinstance(first, str):
                return first.strip()
    return None


def held_out_indices(rows: Sequence[Mapping[str, Any]], size: Any, seed: int, name: str = "eval_split_size"
                     ) -> set[int]:
    """Indices of the ``size`` rows (a fraction or a count) held out with ``seed``, whole groups of rows that open
    with the same user message (`opening`) at a time: groups in a seeded random order, each taken if it still fits,
    until the count is reached. With no shared openings this is the seeded row shuffle's first ``size`` rows."""
    n_test = _fraction_or_count(size, len(rows), name)
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        key = opening(row)
        groups.setdefault(("row", i) if key is None else ("text", key), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    test: set[int] = set()
    for members in order:
        if len(test) + len(members) <= n_test:
            test.update(members)
            if len(test) == n_test:
                break
    return test


def split_rows(raw: RawData, size: Any, seed: int, name: str = "eval_split_size") -> tuple[RawData, RawData]:
    """(train, test): ``size`` rows (a fraction or a count) held out at random with ``seed``, prompt-disjoint
    (`held_out_indices`); rows keep their source numbers, and both parts keep the order they had."""
    test = held_out_indices(raw.rows, size, seed, name)

    def part(keep: bool) -> RawData:
        idx = [i for i in range(len(raw.rows)) if (i in test) == keep]
        return replace(raw, rows=[raw.rows[i] for i in idx], row_numbers=[raw.row_numbers[i] for i in idx],
                       skipped=list(raw.skipped) if not keep else [])

    return part(False), part(True)


def _member(member: Any, where: str) -> dict[str, Any]:
    """A member in handbook form: TRL's names mapped, ``data_files`` with a builder ``path`` read as that file."""
    if not isinstance(member, Mapping):
        raise ConfigError(f"{where}: {member!r} must be a mapping with id or path (and optionally split, config, "
                          "columns, weight).")
    out = {_TRL_MEMBER_KEYS.get(str(k), str(k)): v for k, v in member.items()}
    files = out.pop("data_files", None)
    if files is not None:
        if isinstance(files, list) and len(files) == 1:
            files = files[0]
        if not isinstance(files, str) or str(out.get("path") or out.get("id")) not in _BUILDERS:
            raise ConfigError(f"{where}: data_files={files!r} is read only as one file with path: json / csv / "
                              "parquet. Fix: write path: FILE (prefalign reads .jsonl, .json, .csv, .parquet)")
        out.pop("id", None)
        out["path"] = files
    if not (set(out) <= _MEMBER_KEYS) or not (out.get("id") or out.get("path")):
        raise ConfigError(f"{where}: {member!r} must be a mapping with id or path (and optionally split, config, "
                          "columns, weight; TRL's name, fraction, data_files).")
    return out


def _mix(members: list[Any], part: str, seed: int, options: Mapping[str, Any] | None) -> RawData:
    """The members' rows (each validated as a single dataset), weighted, concatenated and shuffled with the seed."""
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    skipped: list[Problem] = []
    sources, labels = [], set()
    for i, given in enumerate(members, start=1):
        where = f"dataset_mixture.{part}[{i}]"
        member = _member(given, where)
        source = str(member.get("path") or member["id"])
        weight = member.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise ConfigError(f"{where}: weight={weight!r} is out of range. Fix: a fraction in (0, 1] of that "
                              "dataset's rows")
        config = member.get("config")
        mapping, select = _member_columns(member.get("columns"), where)
        raw, _ = read_valid_rows(source, str(member.get("split", "train")), mapping, select=select,
                                 config=None if config is None else str(config), **dict(options or {}))
        order = list(range(len(raw.rows)))
        random.Random(seed * 7919 + i).shuffle(order)
        take = sorted(order[:max(1, math.floor(weight * len(order)))]) if weight < 1 else order
        rows += [raw.rows[j] for j in take]
        numbers += [raw.row_numbers[j] for j in take]
        skipped += raw.skipped
        sources.append(f"{source} ({len(take)} of {len(raw.rows)} rows)")
        labels.add(raw.row_label)
    pairs = all("chosen" in r for r in rows)
    if pairs and len({is_messages(r["chosen"]) for r in rows}) > 1:  # text beside conversations: all conversations
        rows = [_as_conversation(r) if not is_messages(r["chosen"]) else r for r in rows]
    mixed = RawData(" + ".join(sources), "mixture", rows, list(dict.fromkeys(k for r in rows for k in r)),
                    labels.pop() if len(labels) == 1 else "row", numbers, skipped=skipped)
    order = list(range(len(mixed.rows)))
    random.Random(seed).shuffle(order)
    return replace(mixed, rows=[mixed.rows[j] for j in order], row_numbers=[mixed.row_numbers[j] for j in order])


def load_mixture(spec: Any, *, options: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """``(train, test)`` datasets of a ``dataset_mixture`` (see the module docstring); ``test`` is None without
    ``test_split_size`` or ``eval_datasets``. ``options`` are read_valid_rows' row options (text_format,
    on_invalid_row, pairing, ...)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise ConfigError("dataset_mixture needs a list under 'datasets'. Fix: dataset_mixture: {datasets: [{path: "
                          "a.jsonl, weight: 0.5}, {id: org/name}]}")
    unknown = set(spec) - {"datasets", "seed", "test_split_size", "eval_datasets", "streaming"}
    if unknown:
        raise ConfigError(f"dataset_mixture: unknown key(s) {', '.join(sorted(unknown))}. Fix: use datasets, seed, "
                          "test_split_size, eval_datasets")
    if spec.get("streaming"):
        raise ConfigError("dataset_mixture: streaming: true: prefalign validates every row before training and does "
                          "not stream. Fix: remove it")
    seed = spec.get("seed", 0)
    schema = (options or {}).get("schema") or PREFERENCE_ROWS
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"dataset_mixture: seed={seed!r} is not an integer.")
    evals = spec.get("eval_datasets")
    if evals is not None and (not isinstance(evals, list) or not evals or spec.get("test_split_size") is not None):
        raise ConfigError("dataset_mixture: eval_datasets must be a non-empty list, and holds the evaluation set "
                          "instead of test_split_size. Fix: keep one of them")
    mixed = _mix(spec["datasets"], "datasets", seed, options)
    if evals:
        return as_dataset(mixed, schema), as_dataset(_mix(evals, "eval_datasets", seed, options), schema)
    if spec.get("test_split_size") is None:
        return as_dataset(mixed, schema), None
    train, test = split_rows(mixed, spec["test_split_size"], seed, "dataset_mixture.test_split_size")
    return as_dataset(train, schema), as_dataset(test, schema)


def load_with_split(source: Any, split: str, columns: Mapping[str, str] | None, size: Any, seed: int,
                    options: Mapping[str, Any] | None = None, config: str | None = None) -> tuple[Any, Any]:
    """``(train, test)`` datasets of one source with ``size`` rows held out (``eval_split_size``)."""
    from .load import log_kept

    raw, problems = read_valid_rows(source, split, columns, config=config, **dict(options or {}))
    log_kept(raw, problems)
    train, test = split_rows(raw, size, seed)
    schema = (options or {}).get("schema")
    return as_dataset(train, schema), as_dataset(test, schema)


def _as_conversation(row: Mapping[str, Any]) -> dict[str, Any]:
    """A text pair as the conversation a chat template would render it as (a user turn, assistant replies)."""
    ex = to_example(row, chat=True)
    return {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
