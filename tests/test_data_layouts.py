"""Recipes' data keys and layouts: a mixture member's ``columns:`` list (alignment-handbook's select_columns),
``config:`` on local directories, split names with dots, a missing split, and ``hf download`` snapshot folders read
as ``datasets.load_dataset`` reads them (the oracle here)."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign.data.format import to_example
from prefalign.data.load import read_rows, read_valid_rows
from prefalign.data.mixture import load_mixture
from prefalign.data.tokenize import TokenizeSettings, tokenize_rows
from prefalign.errors import DataError
from tiny import smollm2_tokenizer


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "system", "content": "You are an AI assistant."}, {"role": "user", "content": q},
            {"role": "assistant", "content": a}]


def _orca(n: int = 3) -> list[dict]:
    return [{"system": "", "question": f"q{i}", "prompt": f"q{i}", "chosen": _conv(f"q{i}", f"good {i}"),
             "rejected": _conv(f"q{i}", f"bad {i}")} for i in range(n)]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _pairs(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def test_member_columns_list_selects_columns_as_the_handbook(tmp_path):
    path = _jsonl(tmp_path / "orca.jsonl", _orca())
    spec = {"datasets": [{"path": str(path), "columns": ["chosen", "rejected"]}], "seed": 0}
    train, _ = load_mixture(spec)
    rows = sorted(train.to_list(), key=lambda r: r["source_row"])
    # the text prompt column was dropped: the prompt is the conversations' shared start (system + user)
    assert "prompt" not in train.column_names or all(r.get("prompt") is None for r in rows)
    raw, _ = read_valid_rows(path, select=["chosen", "rejected"])
    assert raw.columns == ["chosen", "rejected"] and set(raw.rows[0]) == {"chosen", "rejected"}
    assert [r["chosen"][-1]["content"] for r in rows] == ["good 0", "good 1", "good 2"]
    ex = to_example(rows[0], chat=True)
    assert [m["role"] for m in ex.prompt] == ["system", "user"] and ex.chosen == [
        {"role": "assistant", "content": "good 0"}]
    pairs, report = tokenize_rows(rows, smollm2_tokenizer(), TokenizeSettings())
    assert len(pairs) == 3 and report.prompt_rerendered == []  # a clean split: no prompt re-rendered
    # a listed column the data lacks is a one-line error naming those found
    spec["datasets"][0]["columns"] = ["chosen", "rejected", "score"]
    with pytest.raises(DataError) as info:
        load_mixture(spec)
    assert "columns: score not in the data" in str(info.value) and "question" in str(info.value)


def test_directory_split_files_missing_split_and_dotted_names(tmp_path):
    d = tmp_path / "only_train"
    _jsonl(d / "train.jsonl", _pairs("t", 2))
    assert len(read_rows(d).rows) == 2
    with pytest.raises(DataError) as info:  # used to serve train.jsonl silently
        read_rows(d, split="test")
    msg = str(info.value)
    assert "has no split 'test' (splits: train)" in msg and "\n" not in msg
    d = tmp_path / "dotted"
    _parquet(d / "data" / "OpenThoughts3_1.2M_think-00000-of-00002.parquet", _pairs("a", 2))
    _parquet(d / "data" / "OpenThoughts3_1.2M_think-00001-of-00002.parquet", _pairs("b", 1))
    _parquet(d / "data" / "other_1.0-00000-of-00001.parquet", _pairs("c", 4))
    raw = read_rows(d, split="OpenThoughts3_1.2M_think")
    assert [r["prompt"] for r in raw.rows] == ["a 0?", "a 1?", "b 0?"] and raw.row_numbers == [1, 2, 3]
    with pytest.raises(DataError, match=r"splits: OpenThoughts3_1\.2M_think, other_1\.0"):
        read_rows(d, split="OpenThoughts3_1")
    # a folder whose file names no split is the train split, as datasets reads it
    _jsonl(tmp_path / "plain" / "pairs.jsonl", _pairs("p", 3))
    assert len(read_rows(tmp_path / "plain").rows) == 3
    assert read_rows(tmp_path / "plain").rows == datasets.load_dataset(str(tmp_path / "plain"), split="train").to_list()


SNAPSHOT_README = """---
license: apache-2.0
configs:
- config_name: SFT
  data_files:
  - split: OpenThoughts3_1.2M_think
    path: SFT/OpenThoughts3_1.2M_think-*
  - split: tulu_3.5
    path: SFT/tulu_3.5-*
- config_name: Preference
  default: true
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
---
# a dataset card
"""


def test_hf_snapshot_folder_reads_as_load_dataset(tmp_path):
    d = tmp_path / "snapshot"
    d.mkdir()
    (d / "README.md").write_text(SNAPSHOT_README, encoding="utf-8")
    _parquet(d / "SFT" / "OpenThoughts3_1.2M_think-00000-of-00001.parquet", _pairs("think", 2))
    _parquet(d / "SFT" / "tulu_3.5-00000-of-00001.parquet", _pairs("tulu", 1))
    _parquet(d / "data" / "train_prefs-00000-of-00002.parquet", _pairs("p", 2))
    _parquet(d / "data" / "train_prefs-00001-of-00002.parquet", _pairs("q", 2))
    for config, split in (("SFT", "OpenThoughts3_1.2M_think"), ("SFT", "tulu_3.5"), ("Preference", "train_prefs"),
                          (None, "train_prefs")):
        want = datasets.load_dataset(str(d), config, split=split).to_list()
        assert read_rows(d, split=split, config=config).rows == want, (config, split)
    with pytest.raises(DataError) as info:
        read_rows(d, split="train_prefs", config="RL")
    assert "has no config 'RL' (configs in README.md: SFT, Preference)" in str(info.value)
    with pytest.raises(DataError, match=r"has no split 'train' \(splits: OpenThoughts3_1\.2M_think, tulu_3\.5\)"):
        read_rows(d, split="train", config="SFT")
    # through a recipe member: config and a dotted split honoured
    spec = {"datasets": [{"path": str(d), "config": "SFT", "split": "tulu_3.5"}], "seed": 0}
    train, _ = load_mixture(spec)
    assert train.to_list()[0]["prompt"] == "tulu 0?"


def test_config_on_a_folder_without_a_card(tmp_path):
    d = tmp_path / "configs"
    _jsonl(d / "easy" / "train.jsonl", _pairs("easy", 2))
    _jsonl(d / "hard" / "train.jsonl", _pairs("hard", 1))
    assert [r["prompt"] for r in read_rows(d, config="hard").rows] == ["hard 0?"]
    with pytest.raises(DataError) as info:
        read_rows(d, config="medium")
    msg = str(info.value)
    assert "has no config 'medium'" in msg and "folders: easy, hard" in msg and "\n" not in msg
    with pytest.raises(DataError, match="is one file, which has no config 'hard'"):
        read_rows(d / "hard" / "train.jsonl", config="hard")


def test_shards_are_numbered_on_and_unreadable_lines_located(tmp_path):
    d = tmp_path / "shards"
    _jsonl(d / "train-00000-of-00002.jsonl", _pairs("a", 2))
    (d / "train-00001-of-00002.jsonl").write_text(json.dumps(_pairs("b", 1)[0]) + "\n{oops\n", encoding="utf-8")
    collect: list = []
    raw = read_rows(d, collect_errors=collect)
    assert raw.row_numbers == [1, 2, 3] and raw.row_label == "line"
    assert [p.row for p in collect] == [4]  # line 2 of the second shard, after the first shard's 2 lines
