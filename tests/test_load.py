"""Reading preference data from every supported source, and one-line errors that say where the problem is."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign.data.load import load_preference_dataset, map_columns, read_rows, validate_rows
from prefalign.errors import DataError

TEXT_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris, of course.", "rejected": "Lyon"},
    {"prompt": "Say hi", "chosen": "Hi!\nHow are you?", "rejected": "No."},
]
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away"}]},
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def load_error(source, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_preference_dataset(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- sources


def _rows(ds):
    """The loaded rows without the loader's row numbers (asserted where they matter)."""
    return [{k: v for k, v in r.items() if k != "source_row"} for r in ds.to_list()]


def test_jsonl(tmp_path):
    ds = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", TEXT_ROWS))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "chosen", "rejected", "source_row"]
    assert _rows(ds) == TEXT_ROWS


def test_jsonl_blank_lines_and_bom(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(("\ufeff" + json.dumps(TEXT_ROWS[0]) + "\n\n   \n" + json.dumps(TEXT_ROWS[1]) + "\r\n")
                     .encode("utf-8"))
    ds = load_preference_dataset(path)
    assert _rows(ds) == TEXT_ROWS[:2]
    assert ds["source_row"] == [1, 4]  # line numbers: blank lines count


def test_conversational_jsonl(tmp_path):
    ds = load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS))
    assert _rows(ds) == CHAT_ROWS


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(TEXT_ROWS, indent=2))
    assert _rows(load_preference_dataset(path)) == TEXT_ROWS


def test_json_train_key_and_column_oriented(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": TEXT_ROWS[:2], "test": TEXT_ROWS[2:]}))
    assert _rows(load_preference_dataset(path)) == TEXT_ROWS[:2]
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({k: [r[k] for r in TEXT_ROWS] for k in ("prompt", "chosen", "rejected")}))
    assert _rows(load_preference_dataset(path)) == TEXT_ROWS


def test_json_lines_saved_as_json(tmp_path):
    path = tmp_path / "p.json"
    write_jsonl(path, TEXT_ROWS)
    assert _rows(load_preference_dataset(path)) == TEXT_ROWS


def test_csv(tmp_path):
    # commas and newlines inside fields survive CSV quoting
    ds = load_preference_dataset(write_csv(tmp_path / "p.csv", TEXT_ROWS))
    assert _rows(ds) == TEXT_ROWS


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(TEXT_ROWS), path)
    assert _rows(load_preference_dataset(path)) == TEXT_ROWS
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), path)
    assert _rows(load_preference_dataset(path)) == CHAT_ROWS


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(TEXT_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert _rows(load_preference_dataset(tmp_path / "ds")) == TEXT_ROWS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS[:1]),
                               "test": datasets.Dataset.from_list(TEXT_ROWS[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _rows(load_preference_dataset(tmp_path / "dd")) == TEXT_ROWS[:1]
    assert _rows(load_preference_dataset(str(tmp_path / "dd"), split="test")) == TEXT_ROWS[1:]
    msg = load_error(str(tmp_path / "dd"), split="validation")
    assert str(tmp_path / "dd") in msg and "no split 'validation'" in msg and "train, test" in msg


def test_directory_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TEXT_ROWS[:2])
    write_jsonl(tmp_path / "test.jsonl", TEXT_ROWS[2:])
    assert _rows(load_preference_dataset(tmp_path)) == TEXT_ROWS[:2]
    assert _rows(load_preference_dataset(tmp_path, split="test")) == TEXT_ROWS[2:]


def test_in_memory_dataset_and_rows():
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    assert _rows(load_preference_dataset(ds)) == CHAT_ROWS
    dd = datasets.DatasetDict({"train": ds, "eval": datasets.Dataset.from_list(CHAT_ROWS[:1])})
    assert _rows(load_preference_dataset(dd, split="eval")) == CHAT_ROWS[:1]
    assert _rows(load_preference_dataset(list(TEXT_ROWS))) == TEXT_ROWS


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "score": 1} for r in TEXT_ROWS]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load_preference_dataset(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert ds.column_names == ["prompt", "chosen", "rejected", "source_row"]  # unmapped columns are dropped
    assert _rows(ds) == TEXT_ROWS
    msg = load_error(path, columns={"chosen": "gooood", "rejected": "bad"})
    assert "no column 'gooood'" in msg and "question, good, bad, score" in msg
    msg = load_error(path, columns={"answer": "good"})
    assert "unknown target column 'answer'" in msg


def test_system_column_and_implicit_prompt(tmp_path):
    rows = [{"system": "Be kind.", "chosen": "Q? Yes", "rejected": "Q? No"},
            {"system": None, "chosen": "R? Fine", "rejected": "R? Bad"}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "s.jsonl", rows))
    assert ds.column_names == ["chosen", "rejected", "system", "source_row"]
    assert _rows(ds) == [{"chosen": r["chosen"], "rejected": r["rejected"], "system": r["system"]} for r in rows]
    # a prompt column that is null everywhere is the implicit-prompt format: the column is dropped
    rows = [{"prompt": None, "chosen": "Q? Yes", "rejected": "Q? No"}]
    columns = load_preference_dataset(write_jsonl(tmp_path / "n.jsonl", rows)).column_names
    assert columns == ["chosen", "rejected", "source_row"]


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    msg = load_error(path)
    assert msg.startswith(path + ": ") and "no such file" in msg


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    msg = load_error(path)
    assert str(path) in msg and "unknown file extension '.txt'" in msg and ".jsonl" in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = json.dumps(TEXT_ROWS[0]) + "\n"
    path.write_bytes(good.encode("utf-8") + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    msg = load_error(path)
    assert str(path) in msg and "not UTF-8" in msg and "0xe9" in msg and "line 2" in msg


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in TEXT_ROWS] + ['{"prompt": "x", "chosen": "a" "rejected": "b"}']
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # blank line 3: bad row on line 5
    msg = load_error(path)
    assert str(path) in msg and "invalid JSON on line 5" in msg
    path.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n[1, 2]\n')
    msg = load_error(path)
    assert "line 2 is a JSON list, not an object" in msg


