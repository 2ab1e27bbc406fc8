"""KTO: unpaired rows, pairs split into rows, KL completions, the loss, and parity with TRL 1.13's KTOTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import trl

from prefalign import KTOConfig, KTOTrainer, load_unpaired_dataset
from prefalign.cli import main
from prefalign.data.load import RawData, read_valid_rows
from prefalign.data.unpaired import UNPAIRED_ROWS, kl_completions, unpair_rows, weight_advice
from prefalign.errors import ConfigError, DataError
from prefalign.losses import kto_loss
from tiny import conversational_rows, save_tiny, smollm2_tokenizer, text_rows, tiny_llama

TOL = 1e-4
COMMON = dict(per_device_eval_batch_size=3, per_device_train_batch_size=3, report_to=[], use_cpu=True, bf16=False,
              max_length=256, seed=0, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
KTO_METRICS = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def unpaired_conversational(n: int = 7) -> list[dict]:
    rows = []
    for i, r in enumerate(conversational_rows(n)):  # unbalanced: 2 of 3 desirable
        good = i % 3 != 2
        rows.append({"prompt": r["prompt"], "completion": r["chosen" if good else "rejected"], "label": good})
    return rows


def unpaired_text(n: int = 7) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
            for i, r in enumerate(text_rows(n))]


def _both(tok, rows, cfg: dict, ours_extra: dict | None = None) -> tuple[dict, dict]:
    """evaluate() of prefalign's and TRL's KTOTrainer; policy and reference differ (seeds 1 and 2)."""
    ds = datasets.Dataset.from_list(rows)
    ours = KTOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2), args=KTOConfig(**cfg, **(ours_extra or {})),
                      train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    theirs = trl.KTOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                            args=trl.KTOConfig(**cfg, gradient_checkpointing=False), train_dataset=ds,
                            eval_dataset=ds, processing_class=tok).evaluate()
    return ours, theirs


def _same(ours: dict, theirs: dict, names: list[str]) -> None:
    for name in names:
        key = f"eval_{name}"
        assert key in ours, f"prefalign did not report {key}"
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key


PARITY_CASES = {
    "conversational-kto": (unpaired_conversational, "kto", {}),
    "conversational-apo_zero_unpaired": (unpaired_conversational, "apo_zero_unpaired", {}),
    "text-kto": (unpaired_text, "kto", {"chat_template_for_text": False}),  # TRL never templates text rows
    "pairs-kto-live-reference": (lambda: conversational_rows(5), "kto", {"precompute_ref_log_probs": False}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_evaluate_matches_trl(tmp_path, case):
    """Loss and every shared metric within 1e-4 of TRL 1.13, unequal weights, prefix sharing and packing on."""
    rows_fn, loss_type, extra = PARITY_CASES[case]
    tok = smollm2_tokenizer()
    ours, theirs = _both(tok, rows_fn(), dict(COMMON, output_dir=str(tmp_path), loss_type=loss_type), extra)
    metrics = KTO_METRICS if loss_type == "kto" else [m for m in KTO_METRICS if m != "kl"]
    _same(ours, theirs, metrics)
    assert abs(ours["eval_rewards/margins"]) > 1e-3  # the comparison is not between zeros
    assert (ours["eval_kl"] > 0) == (loss_type == "kto")


def test_a_few_training_steps_log_the_same_losses_as_trl(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(unpaired_conversational(8))
    cfg = dict(COMMON, per_device_train_batch_size=2, max_steps=3, learning_rate=5e-3, logging_steps=1,
               save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
               train_sampling_strategy="sequential")  # TRL's order (its default), so the batches are the same
    losses = []
    for name, cls, conf in (("ours", KTOTrainer, KTOConfig), ("trl", trl.KTOTrainer, trl.KTOConfig)):
        kwargs = {} if name == "ours" else {"gradient_checkpointing": False}
        tr = cls(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                 args=conf(**cfg, **kwargs, output_dir=str(tmp_path / name)), train_dataset=ds, processing_class=tok)
        tr.train()
        losses.append([r["loss"] for r in tr.state.log_history if "loss" in r])
    assert len(losses[0]) == 3 and losses[0][0] != losses[0][-1]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_fast_path_prefix_sharing_and_plain_path_agree(tmp_path):
    """[prompt | completion | KL completion] under the prefix-sharing mask gives the numbers of two separate
    sequences (padded pairs) and of the plain path (full logits)."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(unpaired_conversational(7))
    results = []
    for extra in ({}, {"prefix_sharing": False}, {"fast_path": False, "prefix_sharing": False}):
        tr = KTOTrainer(tiny_llama(tok, 1), ref_model=tiny_llama(tok, 2),
                        args=KTOConfig(**COMMON, output_dir=str(tmp_path), **extra), train_dataset=ds,
                        eval_dataset=ds, processing_class=tok)
        batch = tr.data_collator([tr.eval_dataset[i] for i in range(3)])
        assert ("predictor" in batch and batch["attention_mask"].dim() == 4) == (not extra)
        results.append(tr.evaluate())
    for other in results[1:]:
        for key in KTO_METRICS:
            assert other[f"eval_{key}"] == pytest.approx(results[0][f"eval_{key}"], abs=1e-5), key


