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
