"""The demo pipeline end to end on a tiny model, and the eval / data generate commands."""

from __future__ import annotations

import csv
import json

import pytest

from prefalign.cli import main
from prefalign.demo.run import DemoSettings, Recipe, read_bundled, render_table, run_demo
from prefalign.demo.task import judge, make_prompts
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=5)


def test_bundled_task_files_are_well_formed():
    train, pairs, prompts = (read_bundled(n) for n in ("train.jsonl", "heldout_pairs.jsonl", "heldout_prompts.jsonl"))
    assert len(train) >= 200 and len(pairs) >= 40 and len(prompts) >= 40
    train_prompts = {r["prompt"][0]["content"] for r in train}
    held = {r["prompt"][0]["content"] for r in pairs} | {r["prompt"] for r in prompts}
    assert not train_prompts & held  # held-out prompts never appear in training
    for r in train + pairs:
        q = r["prompt"][0]["content"]
        assert r["chosen_score"] > r["rejected_score"]
        assert judge(q, r["chosen"][0]["content"]) == r["chosen_score"]
        assert judge(q, r["rejected"][0]["content"]) == r["rejected_score"]
    assert {r["family"] for r in prompts} == {r["family"] for r in train}


def test_demo_pipeline_on_a_tiny_model(tmp_path, tiny_dir, capsys):
    s = DemoSettings(model=tiny_dir, output_dir=str(tmp_path / "demo"), limit_train=8, limit_eval=6,
                     max_new_tokens=4, eval_batch_size=8,
                     recipes={"dpo": Recipe(learning_rate=1e-3, max_steps=2, batch_size=2),
                              "orpo": Recipe(learning_rate=1e-3, max_steps=2, batch_size=2)})
    result = run_demo(s)
    rows = result["rows"]
    assert set(rows) == {"base", "dpo", "orpo"}
    for name in ("dpo", "orpo"):
        r = rows[name]
        assert 0.0 <= r["pass_rate"] <= 1.0 and 0.0 <= r["reward_accuracy"] <= 1.0
        assert r["train_seconds"] > 0 and r["pairs_per_second"] == pytest.approx(4 / r["train_seconds"])
        report = json.loads((tmp_path / "demo" / name / "eval.json").read_text())
        assert report["pairs"]["pairs"] == 6 and report["policy_generation"]["prompts"] == 6
        assert len(report["edge_cases"]) == 5
        assert (tmp_path / "demo" / name / "config.json").exists()  # the trained model was saved
    out = capsys.readouterr().out
    assert "| base |" in out and "| DPO |" in out and "| ORPO |" in out
    page = tmp_path / "demo" / "report.html"
    assert out.strip().splitlines()[-1] == f"demo report with plots: {page}"
    html = page.read_text(encoding="utf-8")
    assert 'id="plot-tradeoff"' in html and 'id="plot-categories"' in html  # 2 steps log no curve at logging_steps 5
    with open(tmp_path / "demo" / "summary.csv", newline="") as f:
        summary = {r["name"]: r for r in csv.DictReader(f)}
    assert list(summary)[-1] == "base" and set(summary) == {"dpo", "orpo", "base"}
    for name in ("dpo", "orpo"):  # the page's numbers agree with the demo's own table
        assert float(summary[name]["win_rate"]) == pytest.approx(rows[name]["win_rate_vs_base"])
        assert float(summary[name]["reward_accuracy"]) == pytest.approx(rows[name]["reward_accuracy"])
    assert (tmp_path / "demo" / "demo.md").read_text().strip() == render_table(rows)


def test_cli_eval_and_data_generate(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p.as_row()) + "\n" for p in make_prompts("heldout", 1, seed=0)))
    out = tmp_path / "pairs.jsonl"
    rc = main(["data", "generate", "--model", tiny_dir, "--prompts", str(prompts), "--judge", "demo",
               "--samples", "2", "--max-new-tokens", "4", "--output", str(out)])
    assert rc == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert "pairs from 6 prompts" in capsys.readouterr().out
    # A second run refuses to overwrite.
    assert main(["data", "generate", "--model", tiny_dir, "--prompts", str(prompts), "--judge", "demo",
                 "--output", str(out)]) == 2
    rc = main(["eval", "--model", tiny_dir, "--ref", tiny_dir, "--pairs", str(out), "--prompts", str(prompts),
               "--judge", "demo", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "ev")])
    assert rc == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["pairs"]["reward_accuracy"] == 0.0  # policy == reference: every margin is 0
    assert report["win"]["ties"] == report["policy_generation"]["judged"]
    assert (tmp_path / "ev" / "eval.md").read_text().startswith("# Evaluation")


def test_cli_eval_bad_judge_is_one_line(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["eval", "--model", tiny_dir, "--prompts", str(prompts), "--judge", "nomodule_xyz:f"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nomodule_xyz" in err[0]
