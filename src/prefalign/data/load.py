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
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError, one_line, row_list
from .format import is_messages, parse_tools

logger = logging.getLogger("prefalign")

CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "system", "chat_template_kwargs", "tools")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # pre-tokenized pairs (TRL's processed columns)
REQUIRED_COLUMNS = ("chosen", "rejected")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT's `from` values, as roles
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}  # any file format, compressed
ON_INVALID_ROW = ("error", "skip")
TEXT_FORMATS = ("auto", "raw")
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
    converted_from: str | None = None  # a published format the rows were converted from ("HH-RLHF dialogue text")
    skipped: list[Problem] = field(default_factory=list)  # rows left out under on_invalid_row="skip", with why
    pairing: dict[str, Any] | None = None  # scored completions paired: data/scored.py's PairingReport.to_dict()
    rows_read: int = 0  # rows in the source, unreadable ones included (set by read_valid_rows)


@dataclass(frozen=True)
class RowSchema:
    """What one kind of dataset's rows hold: preference pairs (here), SFT rows (data/sft.py), unpaired feedback.

    ``columns``: the canonical column names (others are dropped, a column mapping may target only these);
    ``required``: alternative column sets, of which the data must have one in full; ``validate``: every problem in
    every row; ``aliases``: alternative names to suggest for a missing column; ``what``: the rows, for messages.
    """

    name: str
    columns: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]
    validate: Callable[[RawData], list[Problem]]
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    what: str = "rows"


def _read_jsonl(path: Path, source: str, collect: list[Problem] | None = None) -> RawData:
    """One object per line. With ``collect``, unreadable lines become problems there and the rest are read."""
    rows, numbers = [], []

    def bad(lineno: int, strict: str, message: str, fix: str) -> None:
        if collect is None:
            raise DataError(strict, source=source, fix=fix)
        collect.append(Problem(lineno, None, message, fix))

    # Split the bytes on "\n" (not splitlines(): U+2028 is valid inside JSON strings) and decode line by line, so a
    # bad byte is located on its line; "\n" never occurs inside a multi-byte UTF-8 sequence.
    for lineno, raw_line in enumerate(_file_bytes(path, source).split(b"\n"), start=1):
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
        import pyarrow as pa

        table = pq.read_table(pa.BufferReader(_file_bytes(path, source)) if _compression(path) else path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"unreadable Parquet file: {str(e).splitlines()[0]}", source=source,
                        fix="re-export the file, or convert it to JSONL") from None
    rows = table.to_pylist()
    return RawData(source, "parquet", rows, list(table.column_names), "row", list(range(1, len(rows) + 1)))


def _compression(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def _format_suffix(path: Path) -> str:
    """The data format's extension, under a compression suffix: ``pairs.jsonl.gz`` → ``.jsonl``."""
    return Path(path.stem).suffix.lower() if _compression(path) else path.suffix.lower()


def _file_bytes(path: Path, source: str) -> bytes:
    """A file's bytes, decompressed by its suffix (gzip, bz2, xz; zstd through pyarrow)."""
    codec = _compression(path)
    if codec is None:
        return path.read_bytes()
    try:
        if codec == "zstd":
            import pyarrow as pa

            with pa.CompressedInputStream(pa.OSFile(str(path)), "zstd") as stream:
                return stream.read()
        import bz2
        import gzip
        import lzma

        return {"gzip": gzip, "bz2": bz2, "xz": lzma}[codec].decompress(path.read_bytes())
    except Exception as e:  # each codec raises its own types for a damaged file
        detail = str(e).splitlines()[0] if str(e) else "damaged"
        raise DataError(f"cannot decompress this {codec} file ({type(e).__name__}: {detail}).", source=source,
                        fix="check the file is complete, or decompress it yourself") from None


def _read_text(path: Path, source: str) -> str:
    data = _file_bytes(path, source)
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


_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")  # data/train-00000-of-00003.parquet


def _split_of(path: Path) -> str:
    """The split a data file serves, read off its name as `datasets` lays files out: ``<split>.<ext>`` or
    ``<split>-NNNNN-of-NNNNN.<ext>`` (dots inside the split name, as ``OpenThoughts3_1.2M_think``, are kept)."""
    stem = path.name[: -len(path.suffix)]
    if _compression(path):  # pairs.jsonl.gz: both suffixes
        stem = stem[: -len(Path(stem).suffix)]
    m = _SHARD.match(stem)
    return m.group("split") if m else stem


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _format_suffix(p) in FILE_EXTENSIONS) \
        if folder.is_dir() else []


