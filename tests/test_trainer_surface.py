"""TRL 1.16's trainer surface: streamed (IterableDataset) train and eval sets for every trainer, eval sets as dicts
of every kind (logged as eval_<name>_loss), and TRL's construction checks; the reference kept until train()."""

from __future__ import annotations

import json
import logging
import math

import datasets
import pytest
import torch

from prefalign import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    SFTConfig,
    SFTTrainer,
)
from prefalign.errors import ConfigError, DataError
from tiny import smollm2_tokenizer, text_rows, tiny_llama

COMMON = dict(per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to=[], use_cpu=True, bf16=False,
              max_length=64, seed=0, learning_rate=1e-2, logging_steps=1, save_strategy="no")
METHODS = {
    "dpo": (DPOTrainer, DPOConfig, {"beta": 0.5}),
    "orpo": (ORPOTrainer, ORPOConfig, {}),
    "cpo": (CPOTrainer, CPOConfig, {}),
    "kto": (KTOTrainer, KTOConfig, {}),
    "sft": (SFTTrainer, SFTConfig, {}),
}


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def rows(n: int = 6, start: int = 0) -> list[dict]:
    return text_rows(n + start)[start:]


def stream(items: list[dict]) -> datasets.IterableDataset:
    def gen():
        yield from items

    return datasets.IterableDataset.from_generator(gen)


def trainer(tok, method: str, tmp_path, train, eval_dataset=None, **cfg):
    cls, config, extra = METHODS[method]
    args = config(output_dir=str(tmp_path / method), **{**COMMON, **extra, **cfg})
    return cls(tiny_llama(tok, 1), args=args, train_dataset=train, eval_dataset=eval_dataset, processing_class=tok)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method,cfg", [(m, {}) for m in METHODS] + [("dpo", {"packing": True}),
                                                                      ("sft", {"packing": True})])
def test_stream_trains_and_evaluates(tok, tmp_path, method, cfg):
    """A generator stream as train and eval set: tokenized on the fly, trains max_steps, evaluates, changes the
    weights; its eval loss equals the same rows' as a map-style Dataset (same prepared batches)."""
    tr = trainer(tok, method, tmp_path, stream(rows(6)), eval_dataset=stream(rows(4, 6)), max_steps=2, **cfg)
    assert isinstance(tr.train_dataset, datasets.IterableDataset)
    first = next(iter(tr.train_dataset))
    trl_names = {"sft": {"labels"}, "kto": {"completion_ids"}}.get(method, set())  # TRL's columns, kept beside ours
    assert set(first) == set(tr.tokenized_columns) | trl_names
    assert all(isinstance(t, int) for t in first[tr.tokenized_columns[0]])
    before = weights(tr.model)
    tr.train()
    assert tr.state.global_step == 2
    assert not torch.equal(before, weights(tr.model))
    streamed = tr.evaluate()["eval_loss"]
    mapped = tr.evaluate(datasets.Dataset.from_list(rows(4, 6)))["eval_loss"]
    assert streamed == pytest.approx(mapped, rel=1e-5)
    assert tr.data_reports["train"].rows >= 2  # counted as read


def test_stream_from_load_dataset_json(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(4)), encoding="utf-8")
    ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    tr = trainer(tok, "dpo", tmp_path, ds, eval_dataset=ds, max_steps=3)
    tr.train()
    assert tr.state.global_step == 3 and tr.args.accelerator_config.dispatch_batches is False
    assert math.isfinite(tr.evaluate()["eval_loss"])


def test_stream_bad_row_named_by_its_stream_index(tok, tmp_path):
    items = rows(5)
    items[2] = {**items[2], "rejected": items[2]["chosen"]}  # the stream's third row
    tr = trainer(tok, "dpo", tmp_path, stream(items), max_steps=1)  # nothing is read at construction
    with pytest.raises(DataError, match=r"train dataset, row 3, field 'rejected': is identical to chosen"):
        tr.train()


def test_stream_skipped_rows_counted_once_and_logged(tok, tmp_path, caplog):
    items = rows(6)
    for i in (1, 4):  # rows 2 and 5
        items[i] = {**items[i], "rejected": items[i]["chosen"]}
    tr = trainer(tok, "dpo", tmp_path, stream(items), max_steps=5, on_invalid_row="skip")  # 2 batches a pass
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        tr.train()
    report = tr.data_reports["train"]
    assert report.rows == 6 and [s["row"] for s in report.skipped] == [2, 5]
    assert report.skipped[0]["field"] == "rejected"
    assert any("train dataset (stream, 6 rows read): 2 invalid rows skipped" in r.message for r in caplog.records)


def test_stream_needs_max_steps(tok, tmp_path):
    with pytest.raises(ConfigError, match="stream.*Fix: set max_steps"):
        trainer(tok, "sft", tmp_path, stream(rows(4)))


