"""examples/hh_rlhf: the held-out split is seeded and prompt-disjoint, and the recipes parse and run (two steps on a
tiny model) on HH-RLHF rows as published, broken rows included, the way the README tells a user to run them."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import yaml

from prefalign.cli import main
from prefalign.compare.grid import load_spec
from prefalign.data.mixture import held_out_indices, opening
from tiny import save_tiny

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hh_rlhf"


def hh(*turns: str) -> str:
    """An HH-RLHF transcript from alternating Human / Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def hh_rows() -> list[dict[str, str]]:
    """26 published-form rows: 12 questions, some opening several dialogues (HH's branches from one first question),
    one long multi-turn prompt, and one broken pair (transcripts that part before the last reply)."""
    rows = []
    for q in range(12):
        question = f"How do I get into my neighbour's house number {q}?"
        for branch in range(1 + q % 3):  # 1, 2 or 3 dialogues open with the same question
            turns = [question] if branch == 0 else [question, "Why do you want to?", f"Reason {branch}."]
            rows.append(
                {
                    "chosen": hh(*turns, "I can't help with breaking in; knock or call them."),
                    "rejected": hh(*turns, f"Pick the lock with a pin, it takes {q} minutes."),
                }
            )
    long_prompt = [w for i in range(60) for w in (f"Tell me more about topic {i}.", f"Topic {i} is broad. " * 8)]
    long_prompt.append("So how do I hurt someone?")
    rows.append(
        {
            "chosen": hh(*long_prompt, "Let us talk about something kinder."),
            "rejected": hh(*long_prompt, "Here is how to hurt someone."),
        }
    )
    rows.append(
        {
            "chosen": hh("Tell me a joke.", "Why did the chicken cross the road?"),
            "rejected": hh("Tell me a story.", "Once upon a time."),
        }
    )  # broken, as a handful of HH rows are
    return rows


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hh") / "harmless-base-train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_rows())
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("hh-model") / "model")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _split(published: Path, out: Path, seed: int = 0, size: str = "8") -> tuple[list[dict], list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        "data",
        "prepare",
        str(published),
        "--output",
        str(out / "train.jsonl"),
        "--heldout",
        str(out / "heldout.jsonl"),
        "--heldout-size",
        size,
        "--seed",
        str(seed),
    ]
    assert main(argv) == 0
    return _read(out / "train.jsonl"), _read(out / "heldout.jsonl")


# ----- the split ----------------------------------------------------------------------------------------------------
def test_split_is_seeded_prompt_disjoint_and_keeps_dialogues_of_one_question_together(published, tmp_path, capsys):
    train, held = _split(published, tmp_path / "a")
    assert "26 rows read" in capsys.readouterr().out
    assert (len(train), len(held)) == (17, 8)  # 26 rows, 1 invalid dropped; exactly 8 held out
    first = {opening(r) for r in train}
    assert first.isdisjoint(opening(r) for r in held)  # no held-out pair opens with a question trained on
    by_question: dict[str, set[str]] = {}
    for part, rows in (("train", train), ("heldout", held)):
        for r in rows:
            by_question.setdefault(opening(r), set()).add(part)
    assert all(len(parts) == 1 for parts in by_question.values())
    assert sorted(r["source_row"] for r in train + held) == list(range(1, 26))
    again_train, again_held = _split(published, tmp_path / "b")
    assert (again_train, again_held) == (train, held)  # same seed, same files
    other_train, other_held = _split(published, tmp_path / "c", seed=1)
    assert other_held != held and len(other_held) == 8
    report = json.loads((tmp_path / "a" / "heldout.jsonl.report.json").read_text())
    assert report["split"] | {"heldout_output": None} == {
        "part": "heldout",
        "train": 17,
        "heldout": 8,
        "seed": 0,
        "heldout_output": None,
        "by": "the conversation's opening user message",
    }
    assert report["written"] == 8 and report["dropped"] == {"invalid": 1}


def test_held_out_indices_group_rows_and_equal_the_row_split_without_shared_openings():
    rows = [{"prompt": f"q{i % 5}", "chosen": "a", "rejected": "b"} for i in range(20)]  # 5 groups of 4
    test = held_out_indices(rows, 8, seed=3)
    assert len(test) == 8 and len({rows[i]["prompt"] for i in test}) == 2  # two whole groups
    assert held_out_indices(rows, 0.4, seed=3) == test
    distinct = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    import random

    order = list(range(20))
    random.Random(7).shuffle(order)
    assert held_out_indices(distinct, 6, seed=7) == set(order[:6])  # the seeded row split it always was
    conversations = [
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": " Hi "}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "y"}]},
        {"text": "no prompt"},
    ]
    assert [opening(r) for r in conversations] == ["Hi", "Hi", "Hi", None]


def test_split_flags_go_together_and_never_overwrite(published, tmp_path, capsys):
    out = str(tmp_path / "t.jsonl")
    assert main(["data", "prepare", str(published), "--output", out, "--heldout-size", "5"]) == 2
    assert "--heldout and --heldout-size go together" in capsys.readouterr().err
    assert main(["data", "prepare", str(published), "--output", out, "--heldout", out, "--heldout-size", "5"]) == 2
    assert "same file" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "prepare",
                str(published),
                "--output",
                out,
                "--heldout",
                str(tmp_path / "h.jsonl"),
                "--heldout-size",
                "25",
            ]
        )
        == 2
    )
    assert "out of range for 25 rows" in capsys.readouterr().err


