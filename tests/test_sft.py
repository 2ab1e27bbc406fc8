"""SFTTrainer: parity with TRL 1.13's SFTTrainer, the loss masks on real chat-template output, packing isolation,
the fast path against the plain one, and the bad inputs of SFT data."""

from __future__ import annotations

import datasets
import pytest
import torch
import trl

from prefalign import DataError, SFTConfig, SFTTrainer
from prefalign.data.collate import LMCollator
from prefalign.data.load import RawData
from prefalign.data.sft import SFTTokenizeSettings, tokenize_sft_row, validate_sft_rows
from prefalign.logps import lm_logps
from prefalign.speed.forward import FastPath
from prefalign.speed.head import HeadStats, chunked_head_logps
from tiny import conversational_rows, smollm2_tokenizer, tiny_llama

TOL = 1e-4
COMMON = dict(per_device_eval_batch_size=3, report_to=[], use_cpu=True, bf16=False, max_length=256, seed=0)


def _prompt_completion_rows(n: int = 7) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "completion": [{"role": "assistant", "content": f"{2 * i}." + " and more" * (i % 4)}]} for i in range(n)]


def _messages_rows(n: int = 7) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": "Hello" + "!" * i}, {"role": "user", "content": "Count"},
                          {"role": "assistant", "content": " ".join(map(str, range(i + 1)))}]} for i in range(n)]


def _text_rows(n: int = 7) -> list[dict]:
    return [{"text": "The quick brown fox " * (1 + 2 * i) + f"ends {i}."} for i in range(n)]


def _string_pc_rows(n: int = 7) -> list[dict]:
    return [{"prompt": f"Q: name colour {i}.\nA:", "completion": " Blue" + " and green" * (i % 3) + "."}
            for i in range(n)]


