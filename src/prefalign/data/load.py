"""Read preference rows from a file, a saved `datasets` directory, or a hub id, and validate them.

Every problem is located by source, row and field. Validation here is about shape and types; what the rows mean
(implicit prompts, system messages) is data/format.py's job, and tokens are data/tokenize.py's.

Row numbers are the user's: the line number in a JSON Lines file (``row_label`` "line"; blank lines count), the
data row otherwise (1 = the first row after a CSV header). Every later stage reports rows with these numbers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .format import is_messages

logger = logging.getLogger("prefalign")

CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "system")
REQUIRED_COLUMNS = ("chosen", "rejected")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
FILE_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                   ".pq": "parquet"}
# Common alternative column names, used to suggest a mapping when `chosen`/`rejected` are missing.
_ALIASES = {
    "prompt": ("question", "instruction", "input", "query", "context"),
    "chosen": ("response_chosen", "chosen_response", "preferred", "good", "accepted", "winner", "response_j"),
    "rejected": ("response_rejected", "rejected_response", "dispreferred", "bad", "loser", "response_k"),
}


@dataclass
class Problem:
    """One thing wrong with one row. ``fatal`` problems stop training; the others are counted and reported."""

    row: int
    field: str | None
    message: str
    fix: str | None = None
    fatal: bool = True

    def as_error(self, source: str, row_label: str = "row", suffix: str = "") -> DataError:
        return DataError(self.message + suffix, source=source, row=self.row, field=self.field, fix=self.fix,
                         row_label=row_label)


@dataclass
class RawData:
    """Rows as read, before validation: ``rows[i]`` is data row ``first_row + i`` in the user's numbering."""

    source: str
    kind: str
    rows: list[dict[str, Any]]
    columns: list[str]
    row_label: str = "row"  # "line" for JSON Lines, where the row number is the line number
    row_numbers: list[int] = field(default_factory=list)


def _read_jsonl(path: Path, source: str, collect: list[Problem] | None = None) -> RawData:
    """One object per line. With ``collect``, unreadable lines become problems there and the rest are read."""
    rows, numbers = [], []

    def bad(lineno: int, strict: str, message: str, fix: str) -> None:
        if collect is None:
            raise DataError(strict, source=source, fix=fix)
        collect.append(Problem(lineno, None, message, fix))

    # Split the bytes on "\n" (not splitlines(): U+2028 is valid inside JSON strings) and decode line by line, so a
    # bad byte is located on its line; "\n" never occurs inside a multi-byte UTF-8 sequence.
    for lineno, raw_line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            byte = f"byte 0x{raw_line[e.start]:02x}"
            bad(lineno, f"is not UTF-8 ({byte} on line {lineno}).", f"is not UTF-8 ({byte}).", _UTF8_FIX)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(lineno, f"invalid JSON on line {lineno}: {e.msg} at column {e.colno}.",
                f"invalid JSON: {e.msg} at column {e.colno}.",
                "each line must be one JSON object; check quotes and commas")
            continue
        if not isinstance(obj, dict):
            kind = type(obj).__name__
            bad(lineno, f"line {lineno} is a JSON {kind}, not an object.", f"is a JSON {kind}, not an object.",
                'write one object per line, e.g. {"prompt": ..., "chosen": ..., "rejected": ...}')
            continue
        rows.append(obj)
        numbers.append(lineno)
    return RawData(source, "jsonl", rows, _columns_of(rows), "line", numbers)


