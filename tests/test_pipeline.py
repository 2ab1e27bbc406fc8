"""Pipelines (`stages:`): SFT → DPO hand-off, the SFT output as DPO's reference, a failing stage, --resume, and the
bad recipes; and `prefalign train --method sft` from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prefalign.cli import main
from tiny import conversational_rows, save_tiny


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("pipe-model") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pipe-data")
    sft = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
           for i in range(8)]
    return {"sft": _write_jsonl(d / "sft.jsonl", sft), "pairs": _write_jsonl(d / "pairs.jsonl", conversational_rows(8))}


def _recipe(path: Path, model: str, data: dict[str, Path], out: Path, dpo_data: Path | None = None) -> Path:
    recipe = {"model": model, "output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2,
              "max_length": 64, "seed": 0,
              "stages": [{"method": "sft", "dataset": str(data["sft"]), "learning_rate": 1e-3},
                         {"method": "dpo", "dataset": str(dpo_data or data["pairs"]), "beta": 0.1}]}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_hands_the_model_on_and_uses_it_as_reference(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "pipe"  # --set output_dir is the pipeline's, not each stage's
    recipe = _recipe(tmp_path / "r.yaml", tiny_model, data, tmp_path / "not-here")
    assert main(["train", str(recipe), "--set", f"output_dir={out}"]) == 0
    assert not (tmp_path / "not-here").exists()
    sft_dir, dpo_dir = out / "1-sft", out / "2-dpo"
    assert (sft_dir / "model.safetensors").is_file() and (dpo_dir / "model.safetensors").is_file()
    dpo_config = yaml.safe_load((dpo_dir / "config.yaml").read_text())
    assert dpo_config["model"] == str(sft_dir.resolve()) and dpo_config["method"] == "dpo"
    assert yaml.safe_load((sft_dir / "config.yaml").read_text())["learning_rate"] == 1e-3
    assert yaml.safe_load((dpo_dir / "config.yaml").read_text()).get("learning_rate") != 1e-3  # stage keys stay local
    first = next(r for r in _records(dpo_dir) if "loss" in r)
    # the first step's metrics come from the policy before its first update: the SFT output, which is the reference
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert (out / "stages" / "1-sft.yaml").is_file() and (out / "stages" / "2-dpo.yaml").is_file()
    assert "pipeline finished: 2 stages" in capsys.readouterr().out


def test_a_failing_stage_stops_the_pipeline_and_resume_continues_there(tiny_model, data, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "same", "rejected": "same"}])
    out = tmp_path / "pipe"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model, data, out, dpo_data=bad)
    assert main(["train", str(recipe)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after stage 1's progress
    assert len(err) == 1 and err[0].startswith("prefalign: error: pipeline stopped at stage 2/2 (dpo):")
    assert "identical to chosen" in err[0] and "Traceback" not in err[0]
    weights = out / "1-sft" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert not (out / "2-dpo").exists()  # nothing half-written
    bad.write_text(json.dumps(conversational_rows(2)[0]) + "\n" + json.dumps(conversational_rows(2)[1]) + "\n")
    assert main(["train", str(recipe), "--resume"]) == 0
    assert "stage 1/2 (sft): finished earlier, reused" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp  # the SFT stage was not trained again
    assert (out / "2-dpo" / "model.safetensors").is_file()


def test_resume_continues_a_stage_at_its_checkpoint(tiny_model, data, tmp_path):
    out = tmp_path / "pipe"
    recipe = yaml.safe_load(_recipe(tmp_path / "r.yaml", tiny_model, data, out).read_text())
    recipe["save_strategy"], recipe["save_steps"] = "steps", 1
    recipe["stages"][1]["max_steps"] = 1  # the first run stops the DPO stage after one step ...
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    (out / "2-dpo" / "model.safetensors").unlink()  # ... and we pretend it was interrupted there
    recipe["stages"][1]["max_steps"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--resume"]) == 0
    steps = [r["step"] for r in _records(out / "2-dpo") if "loss" in r]
    assert steps == [1, 2]  # step 1 from the first run, step 2 after resuming from checkpoint-1


@pytest.mark.parametrize("stages, message", [
    ("[]", "stages must be a non-empty list"),
    ("[{method: rlhf}]", "stage 1: method='rlhf' is not one of"),
    ("[sft]", "stage 1 is a str, not a mapping"),
    ("[{method: sft, output_dir: x}]", "output_dir is set by the pipeline"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, capsys, stages, message):
    (tmp_path / "r.yaml").write_text(f"dataset: x.jsonl\noutput_dir: {tmp_path / 'out'}\nstages: {stages}\n")
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_sft_from_the_cli(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "sft"
    argv = ["train", "--method", "sft", "--model", tiny_model, "--dataset", str(data["sft"]), "--output-dir",
            str(out), "--max-steps", "2", "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 0
    records = [r for r in _records(out) if "loss" in r]
    assert len(records) == 2 and all("mean_token_accuracy" in r and r["num_tokens"] > 0 for r in records)
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "sft"
    assert "run saved to" in capsys.readouterr().out
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": 5}])
    assert main(["train", "--method", "sft", "--model", tiny_model, "--dataset", str(bad), "--output-dir",
                 str(tmp_path / "bad-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and "'text'" in err[0]
    assert not (tmp_path / "bad-run").exists()


@pytest.mark.parametrize("method", ["kto", "simpo", "cpo"])
def test_the_other_methods_follow_sft_in_a_pipeline(method, tiny_model, data, tmp_path):
    """KTO (on the pairs, split into rows; its reference is the SFT output, as DPO's), CPO and SimPO after SFT."""
    out = tmp_path / "pipe"
    recipe = {"model": tiny_model, "output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2,
              "max_length": 64, "seed": 0,
              "stages": [{"method": "sft", "dataset": str(data["sft"]), "learning_rate": 1e-3},
                         {"method": method, "dataset": str(data["pairs"])}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    stage = out / f"2-{method}"
    assert yaml.safe_load((stage / "config.yaml").read_text())["model"] == str((out / "1-sft").resolve())
    first = next(r for r in _records(stage) if "loss" in r)
    if method == "kto":  # the policy before its first update is the reference: every log-ratio is 0, loss 1 - sig(0)
        assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert (stage / "model.safetensors").is_file()