def test_collect_errors_lists_every_unreadable_line_and_reads_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join([
        json.dumps(TEXT_ROWS[0]),
        '{"prompt": "x", "chosen": "a" "rejected": "b"}',  # line 2: invalid JSON
        "",
        json.dumps(TEXT_ROWS[1]),
        "[1, 2]",  # line 5: not an object
        '{"prompt": "p", "chosen": ',  # line 6: invalid JSON
        json.dumps(TEXT_ROWS[2]),
    ]).encode("utf-8") + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')  # line 8: latin-1
    problems: list = []
    raw = read_rows(str(path), collect_errors=problems)
    assert raw.rows == TEXT_ROWS and raw.row_numbers == [1, 4, 7] and raw.row_label == "line"
    assert [(p.row, p.field, p.fatal) for p in problems] == [(2, None, True), (5, None, True), (6, None, True),
                                                             (8, None, True)]
    assert problems[0].message.startswith("invalid JSON: ") and "column" in problems[0].message
    assert problems[1].message == "is a JSON list, not an object."
    assert problems[3].message == "is not UTF-8 (byte 0xe9)."
    assert str(problems[2].as_error(str(path), "line")).startswith(f"{path}, line 6: invalid JSON")
    # without a list the first bad line still raises, and load_preference_dataset still stops there
    with pytest.raises(DataError, match="invalid JSON on line 2"):
        read_rows(str(path))
    assert "invalid JSON on line 2" in load_error(path)


def test_collect_errors_in_json_lists_and_csv_rows(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([TEXT_ROWS[0], "oops", TEXT_ROWS[1], 3]))
    problems: list = []
    raw = read_rows(path, collect_errors=problems)
    assert raw.rows == TEXT_ROWS[:2] and raw.row_numbers == [1, 3]
    assert [(p.row, p.message) for p in problems] == [(2, "is a JSON str, not an object."),
                                                      (4, "is a JSON int, not an object.")]
    path = tmp_path / "wide.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b,c with, commas\nq,c,d\n")
    problems = []
    raw = read_rows(path, collect_errors=problems)
    assert raw.row_numbers == [1, 3] and [(p.row, p.message) for p in problems] == [
        (2, "has 5 fields but the header has 3.")]


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  {"prompt": "p" "chosen": "a"}\n]\n')
    msg = load_error(path)
    assert str(path) in msg and "invalid JSON on line 3" in msg
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, "oops"]')
    msg = load_error(path)
    assert f"{path}, row 2: is a JSON str, not an object" in msg


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "prompt,chosen,rejected\n")])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    msg = load_error(path)
    assert str(path) in msg and "empty (0 rows)" in msg


