"""scripts/trl_tests_check.py's own logic, without TRL's sources: the import rewrite, the hub-id mapping, the dataset
stand-ins and the skip of tests that need a hub id with no stand-in, on small synthetic test files."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import datasets
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "trl_tests_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("trl_tests_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_tests_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("trl_tests_check", None)


SYNTHETIC = textwrap.dedent("""\
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer
    from trl import (
        SFTConfig,
        SFTTrainer as Trainer,
        clone_chat_template,
    )
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


    def test_a():
        from trl import KTOTrainer  # inside a function: left alone
        load_dataset("trl-internal-testing/zen", "standard_preference")
        return "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"
    """)


def test_rewrite_only_the_classes_under_test(check):
    out = check.rewrite_imports(SYNTHETIC)
    assert "from prefalign import DPOConfig, DPOTrainer\n" in out
    assert "from trl import clone_chat_template\nfrom prefalign import SFTConfig, SFTTrainer as Trainer\n" in out
    assert "from trl.trainer.dpo_trainer import DataCollatorForPreference\n" in out
    assert "from prefalign import ORPOConfig, ORPOTrainer\n" in out
    assert "    from trl import KTOTrainer  # inside a function: left alone\n" in out
    assert "trl.experimental.orpo" not in out
    # everything else is byte for byte the same, line by line
    rest = [line for line in out.splitlines() if "import" not in line]
    assert rest == [
        line
        for line in SYNTHETIC.splitlines()
        if "import" not in line
        and line.strip() not in ("SFTConfig,", "SFTTrainer as Trainer,", "clone_chat_template,", ")")
    ]
    compile(out, "rewritten.py", "exec")


def test_hub_ids_and_model_plan(check):
    assert check.hub_ids(SYNTHETIC) == {"trl-internal-testing/zen", "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"}
    qwen = check.parse_model_id("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5")
    assert (qwen.cls_name, qwen.variant) == ("Qwen2ForCausalLM", "2.5")
    assert check.standin_plan(qwen) == ("qwen2", "qwen2_5")
    lfm = check.parse_model_id("trl-internal-testing/tiny-Lfm2ForCausalLM-2.5")
    assert check.standin_plan(lfm) == ("lfm2", "lfm2_2_5")
    assert check.standin_plan(check.parse_model_id("trl-internal-testing/tiny-MistralForCausalLM-0.2")) == (None, None)
    vlm = check.parse_model_id("trl-internal-testing/tiny-Qwen2VLForConditionalGeneration")
    assert vlm.cls_name == "Qwen2VLForConditionalGeneration" and check.standin_plan(vlm) is None
    assert check.parse_model_id("trl-internal-testing/zen") is None
    assert check.parse_model_id("Qwen/Qwen3-4B") is None


def test_snapshot_dir_is_a_hub_cache_entry(check, tmp_path):
    snap = check.snapshot_dir(tmp_path, "trl-internal-testing/tiny-X")
    repo = tmp_path / "models--trl-internal-testing--tiny-X"
    assert snap.parent.parent == repo
    assert (repo / "refs" / "main").read_text() == snap.name and len(snap.name) == 40


def test_zen_formats(check):
    rows = {c: check.zen_rows(c) for c in check.ZEN_CONFIGS}
    assert all(len(r) == 19 for r in rows.values())
    assert set(rows["standard_preference"][0]) == {"prompt", "chosen", "rejected"}
    assert rows["standard_preference"][0]["chosen"].startswith(" ")
    assert set(rows["conversational_unpaired_preference"][1]) == {"prompt", "completion", "label"}
    assert rows["conversational_implicit_prompt_preference"][0]["chosen"][0]["role"] == "user"
    assert {r["label"] for r in rows["standard_unpaired_preference"]} == {True, False}
    call = check.toolcall_rows("language_modeling")[0]["messages"][1]
    assert "content" not in call and call["tool_calls"][0]["function"]["name"] == "multiply"


def test_load_dataset_stand_in_and_skip(check, tmp_path, monkeypatch):
    """install() points datasets.load_dataset's hub id at the parquet stand-ins (configs, splits, slices,
    streaming); a test naming an id with no stand-in is skipped with the id as reason."""
    data = check.build_datasets(tmp_path / "data")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "models": {"trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": "x"},
                "datasets": data,
                "stub_availability": ["is_nothing_available"],
            }
        )
    )
    monkeypatch.setattr(datasets, "load_dataset", datasets.load_dataset)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    check.install(str(manifest))
    import trl.import_utils as iu

    assert iu.is_nothing_available() is False
    monkeypatch.delattr(iu, "is_nothing_available")
    both = datasets.load_dataset("trl-internal-testing/zen", "standard_preference")
    assert (both["train"].num_rows, both["test"].num_rows) == (17, 2)
    assert (
        datasets.load_dataset("trl-internal-testing/zen", "standard_language_modeling", split="train[:2]")["text"][0]
        == "Beautiful is better than ugly."
    )
    stream = datasets.load_dataset("trl-internal-testing/toolcall", "preference", split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and json.loads(next(iter(stream))["tools"])[0]["type"]

    class Item:
        def __init__(self, fn, params=None, marks=()):
            self.function, self.marks, self._marks = fn, [], list(marks)
            if params is not None:
                self.callspec = type("CallSpec", (), {"params": params})()

        def iter_markers(self, name):
            return [m for m in self._marks if m.name == name]

        def add_marker(self, mark):
            self.marks.append(mark)

    def needs_vlm():
        return "trl-internal-testing/tiny-LlavaForConditionalGeneration"

    models = [
        "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5",
        "trl-internal-testing/tiny-SmolVLMForConditionalGeneration",
    ]

    @pytest.mark.parametrize("model_id", models)
    def param_test(model_id):
        return "trl-internal-testing/zen"

    param_marks = list(param_test.pytestmark)
    items = [
        Item(needs_vlm),
        Item(param_test, {"model_id": models[0]}, param_marks),
        Item(param_test, {"model_id": models[1]}, param_marks),
    ]
    check.pytest_collection_modifyitems(None, items)
    reasons = [[m.kwargs["reason"] for m in item.marks] for item in items]
    assert reasons == [
        ["no local stand-in for trl-internal-testing/tiny-LlavaForConditionalGeneration"],
        [],
        ["no local stand-in for trl-internal-testing/tiny-SmolVLMForConditionalGeneration"],
    ]


def test_junit_outcomes_and_copy(check, tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_x.TestA" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.test_x.TestA" name="test_bad[a/b]" time="2">'
        '<failure message="TypeError: expected str,&#10; bytes">trace</failure></testcase>'
        '<testcase classname="tests.test_x.TestA" name="test_skip"><skipped message="no local stand-in"/>'
        "</testcase></testsuite></testsuites>"
    )
    out = check.parse_junit(junit)
    assert {k: (o.status, o.reason) for k, o in out.items()} == {
        "tests.test_x.TestA::test_ok": ("passed", ""),
        "tests.test_x.TestA::test_bad[a/b]": ("failed", "TypeError: expected str, bytes"),
        "tests.test_x.TestA::test_skip": ("skipped", "no local stand-in"),
    }

    src = tmp_path / "trl" / "tests"
    (src / "data").mkdir(parents=True)
    (src / "testing_utils.py").write_text("")
    (src / "test_dpo_trainer.py").write_text(SYNTHETIC)
    check.extract_tests(tmp_path / "trl", tmp_path / "copy-src")
    copy = tmp_path / "copy"
    check.prepare_copy(tmp_path / "copy-src", copy, ["dpo"], True, SCRIPT, tmp_path / "m.json")
    assert "from prefalign import DPOConfig" in (copy / "tests" / "test_dpo_trainer.py").read_text()
    assert (copy / "tests" / "data").is_dir() and (copy / "pytest.ini").is_file()
    assert str(tmp_path / "m.json") in (copy / "conftest.py").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no testing_utils.py"):
        check.extract_tests(tmp_path / "empty", tmp_path / "nowhere")


def test_report_regressions_and_reuse(check, tmp_path, capsys):
    """The report lists tests passing under TRL and not under prefalign; its JSON feeds a later run (--reuse)."""
    Out, R = check.Outcome, check.FileRun
    base = {"dpo": R({"t::a": Out("passed"), "t::b": Out("passed"), "t::c": Out("failed", "drift")}, 3.0)}
    ours = {"dpo": R({"t::a": Out("passed"), "t::b": Out("failed", "TypeError: x"), "t::c": Out("failed", "y")}, 2.0)}
    out = tmp_path / "run.json"
    check.report({"prefalign": ours, "trl": base}, ["dpo"], "1.16.0", out, [])
    text = capsys.readouterr().out
    assert "| dpo | 2 | 1 | 0 | 3 | 1 | 2 | 0 | 2 |" in text
    assert "1 tests pass under TRL and not under prefalign; 3 ran" in text and "t::b: TypeError: x" in text
    again = check.load_runs([out])
    assert again["trl"]["dpo"].outcomes["t::c"].reason == "drift"
    assert again["prefalign"]["dpo"].count("failed") == 2
    # a later part (a -k rerun, as JSON or as a junit file) replaces only the tests it ran
    junit = tmp_path / "junit-prefalign-dpo.xml"
    junit.write_text('<testsuite><testcase classname="t" name="b" time="1"/></testsuite>')
    merged = check.load_runs([out, junit])["prefalign"]["dpo"]
    assert (merged.count("passed"), merged.count("failed")) == (2, 1)