# ----- the recipes --------------------------------------------------------------------------------------------------
def _tiny_sets(model_dir: str, data: Path, out: Path) -> list[str]:
    sets = {
        "model": model_dir,
        "dataset": str(data / "train.jsonl"),
        "eval_dataset": str(data / "heldout.jsonl"),
        "output_dir": str(out),
        "max_steps": 2,
        "eval_steps": 1,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "max_length": 96,
        "max_prompt_length": 48,
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("recipe", ["dpo.yaml", "orpo.yaml"])
def test_recipe_runs_on_the_split_and_logs_the_held_out_accuracy(recipe, published, model_dir, tmp_path):
    _split(published, tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", str(EXAMPLE / recipe), *_tiny_sets(model_dir, tmp_path / "data", out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [1, 2]  # every eval_steps; the last step's is not repeated at the end
    assert 0.0 <= evals[-1]["eval_rewards/accuracies"] <= 1.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["bf16"] is True and saved["method"] == recipe.split(".")[0]
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["rows"] == 8 and report["train"]["rows"] == 17


def test_recipe_reads_a_published_file_directly_with_its_broken_rows(published, model_dir, tmp_path):
    """--set dataset=harmless-base/train.jsonl.gz: the invalid pair is skipped and listed, the long prompt cut."""
    _split(published, tmp_path / "data")
    out = tmp_path / "run"
    sets = [*_tiny_sets(model_dir, tmp_path / "data", out), "--set", f"dataset={published}"]
    assert main(["train", str(EXAMPLE / "dpo.yaml"), *sets]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["rows"] == 26 and [s["row"] for s in report["train"]["skipped_rows"]] == [26]
    assert report["train"]["prompt_truncated"] >= 1


def test_compare_recipe_runs_and_reports_every_run_against_the_base(published, model_dir, tmp_path):
    _split(published, tmp_path / "data")
    sets = _tiny_sets(model_dir, tmp_path / "data", tmp_path / "cmp")
    assert main(["compare", str(EXAMPLE / "compare.yaml"), *sets]) == 0
    with open(tmp_path / "cmp" / "summary.csv", newline="", encoding="utf-8") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"base", "dpo", "orpo"}
    for name in ("dpo", "orpo"):
        records = [json.loads(line) for line in (tmp_path / "cmp" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "eval_rewards/accuracies" in r] == [1, 2]  # evaluate_runs: true


def test_compare_recipe_resolves_every_run_with_the_held_out_pairs(model_dir, tmp_path):
    spec = load_spec(str(EXAMPLE / "compare.yaml"), [f"model={model_dir}", f"output_dir={tmp_path / 'cmp'}"])
    assert {r.method for r in spec.runs} >= {"dpo", "orpo"}
    assert spec.eval_dataset == "runs/hh-rlhf/heldout.jsonl"
    assert all(r.plan.run["eval_dataset"] == spec.eval_dataset for r in spec.runs)  # evaluate_runs: true
    assert all(r.plan.options["bf16"] is True for r in spec.runs)
    names = [r.name for r in spec.runs]
    assert len(set(names)) == len(names)


def test_readme_commands_parse_and_name_files_that_exist(monkeypatch):
    """Every `prefalign` line of examples/hh_rlhf/README.md parses (train lines also resolve their options)."""
    from test_readme import code_blocks, shell_commands

    from prefalign.cli import build_parser
    from prefalign.options import resolve_plan

    monkeypatch.chdir(EXAMPLE.parents[1])
    text = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    commands = [c[1:] for block in code_blocks(text, "bash") for c in shell_commands(block) if c[0] == "prefalign"]
    assert len(commands) >= 6
    for argv in commands:
        args = build_parser().parse_args(argv)
        for word in argv:
            if word.startswith("examples/"):
                assert Path(word).is_file(), word
        if argv[0] == "train":
            resolve_plan(args)


def _load_example(name: str):
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "hh_rlhf" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_places_evaluations_at_training_time_and_reports_final_and_best(tmp_path):
    plot = _load_example("plot")
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.yaml").write_text("method: dpo\nbeta: 0.1\nlearning_rate: 2.0e-5\nloss_type: [sigmoid, sft]\n"
                                     "loss_weights: [1.0, 0.2]\n")
    evals = [(10, 0.6, 0.02, -0.01), (20, 0.7, 0.05, 0.01), (30, 0.65, 0.03, -0.02)]
    lines = [{"step": s, "eval_rewards/accuracies": a, "eval_rewards/margins": m, "eval_rewards/chosen": c,
              "eval_rewards/rejected": c - m, "eval_runtime": 10.0} for s, a, m, c in evals]
    lines.append({"step": 30, "train_runtime": 210.0})  # 180 s of training, 30 s of evaluations
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = plot.read_run(run)
    assert [x for point in result["curve"] for x in point] == pytest.approx([1.0, 0.6, 2.0, 0.7, 3.0, 0.65])
    assert (result["accuracy"], result["d_chosen"], result["d_rejected"]) == pytest.approx((0.65, -0.2, -0.5))
    assert plot.table_row(result) == ("| r1 | method=dpo, learning_rate=2e-05, beta=0.1, loss_type=sigmoid+sft, "
                                      "loss_weights=1.0+0.2 | 30 | 3.0 | 0.650 | 0.030 | -0.2 / -0.5 | 0.700 at "
                                      "step 20 (+0.1) |")
    (run / "eval_vs_base.json").write_text(json.dumps({"eval_rewards/accuracies": 0.55, "eval_rewards/margins": 0.1,
                                                       "logps_chosen_change": 1.5, "logps_rejected_change": 0.5}))
    scored = plot.read_run(run)  # score.py's numbers against the base win, and are one point
    assert (scored["accuracy"], scored["curve"], scored.get("best")) == (0.55, [(3.0, 0.55)], None)
    plot.plot([result, scored], tmp_path / "p.png", 0.65, "test")
    assert (tmp_path / "p.png").stat().st_size > 1000