def test_missing_required_columns_suggests_mapping(tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "missing column(s) 'chosen', 'rejected'" in msg
    assert "found columns: question, good, bad" in msg
    assert "--columns chosen=good,rejected=bad" in msg
    msg = load_error(write_jsonl(tmp_path / "m2.jsonl", [{"prompt": "q", "chosen": "a", "other": "b"}]))
    assert "missing column(s) 'rejected'" in msg and "rejected=<column>" in msg


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b,c with, commas\n")
    msg = load_error(path)
    assert f"{path}, row 2:" in msg and "has 5 fields but the header has 3" in msg


# ---------------------------------------------------------------- row-level errors


def _jsonl_with_bad_row(tmp_path, bad: dict) -> tuple[str, str]:
    path = write_jsonl(tmp_path / "rows.jsonl", [TEXT_ROWS[0], TEXT_ROWS[1], bad])
    return path, load_error(path)


@pytest.mark.parametrize("value,kind", [(42, "a number"), (None, "null"), ({"text": "hi"}, "an object"),
                                        (True, "a boolean"), (["a", "b"], "a list")])
def test_wrong_type_for_text(tmp_path, value, kind):
    path, msg = _jsonl_with_bad_row(tmp_path, {"prompt": "p", "chosen": value, "rejected": "r"})
    assert msg.startswith(f"{path}, line 3, field 'chosen': is {kind}; expected text"), msg


@pytest.mark.parametrize("fmt", ["jsonl", "json", "list"])
def test_missing_field_is_missing_not_null(tmp_path, fmt):
    rows = [TEXT_ROWS[0], {"prompt": "p", "rejected": "r"}, {"prompt": "p", "chosen": None, "rejected": "r"}]
    if fmt == "jsonl":
        source, where = write_jsonl(tmp_path / "m.jsonl", rows), "line"
    elif fmt == "json":
        (tmp_path / "m.json").write_text(json.dumps(rows))
        source, where = str(tmp_path / "m.json"), "row"
    else:
        source, where = rows, "row"
    raw = map_columns(read_rows(source), None)
    assert "chosen" not in raw.rows[1] and raw.rows[2]["chosen"] is None
    problems = validate_rows(raw)
    assert [(p.row, p.field, p.message) for p in problems] == [
        (2, "chosen", "is missing."), (3, "chosen", "is null; expected text or a list of {role, content} messages.")]
    msg = load_error(source)
    assert f"{where} 2, field 'chosen': is missing." in msg and "1 more problem(s)" in msg


def test_missing_field_under_a_column_mapping_and_in_a_short_csv_row(tmp_path):
    rows = [{"q": "p", "good": "a", "bad": "b"}, {"q": "p", "bad": "b"}]
    msg = load_error(write_jsonl(tmp_path / "m.jsonl", rows), columns={"prompt": "q", "chosen": "good",
                                                                       "rejected": "bad"})
    assert "line 2, field 'chosen': is missing." in msg
    path = tmp_path / "short.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a\nq,c,\n")
    problems = validate_rows(map_columns(read_rows(path), None))
    assert [(p.row, p.field, p.message, p.fatal) for p in problems] == [
        (2, "rejected", "is missing.", True),
        (3, "rejected", "is empty; trained on as an empty reply (its end-of-turn token).", False)]


def test_rows_missing_an_optional_field_keep_the_column(tmp_path):
    rows = [{"chosen": "Q? Yes", "rejected": "Q? No"}, {"prompt": "R?", "chosen": " Fine", "rejected": " Bad"},
            {"chosen": "S? a", "rejected": "S? b", "system": "Be kind."}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "o.jsonl", rows))
    assert ds.column_names == ["prompt", "chosen", "rejected", "system", "source_row"]
    assert ds[1]["prompt"] == "R?" and ds[0]["prompt"] is None and ds[2]["system"] == "Be kind."


def test_wrong_type_in_csv_and_parquet_rows(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                         {"prompt": "p", "chosen": "a", "rejected": None}]), path)
    assert load_error(path).startswith(f"{path}, row 2, field 'rejected': is null")
    msg = load_error(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "system": 3}]))
    assert "line 1, field 'system': is a number; expected text." in msg


@pytest.mark.parametrize("message,field,expect", [
    ({"content": "x"}, "chosen[0]", "message has no 'role'"),
    ({"role": "assistant"}, "chosen[0]", "message has no 'content'"),
    ({"role": "bot", "content": "x"}, "chosen[0]", "unknown role 'bot'"),
    ({"role": "assistant", "content": 7}, "chosen[0]", "content is a number, not text"),
])
def test_bad_messages(tmp_path, message, field, expect):
    bad = dict(CHAT_ROWS[1], chosen=[message])
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_ROWS[0], bad])
    msg = load_error(path)
    assert msg.startswith(f"{path}, line 2, field '{field}': {expect}"), msg


def test_bad_message_deep_in_prompt(tmp_path):
    bad = dict(CHAT_ROWS[0], prompt=[{"role": "system", "content": "x"}, {"role": "human", "content": "y"}])
    msg = load_error(write_jsonl(tmp_path / "c.jsonl", [bad]))
    assert "line 1, field 'prompt[1]': unknown role 'human'" in msg


def test_chosen_identical_to_rejected(tmp_path):
    path, msg = _jsonl_with_bad_row(tmp_path, {"prompt": "p", "chosen": "same", "rejected": "same"})
    assert msg.startswith(f"{path}, line 3, field 'rejected': is identical to chosen"), msg


