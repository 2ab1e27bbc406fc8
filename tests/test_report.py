"""`prefalign report`: metrics.jsonl → summary table, curves and report.html; the train hook; tensorboard."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from browser import CHROMIUM, check_page
from PIL import Image

from prefalign.cli import main
from prefalign.errors import DataError
from prefalign.report import load_run, load_runs, read_metrics
from prefalign.report.html import format_value, metrics_table, render_page
from prefalign.report.plots import (
    DPI,
    FIGSIZE,
    PANELS,
    plot_panel,
    present_panels,
    render_plots,
    smooth,
    smoothing_weight,
    write_plots,
)
from prefalign.report.write import write_report, write_report_or_warn
from tiny import conversational_rows, save_tiny

SUMMARY = {"train_runtime": 75.5, "train_samples_per_second": 1.59, "train_steps_per_second": 0.16,
           "total_flos": 1.0e9, "train_loss": 0.41}


def dpo_records(steps: int = 12, eval_every: int = 6) -> list[dict]:
    """What a DPO run logs: one record per step, evaluations, the final evaluate() again, the end-of-run record."""
    out = []
    for s in range(1, steps + 1):
        margin = 0.1 * s + 0.03 * (s % 3)
        out.append({"step": s, "epoch": s / 4, "loss": 0.69 * math.exp(-s / 5) + 0.01 * (s % 2), "grad_norm": 1 + s % 4,
                    "learning_rate": 1e-5 * (1 - s / steps), "rewards/chosen": 0.05 * s, "rewards/rejected": 0.05 * s
                    - margin, "rewards/accuracies": min(1.0, 0.5 + 0.1 * s), "rewards/margins": margin,
                    "logps/chosen": -50 + s, "logps/rejected": -80 - 2 * s})
        if s % eval_every == 0:
            out.append({"step": s, "epoch": s / 4, "eval_loss": 0.6 - 0.02 * s, "eval_runtime": 0.5,
                        "eval_samples_per_second": 20.0, "eval_rewards/accuracies": 0.7,
                        "eval_rewards/margins": 0.04 * s, "eval_logps/chosen": -55.0 + s, "eval_logps/rejected": -85.0})
    out.append({"step": steps, "epoch": steps / 4, **SUMMARY})
    # The final evaluate() logs the last step's evaluation again (here with other numbers: the last one counts).
    out.append({"step": steps, "epoch": steps / 4, "eval_loss": 0.3, "eval_runtime": 0.5,
                "eval_samples_per_second": 20.0, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.5,
                "eval_logps/chosen": -44.0, "eval_logps/rejected": -86.0})
    return out


def orpo_records(steps: int = 8) -> list[dict]:
    return [{"step": s, "epoch": s / 8, "loss": 3 - 0.1 * s, "nll_loss": 2.9 - 0.1 * s,
             "log_odds_ratio": -0.5 + 0.01 * s, "log_odds_chosen": 0.1 * s, "rewards/chosen": -0.3,
             "rewards/rejected": -0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.2, "logps/chosen": -3.0,
             "logps/rejected": -5.0, "grad_norm": 2.0, "learning_rate": 1e-5} for s in range(1, steps + 1)]


def sft_records(steps: int = 6) -> list[dict]:
    return [{"step": s, "epoch": s / 6, "loss": 2.0 / s, "mean_token_accuracy": 0.1 * s, "num_tokens": 100.0 * s}
            for s in range(1, steps + 1)]


def make_run(path: Path, records: list, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                for r in records), encoding="utf-8")
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def last_values(records: list[dict], eval_: bool) -> dict[str, float]:
    """Independent of the report code: each metric's last logged value, end-of-run and timing keys excluded."""
    out: dict[str, float] = {}
    for record in records:
        if "train_runtime" in record:
            continue
        for key, value in record.items():
            if key in ("step", "epoch") or key.endswith(("_runtime", "_per_second")):
                continue
            if key.startswith("eval_") == eval_:
                out[key] = float(value)
    return out


def table_cells(html: str) -> dict[str, tuple[float, str]]:
    return {key: (float(value), text)
            for key, value, text in re.findall(r'data-key="([^"]+)" data-value="([^"]+)">([^<]*)<', html)}


@pytest.fixture
def dpo_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "dpo-run", dpo_records(), {"method": "dpo", "model": "tiny-llama", "dataset": "p.jsonl",
                                                          "ref_model": "tiny-ref"})


