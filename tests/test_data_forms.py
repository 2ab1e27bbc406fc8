"""The data forms TRL takes besides plain rows: tool-call conversations with a ``tools`` column, ShareGPT
conversations, pre-tokenized rows; and the prepared datasets' TRL column names, for SFT and DPO."""

from __future__ import annotations

import json

import pytest

from prefalign import DataError, DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tiny import smollm2_tokenizer, tiny_llama

COMMON = dict(per_device_eval_batch_size=2, report_to=[], use_cpu=True, bf16=False, max_length=512, seed=0)

# A Qwen2.5-like template: tools in a system block, tool calls inside the assistant turn, tool results as user turns.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}\n{{ t | tojson }}{%- endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def _tool_tokenizer():
    tok = smollm2_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def _tool_messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Weather in city {i}?"},
            {"role": "assistant", "tool_calls": [_call(f"city {i}")]},
            {"role": "tool", "name": "get_weather", "content": f"{20 + i} degrees"},
            {"role": "assistant", "content": f"It is {20 + i} degrees."}]


def _decoded_loss_tokens(tok, row) -> str:
    return tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m])


def test_sft_tool_call_conversations_render_tools_and_calls(tmp_path):
    tok = _tool_tokenizer()
    rows = [{"messages": _tool_messages(i), "tools": [WEATHER] if i % 2 else json.dumps([WEATHER])}
            for i in range(3)]
    trainer = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         processing_class=tok)
    row = trainer.train_dataset[1]
    text = tok.decode(row["input_ids"])
    assert '"name": "get_weather", "description": "Weather in a city"' in text  # tools= reached the template
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "city 1"}}\n</tool_call>' in text
    assert "<tool_response>\n21 degrees\n</tool_response>" in text
    trained = _decoded_loss_tokens(tok, row)
    assert '"arguments": {"city": "city 1"}' in trained and "It is 21 degrees." in trained  # both assistant turns
    assert "21 degrees\n</tool_response>" not in trained and "Weather in city" not in trained
    # the string and list forms of tools give the same tokens
    assert tok.decode(trainer.train_dataset[0]["input_ids"]).count("get_weather") == \
        tok.decode(row["input_ids"]).count("get_weather")


def test_dpo_tool_call_replies(tmp_path):
    tok = _tool_tokenizer()
    rows = [{"prompt": _tool_messages(i)[:1], "tools": [WEATHER],
             "chosen": [{"role": "assistant", "tool_calls": [_call(f"city {i}")]}],
             "rejected": [{"role": "assistant", "content": "I cannot know the weather."}]} for i in range(3)]
    trainer = DPOTrainer(tiny_llama(tok), args=DPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         processing_class=tok)
    row = trainer.train_dataset[2]
    assert "get_weather" in tok.decode(row["prompt_ids"])  # the tools block is part of the prompt
    assert tok.decode(row["chosen_ids"]).startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                                    '"city 2"}}')
    assert tok.decode(row["rejected_ids"]).startswith("I cannot know the weather.")
    from prefalign import KTOConfig, KTOTrainer

    kto = KTOTrainer(tiny_llama(tok), args=KTOConfig(output_dir=str(tmp_path / "k"), **COMMON), train_dataset=rows,
                     processing_class=tok)
    desirable = [r for r in kto.train_dataset if r["label"]]
    assert all("get_weather" in tok.decode(r["prompt_ids"]) for r in kto.train_dataset)
    assert all(tok.decode(r["completion_ids"]).startswith("<tool_call>") for r in desirable)  # TRL's column name
    assert all(r["completion_ids"] == r["chosen_ids"] for r in kto.train_dataset)


@pytest.mark.parametrize("message, field, words", [
    ({"role": "assistant"}, "messages[1]", "no 'content'"),
    ({"role": "assistant", "tool_calls": "get_weather()"}, "messages[1].tool_calls", "expected a list of tool calls"),
])
def test_bad_tool_messages_name_row_and_field(tmp_path, message, field, words):
    tok = _tool_tokenizer()
    rows = [{"messages": _tool_messages(0)}, {"messages": [{"role": "user", "content": "hi"}, message]}]
    with pytest.raises(DataError, match=words) as e:
        SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                   processing_class=tok)
    assert e.value.row == 2 and e.value.field == field


def test_bad_tools_column_names_row(tmp_path):
    tok = _tool_tokenizer()
    rows = [{"messages": _tool_messages(0), "tools": [WEATHER]}, {"messages": _tool_messages(1), "tools": "[{"}]
    with pytest.raises(DataError, match="not JSON") as e:
        SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                   processing_class=tok)
    assert e.value.row == 2 and e.value.field == "tools"