@pytest.mark.parametrize("chosen", ["", "   \n"])
def test_empty_completion(tmp_path, chosen, caplog):
    """An empty reply is valid (its templated form still has the end-of-turn token): kept, counted, warned about."""
    path = write_jsonl(tmp_path / "e.jsonl", [TEXT_ROWS[0], TEXT_ROWS[1], {"prompt": "p", "chosen": chosen,
                                                                         "rejected": "r"}])
    problems = validate_rows(map_columns(read_rows(path), None))
    assert [(p.row, p.field, p.fatal) for p in problems] == [(3, "chosen", False)]
    assert problems[0].message.startswith("is empty; trained on as an empty reply")
    assert load_preference_dataset(path)["source_row"] == [1, 2, 3]
    assert "1 rows with an empty reply kept (lines 3)" in caplog.text


def test_empty_final_message_and_empty_message_list(tmp_path):
    bad = dict(CHAT_ROWS[0], rejected=[{"role": "assistant", "content": " "}])
    problems = validate_rows(map_columns(read_rows(write_jsonl(tmp_path / "c.jsonl", [bad])), None))
    assert [(p.row, p.field, p.fatal) for p in problems] == [(1, "rejected", False)]  # a warning: trained on
    assert problems[0].message.startswith("final message is empty")
    bad = dict(CHAT_ROWS[0], chosen=[])
    msg = load_error(write_jsonl(tmp_path / "c2.jsonl", [bad]))
    assert "line 1, field 'chosen': is an empty list of messages" in msg


def test_text_and_messages_mixed_in_one_row(tmp_path):
    bad = dict(TEXT_ROWS[0], prompt=[{"role": "user", "content": "a message prompt before text replies"}])
    msg = load_error(write_jsonl(tmp_path / "c.jsonl", [bad]))
    assert "line 1: mixes plain text and message lists" in msg
    # a text prompt before message replies is the prompt's user turn (HuggingFaceH4/ultrafeedback_binarized's shape)
    ok = dict(CHAT_ROWS[0], prompt="plain text prompt")
    assert _rows(load_preference_dataset(write_jsonl(tmp_path / "ok.jsonl", [ok]))) == [ok]


def test_first_problem_is_raised_and_the_rest_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": 1, "rejected": "r"}, TEXT_ROWS[0], {"prompt": "p", "chosen": "", "rejected": ""}]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    msg = load_error(path)
    assert msg.startswith(f"{path}, line 1, field 'chosen'")
    assert "(1 more problem(s); run `prefalign data check " in msg  # line 3: both empty, so identical


def test_validate_rows_lists_every_problem(tmp_path):
    rows = [{"prompt": "p", "chosen": 1, "rejected": None}, TEXT_ROWS[0], {"prompt": "p", "chosen": "x",
                                                                           "rejected": "x"}]
    raw = map_columns(read_rows(write_jsonl(tmp_path / "many.jsonl", rows)), None)
    got = [(p.row, p.field, p.fatal) for p in validate_rows(raw)]
    assert got == [(1, "chosen", True), (1, "rejected", True), (3, "rejected", True)]


def test_duplicates_are_reported_but_not_fatal(tmp_path):
    rows = [TEXT_ROWS[0], TEXT_ROWS[1], dict(TEXT_ROWS[0]), TEXT_ROWS[2], dict(TEXT_ROWS[1])]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    problems = validate_rows(map_columns(read_rows(path), None))
    assert [(p.row, p.fatal, p.message) for p in problems] == [(3, False, "duplicates line 1."),
                                                               (5, False, "duplicates line 2.")]
    ds = load_preference_dataset(path)
    assert len(ds) == 5  # kept


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variable at import time, which has happened by now
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    name = "prefalign-tests/no-such-preference-dataset"
    msg = load_error(name)
    assert msg.startswith(f"{name}: not a local file and could not be loaded from the hub")
    assert "HF_HUB_OFFLINE" in msg


def test_path_like_names_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("load_dataset must not be called for a path")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    for name in ("./missing", "data/train/prefs", "prefs.jsonl"):
        assert "no such file or directory" in load_error(name)


# ---------------------------------------------------------------- known bugs


def test_jsonl_with_unicode_line_separator_in_a_string(tmp_path):
    rows = [{"prompt": "p", "chosen": "first\u2028second", "rejected": "r\x85s"}, TEXT_ROWS[0]]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert _rows(load_preference_dataset(path)) == rows


def test_csv_with_unicode_line_separator_in_a_field(tmp_path):
    rows = [{"prompt": "p", "chosen": "first\u2028second", "rejected": "r"}, TEXT_ROWS[0]]
    assert _rows(load_preference_dataset(write_csv(tmp_path / "u.csv", rows))) == rows


def test_rows_mixing_text_and_messages_raise_data_error(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [TEXT_ROWS[0], CHAT_ROWS[0]])
    msg = load_error(path)
    assert f"{path}, line 2" in msg