def test_kto_loss_by_hand():
    r = torch.tensor([0.4, -1.0, 2.0])
    labels = torch.tensor([True, False, False])
    s = torch.sigmoid
    got = kto_loss(r, labels, 0.3, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    want = [2.0 * (1 - s(torch.tensor(0.5 * (0.4 - 0.3)))), 0.5 * (1 - s(torch.tensor(0.5 * (0.3 + 1.0)))),
            0.5 * (1 - s(torch.tensor(0.5 * (0.3 - 2.0))))]
    assert got.tolist() == pytest.approx([w.item() for w in want], abs=1e-7)
    apo = kto_loss(r, labels, 5.0, beta=0.5, loss_type="apo_zero_unpaired")  # no reference point
    assert apo.tolist() == pytest.approx([1 - s(torch.tensor(0.2)).item(), s(torch.tensor(-0.5)).item(),
                                          s(torch.tensor(1.0)).item()], abs=1e-7)


def test_kl_completions_rotate_within_each_batch_chunk():
    assert kl_completions([[1], [2], [3], [4], [5]], 2) == [[2], [1], [4], [3], [5]]
    assert kl_completions([[1], [2], [3]], 3) == [[3], [1], [2]]


def test_preference_pairs_become_two_rows_each_in_trls_order():
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    raw, _ = read_valid_rows(pairs, schema=UNPAIRED_ROWS)
    raw = RawData(raw.source, raw.kind, raw.rows, raw.columns, raw.row_label, [4, 6, 9])  # source lines
    out = unpair_rows(raw)
    assert [(r["prompt"], r["completion"], r["label"]) for r in out.rows] == [
        ("p0", "c0", True), ("p1", "c1", True), ("p2", "c2", True),
        ("p0", "r0", False), ("p1", "r1", False), ("p2", "r2", False)]
    assert out.row_numbers == [4, 6, 9, 4, 6, 9]
    assert "3 pairs → 6 rows" in out.converted_from
    # an implicit prompt (shared start of chosen and rejected) is split off first, as for DPO
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in conversational_rows(2)]
    rows = unpair_rows(read_valid_rows(implicit, schema=UNPAIRED_ROWS)[0]).rows
    assert rows[0]["prompt"] == conversational_rows(2)[0]["prompt"]
    assert rows[2]["completion"] == conversational_rows(2)[0]["rejected"]


def test_pairs_give_trls_rows_and_numbers(tmp_path):
    """Pairs given to KTOTrainer: each a desirable and an undesirable row, both numbered by the pair's row."""
    tok = smollm2_tokenizer()
    tr = KTOTrainer(tiny_llama(tok, 1), args=KTOConfig(**COMMON, output_dir=str(tmp_path)),
                    train_dataset=conversational_rows(4), processing_class=tok)
    ds = tr.train_dataset
    assert ds["label"] == [True] * 4 + [False] * 4 and ds["source_row"] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert ds[0]["rejected_ids"] == ds[2]["chosen_ids"]  # row 1's KL completion: row 3's (its chunk's last)
    report = tr.data_reports["train"]
    assert (report.desirable, report.undesirable) == (4, 4) and "4 pairs → 8 rows" in report.converted_from