def _sharegpt(i: int, gpt: str = "gpt") -> dict:
    return {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Hi {i}"},
                              {"from": gpt, "value": f"Hello {i}!"}]}


def test_sharegpt_conversations_train_as_messages(tmp_path):
    tok = smollm2_tokenizer()
    share = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON),
                       train_dataset=[_sharegpt(i) for i in range(3)], processing_class=tok)
    chatml = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                            {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(3)]
    plain = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=chatml,
                       processing_class=tok)
    assert share.train_dataset["input_ids"] == plain.train_dataset["input_ids"]
    assert share.train_dataset["loss_mask"] == plain.train_dataset["loss_mask"]
    assert "<|im_start|>user\nHi 1<|im_end|>" in tok.decode(share.train_dataset[1]["input_ids"])
    assert _decoded_loss_tokens(tok, share.train_dataset[1]).startswith("Hello 1!")


def test_sharegpt_preference_rows(tmp_path):
    tok = smollm2_tokenizer()
    rows = [{"prompt": [{"from": "human", "value": f"Hi {i}"}], "chosen": [{"from": "gpt", "value": f"Hello {i}"}],
             "rejected": [{"from": "gpt", "value": "Go away."}]} for i in range(2)]
    trainer = DPOTrainer(tiny_llama(tok), args=DPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                         processing_class=tok)
    assert tok.decode(trainer.train_dataset[1]["prompt_ids"]).endswith("<|im_start|>user\nHi 1<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    assert tok.decode(trainer.train_dataset[1]["chosen_ids"]).startswith("Hello 1<|im_end|>")


def test_sharegpt_unknown_from_names_row_and_field(tmp_path):
    tok = smollm2_tokenizer()
    rows = [_sharegpt(0), _sharegpt(1), _sharegpt(2, gpt="bot")]
    with pytest.raises(DataError, match="unknown ShareGPT 'from' value 'bot'.*human, gpt, system") as e:
        SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                   processing_class=tok)
    assert e.value.row == 3 and e.value.field == "messages[2]"


def test_sft_pretokenized_rows_as_trl(tmp_path):
    """``input_ids`` rows skip templating; the loss follows labels, else completion_mask, else assistant_masks;
    padding (attention_mask 0) is left out; max_length cuts and counts; the dataset carries TRL's labels."""
    import datasets

    tok = smollm2_tokenizer()
    rows = [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "labels": None, "attention_mask": None},
            {"input_ids": [9, 10, 11], "completion_mask": None, "labels": [-100, 10, -100], "attention_mask": None},
            {"input_ids": [12, 13, 14, 0], "completion_mask": None, "labels": None, "attention_mask": [1, 1, 1, 0]},
            {"input_ids": list(range(20, 40)), "completion_mask": None, "labels": None, "attention_mask": None}]
    trainer = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **{**COMMON, "max_length": 8}),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ds = trainer.train_dataset
    assert ds["input_ids"][:3] == [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert ds["loss_mask"][:3] == [[0, 0, 1, 1], [0, 1, 0], [0, 1, 1]]
    assert ds["labels"][:3] == [[-100, -100, 7, 8], [-100, 10, -100], [12, 13, 14]]  # TRL keeps the first token
    assert ds["input_ids"][3] == list(range(20, 28))
    assert trainer.data_reports["train"].sequence_truncated == [4]
    trainer.train()  # trains on them (one step is enough to show the collator takes the rows)


@pytest.mark.parametrize("row, field, words", [
    ({"input_ids": [5, 6, 10**7]}, "input_ids", "outside the tokenizer's vocabulary"),
    ({"input_ids": [5, "a"]}, "input_ids", "expected a non-empty list of token ids"),
    ({"input_ids": [5, 6], "completion_mask": [1]}, "completion_mask", "one per input_ids entry"),
])
def test_sft_bad_pretokenized_rows(tmp_path, row, field, words):
    tok = smollm2_tokenizer()
    with pytest.raises(DataError, match=words) as e:
        SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON),
                   train_dataset=[{"input_ids": [1, 2, 3]}, row], processing_class=tok)
    assert e.value.row == 2 and e.value.field == field


