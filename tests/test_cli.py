"""The `prefalign` CLI, run in-process: training runs, option precedence, one-line errors, `data check`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.cli import build_parser, main
from prefalign.config import DPOConfig, ORPOConfig
from prefalign.errors import ConfigError
from prefalign.options import coerce_option, field_types, resolve_plan
from tiny import conversational_rows, save_tiny, text_rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("cli-model") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("cli-data") / "pairs.jsonl", conversational_rows(8))


def _train_argv(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "64", *extra]


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("prefalign: error: ")
    return lines[0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----- startup ---------------------------------------------------------------------------------------------------
def test_help_does_not_import_the_heavy_libraries():
    code = ("import sys, contextlib, io, prefalign, prefalign.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['train', '--help'], ['data', 'check', '--help']):\n"
            "        assert prefalign.cli.main(argv) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft') if m in sys.modules))\n"
            "from prefalign import DPOTrainer, load_preference_dataset\n"
            "print(DPOTrainer.__name__, load_preference_dataset.__name__, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "DPOTrainer load_preference_dataset True"]


# ----- training runs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_train_writes_a_loadable_run_dir_that_can_be_rerun(method, tiny_model, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(tiny_model, pairs, out, "--method", method, "--beta", "0.2")) == 0
    captured = capsys.readouterr()
    assert f"run saved to {out}" in captured.out and "reward accuracy" in captured.out
    assert "{'loss'" not in captured.out + captured.err  # the bar replaced transformers' raw log dicts

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == method and config["model"] == str(Path(tiny_model).resolve())
    assert config["dataset"] == str(pairs.resolve()) and config["max_steps"] == 2 and config["max_length"] == 64
    assert config["orpo_alpha" if method == "orpo" else "beta"] == 0.2  # --beta is ORPO's orpo_alpha
    records = _records(out)
    assert any("loss" in r and "rewards/accuracies" in r for r in records)
    assert json.loads((out / "data_report.json").read_text())["train"]["rows"] == 8

    again = tmp_path / "again"
    assert main(["train", str(out / "config.yaml"), "--set", f"output_dir={again}"]) == 0
    assert yaml.safe_load((again / "config.yaml").read_text()) == {**config, "output_dir": str(again.resolve())}
    assert len([r for r in _records(again) if "loss" in r]) == 2


def test_existing_output_dir_is_refused_without_overwrite(tiny_model, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert main(_train_argv(tiny_model, pairs, out)) == 2
    assert "--overwrite" in _one_error(capsys)
    assert (out / "old.txt").exists()
    # A bad input with --overwrite leaves the old run untouched.
    assert main(_train_argv(tiny_model, tmp_path / "missing.jsonl", out, "--overwrite")) == 2
    assert "missing.jsonl" in _one_error(capsys) and (out / "old.txt").exists()
    assert main(_train_argv(tiny_model, pairs, out, "--overwrite")) == 0
    assert not (out / "old.txt").exists() and (out / "config.yaml").exists()


def test_a_failing_training_run_keeps_its_output_and_prints_one_line(tiny_model, pairs, tmp_path, capsys,
                                                                   monkeypatch):
    from prefalign.trainer import DPOTrainer

    def boom(self, *args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(DPOTrainer, "train", boom)
    out = tmp_path / "run"
    assert main(_train_argv(tiny_model, pairs, out)) == 1
    line = _one_error(capsys)
    assert "training failed at step 0: RuntimeError: out of memory" in line and str(out) in line
    assert "second line" in (out / "error.log").read_text() and not (out / "config.yaml").exists()


# ----- options ---------------------------------------------------------------------------------------------------
def _plan(argv: list[str]):
    args = build_parser().parse_args(argv)
    args.explicit = {a.lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    return resolve_plan(args)


def test_precedence_is_config_file_then_set_then_flags(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: orpo\ndataset: a.jsonl\nlearning_rate: 1e-5\nbeta: 0.3\nseed: 1\n"
                   "columns: {prompt: q}\n")
    plan = _plan(["train", str(cfg)])
    assert plan.method == "orpo" and plan.run["columns"] == {"prompt": "q"}
    assert plan.options["learning_rate"] == 1e-5  # YAML 1.1 reads 1e-5 as a string; coerced to a float
    assert plan.options["logging_steps"] == 1 and plan.options["report_to"] == "none"
    assert plan.options["output_dir"].startswith("runs/orpo-")
    plan = _plan(["train", str(cfg), "--set", "seed=2", "--set", "method=dpo", "--set", "beta=0.4", "--set",
                  "dataset=b.jsonl", "--set", "logging_steps=5"])
    assert (plan.method, plan.options["seed"], plan.options["beta"], plan.run["dataset"]) == ("dpo", 2, 0.4, "b.jsonl")
    assert plan.options["logging_steps"] == 5
    plan = _plan(["train", str(cfg), "--set", "seed=2", "--seed", "3", "--dataset", "c.jsonl", "--beta", "0.6",
                  "--columns", "prompt=x,chosen=y", "--method", "orpo"])
    assert (plan.options["seed"], plan.run["dataset"], plan.run["columns"]) == (3, "c.jsonl", {"prompt": "x",
                                                                                               "chosen": "y"})
    assert plan.options["orpo_alpha"] == 0.6 and "beta" not in plan.options  # the flag wins over `beta: 0.3`
    assert _plan(["train", str(cfg), "--max-length", "none"]).options["max_length"] is None


@dataclass
class _Options:
    """Annotations of every kind coercion handles, written as strings (this file has postponed annotations)."""

    rate: float = 0.1
    steps: int = 1
    limit: int | None = None
    old_style: Optional[int] = None  # noqa: UP045 -- the typing spelling resolves to the same type
    either: Union[int, float] = 1  # noqa: UP007
    flag: bool = True
    names: list[str] | str = "a"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("rate", "1e-5", 1e-5), ("rate", 3, 3), ("steps", "7", 7), ("limit", "12", 12), ("limit", None, None),
    ("old_style", "4", 4), ("either", "3", 3.0), ("flag", False, False), ("names", "x", "x"),
    ("names", ["x", "y"], ["x", "y"]), ("names", 5, 5), ("unknown", "1e-5", "1e-5")])
def test_yaml_values_are_coerced_by_the_declared_type(key, value, expected):
    result = coerce_option(_Options, key, value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rate", "fast", "rate='fast' is not a number."), ("steps", "7.5", "steps='7.5' is not an integer."),
    ("limit", True, "limit=True must be a number."), ("either", False, "either=False must be a number."),
    ("flag", 1, "flag=1 must be true or false."), ("flag", "yes please", "flag='yes please' must be true or false.")])
def test_values_of_the_wrong_type_are_config_errors(key, value, message):
    with pytest.raises(ConfigError) as e:
        coerce_option(_Options, key, value)
    assert str(e.value) == message


def test_config_field_types_come_from_the_dataclasses():
    dpo, orpo = field_types(DPOConfig), field_types(ORPOConfig)
    assert dpo["max_length"] == int | None and dpo["learning_rate"] is float and dpo["prefix_sharing"] is bool
    assert dpo["loss_type"] == list[str] | str and orpo["beta"] == float | None and "beta" in dpo
    assert coerce_option(DPOConfig, "logging_steps", "5") == 5.0 and coerce_option(DPOConfig, "max_steps", "3") == 3
    assert coerce_option(ORPOConfig, "beta", "2e-1") == 0.2 and coerce_option(DPOConfig, "loss_type", "ipo") == "ipo"


def test_a_non_bool_for_a_bool_option_is_one_line(pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--dataset", str(pairs), "--output-dir", str(out), "--set", "prefix_sharing=1"]) == 2
    assert "prefix_sharing=1 must be true or false" in _one_error(capsys) and not out.exists()


@pytest.mark.parametrize(("where", "key", "suggestion"), [("set", "bta", "beta"),
                                                         ("yaml", "learnig_rate", "learning_rate"),
                                                         ("set", "datset", "dataset")])
def test_unknown_option_suggests_the_nearest_key(where, key, suggestion, pairs, tmp_path, capsys):
    argv = ["train", "--dataset", str(pairs), "--output-dir", str(tmp_path / "out")]
    if where == "set":
        argv += ["--set", f"{key}=0.2"]
    else:
        (tmp_path / "c.yaml").write_text(f"{key}: 0.2\n")
        argv.insert(1, str(tmp_path / "c.yaml"))
    assert main(argv) == 2
    line = _one_error(capsys)
    assert f"'{key}'" in line and f"'{suggestion}'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [["--beta", "0"], ["--set", "beta=-1"], ["--learning-rate", "0"],
                                 ["--max-length", "1"], ["--method", "orpo", "--beta", "-0.5"],
                                 ["--set", "learning_rate=fast"]])
def test_out_of_range_values_fail_before_anything_is_created(bad, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--dataset", str(pairs), "--output-dir", str(out), *bad]) == 2
    _one_error(capsys)
    assert not out.exists()


def test_config_file_errors_are_one_line(pairs, tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("method: dpo\n  beta: [0.1\n")
    assert main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "invalid YAML" in _one_error(capsys)
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in _one_error(capsys)
    assert main(["train", "--dataset", str(pairs), "--not-an-option"]) == 2
    assert "--not-an-option" in _one_error(capsys)


# ----- data check ------------------------------------------------------------------------------------------------
def test_data_check_lists_every_problem_with_its_line(tiny_model, tmp_path, capsys):
    good = text_rows(2)
    data = _write_jsonl(tmp_path / "bad.jsonl", [
        good[0],
        {"prompt": "p", "chosen": "", "rejected": "no"},  # line 2: empty reply
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # line 3: chosen == rejected
        {"prompt": "p", "chosen": "only chosen"},  # line 4: missing field
        {"prompt": "p", "chosen": 42, "rejected": "x"},  # line 5: a number
        '{"prompt": "p", "chosen": ',  # line 6: invalid JSON
        good[1],
        good[0],  # line 8: duplicate of line 1 (a warning)
    ])
    assert main(["data", "check", str(data), "--model", tiny_model]) == 2
    out = capsys.readouterr().out
    for line, what in [(3, "identical to chosen"), (4, "'rejected': is missing"), (5, "a number"),
                       (6, "invalid JSON")]:
        assert any(f"error: line {line}" in row and what in row for row in out.splitlines()), (line, out)
    assert "warning: line 8: duplicates line 1" in out
    assert "warning: line 2, field 'chosen': is empty; trained on as an empty reply" in out  # valid, but said
    assert "on_invalid_row: skip, which would skip 4 row(s) (lines 3, 4, 5, 6)" in out
    assert "format: standard (plain text), explicit prompt" in out and "p50" in out


def test_data_check_on_clean_data(tiny_model, pairs, capsys):
    assert main(["data", "check", str(pairs), "--model", tiny_model]) == 0
    out = capsys.readouterr().out
    assert "format: conversational (message lists), explicit prompt" in out
    assert all(word in out for word in ("p50", "p90", "p99", "max", "prompt+longest reply", "OK"))
    assert main(["data", "check", str(pairs), "--model", tiny_model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rows"] == 8 and report["problems"] == []
    lengths = report["token_lengths"]
    assert lengths["prompt+longest reply"]["max"] == lengths["prompt"]["max"] + lengths["rejected"]["max"]


def test_data_check_counts_what_max_length_would_cut_or_reject(tiny_model, pairs, capsys):
    assert main(["data", "check", str(pairs), "--model", tiny_model, "--json", "--max-length", "48"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reply_cut_rows"] == [1, 2, 3, 4, 5, 6, 7, 8] and report["prompt_cut_rows"] == []
    assert main(["data", "check", str(pairs), "--model", tiny_model, "--max-length", "20"]) == 2
    out = capsys.readouterr().out
    assert "8 row(s) rejected (prompt leaves no room) (lines 1, 2, 3, 4, 5, 6, 7, 8)" in out
    assert "error: line 1, field 'prompt'" in out
    assert main(["data", "check", str(pairs), "--model", tiny_model, "--max-length", "48", "--max-prompt-length",
                 "30"]) == 0
    assert "8 prompt(s) cut" in capsys.readouterr().out


def test_data_check_user_errors_are_one_line(tiny_model, tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl"), "--model", tiny_model]) == 2
    assert "nope.jsonl" in capsys.readouterr().out  # an unreadable source is part of the report
    assert main(["data", "check", str(tmp_path / "x.jsonl"), "--model", str(tmp_path / "no-model")]) == 2
    _one_error(capsys)
    assert main(["data", "check", str(tmp_path / "x.jsonl"), "--max-length", "1"]) == 2
    assert "max_length" in _one_error(capsys)


@pytest.mark.parametrize(("method", "loss_type", "beta", "cpo_alpha"), [("cpo", "sigmoid", 0.1, 1.0),
                                                                         ("simpo", "simpo", 2.0, 0.0)])
def test_cpo_and_simpo_train_from_the_cli(tiny_model, pairs, tmp_path, capsys, method, loss_type, beta, cpo_alpha):
    import yaml

    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", tiny_model, "--dataset", str(pairs), "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "2"]) == 0
    assert "2 steps" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["method"], saved.get("loss_type", loss_type)) == (method, loss_type)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in m and "nll_loss" in m for m in metrics)
    from prefalign.options import config_class

    defaults = config_class(method)(output_dir=str(tmp_path / "x"))
    assert (defaults.loss_type, defaults.beta, defaults.cpo_alpha) == (loss_type, beta, cpo_alpha)


def test_an_unquoted_no_is_the_strategy_no_not_false(tmp_path):
    """YAML 1.1 reads ``no`` as false; TRL's recipes and users write ``eval_strategy: no`` unquoted."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("dataset: a.jsonl\neval_strategy: no\nsave_strategy: no\nlogging_strategy: steps\n")
    plan = _plan(["train", str(cfg), "--set", "save_strategy=no"])
    assert (plan.options["eval_strategy"], plan.options["save_strategy"]) == ("no", "no")
    assert coerce_option(DPOConfig, "hub_strategy", False) is False  # no 'no' among its values: left to the config
    with pytest.raises(ConfigError):
        coerce_option(DPOConfig, "prefix_sharing", "no")