# ----- metrics.jsonl and the summary table ------------------------------------------------------------------------
def test_summary_table_holds_the_final_values_of_metrics_jsonl(dpo_run):
    records = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    html = write_report(dpo_run).read_text(encoding="utf-8")
    cells = table_cells(html)
    expected = {**last_values(records, eval_=False), **last_values(records, eval_=True)}
    assert set(cells) == set(expected)
    assert expected["eval_loss"] == 0.3 and expected["loss"] == pytest.approx(0.69 * math.exp(-12 / 5))
    for key, value in expected.items():
        assert cells[key] == (value, format_value(value)), key
    assert "train_runtime" not in cells and "eval_runtime" not in cells  # run facts, not metrics
    # The header: run dir, method, model, reference, steps, train time from config.yaml and the end-of-run record.
    for fact in (str(dpo_run.resolve()), ">dpo<", ">tiny-llama<", ">tiny-ref<", ">12<", ">1 min 16 s<", ">3<"):
        assert fact in html, fact


def test_series_keeps_the_last_value_per_step_and_counts_non_finite_values(tmp_path):
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5},
               {"step": 2, "loss": 0.8}, {"step": 3, "loss": float("inf")}, {"step": 4, "loss": 0.25}]
    run = load_run(make_run(tmp_path / "r", records))
    series = run.series("loss")
    assert series.steps == (1.0, 2.0, 4.0) and series.values == (1.0, 0.8, 0.25) and series.nonfinite == 1
    assert run.config == {} and run.steps() == 4 and run.summary() == {}
    plot = plot_panel(PANELS[0], {"r": run})
    assert plot.notes == ("1 non-finite value(s) of loss not drawn",)
    assert "1 non-finite value(s) of loss not drawn" in write_report(tmp_path / "r").read_text()


def test_read_metrics_names_the_bad_line(tmp_path):
    path = make_run(tmp_path / "r", [{"step": 1, "loss": 1.0}, "", '{"step": 2, "loss": 0.'])
    with pytest.raises(DataError, match=r"metrics.jsonl, line 3: not valid JSON"):
        read_metrics(path / "metrics.jsonl")
    make_run(tmp_path / "r", [{"step": 1}, "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        read_metrics(path / "metrics.jsonl")


# ----- plots ------------------------------------------------------------------------------------------------------
def test_smoothing_is_a_debiased_ema():
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])  # (0.5·1 + 0.5·2·... ) / (1 - 0.5^t)
    assert smooth([4.0, 4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0] * 4)  # no pull towards 0 at the start
    assert smooth([3.0, -1.0, 2.0], 0.0) == [3.0, -1.0, 2.0]
    assert (smoothing_weight(5), smoothing_weight(30), smoothing_weight(1000)) == (0.0, 0.5, pytest.approx(99 / 101))
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


@pytest.mark.parametrize("records, panels", [
    (dpo_records(), {"loss", "reward_accuracy", "reward_margins", "rewards", "logps", "grad_norm", "learning_rate"}),
    (orpo_records(), {"loss", "nll_loss", "reward_accuracy", "reward_margins", "rewards", "logps", "log_odds",
                      "grad_norm", "learning_rate"}),
    (sft_records(), {"loss", "token_accuracy"}),
], ids=["dpo", "orpo", "sft"])
def test_only_the_metrics_a_run_has_are_plotted(records, panels, tmp_path):
    run = load_run(make_run(tmp_path / "r", records))
    plots = render_plots({"r": run})
    assert {p.name for p in plots} == panels
    for plot in plots:
        image = Image.open(io.BytesIO(plot.png))
        assert image.format == "PNG" and image.size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert {p.stem for p in write_plots(plots, tmp_path / "plots")} == panels


def test_several_runs_share_axes_and_a_table(tmp_path):
    runs = load_runs([make_run(tmp_path / "a" / "run", dpo_records()),
                      make_run(tmp_path / "b" / "run", orpo_records())])
    assert [r.name for r in runs] == ["a/run", "b/run"]  # same directory name: told apart by the parent
    by_name = {r.name: r for r in runs}
    assert {p.name for p in present_panels(by_name)} >= {"nll_loss", "log_odds", "reward_margins"}
    assert Image.open(io.BytesIO(plot_panel(PANELS[0], by_name).png)).size == (750, 480)
    table = metrics_table(runs)
    assert '<th colspan="2">a/run</th><th colspan="2">b/run</th>' in table
    row = re.search(r'<tr><td class="metric">nll_loss</td>(.*?)</tr>', table).group(1)
    assert row.count("—") == 3 and f'data-key="nll_loss" data-value="{2.9 - 0.1 * 8!r}">2.1<' in row  # only b
    assert "<h1>compare</h1>" in render_page("compare", runs, [])


