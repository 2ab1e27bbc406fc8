"""`prefalign compare`: grid expansion, bad configs, an end-to-end compare on a tiny model, resume, failure rows,
the win-rate interval and the KL estimate."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
import yaml
from browser import CHROMIUM, check_page

from prefalign.cli import main
from prefalign.compare.grid import expand, load_spec, run_name
from prefalign.compare.score import SCORES_FILE, Heldout, Scores, read_scores, reply_logps
from prefalign.compare.table import Entry, compute_row
from prefalign.demo.run import read_bundled
from prefalign.demo.task import make_prompts
from prefalign.evaluate import WinRate, generation_metrics, pair_metrics, sequence_logps, wilson_interval
from prefalign.generate import prompt_text
from prefalign.judges import load_judge
from prefalign.models import load_model, load_tokenizer
from prefalign.report import load_run
from tiny import conversational_rows, save_tiny, tiny_llama


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-data")
    return {"model": save_tiny(d / "model", seed=3), "dataset": _jsonl(d / "train.jsonl", conversational_rows(8)),
            "eval_dataset": _jsonl(d / "pairs.jsonl", read_bundled("heldout_pairs.jsonl")[:6]),
            "eval_prompts": _jsonl(d / "prompts.jsonl", [p.as_row() for p in make_prompts("heldout", 1, seed=0)])}


def _recipe(tmp_path, files, grid, **extra):
    recipe = {**files, "judge": "demo", "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
              "max_length": 128, "max_new_tokens": 4, "samples": 3, "output_dir": str(tmp_path / "cmp"),
              "grid": grid, **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


# ----- the grid -----------------------------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_per_method(tmp_path, files):
    assert expand("dpo", {"beta": [0.1, 0.5], "loss_type": [["sigmoid", "sft"]], "seed": 3}, "x") == [
        {"beta": 0.1, "loss_type": ["sigmoid", "sft"], "seed": 3}, {"beta": 0.5, "loss_type": ["sigmoid", "sft"],
                                                                     "seed": 3}]
    assert run_name("dpo", {"beta": 0.05, "loss_type": ["sigmoid", "sft"]}) == "dpo-beta0.05-loss_typesigmoid+sft"
    spec = load_spec(_recipe(tmp_path, files, {"dpo": {"beta": [0.05, 0.1, 0.5], "learning_rate": [1e-3, 2e-3]},
                                               "orpo": {"orpo_alpha": [0.05, 0.2]}, "sft": None}))
    names = [r.name for r in spec.runs]
    assert names[:2] == ["dpo-beta0.05-learning_rate0.001", "dpo-beta0.05-learning_rate0.002"]
    assert len(names) == 6 + 2 + 1 and names[-3:] == ["orpo-orpo_alpha0.05", "orpo-orpo_alpha0.2", "sft"]
    dpo = spec.runs[1].plan
    assert dpo.options["beta"] == 0.05 and dpo.options["learning_rate"] == 2e-3 and dpo.options["max_steps"] == 2
    assert dpo.output_dir == tmp_path / "cmp" / names[1]
    assert dpo.run["eval_dataset"] is None  # the held-out pairs are the compare's, not evaluated in training
    assert spec.runs[-1].plan.method == "sft" and spec.runs[-2].plan.options["orpo_alpha"] == 0.2
    assert "beta" not in spec.runs[-1].plan.options  # a base key goes to the methods that have it
    again = load_spec(_recipe(tmp_path, files, {"dpo": {"beta": [0.1, 0.2]}}, beta=0.3), ["max_steps=5"])
    assert [(r.plan.options["max_steps"], r.plan.options["beta"]) for r in again.runs] == [(5, 0.1), (5, 0.2)]


@pytest.mark.parametrize(("grid", "extra", "words"), [
    ({"dpx": {"beta": [0.1]}}, {}, "method 'dpx'"),
    ({"dpo": {"betta": [0.1]}}, {}, "unknown option 'betta'"),
    ({"dpo": {"beta": []}}, {}, "grid.dpo.beta is an empty list"),
    ({"dpo": {"beta": [0.1]}}, {"warmup_stepz": 3}, "unknown option 'warmup_stepz'"),
    ({"dpo": {"beta": [-1.0]}}, {}, "beta"),
])
def test_bad_configs_are_one_line_exit_2_and_write_nothing(tmp_path, files, capsys, grid, extra, words):
    path = _recipe(tmp_path, files, grid, **extra)
    assert main(["compare", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefalign: error:") and words in err[0]
    assert not (tmp_path / "cmp").exists()


# ----- end to end ---------------------------------------------------------------------------------------------------
def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_compare_end_to_end_resume_and_failure_row(tmp_path, files, capsys, monkeypatch):
    from prefalign.trainer import DPOTrainer

    original = DPOTrainer.compute_loss

    def explode(self, *args, **kwargs):  # the beta=0.5 run fails inside training; the others must not care
        if self.args.beta == 0.5:
            raise RuntimeError("boom at beta 0.5")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "compute_loss", explode)
    path = _recipe(tmp_path, files, {"dpo": {"beta": [0.1, 0.5]}, "orpo": {"orpo_alpha": 0.2}})
    assert main(["compare", path]) == 1
    out = tmp_path / "cmp"
    captured = capsys.readouterr()
    assert f"compare report: {out / 'report.html'}" in captured.out
    rows = _csv(out / "summary.csv")
    assert set(rows) == {"dpo-beta0.1", "orpo", "base", "dpo-beta0.5"}
    assert list(rows)[-1] == "dpo-beta0.5" and rows["dpo-beta0.5"]["status"] == "failed"
    assert rows["dpo-beta0.5"]["reason"] == "RuntimeError: boom at beta 0.5"
    assert list(rows)[2] == "base" and rows["base"]["status"] == "reference"
    # The numbers are computed: recompute them from the run directories with the evaluate functions.
    tok = load_tokenizer(files["model"])
    base = load_model(files["model"])
    pairs = read_bundled("heldout_pairs.jsonl")[:6]
    prompts = [p.as_row() for p in make_prompts("heldout", 1, seed=0)]
    judge = load_judge("demo")
    ref = sequence_logps(base, tok, pairs, max_length=1024)
    for name in ("dpo-beta0.1", "orpo"):
        run_dir = out / name
        policy = load_model(str(run_dir))
        pm = pair_metrics(sequence_logps(policy, tok, pairs, max_length=1024), ref, 0.1)
        row = rows[name]
        assert float(row["reward_accuracy"]) == pytest.approx(pm.reward_accuracy, abs=1e-6)
        assert float(row["reward_margin"]) == pytest.approx(pm.reward_margin, abs=1e-5)
        assert float(row["chosen_change"]) == pytest.approx(pm.logps_chosen - pm.ref_logps_chosen, abs=1e-4)
        scores = read_scores(run_dir / SCORES_FILE)
        g = generation_metrics([prompt_text(p["prompt"]) for p in prompts], scores.replies, scores.scores, judge, tok,
                               [p["family"] for p in prompts])
        assert float(row["pass_rate"]) == pytest.approx(g.pass_rate)
        kl = (sum(scores.reply_logps) - sum(scores.reply_ref_logps)) / sum(scores.reply_tokens)
        assert float(row["kl"]) == pytest.approx(kl) and kl != 0.0
        summary = load_run(run_dir).summary()
        assert float(row["train_seconds"]) == pytest.approx(summary["train_runtime"])
        assert float(row["pairs_per_second"]) == pytest.approx(summary["train_samples_per_second"])
        assert int(row["steps"]) == 2
    assert float(rows["base"]["kl"]) == 0.0 and rows["base"]["win_rate"] == ""
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Ranked by win rate vs base" in md and "boom at beta 0.5" in md
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    assert html.count('src="data:image/png;base64,') >= 5
    assert {p.name for p in (out / "plots").iterdir()} >= {"loss.png", "tradeoff.png", "categories.png"}
    # Resume: finished runs and their scores are reused; only the failed run is trained again.
    monkeypatch.setattr(DPOTrainer, "compute_loss", original)
    stamps = {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in ("dpo-beta0.1", "orpo")}
    score_stamps = {n: (out / n / SCORES_FILE).stat().st_mtime_ns for n in ("dpo-beta0.1", "orpo")}
    assert main(["compare", path]) == 2  # without --resume the output directory is refused
    capsys.readouterr()
    assert main(["compare", path, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "run 1/3 dpo-beta0.1: finished earlier, reused" in resumed and "run 2/3 dpo-beta0.5: finished" not in resumed
    assert {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    assert {n: (out / n / SCORES_FILE).stat().st_mtime_ns for n in stamps} == score_stamps
    again = _csv(out / "summary.csv")
    assert again["dpo-beta0.5"]["status"] == "ok" and again["orpo"]["reward_accuracy"] == rows["orpo"][
        "reward_accuracy"]


# ----- the numbers --------------------------------------------------------------------------------------------------
def test_wilson_interval_against_hand_computed_numbers():
    # 7 of 10, z = 1.96: centre (0.7 + 0.19208) / 1.38416 = 0.644492, half 1.96 * sqrt(0.021 + 0.009604) / 1.38416
    # = 0.247718
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.396774, abs=1e-5) and high == pytest.approx(0.892210, abs=1e-5)
    # ties count half: 3 wins, 2 ties, 5 losses is 4 of 10
    assert WinRate(3, 5, 2).interval() == pytest.approx(wilson_interval(4, 10))
    # 4 of 10: centre 0.59208 / 1.38416 = 0.427754, half 1.96 * sqrt(0.024 + 0.009604) / 1.38416 = 0.259576
    assert wilson_interval(4, 10) == pytest.approx((0.168178, 0.687330), abs=1e-5)
    assert wilson_interval(0, 5)[0] == 0.0 and all(math.isnan(x) for x in wilson_interval(0, 0))


def test_kl_estimate_against_a_hand_computation():
    from tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()
    policy, ref = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    prompts, replies = ["What is 2 + 2?", "Name a bird."], ["4", "A sparrow, I think."]
    got_p, tokens = reply_logps(policy, tok, prompts, replies, max_length=256)
    got_r, _ = reply_logps(ref, tok, prompts, replies, max_length=256)
    want = {"p": [], "r": [], "n": []}
    for prompt, reply in zip(prompts, replies, strict=True):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                       tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor([full])
        for key, model in (("p", policy), ("r", ref)):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            want[key].append(sum(logp[t - 1, full[t]].item() for t in range(len(head), len(full))))
        want["n"].append(len(full) - len(head))
    assert tokens == want["n"]
    assert got_p == pytest.approx(want["p"], abs=1e-4) and got_r == pytest.approx(want["r"], abs=1e-4)
    scores = Scores(replies=replies, scores=[None, None], reply_logps=got_p, reply_ref_logps=got_r,
                    reply_tokens=tokens)
    hand = (sum(want["p"]) - sum(want["r"])) / sum(want["n"])
    assert scores.kl() == pytest.approx(hand, abs=1e-5) and abs(hand) > 1e-3
    held = Heldout([], [{"prompt": p} for p in prompts], load_judge("demo"))
    row = compute_row(Entry("p", "dpo", "beta=0.1", scores), Scores(replies=replies, scores=[None, None]), held, tok,
                      0.1)
    assert row.values["kl"] == pytest.approx(hand, abs=1e-5)
    assert re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", repr(row.values["kl"]))


# ----- the page -----------------------------------------------------------------------------------------------------
def _synthetic_report(tmp_path):
    """A compare page from hand-made scores and metrics (no training): base and two DPO runs, one failed run."""
    from prefalign.compare.run import report_files
    from prefalign.report.metrics import Run
    from tiny import smollm2_tokenizer

    prompts = [p.as_row() for p in make_prompts("heldout", 1, seed=0)]
    held = Heldout([{}] * 4, prompts, load_judge("demo"), edge_cases=("", "asdf"))
    base = Scores([-10.0, -12.0, -9.0, -11.0], [-11.0, -11.0, -10.0, -12.0], ["I do not know."] * 6,
                  [0.0, 0.0, 0.5, 0.0, 1.0, 0.0], ["Hello.", "Hm."])

    def run(name, lift, scores):
        records = [{"step": s, "loss": 0.69 - lift * s, "rewards/accuracies": min(1.0, 0.5 + lift * s),
                    "rewards/margins": lift * s, "logps/chosen": -10 + lift * s, "logps/rejected": -11 - lift * s}
                   for s in range(1, 9)] + [{"step": 8, "train_runtime": 4.0, "train_samples_per_second": 16.0}]
        s = Scores([c + lift for c in base.pair_chosen], list(base.pair_rejected), ["4", "No.", "Yes.", "Tea",
                   "I can't help with that.", "Snow falls."], scores, ["I can't help with that.", "Hi."],
                   [-3.0] * 6, [-3.0 - 10 * lift] * 6, [3] * 6)
        return Entry(name, "dpo", f"beta={lift}", s, Run(name, tmp_path / name, records))

    entries = [run("dpo-beta0.1", 0.05, [1.0, 0.0, 0.5, 1.0, 1.0, 1.0]),
               run("dpo-beta0.5", 0.02, [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
               Entry("dpo-beta9", "dpo", "beta=9", None, failure="RuntimeError: boom")]
    facts = [("base model (reference)", "tiny")]
    return report_files(tmp_path / "out", "Compare: synthetic", facts, entries, Entry("base", "—", "untrained", base),
                        held, smollm2_tokenizer(), 0.1, 3)


def test_synthetic_report_ranks_by_win_rate_and_names_failures(tmp_path):
    outcome = _synthetic_report(tmp_path)
    rows = _csv(tmp_path / "out" / "summary.csv")
    assert list(rows) == ["dpo-beta0.1", "dpo-beta0.5", "base", "dpo-beta9"] and outcome.failed == 1
    # dpo-beta0.1 against the base: wins on prompts 0, 3, 5; ties on 1, 2, 4 -> (3 + 1.5) / 6
    assert float(rows["dpo-beta0.1"]["win_rate"]) == pytest.approx(4.5 / 6)
    assert float(rows["dpo-beta0.1"]["win_low"]) == pytest.approx(wilson_interval(4.5, 6)[0])
    assert float(rows["dpo-beta0.1"]["kl"]) == pytest.approx(10 * 0.05 * 6 / 18)
    assert float(rows["dpo-beta0.1"]["chosen_change"]) == pytest.approx(0.05, abs=1e-5)  # float32 log-probs
    assert float(rows["dpo-beta0.1"]["reward_accuracy"]) == 1.0 and rows["dpo-beta9"]["reason"] == "RuntimeError: boom"
    assert float(rows["dpo-beta0.1"]["pairs_per_second"]) == 16.0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_compare_page_loads_in_a_browser(tmp_path):
    html = _synthetic_report(tmp_path).report.read_text(encoding="utf-8")
    verdict, images, errors = check_page(html, tmp_path)
    # loss, reward accuracy, margins, log-probs, trade-off, categories
    assert (verdict, images, errors) == ("ok", 6, [])


def test_a_data_error_is_a_failure_row_and_prompts_work_without_a_judge(tmp_path, files, capsys):
    """A value that makes the data untrainable (every prompt longer than max_length) fails that run alone, with the
    data error's one line; without a judge the held-out prompts still give replies and the KL, and the table is
    ranked by held-out reward accuracy."""
    path = _recipe(tmp_path, files, {"dpo": {"max_length": [128, 8]}}, judge=None)
    assert main(["compare", path]) == 1
    out = tmp_path / "cmp"
    rows = _csv(out / "summary.csv")
    failed = rows["dpo-max_length8"]
    assert failed["status"] == "failed" and "leaving no room for a reply under" in failed["reason"]
    assert files["dataset"] in failed["reason"] and "\n" not in failed["reason"]
    ok = rows["dpo-max_length128"]
    assert ok["status"] == "ok" and math.isfinite(float(ok["kl"])) and float(ok["kl"]) != 0.0
    assert ok["win_rate"] == "" and ok["pass_rate"] == ""
    scores = read_scores(out / "dpo-max_length128" / SCORES_FILE)
    assert len(scores.replies) == 3 + 3 and all(s is None for s in scores.scores)  # held-out + edge-case prompts
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Ranked by reward accuracy" in md and "leaving no room" in md and "pass rate per category" not in md
    assert not (out / "plots" / "categories.png").exists()


def test_every_method_runs_in_a_compare(tmp_path, files):
    """KTO, CPO, SimPO and SFT runs beside DPO: each trains and is scored on the same held-out data."""
    path = _recipe(tmp_path, files, {"dpo": None, "kto": None, "cpo": {"beta": [0.1]}, "simpo": None, "sft": None})
    assert main(["compare", path]) == 0
    rows = _csv(tmp_path / "cmp" / "summary.csv")
    assert set(rows) == {"dpo", "kto", "cpo", "simpo", "sft", "base"}  # a one-value list sweeps nothing
    for name, row in rows.items():
        assert row["status"] == ("reference" if name == "base" else "ok"), name
        assert row["reward_accuracy"] != "" and row["pass_rate"] != ""
