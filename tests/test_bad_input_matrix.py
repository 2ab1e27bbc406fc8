"""Issue 5's bad-input matrix through `prefalign train`: one line naming file, row and field, exit code 2, no
traceback, and no output directory left behind."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main
from tiny import save_tiny

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello."}
B = {"role": "assistant", "content": "Go away."}


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"prompt": [U], "chosen": [A], "rejected": [B]}
CASES = {
    # name: (file name, file content (str or bytes), extra argv, fragments the one error line must contain)
    "missing file": ("absent.jsonl", None, [], ["absent.jsonl", "no such file"]),
    "unknown extension": ("pairs.txt", "x", [], ["pairs.txt", "extension", ".jsonl"]),
    "not utf-8": ("latin.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), [], ["latin.jsonl", "UTF-8"]),
    "invalid json": ("bad.jsonl", _jsonl([GOOD]) + "{not json\n", [], ["bad.jsonl", "line 2", "JSON"]),
    "empty dataset": ("empty.jsonl", "", [], ["empty.jsonl", "empty"]),
    "missing chosen": ("cols.jsonl", _jsonl([{"prompt": "q", "good": "a", "rejected": "b"}]), [],
                       ["cols.jsonl", "chosen", "found columns", "good", "--columns"]),
    "number as text": ("num.jsonl", _jsonl([GOOD, {"prompt": "q", "chosen": 5, "rejected": "b"}]), [],
                       ["num.jsonl", "line 2", "chosen", "number"]),
    "null as text": ("null.jsonl", _jsonl([{"prompt": "q", "chosen": "a", "rejected": None}]), [],
                     ["null.jsonl", "line 1", "rejected", "null"]),
    "dict as text": ("dict.jsonl", _jsonl([{"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}]), [],
                     ["dict.jsonl", "line 1", "chosen", "object"]),
    "message without role": ("norole.jsonl", _jsonl([{"prompt": [{"content": "Hi"}], "chosen": [A],
                                                      "rejected": [B]}]), [], ["norole.jsonl", "prompt[0]", "role"]),
    "message without content": ("nocontent.jsonl", _jsonl([{"prompt": [U], "chosen": [{"role": "assistant"}],
                                                            "rejected": [B]}]), [],
                                ["nocontent.jsonl", "chosen[0]", "content"]),
    "unknown role": ("role.jsonl", _jsonl([{"prompt": [{"role": "wizard", "content": "Hi"}], "chosen": [A],
                                            "rejected": [B]}]), [], ["role.jsonl", "prompt[0]", "wizard"]),
    "chosen identical to rejected": ("same.jsonl", _jsonl([{"prompt": [U], "chosen": [A], "rejected": [A]}]), [],
                                     ["same.jsonl", "line 1", "identical"]),
    # (an empty reply is valid: a warning, trained on as its end-of-turn token; an empty message list is not)
    "empty completion": ("emptyreply.jsonl", _jsonl([{"prompt": [{"role": "user", "content": "q"}], "chosen": [],
                                                      "rejected": [A]}]), [],
                         ["emptyreply.jsonl", "line 1", "chosen", "empty list of messages"]),
    "prompt longer than max_length": (
        "long.jsonl", _jsonl([GOOD, {"prompt": [{"role": "user", "content": "word " * 200}], "chosen": [A],
                                     "rejected": [B]}]),
        ["--max-length", "64"], ["line 2", "prompt", "max_length=64", "max_prompt_length"]),
    "unknown config key": ("ok.jsonl", _jsonl([GOOD]), ["--set", "lerning_rate=1e-5"],
                           ["lerning_rate", "learning_rate"]),
    "beta <= 0": ("ok.jsonl", _jsonl([GOOD]), ["--beta", "0"], ["beta", "> 0"]),
    "learning rate <= 0": ("ok.jsonl", _jsonl([GOOD]), ["--learning-rate", "-1"], ["learning_rate", "> 0"]),
    "max_length < 2": ("ok.jsonl", _jsonl([GOOD]), ["--max-length", "1"], ["max_length", ">= 2"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    chat = save_tiny(root / "chat", seed=0)
    # The same model with a tokenizer that has no chat template.
    from transformers import AutoTokenizer

    plain = save_tiny(root / "plain", seed=0)
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (root / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    return chat, plain


def _check(capsys, rc, out, fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment.lower() in err[0].lower(), (fragment, err[0])
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, models, capsys, case):
    name, content, extra, fragments = CASES[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    rc = main(["train", "--model", models[0], "--dataset", str(path), "--output-dir", str(out), "--max-steps", "1",
               *extra])
    _check(capsys, rc, out, fragments)


def test_conversational_data_with_a_tokenizer_without_chat_template(tmp_path, models, capsys):
    path = tmp_path / "conv.jsonl"
    path.write_text(_jsonl([GOOD]))
    out = tmp_path / "run"
    rc = main(["train", "--model", models[1], "--dataset", str(path), "--output-dir", str(out), "--max-steps", "1"])
    _check(capsys, rc, out, ["chat template"])


def test_existing_run_is_refused_without_overwrite_or_resume(tmp_path, models, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(_jsonl([GOOD]))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: dpo\n")
    rc = main(["train", "--model", models[0], "--dataset", str(path), "--output-dir", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # untouched