def test_dpo_pretokenized_rows_as_trl(tmp_path):
    import datasets

    tok = smollm2_tokenizer()
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]},
            {"prompt_ids": [9] * 6, "chosen_ids": [10] * 6, "rejected_ids": [11]}]
    args = DPOConfig(output_dir=str(tmp_path), **{**COMMON, "max_length": 8, "max_prompt_length": 4})
    trainer = DPOTrainer(tiny_llama(tok), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    ds = trainer.train_dataset
    assert ds[0]["prompt_ids"] == [1, 2, 3] and ds[0]["chosen_ids"] == [4, 5] and ds[0]["rejected_ids"] == [6, 7, 8]
    assert ds[1]["prompt_ids"] == [9] * 4 and ds[1]["chosen_ids"] == [10] * 4  # cut as text rows are, and counted
    report = trainer.data_reports["train"]
    assert report.prompt_truncated == [2] and report.chosen_truncated == [2]
    assert "ref_chosen_logps" in ds.column_names and len(ds) == 2
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary") as e:
        DPOTrainer(tiny_llama(tok), args=args, processing_class=tok,
                   train_dataset=[rows[0], {**rows[1], "rejected_ids": [-1]}])
    assert e.value.row == 2 and e.value.field == "rejected_ids"


def test_trl_column_names_on_prepared_datasets(tmp_path):
    tok = smollm2_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"Hi {i}"}],
             "completion": [{"role": "assistant", "content": f"Hello {i}"}]} for i in range(2)]
    sft = SFTTrainer(tiny_llama(tok), args=SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows,
                     processing_class=tok)
    example = sft.train_dataset[0]
    assert len(example["labels"]) == len(example["input_ids"])
    assert all(label in (-100, t) for label, t in zip(example["labels"], example["input_ids"], strict=True))
    assert tok.decode([t for t in example["labels"] if t != -100]).startswith("Hello 0")


def test_plain_training_arguments_tags_and_chat_template_from_a_model_directory(tmp_path):
    from transformers import TrainingArguments

    tok = smollm2_tokenizer()
    rows = [{"messages": _tool_messages(i)} for i in range(2)]
    plain = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, learning_rate=3e-4,
                              per_device_train_batch_size=3)
    trainer = SFTTrainer(tiny_llama(tok), args=plain, train_dataset=rows, processing_class=tok)
    assert isinstance(trainer.args, SFTConfig)
    assert trainer.args.learning_rate == 3e-4 and trainer.args.per_device_train_batch_size == 3
    assert trainer.args.max_length == SFTConfig(output_dir="x").max_length  # SFT's own defaults for the rest
    assert {"prefalign", "sft"} <= set(trainer.model.model_tags)
    dpo = DPOTrainer(tiny_llama(tok), args=DPOConfig(output_dir=str(tmp_path / "d"), **COMMON),
                     train_dataset=[{"prompt": "a", "chosen": "b", "rejected": "c"}], processing_class=tok)
    assert {"prefalign", "dpo"} <= set(dpo.model.model_tags)

    # chat_template_path naming a model directory: that tokenizer's template (TRL's clone_chat_template)
    source = _tool_tokenizer()
    source.add_tokens(["<tool_call_token>"])
    source.save_pretrained(tmp_path / "source")
    model = tiny_llama(tok)
    args = SFTConfig(output_dir=str(tmp_path / "c"), chat_template_path=str(tmp_path / "source"), **COMMON)
    cloned = SFTTrainer(model, args=args, train_dataset=rows, processing_class=tok)
    assert cloned.tokenizer_.chat_template == TOOL_TEMPLATE
    assert "<tool_call_token>" in cloned.tokenizer_.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(cloned.tokenizer_)
    assert "<tool_response>" in cloned.tokenizer_.decode(cloned.train_dataset[0]["input_ids"])


def test_data_check_takes_the_new_forms(tmp_path):
    from prefalign.data.check import check_dataset

    tok = _tool_tokenizer()
    forms = {"sharegpt": [_sharegpt(i) for i in range(2)],
             "tokenized": [{"input_ids": [1, 2, 3 + i], "completion_mask": [0, 1, 1]} for i in range(2)],
             "pairs": [{"prompt_ids": [1, 2], "chosen_ids": [3 + i], "rejected_ids": [9]} for i in range(2)],
             "tools": [{"messages": _tool_messages(i), "tools": [WEATHER]} for i in range(2)]}
    formats = {}
    for name, rows in forms.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        report = check_dataset(path, tokenizer=tok)
        assert report.ok, (name, [f.text for f in report.errors])
        formats[name] = report.format
    assert formats == {"sharegpt": "SFT rows: messages", "tokenized": "SFT rows: tokenized",
                       "pairs": "pre-tokenized pairs (prompt_ids, chosen_ids, rejected_ids)",
                       "tools": "SFT rows: messages"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_sharegpt(0)) + "\n" + json.dumps(_sharegpt(1, gpt="bot")) + "\n", encoding="utf-8")
    report = check_dataset(bad, tokenizer=tok)
    assert not report.ok and "line 2" in report.errors[0].text and "'bot'" in report.errors[0].text