def _readme_configs(path: Path, text: str) -> list[dict[str, Any]] | None:
    """The ``configs:`` of a dataset card's YAML header (an ``hf download`` snapshot), or None without one."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    card = readme.read_text(encoding="utf-8", errors="replace")
    if not card.startswith("---"):
        return None
    header = card[3:].split("\n---", 1)[0]
    import yaml

    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError as e:
        raise DataError(f"README.md's YAML header is unreadable ({str(e).splitlines()[0]}).", source=text,
                        fix="fix the dataset card's header, or point at the data file itself") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None


def _config_files(path: Path, text: str, configs: list[dict[str, Any]], config: str | None) -> dict[str, list[Path]]:
    """``{split: files}`` of one README ``configs:`` entry, picked as datasets.load_dataset(dir, name) picks it."""
    names = [str(c.get("config_name", "default")) for c in configs]
    if config is None:
        chosen = [c for c in configs if c.get("default")] or [
            c for c, n in zip(configs, names, strict=True) if n == "default"] or (configs if len(configs) == 1 else [])
        if not chosen:
            raise DataError(f"holds several configs ({', '.join(names)}) and none is the default.", source=text,
                            fix="name one with config: (TRL's name:, the CLI's --config)")
    else:
        chosen = [c for c, n in zip(configs, names, strict=True) if n == config]
        if not chosen:
            raise DataError(f"has no config '{config}' (configs in README.md: {', '.join(names)}).", source=text,
                            fix=f"use config: one of {', '.join(names)}")
    spec = chosen[0].get("data_files")
    entries = [{"split": "train", "path": spec}] if isinstance(spec, (str, list)) and (
        isinstance(spec, str) or all(isinstance(x, str) for x in spec)) else spec
    if isinstance(spec, dict):
        entries = [{"split": k, "path": v} for k, v in spec.items()]
    out: dict[str, list[Path]] = {}
    for entry in entries or []:
        patterns = entry.get("path") if isinstance(entry, dict) else None
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            out.setdefault(str(entry.get("split", "train")), []).extend(
                sorted(p for p in path.glob(str(pattern)) if p.is_file() and _format_suffix(p) in FILE_EXTENSIONS))
    return out


def _read_directory(path: Path, text: str, split: str, config: str | None,
                    collect: list[Problem] | None) -> RawData:
    """A directory of data files, read as datasets.load_dataset(dir, config, split=split) reads one: the README's
    ``configs:`` header if it has one (an ``hf download`` snapshot), else ``<split>.<ext>`` or
    ``<split>-NNNNN-of-NNNNN.<ext>`` files in it or in ``data/`` (in ``<config>/`` when a config is named); a
    directory whose files name no split serves them as ``train``, as datasets does. A missing split or config is an
    error naming those there are."""
    configs = _readme_configs(path, text)
    if configs:
        splits = _config_files(path, text, configs, config)
    else:
        root = path
        if config is not None and config != "default":
            subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and _data_files(p))
            if config not in subdirs:
                raise DataError(f"has no config '{config}': no README.md configs: header and no folder "
                                f"'{config}/' of data files (folders: {', '.join(subdirs) or 'none'}).", source=text,
                                fix="drop config:, or point at the folder of that config's files")
            root = path / config
        files = _data_files(root) + _data_files(root / "data")
        splits = {}
        for f in files:
            splits.setdefault(_split_of(f), []).append(f)
        if split not in splits and split == "train" and files and not set(splits) & _SPLIT_NAMES:
            splits = {"train": files}  # files that name no split are the train split (datasets' rule)
    wanted = splits.get(split)
    if not wanted:
        found = ", ".join(sorted(s for s, f in splits.items() if f)) or "none"
        raise DataError(f"has no split '{split}' (splits: {found}).", source=text,
                        fix=f"pass split= one of {found}" if splits else "put <split>.jsonl (or .parquet, ...) files "
                            "in it, or point at a file")
    if len(wanted) == 1:
        return read_rows(wanted[0], split, collect)
    # shards of one split: numbered on through the files in order (shard 2's first row follows shard 1's last)
    rows, numbers, kinds, labels, offset = [], [], set(), set(), 0
    for f in wanted:
        before = len(collect) if collect is not None else 0
        part = read_rows(f, split, collect)
        new = collect[before:] if collect is not None else []
        last = max([*part.row_numbers, *(p.row for p in new)], default=0)
        for p in new:
            p.row += offset
        rows += part.rows
        numbers += [n + offset for n in part.row_numbers]
        kinds.add(part.kind)
        labels.add(part.row_label)
        offset += last
    return RawData(text, kinds.pop() if len(kinds) == 1 else "files", rows, _columns_of(rows),
                   labels.pop() if len(labels) == 1 else "row", numbers)


_SPLIT_NAMES = {"train", "test", "validation", "valid", "dev", "eval", "training", "testing", "val"}


def read_rows(source: str | os.PathLike | Any, split: str = "train",
              collect_errors: list[Problem] | None = None, config: str | None = None) -> RawData:
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
        return _read_directory(path, text, split, config, collect_errors)
    if path.exists():
        if config not in (None, "default"):
            raise DataError(f"is one file, which has no config '{config}'.", source=text,
                            fix="drop config:, or point at the dataset's folder (README.md configs: or "
                                "<config>/ folders)")
        ext = _format_suffix(path)
        readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
        if ext not in FILE_EXTENSIONS:
            raise DataError(f"unknown file extension '{ext or '(none)'}'.", source=text,
                            fix="use .jsonl, .json, .csv or .parquet (optionally compressed: .gz, .bz2, .xz, .zst), "
                                "or a directory saved by datasets")
        return readers[FILE_EXTENSIONS[ext]](path, text, collect_errors)
    looks_local = text.startswith((".", "/", "~")) or _format_suffix(Path(text)) in FILE_EXTENSIONS
    if looks_local or text.count("/") > 1 or not text:
        raise DataError("no such file or directory.", source=text or "''",
                        fix="check the path (relative paths are taken from the current directory)")
    import datasets

    try:
        ds = datasets.load_dataset(text, config, split=split)  # config: the hub dataset's configuration name
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"not a local file and could not be loaded from the hub ({first}).", source=text,
                        fix="check the path, or the dataset id and your network / HF_HUB_OFFLINE") from None
    return _from_hf_dataset(ds, text, "hub", split)


def select_columns(raw: RawData, names: Sequence[str] | None) -> RawData:
    """Keep only ``names`` (alignment-handbook's ``columns: [...]``, its ``Dataset.select_columns``): e.g.
    orca_dpo_pairs with ``[chosen, rejected]`` drops its text ``prompt`` and the prompt is the conversations' shared
    start. A name the data lacks is an error naming the columns found."""
    if names is None:
        return raw
    missing = [c for c in names if c not in raw.columns]
    if missing:
        raise DataError(f"columns: {', '.join(missing)} not in the data (found: {', '.join(raw.columns) or 'none'}).",
                        source=raw.source, fix="list columns the data has")
    keep = list(dict.fromkeys(names))
    return replace(raw, rows=[{c: r[c] for c in keep if c in r} for r in raw.rows], columns=keep)


def map_columns(raw: RawData, columns: Mapping[str, str] | None, schema: RowSchema | None = None) -> RawData:
    """Rename user columns to prefalign's names (``{"chosen": "good_answer", ...}``) and check required ones."""
    schema = schema or PREFERENCE_ROWS
    columns = dict(columns or {})
    for canon, actual in columns.items():
        if canon not in schema.columns:
            raise DataError(f"unknown target column '{canon}' in the column mapping.", source=raw.source,
                            fix=f"map onto {', '.join(schema.columns)}")
        if actual not in raw.columns:
            raise DataError(f"column mapping {canon}={actual}: the data has no column '{actual}' "
                            f"(found: {', '.join(raw.columns) or 'none'}).", source=raw.source,
                            fix="use one of the columns found")
    if not raw.rows:
        raise DataError("the dataset is empty (0 rows).", source=raw.source, fix=f"add {schema.what}")
    present = {c: columns.get(c, c) for c in schema.columns if columns.get(c, c) in raw.columns}
    if not any(all(c in present for c in option) for option in schema.required):
        missing = [c for c in schema.required[0] if c not in present]
        guesses = {c: next((a for a in schema.aliases.get(c, ()) if a in raw.columns), "<column>") for c in missing}
        cli = ",".join(f"{c}={g}" for c, g in guesses.items())
        others = "; or " + " / ".join("+".join(o) for o in schema.required[1:]) if len(schema.required) > 1 else ""
        raise DataError(f"missing column(s) {', '.join(repr(c) for c in missing)}{others}; found columns: "
                        f"{', '.join(raw.columns) or 'none'}.", source=raw.source,
                        fix=f"rename them, or map them with --columns {cli} (Python: columns={guesses!r})")
    # A field absent from a row stays absent (validate_rows reports a missing required field as missing, not null).
    rows = [{c: r[actual] for c, actual in present.items() if actual in r} for r in raw.rows]
    return replace(raw, rows=rows, columns=list(present))


def _check_messages(value: list, row: int, name: str) -> Iterable[Problem]:
    if not value:
        yield Problem(row, name, "is an empty list of messages.", "give at least one message")
        return
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        calls = m.get("tool_calls")
        if "role" not in m and "from" in m:  # a ShareGPT message that sharegpt_to_chatml could not convert
            yield Problem(row, where, f"unknown ShareGPT 'from' value {m['from']!r}.",
                          f"use one of {', '.join(SHAREGPT_ROLES)} (or a role: {', '.join(KNOWN_ROLES)})")
        elif "role" not in m or (m.get("content") is None and calls is None):
            miss = "role" if "role" not in m else "content"
            yield Problem(row, where, f"message has no '{miss}' (keys: {', '.join(m) or 'none'}).",
                          'write messages as {"role": "user"|"assistant"|"system"|"tool", "content": "..."} (an '
                          'assistant message may give "tool_calls" instead of content)')
        elif m["role"] not in KNOWN_ROLES:
            yield Problem(row, where, f"unknown role {m['role']!r}.", f"use one of {', '.join(KNOWN_ROLES)}")
        elif m.get("content") is not None and not isinstance(m["content"], str):
            yield Problem(row, where, f"content is {_type_name(m['content'])}, not text.", "make content a string")
        elif calls is not None and not (isinstance(calls, list) and all(isinstance(c, Mapping) for c in calls)):
            yield Problem(row, f"{where}.tool_calls", f"is {_type_name(calls)}; expected a list of tool calls.",
                          'write tool_calls as [{"type": "function", "function": {"name": ..., "arguments": {...}}}]')


def tools_problems(r: Mapping[str, Any], n: int) -> list[Problem]:
    """A row's ``tools`` (TRL's column, passed to the chat template as ``tools=``): a list of JSON schemas or
    functions' descriptions, or that list as a JSON string."""
    v = r.get("tools")
    if v is None:
        return []
    try:
        parse_tools(v)
    except ValueError as e:
        return [Problem(n, "tools", f"{e}.", 'write tools as a list of function schemas, e.g. [{"type": "function", '
                        '"function": {"name": ..., "parameters": {...}}}], or that list as a JSON string')]
    return []


def template_kwargs_problems(r: Mapping[str, Any], n: int) -> list[Problem]:
    """A row's ``chat_template_kwargs`` (TRL's column, e.g. ``{"enable_thinking": false}``) must be a mapping."""
    v = r.get("chat_template_kwargs")
    if v is None or (isinstance(v, Mapping) and all(isinstance(k, str) for k in v)):
        return []
    return [Problem(n, "chat_template_kwargs", f"is {_type_name(v)}; expected an object of keyword arguments for "
                    "the chat template.", 'write e.g. {"enable_thinking": false}, or null')]


def _type_name(v: Any) -> str:
    return "null" if v is None else {"int": "a number", "float": "a number", "bool": "a boolean",
                                     "dict": "an object", "list": "a list", "str": "text"}.get(type(v).__name__,
                                                                                              type(v).__name__)


_EMPTY = "is empty; trained on as an empty reply (its end-of-turn token)."
_EMPTY_FIX = "write the response, or drop the row if an empty reply is not what you mean"


def validate_rows(raw: RawData) -> list[Problem]:
    """Every problem in every row: type errors, empty responses, chosen == rejected, duplicates (not fatal)."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    first_kind: tuple[int, bool] | None = None  # (row number, is messages) of the first well-formed row
    for r, n in zip(raw.rows, raw.row_numbers, strict=True):
        if r.get("chosen_ids") is not None or r.get("rejected_ids") is not None:
            problems.extend(_id_problems(r, n))
            continue
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
                    row_problems.append(Problem(n, name, _EMPTY, _EMPTY_FIX, fatal=False))
            elif is_messages(v) and name != "system":
                row_problems.extend(_check_messages(v, n, name))
            else:
                want = "text" if name == "system" else "text or a list of {role, content} messages"
                row_problems.append(Problem(n, name, f"is {_type_name(v)}; expected {want}.",
                                            f"store {name} as {want}"))
        row_problems.extend(template_kwargs_problems(r, n) + tools_problems(r, n))
        if not any(p.fatal for p in row_problems):
            kinds = {k: is_messages(r[k]) for k in ("prompt", "chosen", "rejected") if r.get(k) is not None}
            # a text prompt before message replies is a user turn (ultrafeedback_binarized's shape); not the reverse
            if kinds.get("prompt") is False and kinds["chosen"] and kinds["rejected"]:
                kinds.pop("prompt")
            if len(set(kinds.values())) > 1:
                row_problems.append(Problem(n, None, "mixes plain text and message lists across prompt/chosen/"
                                            "rejected.", "use text everywhere or messages everywhere in a row"))
            elif r["chosen"] == r["rejected"]:
                row_problems.append(Problem(n, "rejected", "is identical to chosen, so the pair carries no "
                                            "preference.", "drop the row or fix the responses"))
            else:
                row_problems.extend(Problem(n, name, "final message " + _EMPTY, _EMPTY_FIX, fatal=False)
                                    for name in ("chosen", "rejected")
                                    if is_messages(r[name]) and _completion_text(r[name]).strip() == "")
        if not any(p.fatal for p in row_problems):
            is_msgs = is_messages(r["chosen"])
            if first_kind is None:
                first_kind = (n, is_msgs)
            elif is_msgs != first_kind[1]:
                kinds = ("text", "messages") if first_kind[1] else ("messages", "text")
                row_problems.append(Problem(n, "chosen", f"is {kinds[0]} but {raw.row_label} {first_kind[0]} is "
                                            f"{kinds[1]}; a dataset must use one format.",
                                            "convert all rows to text or all rows to messages"))
        if not any(p.fatal for p in row_problems):
            row_problems.extend(duplicate_of(seen, [r.get("system"), r.get("prompt"), r["chosen"], r["rejected"]],
                                             n, raw.row_label))
        problems.extend(row_problems)
    return problems


def _id_problems(r: Mapping[str, Any], n: int) -> list[Problem]:
    """A pre-tokenized pair: ``prompt_ids`` (may be empty), ``chosen_ids`` and ``rejected_ids`` lists of token ids."""
    out = []
    for name in ID_COLUMNS:
        v = r.get(name)
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            out.append(Problem(n, name, f"is {_type_name(v)}; expected a list of token ids.",
                               f"give {name} as a list of integers (a pre-tokenized pair has prompt_ids, "
                               "chosen_ids and rejected_ids)"))
        elif not v and name != "prompt_ids":
            out.append(Problem(n, name, "is an empty list of token ids.", "give the reply's tokens"))
    return out


def duplicate_of(seen: dict[str, int], fields: list[Any], row: int, row_label: str) -> list[Problem]:
    """A warning when ``fields`` repeat an earlier row's (recorded in ``seen``); duplicates are kept, not fatal."""
    key = json.dumps(fields, sort_keys=True)
    if key in seen:
        return [Problem(row, None, f"duplicates {row_label} {seen[key]}.", "deduplicate", fatal=False)]
    seen[key] = row
    return []


PREFERENCE_ROWS = RowSchema("preference", CANONICAL_COLUMNS + ID_COLUMNS, (REQUIRED_COLUMNS, ID_COLUMNS[1:]),
                            validate_rows, _ALIASES,
                            "preference rows with chosen and rejected fields")


def _completion_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value and value[-1].get("tool_calls"):
        return "tool calls"  # a reply that calls tools is not empty
    return value[-1].get("content") or "" if value else ""


def convert_published_formats(raw: RawData, text_format: str = "auto") -> tuple[RawData, list[Problem]]:
    """Rows of a published format converted to prefalign's: HH-RLHF dialogue text becomes conversations
    (data/dialogue.py) unless ``text_format="raw"``. Rows that look like the format but cannot be converted are
    returned as fatal problems (and left out of the rows)."""
    if text_format not in TEXT_FORMATS:
        raise DataError(f"text_format={text_format!r} is not one of {', '.join(TEXT_FORMATS)}.", source=raw.source,
                        fix="use 'auto' (HH-RLHF dialogue text becomes conversations) or 'raw' (text as is)")
    from .dialogue import DialogueError, dialogue_to_conversation, is_dialogue_row

    # The dataset's format is its first text row's: one reply that happens to start with "Human:" in a dataset of
    # plain text stays text (and HH rows that do not parse are reported, not silently kept as text).
    first = next((r for r in raw.rows if isinstance(r.get("chosen"), str)), None)
    if text_format == "raw" or first is None or not is_dialogue_row(first):
        return raw, []
    rows, numbers, problems = [], [], []
    for r, n in zip(raw.rows, raw.row_numbers, strict=True):
        if is_dialogue_row(r):
            try:
                r = dialogue_to_conversation(r)
            except DialogueError as e:
                problems.append(Problem(n, e.field, str(e), e.fix))
                continue
        rows.append(r)
        numbers.append(n)
    columns = list(dict.fromkeys([*raw.columns, "prompt"]))
    return replace(raw, rows=rows, columns=columns, row_numbers=numbers, converted_from="HH-RLHF dialogue text",
                   skipped=list(raw.skipped)), problems


def pair_scored_rows(raw: RawData, pairing: str = "best_worst", min_score_margin: float = 0.0,
                     seed: int = 0) -> RawData:
    """Scored completions (UltraFeedback, Argilla, generic) become pairs and binarized pairs are filtered by their
    scores (data/scored.py); other rows pass as they are. Raises when scored rows leave no pair."""
    from .scored import PAIRINGS, scored_to_pairs

    if pairing not in PAIRINGS:
        raise DataError(f"pairing={pairing!r} is not one of {', '.join(PAIRINGS)}.", source=raw.source,
                        fix="use best_worst (default), best_random or all_pairs")
    rows, numbers, report = scored_to_pairs(raw.rows, raw.row_numbers, pairing=pairing,
                                            min_score_margin=min_score_margin, seed=seed)
    if not report.rows:
        return raw
    if not rows:
        raise DataError(f"no pair is left: {report.line()}.", source=raw.source,
                        fix="lower min_score_margin, or check the scores")
    logger.info("%s: %s", raw.source, report.line())
    return replace(raw, rows=rows, columns=_columns_of(rows), row_numbers=numbers, skipped=list(raw.skipped),
                   pairing=report.to_dict())


def sharegpt_to_chatml(raw: RawData, columns: Mapping[str, str] | None = None) -> RawData:
    """ShareGPT conversations (``{"from": "human"|"gpt"|"system", "value": ...}``) as messages (``{"role", "content"}``,
    human → user, gpt → assistant; a ``from`` that is already a role is kept), in every message column, and a
    ``conversations`` column named ``messages`` (as TRL's maybe_convert_to_chatml; TRL keeps ``human`` / ``gpt`` as
    role names, which chat templates do not know). A message with another ``from`` is left as it is, for validation
    to report by row and field."""

    def convert(value: Any) -> Any:
        if not is_messages(value) or not any("from" in m and "role" not in m for m in value):
            return value
        out = []
        for m in value:
            role = SHAREGPT_ROLES.get(m.get("from"), m.get("from") if m.get("from") in KNOWN_ROLES else None)
            if "role" in m or role is None:
                out.append(m)
                continue
            out.append({"role": role, "content": m.get("value"),
                        **{k: v for k, v in m.items() if k not in ("from", "value")}})
        return out

    names = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")
    if not any(is_messages(r.get(c)) and any("from" in m for m in r[c]) for r in raw.rows[:1] for c in names):
        return raw
    rename = ("conversations" in raw.columns and "messages" not in raw.columns
              and "conversations" not in (columns or {}).values())
    rows = []
    for r in raw.rows:
        r = {k: convert(v) if k in names else v for k, v in r.items()}
        if rename and "conversations" in r:
            r["messages"] = r.pop("conversations")
        rows.append(r)
    cols = [("messages" if rename and c == "conversations" else c) for c in raw.columns]
    return replace(raw, rows=rows, columns=cols)


def read_valid_rows(source: str | os.PathLike | Any, split: str = "train", columns: Mapping[str, str] | None = None,
                    name: str | None = None, *, text_format: str = "auto", on_invalid_row: str = "error",
                    pairing: str = "best_worst", min_score_margin: float = 0.0, seed: int = 0,
                    config: str | None = None, schema: RowSchema | None = None,
                    select: Sequence[str] | None = None) -> tuple[RawData, list[Problem]]:
    """Read, map, convert and validate rows; return the rows and the non-fatal problems (warnings).

    ``select``: the only columns read (alignment-handbook's list form of ``columns``; see select_columns).

    Scored completions are paired first (``pairing``, ``min_score_margin``, ``seed``: data/scored.py).
    ``on_invalid_row="error"``: raise on the first row that cannot be trained on. ``"skip"``: leave such rows out
    (unreadable lines too) and list each with its reason in ``raw.skipped``. ``name`` replaces the source in
    messages (the trainer says "train dataset" for in-memory data). ``schema``: the kind of rows (default
    preference pairs; see RowSchema).
    """
    if on_invalid_row not in ON_INVALID_ROW:
        raise DataError(f"on_invalid_row={on_invalid_row!r} is not one of {', '.join(ON_INVALID_ROW)}.",
                        source=name or source_name(source), fix="use 'error' (stop at the first bad row) or 'skip'")
    unreadable: list[Problem] | None = [] if on_invalid_row == "skip" else None
    raw = read_rows(source, split, collect_errors=unreadable, config=config)
    raw.rows_read = len(raw.rows) + len(unreadable or [])
    if name:
        raw.source = name
    raw = sharegpt_to_chatml(select_columns(raw, select), columns)
    raw = map_columns(pair_scored_rows(raw, pairing, min_score_margin, seed), columns, schema)
    return _apply_policy(raw, text_format, on_invalid_row, unreadable or [], in_memory=bool(name), schema=schema)


def _apply_policy(raw: RawData, text_format: str, on_invalid_row: str, unreadable: list[Problem],
                  in_memory: bool = False, schema: RowSchema | None = None) -> tuple[RawData, list[Problem]]:
    """Convert published formats, validate, and raise or skip by ``on_invalid_row`` (see read_valid_rows)."""
    raw, conversion = convert_published_formats(raw, text_format)
    problems = conversion + (schema or PREFERENCE_ROWS).validate(raw)
    fatal = [p for p in problems if p.fatal]
    if on_invalid_row == "skip":
        first: dict[int, Problem] = {}
        for p in [*unreadable, *fatal]:
            first.setdefault(p.row, p)
        raw.skipped = sorted(first.values(), key=lambda p: p.row)
        keep = [i for i, n in enumerate(raw.row_numbers) if n not in first]
        raw.rows = [raw.rows[i] for i in keep]
        raw.row_numbers = [raw.row_numbers[i] for i in keep]
        if not raw.rows:
            raise DataError(f"every row is invalid ({len(first)} skipped under on_invalid_row=skip); nothing is "
                            "left to train on.", source=raw.source,
                            fix=f"run `prefalign data check {'on the data' if in_memory else raw.source}` to list "
                                "them")
        return raw, [p for p in problems if not p.fatal and p.row in set(raw.row_numbers)]
    if fatal:
        target = "on the data" if in_memory else raw.source
        more = f" ({len(fatal) - 1} more problem(s); run `prefalign data check {target}` to list them all)" \
            if len(fatal) > 1 else ""
        raise fatal[0].as_error(raw.source, raw.row_label, more + _SKIP_HINT)
    return raw, problems


_SKIP_HINT = " To leave such rows out instead (counted and listed): on_invalid_row: skip (--set on_invalid_row=skip)."


def source_name(source: Any) -> str:
    """How messages name a source: its path, or what kind of in-memory data it is."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<in-memory {type(source).__name__}>"


def skipped_entries(raw: RawData) -> list[dict[str, Any]]:
    """``raw.skipped`` as plain data for reports: row, field and reason of each row left out."""
    return [{"row": p.row, "field": p.field, "reason": one_line(p.message)} for p in raw.skipped]


ROW_COLUMN = "source_row"  # the loader's row number (the source line) of each row, carried to every later stage
_INFO_KEY = "prefalign"


def load_preference_dataset(
    source: str | os.PathLike | Any,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    *,
    text_format: str = "auto",
    on_invalid_row: str = "error",
    pairing: str = "best_worst",
    min_score_margin: float = 0.0,
    seed: int = 0,
    schema: RowSchema | None = None,
    config: str | None = None,
) -> Any:
    """Load preference pairs as a `datasets.Dataset` with columns prompt/chosen/rejected (and system if present).

    ``source`` is a .jsonl/.json/.csv/.parquet file (optionally .gz/.bz2/.xz/.zst), a directory saved by
    `datasets`, a hub dataset id, or an in-memory `datasets.Dataset`. ``columns`` maps prefalign's names to yours:
    ``{"chosen": "good"}``. HH-RLHF dialogue text becomes conversations (``text_format="raw"`` keeps the text);
    scored completions (UltraFeedback, Argilla, ``completions: [{text, score}]``) become pairs by ``pairing``, and
    pairs whose scores differ by less than ``min_score_margin`` (or not at all) are left out and counted.
    Raises `DataError` on the first invalid row (``prefalign data check`` lists all of them), or with
    ``on_invalid_row="skip"`` leaves such rows out, logs how many and remembers which (``dataset.info``, read by the
    trainers' data reports). Suspicious rows (duplicates, empty replies) are kept, counted and logged. The rows
    are validated here, once: the dataset also carries each row's number in the source (column ``source_row``) and
    the source's name, so the trainers take it as it is and report rows by the same numbers. ``schema``: another
    kind of rows (``prefalign.data.sft.SFT_ROWS`` for SFT data), validated as that kind. ``config`` is a hub
    dataset's configuration name.
    """
    raw, problems = read_valid_rows(source, split, columns, text_format=text_format, on_invalid_row=on_invalid_row,
                                    pairing=pairing, min_score_margin=min_score_margin, seed=seed, schema=schema,
                                    config=config)
    log_kept(raw, problems)
    return as_dataset(raw, schema)


def as_dataset(raw: RawData, schema: RowSchema | None = None) -> Any:
    """Validated rows as a `datasets.Dataset` that remembers its source, row numbers and the schema they were
    validated against (see validated_rows)."""
    import datasets

    # Every row gets every column (an absent optional field is None): Dataset.from_list takes the first row's keys.
    keep = [c for c in raw.columns if c != "prompt" or any(r.get("prompt") is not None for r in raw.rows)]
    record = {"source": raw.source, "kind": raw.kind, "row_label": raw.row_label, "converted_from": raw.converted_from,
              "pairing": raw.pairing, "rows": _rows_key(raw.row_numbers), "schema": (schema or PREFERENCE_ROWS).name,
              "skipped": [{"row": p.row, "field": p.field, "message": p.message, "fix": p.fix} for p in raw.skipped]}
    # tools as JSON text: Arrow would give every tool schema the keys of all the others (as None)
    ds = datasets.Dataset.from_list([{**{c: _json_tools(r.get(c)) if c == "tools" else r.get(c) for c in keep},
                                      ROW_COLUMN: n}
                                     for r, n in zip(raw.rows, raw.row_numbers, strict=True)])
    # the dataset's fingerprint changes with every map / filter / select, while the info is copied: see validated_rows
    record["fingerprint"] = getattr(ds, "_fingerprint", None)
    ds.info.description = json.dumps({_INFO_KEY: record})
    return ds


def _json_tools(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list) else value


def _rows_key(numbers: Sequence[int]) -> str:
    """A fingerprint of a dataset's row numbers: a dataset derived from a loaded one (filtered, split, mapped)
    keeps the loader's info but not these numbers in this order."""
    import hashlib

    return hashlib.sha256(json.dumps(list(numbers)).encode()).hexdigest()[:16]


def _loader_info(dataset: Any) -> dict[str, Any] | None:
    """What as_dataset recorded, if ``dataset`` came from it (and still has its row numbers)."""
    ds_module = sys.modules.get("datasets")
    if ds_module is None or not isinstance(dataset, ds_module.Dataset) or ROW_COLUMN not in dataset.column_names:
        return None
    try:
        return json.loads(dataset.info.description or "")[_INFO_KEY]
    except (ValueError, TypeError, KeyError):
        return None


def validated_rows(data: Any, name: str, schema: RowSchema | None = None, **options: Any) -> RawData:
    """The rows of ``data`` for tokenisation, validated exactly once.

    A dataset from `load_preference_dataset` was validated by it: its rows, source, row numbers and skipped rows
    are taken as they are. Anything else (raw rows, a `datasets.Dataset`, a path) is read, converted and validated
    here, named ``name`` in messages, with its warnings logged; ``options`` are read_valid_rows' (text_format,
    on_invalid_row, pairing, min_score_margin, seed).
    """
    info = _loader_info(data)
    if info is not None:
        rows = data.to_list()
        numbers = [int(r.pop(ROW_COLUMN)) for r in rows]
        columns = [c for c in data.column_names if c != ROW_COLUMN]
        raw = RawData(info["source"], info.get("kind", "dataset"), rows, columns, info.get("row_label", "row"),
                      numbers, info.get("converted_from"), pairing=info.get("pairing"))
        fingerprint = getattr(data, "_fingerprint", None)
        # exactly what the loader validated (not filtered, split or mapped since), as the same kind of rows
        if (info.get("rows") == _rows_key(numbers) and info.get("fingerprint") in (None, fingerprint)
                and info.get("schema", "preference") == (schema or PREFERENCE_ROWS).name):
            raw.skipped = [Problem(p["row"], p.get("field"), p["message"], p.get("fix"))
                           for p in info.get("skipped", [])]
            return raw
        # derived from a loaded dataset (filtered, split, mapped) or loaded as another kind of rows: validated
        # again, by the same source numbers
        raw, problems = _apply_policy(raw, options.get("text_format", "auto"),
                                      options.get("on_invalid_row", "error"), [], schema=schema)
        log_kept(raw, problems)
        return raw
    in_memory = not isinstance(data, (str, os.PathLike))
    raw, problems = read_valid_rows(data, columns=None, name=name if in_memory else None, schema=schema, **options)
    log_kept(raw, problems)
    return raw


def log_kept(raw: RawData, problems: list[Problem]) -> None:
    """Rows kept despite a warning (duplicates, empty replies), and rows skipped, are never silent."""
    groups: dict[str, list[int]] = {}
    for p in problems:
        kind = "duplicate rows kept" if p.message.startswith("duplicates") else "rows with an empty reply kept"
        groups.setdefault(kind, []).append(p.row)
    if raw.skipped:
        groups["invalid rows skipped (on_invalid_row=skip; listed in data_report.json)"] = [p.row for p in
                                                                                            raw.skipped]
    for kind, rows in groups.items():
        logger.warning("%s: %d %s (%ss %s)", raw.source, len(rows), kind, raw.row_label, row_list(rows))


def validated_chunk(rows: list[dict[str, Any]], numbers: list[int], source: str, schema: RowSchema | None = None,
                    **options: Any) -> RawData:
    """A chunk of a stream (``datasets.IterableDataset``), validated as it is read: the checks one row allows.

    Rows are numbered by the stream's running index (``numbers``); whole-dataset checks (one format for every row,
    duplicates) see only the chunk. ``options`` as validated_rows'; under ``on_invalid_row="skip"`` the chunk's bad
    rows are in ``raw.skipped`` and the chunk may come back empty, otherwise the first bad row raises.
    """
    on_invalid_row = options.get("on_invalid_row", "error")
    raw = RawData(source, "stream", rows, _columns_of(rows), "row", list(numbers))
    raw = map_columns(pair_scored_rows(raw, options.get("pairing", "best_worst"), options.get("min_score_margin", 0.0),
                                       options.get("seed", 0)), None, schema)
    raw, conversion = convert_published_formats(raw, options.get("text_format", "auto"))
    problems = conversion + (schema or PREFERENCE_ROWS).validate(raw)
    fatal = [p for p in problems if p.fatal]
    if fatal and on_invalid_row != "skip":
        raise fatal[0].as_error(raw.source, raw.row_label, " (a streamed dataset: rows are numbered from 1 in the "
                                "order the stream yields them)" + _SKIP_HINT)
    first: dict[int, Problem] = {}
    for p in fatal:
        first.setdefault(p.row, p)
    keep = [i for i, n in enumerate(raw.row_numbers) if n not in first]
    return replace(raw, rows=[raw.rows[i] for i in keep], row_numbers=[raw.row_numbers[i] for i in keep],
                   skipped=sorted(first.values(), key=lambda p: p.row))