def _read_json(path: Path, source: str, collect: list[Problem] | None = None) -> RawData:
    text = _read_text(path, source)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if "Extra data" in e.msg:  # a JSON Lines file saved as .json
            return _read_jsonl(path, source, collect)
        raise DataError(f"invalid JSON on line {e.lineno}: {e.msg} at column {e.colno}.", source=source,
                        fix="the file must hold a JSON list of objects (or use .jsonl, one object per line)") from None
    if isinstance(obj, dict):
        # {"train": [...], "test": [...]} or {"data": [...]} or column-oriented {"chosen": [...], ...}
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if lists and all(isinstance(v, list) and (not v or isinstance(v[0], dict)) for v in lists.values()) and (
                "train" in lists or "data" in lists):
            obj = lists.get("train", lists.get("data"))
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            obj = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            raise DataError("top-level JSON object is not a list of rows.", source=source,
                            fix='use a list of objects: [{"prompt": ..., "chosen": ..., "rejected": ...}, ...]')
    if not isinstance(obj, list):
        raise DataError(f"top-level JSON is a {type(obj).__name__}, not a list of rows.", source=source,
                        fix="use a list of objects, one per preference pair")
    rows, numbers = [], []
    for i, r in enumerate(obj, start=1):
        if not isinstance(r, dict):
            problem = Problem(i, None, f"is a JSON {type(r).__name__}, not an object.",
                              "each row must be an object with prompt/chosen/rejected fields")
            if collect is None:
                raise problem.as_error(source)
            collect.append(problem)
            continue
        rows.append(r)
        numbers.append(i)
    return RawData(source, "json", rows, _columns_of(rows), "row", numbers)


def _read_csv(path: Path, source: str, collect: list[Problem] | None = None) -> RawData:
    text = _read_text(path, source)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, numbers = [], []
    try:
        for i, r in enumerate(reader, start=1):
            if None in r:
                problem = Problem(i, None, f"has {len(r[None]) + len(reader.fieldnames or [])} fields but the header "
                                           f"has {len(reader.fieldnames or [])}.", "quote fields that contain commas")
                if collect is None:
                    raise problem.as_error(source)
                collect.append(problem)
                continue
            # A short row leaves its last fields out (DictReader's None): they are missing, not null.
            rows.append({k: v for k, v in r.items() if v is not None})
            numbers.append(i)
    except csv.Error as e:
        raise DataError(f"unreadable CSV: {e}.", source=source, fix="check quoting") from None
    return RawData(source, "csv", rows, list(reader.fieldnames or []), "row", numbers)


def _read_parquet(path: Path, source: str, collect: list[Problem] | None = None) -> RawData:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"unreadable Parquet file: {str(e).splitlines()[0]}", source=source,
                        fix="re-export the file, or convert it to JSONL") from None
    rows = table.to_pylist()
    return RawData(source, "parquet", rows, list(table.column_names), "row", list(range(1, len(rows) + 1)))


def _read_text(path: Path, source: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}).", source=source,
                        fix=_UTF8_FIX) from None


_UTF8_FIX = "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:1000]:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _from_hf_dataset(ds: Any, source: str, kind: str, split: str) -> RawData:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"has no split '{split}' (splits: {', '.join(ds)}).", source=source,
                            fix=f"pass split= one of {', '.join(ds)}")
        ds = ds[split]
    rows = ds.to_list()
    return RawData(source, kind, rows, list(ds.column_names), "row", list(range(1, len(rows) + 1)))