def test_stream_precompute_explicit_refused_unset_runs_live(tok, tmp_path, caplog):
    train = datasets.Dataset.from_list(rows(4))
    for train_set, evals in ((stream(rows(4)), None), (train, datasets.IterableDatasetDict({"a": stream(rows(2))}))):
        with pytest.raises(ConfigError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
            trainer(tok, "dpo", tmp_path, train_set, eval_dataset=evals, max_steps=1, precompute_ref_log_probs=True)
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        tr = trainer(tok, "kto", tmp_path, stream(rows(4)), max_steps=1)
    assert tr.args.precompute_ref_log_probs is False and tr.ref_model is not None
    assert any("precompute_ref_log_probs: off" in r.message for r in caplog.records)
    assert trainer(tok, "dpo", tmp_path, train).args.precompute_ref_log_probs is True  # map-style: on


def test_kto_stream_kl_completions_pair_rows_within_a_chunk(tok, tmp_path):
    """Each streamed row's KL completion is another row's completion from its chunk (its own prompt kept)."""
    tr = trainer(tok, "kto", tmp_path, stream(rows(4)), max_steps=1)
    examples = list(tr.train_dataset)
    assert len(examples) == 8  # 4 pairs, each a desirable and an undesirable row
    chunk = 2 * COMMON["per_device_train_batch_size"]
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        completions = [e["chosen_ids"] for e in part]
        for e in part:
            assert e["rejected_ids"] in completions and e["rejected_ids"] != e["chosen_ids"]


def _eval_sets(kind: str, method: str):
    a, b = rows(2, 6), rows(3, 8)
    if kind in ("dataset_dict", "dict_of_dataset"):
        sets = {"data1": datasets.Dataset.from_list(a), "data2": datasets.Dataset.from_list(b)}
        return datasets.DatasetDict(sets) if kind == "dataset_dict" else sets
    sets = {"data1": stream(a), "data2": stream(b)}
    return datasets.IterableDatasetDict(sets) if kind == "iterable_dataset_dict" else sets


EVAL_METRIC = {"dpo": "eval_rewards/chosen", "orpo": "eval_log_odds_ratio", "cpo": "eval_rewards/chosen",
               "kto": "eval_kl", "sft": "eval_mean_token_accuracy"}


@pytest.mark.parametrize("kind", ["dataset_dict", "dict_of_dataset", "iterable_dataset_dict",
                                  "dict_of_iterable_dataset"])
@pytest.mark.parametrize("method", list(METHODS))
def test_eval_dict_each_set_prepared_and_logged(tok, tmp_path, method, kind):
    tr = trainer(tok, method, tmp_path, datasets.Dataset.from_list(rows(4)), eval_dataset=_eval_sets(kind, method),
                 max_steps=1, eval_strategy="steps", eval_steps=1)
    assert isinstance(tr.eval_dataset, dict) and set(tr.eval_dataset) == {"data1", "data2"}
    for name in ("data1", "data2"):
        assert set(tr.tokenized_columns) <= set(next(iter(tr.eval_dataset[name])))
    tr.train()
    logged = {k: v for record in tr.state.log_history for k, v in record.items()}
    assert math.isfinite(logged["eval_data1_loss"]) and math.isfinite(logged["eval_data2_loss"])
    assert logged["eval_data1_loss"] != logged["eval_data2_loss"]  # different sets, evaluated apart
    assert EVAL_METRIC[method] in logged  # TRL 1.16's names: eval_<metric>, beside each set's eval_<name>_loss
    if method in ("orpo", "cpo", "sft") or "iterable" in kind:  # a reference to run on new sets after training
        metrics = tr.evaluate(_eval_sets(kind, method))
        assert metrics["eval_data1_loss"] == pytest.approx(tr.evaluate()["eval_data1_loss"], rel=1e-5)
        assert math.isfinite(metrics["eval_data2_loss"])


def test_construction_checks(tok, tmp_path):
    with pytest.raises(ConfigError, match="`train_dataset` is required"):
        trainer(tok, "orpo", tmp_path, None)
    model = tiny_llama(tok, 1)
    with pytest.raises(ConfigError, match="`model` and `ref_model` cannot be the same object"):
        DPOTrainer(model, ref_model=model, args=DPOConfig(output_dir=str(tmp_path), **COMMON),
                   train_dataset=rows(2), processing_class=tok)
    with pytest.raises(ConfigError, match="one dataset, not a DatasetDict"):
        trainer(tok, "sft", tmp_path, datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(2))}))


def test_precomputed_reference_kept_until_train(tok, tmp_path):
    """As TRL: before train() a new eval set gets reference log-probs (the untrained policy: DPO's loss is log 2);
    after, the freed reference gives an error that says what to do."""
    tr = trainer(tok, "dpo", tmp_path, rows(4), max_steps=1)
    assert tr.args.precompute_ref_log_probs is True
    assert tr.evaluate(rows(3, 4))["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    tr.train()
    with pytest.raises(ConfigError, match="precompute_ref_log_probs=False \\(the reference is then kept"):
        tr.evaluate(rows(3, 7))