CASES = {  # name: (rows, prefalign options, TRL options)
    "prompt_completion": (_prompt_completion_rows, {}, {}),
    "prompt_completion_text": (_string_pc_rows, {"chat_template_for_text": False}, {}),
    "prompt_completion_whole": (_prompt_completion_rows, {"completion_only_loss": False},
                                {"completion_only_loss": False}),
    "messages_whole_sequence": (_messages_rows, {"assistant_only_loss": False}, {}),
    "text_packed": (_text_rows, {"packing": True}, {}),
    "text_unpacked": (_text_rows, {"packing": False}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_matches_trl(tmp_path, case):
    """evaluate() against TRL 1.13's SFTTrainer (unpacked: TRL's packing would change which tokens form a batch):
    the loss within 1e-4, with prefalign's speed features and its in-batch packing on."""
    rows, ours_extra, theirs_extra = CASES[case]
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(rows())
    ours = SFTTrainer(tiny_llama(tok, 1), args=SFTConfig(output_dir=str(tmp_path / "o"), **COMMON, **ours_extra),
                      train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    theirs = trl.SFTTrainer(tiny_llama(tok, 1), args=trl.SFTConfig(output_dir=str(tmp_path / "t"), **COMMON,
                                                                   **theirs_extra),
                            train_dataset=ds, eval_dataset=ds, processing_class=tok).evaluate()
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=TOL)
    assert ours["eval_mean_token_accuracy"] == pytest.approx(theirs["eval_mean_token_accuracy"], abs=TOL)


def test_training_steps_log_the_same_losses_as_trl(tmp_path):
    """Four optimizer steps with gradient accumulation over batches of different token counts: the loss is over
    the global batch's tokens (num_items_in_batch) in both, so every logged loss agrees."""
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(_prompt_completion_rows(16))
    cfg = dict(COMMON, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, logging_steps=1,
               learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="no")
    ours = SFTTrainer(tiny_llama(tok, 1), args=SFTConfig(output_dir=str(tmp_path / "o"), **cfg), train_dataset=ds,
                      processing_class=tok)
    ours.train()
    theirs = trl.SFTTrainer(tiny_llama(tok, 1), args=trl.SFTConfig(output_dir=str(tmp_path / "t"), **cfg),
                            train_dataset=ds, processing_class=tok)
    theirs.train()
    ours_losses = [r["loss"] for r in ours.state.log_history if "loss" in r]
    theirs_losses = [r["loss"] for r in theirs.state.log_history if "loss" in r]
    assert len(ours_losses) == 4
    assert ours_losses == pytest.approx(theirs_losses, abs=TOL)
    assert ours_losses[-1] < ours_losses[0]
    ours_tokens = [r["num_tokens"] for r in ours.state.log_history if "num_tokens" in r]
    theirs_tokens = [r["num_tokens"] for r in theirs.state.log_history if "num_tokens" in r]
    assert ours_tokens == theirs_tokens


def _masked_text(tok, example) -> str:
    return tok.decode([t for t, m in zip(example["input_ids"], example["loss_mask"], strict=True) if m])


def test_messages_train_on_assistant_turns_only_by_default():
    """On SmolLM2's real ChatML output the loss covers each assistant turn's content and end-of-turn tokens."""
    tok = smollm2_tokenizer()
    row = _messages_rows(3)[2]
    example, cut = tokenize_sft_row(row, tok, SFTTokenizeSettings())
    assert not cut
    assert _masked_text(tok, example) == "Hello!!<|im_end|>\n0 1 2<|im_end|>\n"
    assert example["input_ids"] == tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)[
        "input_ids"]
    whole, _ = tokenize_sft_row(row, tok, SFTTokenizeSettings(assistant_only_loss=False))
    assert whole["loss_mask"] == [0] + [1] * (len(whole["input_ids"]) - 1)


def test_prompt_completion_masks_and_preference_rows():
    tok = smollm2_tokenizer()
    example, _ = tokenize_sft_row(_prompt_completion_rows(4)[3], tok, SFTTokenizeSettings())
    assert _masked_text(tok, example) == "6. and more and more and more<|im_end|>\n"
    pref = conversational_rows(2)[1]  # prompt + chosen, rejected unused
    example, _ = tokenize_sft_row(pref, tok, SFTTokenizeSettings())
    assert _masked_text(tok, example) == "2.<|im_end|>\n"
    text, _ = tokenize_sft_row({"prompt": "Q: hi\nA:", "completion": " yes"}, tok, SFTTokenizeSettings(chat=False))
    assert _masked_text(tok, text) == " yes<|im_end|>"  # EOS appended, as TRL
    lm, _ = tokenize_sft_row({"text": "one two"}, tok, SFTTokenizeSettings())
    assert tok.decode(lm["input_ids"]) == "one two<|im_end|>" and lm["loss_mask"] == [0] + [1] * (
        len(lm["input_ids"]) - 1)


def test_truncation_keeps_the_start_and_counts(tmp_path):
    tok = smollm2_tokenizer()
    rows = _text_rows(5)
    trainer = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **{**COMMON, "max_length": 12}),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    assert max(lengths) == 12
    report = trainer.data_reports["train"]
    assert report.sequence_truncated == [n for n, r in enumerate(rows, 1) if len(tok(r["text"])["input_ids"]) >= 12]
    assert report.sequence_truncated  # the fixture has long rows


def test_packing_isolates_examples_and_fast_equals_plain():
    """Each example's token log-probs are the same alone, padded with others, and packed with others; the fast
    path (chunked head) equals the plain path (full logits)."""
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 3)
    settings = SFTTokenizeSettings()
    examples = [tokenize_sft_row(r, tok, settings)[0] for r in _prompt_completion_rows(5) + _text_rows(3)]
    alone = [lm_logps(model, LMCollator(tok.pad_token_id, pack=False)([e]), None) for e in examples]
    packed_batch = LMCollator(tok.pad_token_id, pack=True)(examples)
    assert packed_batch["input_ids"].shape[0] < len(examples)  # shorter examples really share rows
    with torch.no_grad():
        packed = lm_logps(model, packed_batch, FastPath())
        plain_packed = lm_logps(model, packed_batch, None)
        padded = lm_logps(model, LMCollator(tok.pad_token_id, pack=False)(examples), FastPath())
    torch.testing.assert_close(packed, plain_packed, atol=1e-5, rtol=0)
    expected = torch.cat(alone)
    # packed rows hold examples in first-fit-decreasing order: the same token log-probs, as a multiset
    torch.testing.assert_close(packed.sort().values, expected.sort().values, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=0)
    labels = packed_batch["labels"]
    per_row = [labels[r][labels[r] != -100].numel() for r in range(labels.shape[0])]
    assert sum(per_row) == sum(sum(e["loss_mask"]) for e in examples)