def read_rows(source: str | os.PathLike | Any, split: str = "train",
              collect_errors: list[Problem] | None = None) -> RawData:
    """Read rows from any supported source without validating them.

    Raises `DataError` on the first unreadable row, unless ``collect_errors`` is a list: then each unreadable row
    (a JSON Lines line that is not UTF-8, not JSON or not an object; a JSON list item that is not an object; a CSV
    row with too many fields) is appended to it as a fatal `Problem` with its row number, and the other rows are
    read. Problems with the whole source (missing file, unknown extension, unreadable file) always raise.
    """
    ds_module = sys.modules.get("datasets")  # an in-memory Dataset means `datasets` is imported already
    if ds_module is not None and isinstance(source, (ds_module.Dataset, ds_module.DatasetDict)):
        return _from_hf_dataset(source, "<in-memory dataset>", "dataset", split)
    if isinstance(source, list):
        return RawData("<in-memory rows>", "list", source, _columns_of(source), "row",
                       list(range(1, len(source) + 1)))
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
                path / "state.json").exists():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as e:
                raise DataError(f"cannot load saved dataset: {str(e).splitlines()[0]}", source=text,
                                fix="point at a directory written by Dataset.save_to_disk") from None
            return _from_hf_dataset(ds, text, "datasets", split)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_EXTENSIONS)
        wanted = [p for p in files if p.stem.split("-")[0].split(".")[0] == split] or files
        if len(wanted) != 1:
            found = ", ".join(p.name for p in files) or "no data files"
            raise DataError(f"directory holds {found}; cannot tell which file is the '{split}' split.", source=text,
                            fix="pass the file itself, or name it <split>.jsonl")
        return read_rows(wanted[0], split, collect_errors)
    if path.exists():
        ext = path.suffix.lower()
        readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
        if ext not in FILE_EXTENSIONS:
            raise DataError(f"unknown file extension '{ext or '(none)'}'.", source=text,
                            fix="use .jsonl, .json, .csv or .parquet, or a directory saved by datasets")
        return readers[FILE_EXTENSIONS[ext]](path, text, collect_errors)
    looks_local = text.startswith((".", "/", "~")) or Path(text).suffix.lower() in FILE_EXTENSIONS
    if looks_local or text.count("/") > 1 or not text:
        raise DataError("no such file or directory.", source=text or "''",
                        fix="check the path (relative paths are taken from the current directory)")
    import datasets

    try:
        ds = datasets.load_dataset(text, split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"not a local file and could not be loaded from the hub ({first}).", source=text,
                        fix="check the path, or the dataset id and your network / HF_HUB_OFFLINE") from None
    return _from_hf_dataset(ds, text, "hub", split)


def map_columns(raw: RawData, columns: Mapping[str, str] | None) -> RawData:
    """Rename user columns to prefalign's names (``{"chosen": "good_answer", ...}``) and check required ones."""
    columns = dict(columns or {})
    for canon, actual in columns.items():
        if canon not in CANONICAL_COLUMNS:
            raise DataError(f"unknown target column '{canon}' in the column mapping.", source=raw.source,
                            fix=f"map onto {', '.join(CANONICAL_COLUMNS)}")
        if actual not in raw.columns:
            raise DataError(f"column mapping {canon}={actual}: the data has no column '{actual}' "
                            f"(found: {', '.join(raw.columns) or 'none'}).", source=raw.source,
                            fix="use one of the columns found")
    if not raw.rows:
        raise DataError("the dataset is empty (0 rows).", source=raw.source,
                        fix="add preference rows with chosen and rejected fields")
    present = {c: columns.get(c, c) for c in CANONICAL_COLUMNS if columns.get(c, c) in raw.columns}
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        guesses = {c: next((a for a in _ALIASES.get(c, ()) if a in raw.columns), "<column>") for c in missing}
        cli = ",".join(f"{c}={g}" for c, g in guesses.items())
        raise DataError(f"missing column(s) {', '.join(repr(c) for c in missing)}; found columns: "
                        f"{', '.join(raw.columns) or 'none'}.", source=raw.source,
                        fix=f"rename them, or map them with --columns {cli} (Python: columns={guesses!r})")
    # A field absent from a row stays absent (validate_rows reports a missing required field as missing, not null).
    rows = [{c: r[actual] for c, actual in present.items() if actual in r} for r in raw.rows]
    return RawData(raw.source, raw.kind, rows, list(present), raw.row_label, raw.row_numbers)


def _check_messages(value: list, row: int, name: str) -> Iterable[Problem]:
    if not value:
        yield Problem(row, name, "is an empty list of messages.", "give at least one message")
        return
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        if "role" not in m or "content" not in m:
            miss = "role" if "role" not in m else "content"
            yield Problem(row, where, f"message has no '{miss}' (keys: {', '.join(m) or 'none'}).",
                          'write messages as {"role": "user"|"assistant"|"system", "content": "..."}')
        elif m["role"] not in KNOWN_ROLES:
            yield Problem(row, where, f"unknown role {m['role']!r}.", f"use one of {', '.join(KNOWN_ROLES)}")
        elif not isinstance(m["content"], str):
            yield Problem(row, where, f"content is {_type_name(m['content'])}, not text.", "make content a string")


