"""`prefalign.data.check.check_dataset`: every problem with the loader's row numbers, token lengths, truncation."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from prefalign.config import PreferenceConfig
from prefalign.data.check import PERCENTILES, check_dataset, percentile
from prefalign.errors import ConfigError
from tiny import smollm2_tokenizer, text_rows


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def _rows() -> list[dict]:
    """Plain-text pairs with prompts and replies of clearly different lengths; the last has a very long prompt."""
    rows = [{"prompt": "Tell me about colour number " + "and more " * (3 * i) + f"{i}.",
             "chosen": f" Colour {i} is blue" + ", really" * i + ".",
             "rejected": " I do not know" + " anything" * (7 - i) + "."} for i in range(7)]
    rows.append({"prompt": "Explain this at length: " + "word " * 200, "chosen": " Sure.", "rejected": " No."})
    return rows


def _lengths(tokenizer, row: dict) -> tuple[int, int, int]:
    """Prompt, chosen and rejected token counts under the chat template, computed without prefalign."""
    def ids(messages, **kw):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    user = [{"role": "user", "content": row["prompt"]}]
    lp = len(ids(user, add_generation_prompt=True))
    return (lp, *(len(ids(user + [{"role": "assistant", "content": row[k]}])) - lp for k in ("chosen", "rejected")))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], list[dict]]:
    """A JSON Lines file with a blank line, bad lines and a duplicate; returns (path, good line numbers, good rows)."""
    rows = _rows()
    lines = [rows[0], "", rows[1], '{"prompt": "p", "chosen": ', rows[2], rows[3],
             {"prompt": "p", "chosen": "only chosen"},  # line 7: missing rejected
             rows[4], "[1, 2]", rows[5], rows[6], rows[7], rows[0]]  # line 9: not an object; line 13: duplicate
    path = _write(tmp_path_factory.mktemp("check") / "pairs.jsonl", lines)
    measured = [1, 3, 5, 6, 8, 10, 11, 12, 13]
    return path, measured, [*rows, rows[0]]


def test_counts_problems_and_percentiles_with_the_real_tokenizer(data, tokenizer):
    path, measured, rows = data
    report = check_dataset(path, tokenizer=tokenizer, max_length=None)
    assert report.source == str(path) and report.kind == "jsonl" and report.row_label == "line"
    assert report.rows == 12  # 10 readable rows + 2 unreadable lines; blank lines are not rows
    assert report.format == "standard (plain text), explicit prompt" and report.chat_template is True
    assert [(f.row, f.fatal) for f in report.findings] == [(4, True), (7, True), (9, True), (13, False)]
    assert report.findings[0].text.startswith("line 4: invalid JSON")
    assert report.findings[1].text.startswith("line 7, field 'rejected': is missing.")
    assert report.findings[3].text.startswith("line 13: duplicates line 1.")
    assert not report.ok and len(report.errors) == 3 and len(report.warnings) == 1

    expected = [_lengths(tokenizer, r) for r in rows]  # the duplicate is a warning, so it is measured too
    assert report.lengths["prompt"] == [lp for lp, _, _ in expected]
    assert report.lengths["chosen"] == [lc for _, lc, _ in expected]
    assert report.lengths["rejected"] == [lr for _, _, lr in expected]
    assert report.lengths["prompt+longest reply"] == [lp + max(lc, lr) for lp, lc, lr in expected]
    # Nearest rank over 9 rows: p50 is the 5th smallest, p90 and p99 the 9th (the largest).
    prompts = sorted(lp for lp, _, _ in expected)
    assert report.length_stats()["prompt"] == {"p50": prompts[4], "p90": prompts[8], "p99": prompts[8],
                                               "max": prompts[8]}
    assert report.cut == {"prompt": [], "reply": [], "no_room": []}  # max_length=None cuts nothing

    text = report.render_text()
    assert "rows: 12 read, 9 without errors, 3 error(s), 1 warning(s)" in text
    assert "token lengths over 9 rows, before truncation:" in text
    assert f"  {'prompt':<22}{prompts[4]:>8}{prompts[8]:>8}{prompts[8]:>8}{prompts[8]:>8}" in text.splitlines()
    doc = json.loads(report.to_json())
    assert doc["rows"] == 12 and doc["ok"] is False and doc["token_lengths"] == report.length_stats()
    assert [p["row"] for p in doc["problems"]] == [4, 7, 9, 13]


def test_truncation_is_counted_by_line_number(data, tokenizer):
    path, measured, rows = data
    expected = dict(zip(measured, (_lengths(tokenizer, r) for r in rows), strict=True))
    longest = max(lp for lp, _, _ in expected.values())
    normal = sorted(lp for lp, _, _ in expected.values())[-2]  # the longest prompt but the 200-word one
    max_length = normal + 5
    assert longest > max_length
    report = check_dataset(path, tokenizer=tokenizer, max_length=max_length)
    assert report.cut["no_room"] == [n for n, (lp, _, _) in expected.items() if lp >= max_length] == [12]
    assert report.cut["reply"] == [n for n, (lp, lc, lr) in expected.items()
                                   if lp < max_length and lp + max(lc, lr) > max_length]
    assert report.cut["reply"] and report.cut["prompt"] == []
    assert any(f.row == 12 and f.text.startswith("line 12, field 'prompt': the prompt alone is") for f in report.errors)
    assert "1 row(s) rejected (prompt leaves no room) (lines 12)" in report.render_text()

    report = check_dataset(path, tokenizer=tokenizer, max_length=max_length, max_prompt_length=normal)
    assert report.cut["prompt"] == [12] and report.cut["no_room"] == []
    assert report.lengths["prompt"] == [lp for lp, _, _ in expected.values()]  # lengths are before truncation


def test_without_a_tokenizer_only_the_data_is_checked(data):
    path, _, _ = data
    report = check_dataset(str(path))
    assert report.tokenizer_name is None and not report.measured and report.chat_template is None
    assert [f.row for f in report.findings] == [4, 7, 9, 13] and report.lengths["prompt"] == []
    assert "token lengths and truncation not measured" in report.render_text()
    doc = json.loads(report.to_json())
    assert doc["token_lengths"] is None and doc["reply_cut_rows"] is None and doc["model"] is None


def test_clean_data_mapped_columns_and_in_memory_rows(tmp_path, tokenizer):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in text_rows(4)]
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    report = check_dataset(_write(tmp_path / "m.jsonl", rows), tokenizer=tokenizer, columns=columns,
                           tokenizer_name="smollm2")
    assert report.ok and report.findings == [] and report.rows == 4 and len(report.lengths["chosen"]) == 4
    assert "tokenizer: smollm2 (chat template: yes)" in report.render_text()
    assert "result: OK" in report.render_text()
    report = check_dataset(text_rows(3), tokenizer=tokenizer)
    assert report.ok and report.source == "<in-memory rows>" and report.row_label == "row"


def test_unreadable_sources_are_findings(tmp_path):
    report = check_dataset(tmp_path / "nope.jsonl")
    assert not report.ok and report.rows == 0 and report.findings[0].row is None
    assert "no such file" in report.findings[0].text and report.format is None
    report = check_dataset(_write(tmp_path / "q.jsonl", [{"question": "q", "good": "a", "bad": "b"}]))
    assert "missing column(s)" in report.findings[0].text and report.rows == 1


def test_settings_follow_the_config_rules_and_defaults():
    defaults = {f.name: f.default for f in fields(PreferenceConfig)}
    report = check_dataset([])
    assert report.settings.max_length == defaults["max_length"]
    assert report.settings.chat == defaults["chat_template_for_text"]
    with pytest.raises(ConfigError, match="max_length"):
        check_dataset([], max_length=1)
    with pytest.raises(ConfigError, match="max_prompt_length"):
        check_dataset([], max_length=10, max_prompt_length=10)


@pytest.mark.parametrize(("values", "expected"), [([5], (5, 5, 5)), ([1, 2], (1, 2, 2)),
                                                  (list(range(1, 101)), (50, 90, 99)),
                                                  ([3, 1, 2, 10, 4], (3, 10, 10))])
def test_percentile_is_nearest_rank(values, expected):
    assert tuple(percentile(values, p) for p in PERCENTILES) == expected