def test_packed_example_logps_equal_alone():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 4)
    settings = SFTTokenizeSettings()
    examples = [tokenize_sft_row(r, tok, settings)[0] for r in _text_rows(7)]
    short, long_ = examples[0], examples[6]
    batch = LMCollator(tok.pad_token_id, pack=True)([long_, short, short])
    assert batch["input_ids"].shape[0] == 2  # the two short ones share a row
    with torch.no_grad():
        got = lm_logps(model, batch, FastPath())
        want_long = lm_logps(model, LMCollator(tok.pad_token_id)([long_]), FastPath())
        want_short = lm_logps(model, LMCollator(tok.pad_token_id)([short]), FastPath())
    torch.testing.assert_close(got, torch.cat([want_long, want_short, want_short]), atol=1e-5, rtol=0)


def _loss_and_grads(model, batch, path):
    model.zero_grad(set_to_none=True)
    logps = lm_logps(model, batch, path)
    (-logps.sum()).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flat_packing_runs_each_example_alone(monkeypatch):
    """One row of spans (``flat``) under the speed boundary: one causal SDPA call per example and layer, and the
    same log-probs and gradients as the masked rows and as each example alone; off the boundary (plain SDPA) the
    spans become a block mask with the same numbers."""
    import torch.nn.functional as F

    from prefalign import speed
    from prefalign.speed.attention import ATTENTION_NAME

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, 5)
    model.train()
    settings = SFTTokenizeSettings()
    examples = [tokenize_sft_row(r, tok, settings)[0] for r in _prompt_completion_rows(4) + _text_rows(3)]
    lengths = [len(e["input_ids"]) for e in examples]
    flat = LMCollator(tok.pad_token_id, pad_to_multiple_of=64, pack=True, flat=True)(examples)
    total = -(-sum(lengths) // 64) * 64
    assert flat["input_ids"].shape == (1, total) and sum(lengths) < total  # a padding span at the end
    assert flat["cu_seq_lens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist(), total]
    assert flat["position_ids"][0, lengths[0]] == 0  # positions restart at every example
    rows = LMCollator(tok.pad_token_id, pack=True)(examples)
    alone = torch.cat([lm_logps(model, LMCollator(tok.pad_token_id, pack=False)([e]), None).detach()
                       for e in examples])

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], kw.get("is_causal"), kw.get("attn_mask") is None))
        return sdpa(q, k, v, **kw)

    with speed.enable(model, SFTConfig(output_dir="unused", use_cpu=True)) as handle:
        assert model.config._attn_implementation == ATTENTION_NAME
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        got, got_grads = _loss_and_grads(model, flat, handle.path)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        want, want_grads = _loss_and_grads(model, rows, handle.path)
    spans = [*lengths, total - sum(lengths)]
    assert calls == [(n, True, True) for _ in range(model.config.num_hidden_layers) for n in spans]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)  # flat keeps the input order
    torch.testing.assert_close(got.sort().values, want.sort().values, atol=1e-5, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert model.config._attn_implementation == "sdpa"
    plain, plain_grads = _loss_and_grads(model, flat, None)  # plain SDPA: the spans' block mask
    torch.testing.assert_close(plain, alone, atol=1e-5, rtol=0)
    for name in got_grads:
        torch.testing.assert_close(plain_grads[name], got_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_trainer_packs_flat_only_where_attention_runs_spans(tmp_path):
    rows = datasets.Dataset.from_list(_text_rows(4))
    tok = smollm2_tokenizer()
    kinds = {}
    for name, model, options in (("sdpa", tiny_llama(tok, 0), {}), ("no_fast_path", tiny_llama(tok, 0),
                                                                    {"fast_path": False}),
                                 ("eager", tiny_llama(tok, 0, attn_implementation="eager"), {}),
                                 ("unpacked", tiny_llama(tok, 0), {"packing": False})):
        args = SFTConfig(output_dir=str(tmp_path / name), report_to=[], use_cpu=True, **options)
        collator = SFTTrainer(model, args=args, train_dataset=rows, processing_class=tok).data_collator
        kinds[name] = (collator.pack, collator.flat)
    assert kinds == {"sdpa": (True, True), "no_fast_path": (True, False), "eager": (True, False),
                     "unpacked": (False, False)}


def test_head_statistics_match_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(30, 8)
    logits = head(hidden)
    targets = torch.where(torch.arange(30) % 2 == 0, logits.argmax(-1), (logits.argmax(-1) + 1) % 50)
    for rows, module in ((7, head), (100, head), (7, torch.nn.Sequential(head))):  # fused, one chunk, generic
        stats = HeadStats("hits", "log_sum_sq")
        chunked_head_logps(module, hidden, targets, chunk_rows=rows, stats=stats)
        assert stats.get("hits").tolist() == (torch.arange(30) % 2 == 0).tolist()
        probs = logits.softmax(-1)
        torch.testing.assert_close(stats.get("log_sum_sq"), probs.square().sum(-1).log(), atol=1e-5, rtol=0)


def test_dft_loss_weights_each_token_by_its_probability(tmp_path):
    tok = smollm2_tokenizer()
    ds = datasets.Dataset.from_list(_prompt_completion_rows(3))
    args = SFTConfig(output_dir=str(tmp_path), **{**COMMON, "per_device_eval_batch_size": 3}, loss_type="dft")
    trainer = SFTTrainer(tiny_llama(tok, 1), args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)
    batch = trainer.data_collator(list(trainer.eval_dataset.select_columns(["input_ids", "loss_mask"])))
    logps = lm_logps(trainer.model, batch, None).detach()
    want = (-(logps.exp() * logps)).mean().item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, abs=1e-6)


def _problems(rows):
    return [(p.row, p.field, p.fatal) for p in validate_sft_rows(RawData("d.jsonl", "file", rows, [],
                                                                         row_numbers=list(range(1, len(rows) + 1))))]


def test_validation_names_row_and_field():
    assert _problems([{"text": "ok"}, {"text": 3}, {"text": "  "}]) == [(2, "text", True), (3, "text", True)]
    assert _problems([{"text": "a"}, {"messages": [{"role": "user", "content": "x"}]}]) == [(2, None, True)]
    assert _problems([{"messages": [{"role": "robot", "content": "x"}]}]) == [(1, "messages[0]", True)]
    assert _problems([{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}]) == [
        (1, "completion", True)]
    assert _problems([{"text": "a"}, {"text": "a"}]) == [(2, None, False)]  # duplicate kept, reported


def test_bad_rows_raise_one_line_errors(tmp_path):
    tok = smollm2_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(DataError, match=r"row 2.*'text'.*empty") as err:
        SFTTrainer(tiny_llama(tok), args=args, train_dataset=[{"text": "a b"}, {"text": ""}], processing_class=tok)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"row 1.*no assistant message.*assistant_only_loss: false"):
        SFTTrainer(tiny_llama(tok), args=args, processing_class=tok,
                   train_dataset=[{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"missing column.*found columns: question"):
        SFTTrainer(tiny_llama(tok), args=args, train_dataset=[{"question": "x"}], processing_class=tok)
    skipped = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON, on_invalid_row="skip"),
                         train_dataset=[{"text": "a b"}, {"text": ""}, {"text": "c d"}], processing_class=tok)
    assert len(skipped.train_dataset) == 2
    assert [s["row"] for s in skipped.data_reports["train"].skipped] == [2]