def test_unpaired_file_loads_with_labels_and_row_numbers(tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in unpaired_text(4)) + "\n\n", encoding="utf-8")
    ds = load_unpaired_dataset(path)
    assert ds["label"] == [False, True, True, False] and ds["source_row"] == [1, 2, 3, 4]
    csv = tmp_path / "fb.csv"
    csv.write_text("prompt,completion,label\nHi,Hello,true\nHi,Go away,FALSE\n", encoding="utf-8")
    assert load_unpaired_dataset(csv)["label"] == [True, False]


@pytest.mark.parametrize("label, said", [("yes", "the text 'yes'"), (1, "a number (1)"), (None, "is null")])
def test_a_bad_label_is_one_line_naming_row_and_field(tmp_path, label, said):
    path = tmp_path / "fb.jsonl"
    rows = unpaired_text(3)
    rows[1]["label"] = label
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_unpaired_dataset(path)
    msg = str(err.value)
    assert "line 2" in msg and "field 'label'" in msg and said in msg and "Fix: write label as true" in msg


def test_weight_advice_is_trls_check():
    assert weight_advice(5, 5) is None
    assert weight_advice(10, 20, 1.0, 1.0) is not None  # fewer desirable rows, equal weights: outside
    assert weight_advice(10, 20, 2.2, 1.0) is None  # desirable_weight in [2.0, 2.66]
    assert weight_advice(30, 10, 1.0, 2.5) is None  # undesirable_weight in [2.26, 3.0]
    assert "desirable_weight in [2.0, 2.66]" in weight_advice(10, 20)


def test_config_checks():
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        KTOConfig(output_dir="unused", per_device_train_batch_size=1, use_cpu=True, report_to=[])
    KTOConfig(output_dir="unused", per_device_train_batch_size=1, loss_type="apo_zero_unpaired", use_cpu=True,
              report_to=[])
    with pytest.raises(ConfigError, match="loss_type"):
        KTOConfig(output_dir="unused", loss_type="sigmoid", use_cpu=True, report_to=[])


# ----- the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(tmp_path_factory.mktemp("kto-model") / "model")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_method_kto_end_to_end(tiny_model, tmp_path, capsys):
    data = _write(tmp_path / "fb.jsonl", unpaired_conversational(6))
    out = tmp_path / "run"
    argv = ["train", "--method", "kto", "--model", tiny_model, "--dataset", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--max-length", "64"]
    assert main(argv) == 0
    assert f"run saved to {out}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "kl" in r for r in records)
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert report["rows"] == 6 and (report["desirable"], report["undesirable"]) == (4, 2)


def test_train_method_kto_bad_label_exits_2_with_one_line(tiny_model, tmp_path, capsys):
    rows = unpaired_text(3)
    rows[2]["label"] = "yes"
    data = _write(tmp_path / "fb.jsonl", rows)
    code = main(["train", "--method", "kto", "--model", tiny_model, "--dataset", str(data), "--output-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("prefalign: error: ") and "line 3, field 'label'" in err[0] and "Fix:" in err[0]


def test_data_check_reports_labels_balance_and_trls_weight_warning(tmp_path, capsys):
    rows = unpaired_text(6)  # 4 desirable, 2 undesirable
    rows.append({**rows[0], "label": "yes"})
    data = _write(tmp_path / "fb.jsonl", rows)
    assert main(["data", "check", str(data), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    labels = report["labels"]
    assert (labels["desirable"], labels["undesirable"]) == (4, 2)
    assert labels["label_types"] == {"boolean": 6, "text": 1}
    assert "desirable_weight in [0.5, 0.67]" in labels["weight_warning"]
    assert report["problems"][0]["row"] == 7 and "field 'label'" in report["problems"][0]["message"]
    assert set(report["token_lengths"]) == {"prompt", "completion", "prompt+completion"}