def _type_name(v: Any) -> str:
    return "null" if v is None else {"int": "a number", "float": "a number", "bool": "a boolean",
                                     "dict": "an object", "list": "a list", "str": "text"}.get(type(v).__name__,
                                                                                              type(v).__name__)


def validate_rows(raw: RawData) -> list[Problem]:
    """Every problem in every row: type errors, empty responses, chosen == rejected, duplicates (not fatal)."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    first_kind: tuple[int, bool] | None = None  # (row number, is messages) of the first well-formed row
    for r, n in zip(raw.rows, raw.row_numbers, strict=True):
        row_problems: list[Problem] = []
        for name in ("prompt", "chosen", "rejected", "system"):
            if name not in r:
                if name in REQUIRED_COLUMNS:
                    row_problems.append(Problem(n, name, "is missing.",
                                                f"add the {name} reply to the row, or drop the row"))
                continue
            v = r[name]
            if name in ("prompt", "system") and v is None:
                continue
            if isinstance(v, str):
                if name in ("chosen", "rejected") and not v.strip():
                    row_problems.append(Problem(n, name, "is empty.", "drop the row or write the response"))
            elif is_messages(v) and name != "system":
                row_problems.extend(_check_messages(v, n, name))
            else:
                want = "text" if name == "system" else "text or a list of {role, content} messages"
                row_problems.append(Problem(n, name, f"is {_type_name(v)}; expected {want}.",
                                            f"store {name} as {want}"))
        if not row_problems:
            kinds = {k: is_messages(r[k]) for k in ("prompt", "chosen", "rejected") if r.get(k) is not None}
            if len(set(kinds.values())) > 1:
                row_problems.append(Problem(n, None, "mixes plain text and message lists across prompt/chosen/"
                                            "rejected.", "use text everywhere or messages everywhere in a row"))
            elif _completion_text(r["chosen"]).strip() == "" and is_messages(r["chosen"]):
                row_problems.append(Problem(n, "chosen", "final message is empty.", "write the response"))
            elif is_messages(r["rejected"]) and _completion_text(r["rejected"]).strip() == "":
                row_problems.append(Problem(n, "rejected", "final message is empty.", "write the response"))
            elif r["chosen"] == r["rejected"]:
                row_problems.append(Problem(n, "rejected", "is identical to chosen, so the pair carries no "
                                            "preference.", "drop the row or fix the responses"))
        if not row_problems:
            is_msgs = is_messages(r["chosen"])
            if first_kind is None:
                first_kind = (n, is_msgs)
            elif is_msgs != first_kind[1]:
                kinds = ("text", "messages") if first_kind[1] else ("messages", "text")
                row_problems.append(Problem(n, "chosen", f"is {kinds[0]} but {raw.row_label} {first_kind[0]} is "
                                            f"{kinds[1]}; a dataset must use one format.",
                                            "convert all rows to text or all rows to messages"))
        if not row_problems:
            key = json.dumps([r.get("system"), r.get("prompt"), r["chosen"], r["rejected"]], sort_keys=True)
            if key in seen:
                row_problems.append(Problem(n, None, f"duplicates {raw.row_label} {seen[key]}.", "deduplicate",
                                            fatal=False))
            else:
                seen[key] = n
        problems.extend(row_problems)
    return problems


def _completion_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return value[-1].get("content") or "" if value else ""


def read_valid_rows(source: str | os.PathLike | Any, split: str = "train", columns: Mapping[str, str] | None = None,
                    name: str | None = None) -> tuple[RawData, list[Problem]]:
    """Read, map and validate rows; raise on the first fatal problem, return the rows and the non-fatal ones.

    ``name`` replaces the source in messages (the trainer says "train dataset" for in-memory data).
    """
    raw = map_columns(read_rows(source, split), columns)
    if name:
        raw.source = name
    problems = validate_rows(raw)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        target = "on the data" if name else raw.source
        more = f" ({len(fatal) - 1} more problem(s); run `prefalign data check {target}` to list them all)" \
            if len(fatal) > 1 else ""
        raise fatal[0].as_error(raw.source, raw.row_label, more)
    return raw, problems


ROW_COLUMN = "source_row"  # the loader's row number (the source line) of each row, carried to every later stage
_INFO_KEY = "prefalign"


def load_preference_dataset(
    source: str | os.PathLike | Any,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
) -> Any:
    """Load preference pairs as a `datasets.Dataset` with columns prompt/chosen/rejected (and system if present).

    ``source`` is a .jsonl/.json/.csv/.parquet file, a directory saved by `datasets`, a hub dataset id, or an
    in-memory `datasets.Dataset`. ``columns`` maps prefalign's names to yours: ``{"chosen": "good"}``.
    Raises `DataError` on the first fatal problem (``prefalign data check`` lists all of them). Suspicious rows
    (duplicates) are kept, counted and logged. The rows are validated here, once: the dataset also carries each
    row's number in the source (column ``source_row``) and the source's name, so the trainers take it as it is and
    report rows by the same numbers.
    """
    raw, problems = read_valid_rows(source, split, columns)
    _log_kept(raw, problems)
    return as_dataset(raw)


def as_dataset(raw: RawData) -> Any:
    """Validated rows as a `datasets.Dataset` that remembers its source and row numbers (see validated_rows)."""
    import datasets

    # Every row gets every column (an absent optional field is None): Dataset.from_list takes the first row's keys.
    keep = [c for c in raw.columns if c != "prompt" or any(r.get("prompt") is not None for r in raw.rows)]
    info = datasets.DatasetInfo(description=json.dumps({_INFO_KEY: {"source": raw.source, "kind": raw.kind,
                                                                    "row_label": raw.row_label}}))
    return datasets.Dataset.from_list([{**{c: r.get(c) for c in keep}, ROW_COLUMN: n}
                                       for r, n in zip(raw.rows, raw.row_numbers, strict=True)], info=info)


def _loader_info(dataset: Any) -> dict[str, str] | None:
    """What as_dataset recorded, if ``dataset`` came from it (and still has its row numbers)."""
    ds_module = sys.modules.get("datasets")
    if ds_module is None or not isinstance(dataset, ds_module.Dataset) or ROW_COLUMN not in dataset.column_names:
        return None
    try:
        return json.loads(dataset.info.description or "")[_INFO_KEY]
    except (ValueError, TypeError, KeyError):
        return None


def validated_rows(data: Any, name: str) -> RawData:
    """The rows of ``data`` for tokenisation, validated exactly once.

    A dataset from `load_preference_dataset` was validated by it: its rows, source and row numbers are taken as
    they are. Anything else (raw rows, a `datasets.Dataset`, a path) is read and validated here, named ``name``
    in messages, with its duplicates logged.
    """
    info = _loader_info(data)
    if info is not None:
        rows = data.to_list()
        numbers = [int(r.pop(ROW_COLUMN)) for r in rows]
        return RawData(info["source"], info.get("kind", "dataset"), rows, [c for c in data.column_names
                                                                             if c != ROW_COLUMN],
                       info.get("row_label", "row"), numbers)
    in_memory = not isinstance(data, (str, os.PathLike))
    raw, problems = read_valid_rows(data, columns=None, name=name if in_memory else None)
    _log_kept(raw, problems)
    return raw


def _log_kept(raw: RawData, problems: list[Problem]) -> None:
    """Non-fatal problems (duplicates) are kept, but never silently."""
    if problems:
        shown = ", ".join(str(p.row) for p in problems[:10]) + (" ..." if len(problems) > 10 else "")
        logger.warning("%s: %d duplicate rows kept (%ss %s)", raw.source, len(problems), raw.row_label, shown)