def test_formatting_func_and_dataset_text_field(tmp_path):
    tok = smollm2_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), **COMMON, dataset_text_field="body")
    t = SFTTrainer(tiny_llama(tok), args=args, train_dataset=[{"body": "hello there"}], processing_class=tok)
    assert tok.decode(t.train_dataset[0]["input_ids"]) == "hello there<|im_end|>"
    t = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), processing_class=tok,
                   train_dataset=[{"q": "2+2", "a": "4"}], formatting_func=lambda r: f"Q: {r['q']} A: {r['a']}")
    assert tok.decode(t.train_dataset[0]["input_ids"]) == "Q: 2+2 A: 4<|im_end|>"


def test_data_check_reports_sft_rows(tmp_path):
    from prefalign.data.check import check_dataset

    tok = smollm2_tokenizer()
    path = tmp_path / "sft.jsonl"
    rows = _messages_rows(3) + [{"messages": [{"role": "user", "content": "no reply"}]}, {"text": "other kind"}]
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    report = check_dataset(str(path), tokenizer=tok, max_length=48)
    assert report.format == "SFT rows: messages"
    assert [f.row for f in report.errors] == [4, 5]
    lengths = [len(tokenize_sft_row(r, tok, SFTTokenizeSettings(max_length=None))[0]["input_ids"]) for r in rows[:3]]
    assert sorted(report.lengths["sequence"]) == sorted(lengths)
    assert report.cut["reply"] == [n for n, length in enumerate(lengths, 1) if length > 48]
    assert "sequence(s) cut" in report.render_text()