def test_plotting_changes_no_process_wide_matplotlib_state():
    # rcParams are compared as stored (dict.__eq__): reading rcParams["backend"] would itself import pyplot.
    code = ("import sys, matplotlib\n"
            "before = matplotlib.rcParams.copy()\n"
            "from prefalign.report.plots import PANELS, plot_panel\n"
            "from prefalign.report.metrics import Run\n"
            "from pathlib import Path\n"
            "run = Run('r', Path('.'), [{'step': s, 'loss': 1.0 / s} for s in range(1, 6)])\n"
            "assert plot_panel(PANELS[0], {'r': run}).png[:4] == b'\\x89PNG'\n"
            "print('matplotlib.pyplot' in sys.modules, dict.__eq__(before, matplotlib.rcParams))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


# ----- the command ------------------------------------------------------------------------------------------------
def test_report_command_writes_the_page_and_replaces_old_plots(dpo_run, capsys):
    (dpo_run / "plots").mkdir()
    (dpo_run / "plots" / "stale.png").write_bytes(b"old")
    assert main(["report", str(dpo_run)]) == 0
    assert capsys.readouterr().out.strip() == str(dpo_run / "report.html")
    assert not (dpo_run / "plots" / "stale.png").exists() and (dpo_run / "plots" / "loss.png").exists()
    assert sorted(p.name for p in dpo_run.iterdir()) == ["config.yaml", "metrics.jsonl", "plots", "report.html"]
    html = (dpo_run / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 7
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<script" not in html  # self-contained


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("prefalign: error: ")
    return lines[0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("no-metrics", "metrics.jsonl: no such file"),
    ("empty", "metrics.jsonl: holds no records"),
    ("corrupt", "metrics.jsonl, line 2: not valid JSON"),
    ("bad-config", "config.yaml: cannot read it"),
])
def test_report_command_bad_input_is_one_line_and_writes_nothing(case, message, tmp_path, capsys):
    target = tmp_path / "run"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
    if case == "empty":
        (target / "metrics.jsonl").write_text("\n\n")
    if case in ("corrupt", "bad-config"):
        make_run(target, [{"step": 1, "loss": 1.0}, '{"step": 2' if case == "corrupt" else {"step": 2, "loss": 0.5}])
    if case == "bad-config":
        (target / "config.yaml").write_text("method: [dpo\n")
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else None
    assert main(["report", str(target)]) == 2
    assert message in _one_error(capsys)
    if target.is_dir():
        assert sorted(p.name for p in target.iterdir()) == before  # no report.html, no plots/, no staging dir


def test_a_plotting_failure_only_warns_and_leaves_the_run_as_it_was(dpo_run, monkeypatch, caplog):
    def boom(runs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("prefalign.report.write.render_plots", boom)
    assert write_report_or_warn(dpo_run) is None
    assert "could not write report.html" in caplog.text and "RuntimeError: no fonts" in caplog.text
    assert sorted(p.name for p in dpo_run.iterdir()) == ["config.yaml", "metrics.jsonl"]


# ----- what a person sees -----------------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_page_loads_in_a_browser_with_every_image_and_table(dpo_run, tmp_path):
    html = write_report(dpo_run).read_text(encoding="utf-8")
    assert check_page(html, tmp_path) == ("ok", 7, [])
    # The check itself catches a broken image, an empty table and a script error (one page, one browser run).
    broken = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,AAAA"', html, count=1)
    broken = re.sub(r"<tbody>.*?</tbody>", "<tbody></tbody>", broken, count=1, flags=re.S)
    verdict, images, errors = check_page(broken.replace("</body>", "<script>undefinedFunction();</script></body>"),
                                         tmp_path)
    assert verdict == "image 0 (Training loss) is broken; table 0 has no rows" and images == 7
    assert len(errors) == 1 and "Uncaught ReferenceError: undefinedFunction is not defined" in errors[0]


# ----- training runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("report-model") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(8)), encoding="utf-8")
    return path


def _train(model: str, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", model, "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--max-length", "64", *extra])


def test_train_writes_the_report(tiny_model, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model, pairs, out, "--method", "orpo") == 0
    assert "warning" not in capsys.readouterr().err
    html = (out / "report.html").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert table_cells(html)["loss"][0] == [r["loss"] for r in records if "loss" in r][-1]
    assert {p.stem for p in (out / "plots").iterdir()} >= {"loss", "nll_loss", "log_odds", "logps"}
    assert ">orpo<" in html and f">{Path(tiny_model).resolve()}<" in html


def test_report_to_tensorboard_writes_event_files_offline(tiny_model, pairs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _train(tiny_model, pairs, out, "--set", "report_to=tensorboard") == 0
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    logged = acc.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx(losses, rel=1e-6)
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == "tensorboard"
