"""Templates that render the prompt differently alone (TRL >= 1.14's common-prefix split, reported) and
chat_template_kwargs (the run's and a row's), on the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from prefalign import DPOConfig, DPOTrainer
from prefalign.data.check import check_dataset
from prefalign.data.load import read_valid_rows
from prefalign.data.sft import SFTTokenizeSettings, tokenize_sft_rows
from prefalign.data.tokenize import TokenizeSettings, tokenize_rows
from prefalign.errors import ConfigError, DataError
from prefalign.runs import data_report
from tiny import smollm2_tokenizer, tiny_llama

# A reasoning template (DeepSeek-R1 / Qwen3 style): an assistant turn's <think> block is kept only when it is the
# last message, so a prompt ending in an assistant turn renders it alone with its thoughts and without them once a
# reply follows.
REASONING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in m['content'] %}"
    "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Reads a keyword argument: enable_thinking=false marks the system line and appends an empty thought block to the
# generation prompt only (Qwen3's shape), which the full conversation never renders.
THINKING = (
    "<|im_start|>system\nmode: {{ 'no_think' if enable_thinking is defined and not enable_thinking else 'think' }}"
    "<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _tok(template: str | None = None):
    tok = smollm2_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def test_reasoning_template_that_drops_earlier_thoughts_is_split_and_reported():
    tok = _tok(REASONING)
    rows = [{"prompt": [_user("Hi")], "chosen": [_bot("Hello")], "rejected": [_bot("Go")]},
            {"prompt": [_user("2+2?"), _bot("<think>easy</think>4"), _user("and 3+3?")],
             "chosen": [_bot("6")], "rejected": [_bot("7")]},
            {"prompt": [_user("Plan?"), _bot("<think>list steps</think>First,")],
             "chosen": [_bot(" buy.")], "rejected": [_bot(" sell.")]}]
    pairs, report = tokenize_rows(rows, tok, TokenizeSettings())
    assert report.prompt_rerendered == [{"row": 3, "field": "chosen"}, {"row": 3, "field": "rejected"}]
    # rows 1 and 2 split cleanly (row 2's earlier thought is dropped in both renderings)
    assert tok.decode(pairs[1]["prompt_ids"]).endswith("and 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(pairs[1]["chosen_ids"]) == "6<|im_end|>\n"
    # row 3: the prompt stops where the renderings diverge (the thought); the reply tokens are the full rendering's
    full = tok.apply_chat_template(rows[2]["prompt"] + rows[2]["chosen"], tokenize=False)
    assert tok.decode(pairs[2]["prompt_ids"]) == "<|im_start|>user\nPlan?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(pairs[2]["prompt_ids"] + pairs[2]["chosen_ids"]) == full
    assert tok.decode(pairs[2]["chosen_ids"]) == "First,<|im_end|>\n<|im_start|>assistant\n buy.<|im_end|>\n"
    assert any("1 of 3 rows trained with the prompt split" in line and "3 (chosen)" in line
               for line in report.lines())
    entry = data_report({"train": report})["train"]
    assert entry["prompt_rerendered"] == 2 and entry["prompt_rerendered_rows"][0] == {"row": 3, "field": "chosen"}


def test_generation_prompt_suffix_and_run_kwargs():
    tok = _tok(THINKING)
    row = {"prompt": [_user("Hi")], "chosen": [_bot("Hello")], "rejected": [_bot("Go")]}
    pairs, report = tokenize_rows([row], tok, TokenizeSettings())
    assert "mode: think" in tok.decode(pairs[0]["prompt_ids"]) and report.prompt_rerendered == []
    pairs, report = tokenize_rows([row], tok, TokenizeSettings(chat_template_kwargs={"enable_thinking": False}))
    # the kwarg reached every rendering; the generation prompt's empty thought is not in prompt + reply
    prompt = tok.decode(pairs[0]["prompt_ids"])
    assert "mode: no_think" in prompt and prompt.endswith("<|im_start|>assistant\n") and "<think>" not in prompt
    assert tok.decode(pairs[0]["chosen_ids"]) == "Hello<|im_end|>\n"
    assert report.prompt_rerendered == [{"row": 1, "field": "chosen"}, {"row": 1, "field": "rejected"}]


def test_row_kwargs_merge_over_the_run_and_are_validated(tmp_path):
    tok = _tok(THINKING)
    base = {"prompt": [_user("Hi")], "chosen": [_bot("Hello")], "rejected": [_bot("Go")]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {**base, "chat_template_kwargs": {"enable_thinking": False}},  # SmolLM3 /no_think rows
        {**base, "chosen": [_bot("Hey")], "chat_template_kwargs": {"enable_thinking": True}},
        {**base, "chosen": [_bot("Yo")]}]) + "\n")
    raw, _ = read_valid_rows(path)
    assert raw.rows[0]["chat_template_kwargs"] == {"enable_thinking": False}  # kept, not dropped by the loader
    pairs, _ = tokenize_rows(raw.rows, tok, TokenizeSettings())
    assert ["no_think" in tok.decode(p["prompt_ids"]) for p in pairs] == [True, False, False]
    pairs, _ = tokenize_rows(raw.rows, tok, TokenizeSettings(chat_template_kwargs={"enable_thinking": False}))
    assert ["no_think" in tok.decode(p["prompt_ids"]) for p in pairs] == [True, False, True]
    # SFT reads the same column
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"], "chat_template_kwargs": r.get(
        "chat_template_kwargs")} for r in raw.rows]
    out, report = tokenize_sft_rows(sft_rows, tok, SFTTokenizeSettings())
    assert ["no_think" in tok.decode(o["input_ids"]) for o in out] == [True, False, False]
    assert report.prompt_rerendered == [{"row": 1, "field": "completion"}]
    # a non-mapping is a one-line row error
    path.write_text(json.dumps({**base, "chat_template_kwargs": "enable_thinking=false"}) + "\n")
    with pytest.raises(DataError) as info:
        read_valid_rows(path)
    msg = str(info.value)
    assert "line 1, field 'chat_template_kwargs'" in msg and "is text" in msg and "\n" not in msg


def test_config_field_reads_json_and_refuses_a_non_mapping(tmp_path):
    cfg = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                    chat_template_kwargs='{"enable_thinking": false}')
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, chat_template_kwargs="[1]")


def _orca_rows(n: int = 4) -> list[dict]:
    """orca_dpo_pairs' shape: a text prompt column beside whole conversations (system, user, assistant)."""
    out = []
    for i in range(n):
        q = f"Question {i}: what is {i} + {i}?"
        conv = [{"role": "system", "content": "You are an AI assistant."}, _user(q)]
        out.append({"prompt": q, "chosen": conv + [_bot(f"It is {2 * i}.")], "rejected": conv + [_bot("No idea.")]})
    return out


def test_orca_shaped_rows_train_and_are_listed_in_the_run_and_the_check(tmp_path):
    tok = _tok()
    rows = _orca_rows()
    tr = DPOTrainer(tiny_llama(tok, 1), args=DPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], use_cpu=True, max_length=256,
        max_steps=1, save_strategy="no", precompute_ref_log_probs=False), train_dataset=rows, processing_class=tok)
    report = tr.data_reports["train"]
    assert len(tr.train_dataset) == 4
    assert sorted({r["row"] for r in report.prompt_rerendered}) == [1, 2, 3, 4]
    path = tmp_path / "orca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    check = check_dataset(path, tokenizer=tok)
    assert check.ok and [r["row"] for r in check.rerendered if r["field"] == "chosen"] == [1, 2, 3, 4]
    assert "prompt split: 4 row(s)" in check.render_text()
    assert check.to_dict()["prompt_rerendered_rows"][0] == {"row": 1, "field": "chosen"}


def _spy(tok):
    """Record the keyword arguments of every apply_chat_template call."""
    calls = []
    original = tok.apply_chat_template

    def spy(conversation, **kw):
        calls.append(kw)
        return original(conversation, **kw)

    tok.apply_chat_template = spy
    return calls


def test_generation_eval_compare_and_chat_render_with_the_kwargs(tmp_path):
    from prefalign.chat import ChatSession, GenerationOptions
    from prefalign.compare.score import Heldout, score_model
    from prefalign.generate import _encode
    from prefalign.judges import Judge

    tok = _tok(THINKING)
    prompts = [[_user("Hi")], "Name a bird."]
    encoded = _encode(tok, prompts, {"enable_thinking": False}, [None, {"enable_thinking": True}])
    assert ["mode: no_think" in tok.decode(ids) for ids in encoded] == [True, False]
    calls = _spy(tok)
    held = Heldout([{"prompt": [_user("Hi")], "chosen": [_bot("a")], "rejected": [_bot("b")]}],
                   [{"prompt": p} for p in prompts], Judge("none", lambda p, r: None), max_new_tokens=2,
                   chat_template_kwargs={"enable_thinking": False})
    scores = score_model(tiny_llama(tok, 1), tok, held, reference=tiny_llama(tok, 2))
    assert scores.kl() is not None and len(calls) >= 8
    assert all(kw.get("enable_thinking") is False for kw in calls)  # pairs, generation, KL: every rendering
    calls.clear()
    session = ChatSession(tiny_llama(tok, 1), tok, GenerationOptions(max_new_tokens=2),
                          chat_template_kwargs={"enable_thinking": False})
    session.respond("Hi")
    assert calls and all(kw.get("enable_thinking") is False for kw in calls)


def test_cli_chat_template_kwargs_must_be_a_json_object(tmp_path, capsys):
    from prefalign.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    assert main(["eval", "--model", "x", "--prompts", str(path), "--chat-template-kwargs", "enable_thinking"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chat-template-kwargs" in err[0] and "not JSON" in err[0]
    assert main(["data", "check", str(path), "--chat-template-kwargs", "[1]"]) == 2
    assert "is not a JSON object" in capsys.readouterr().err


def test_unpaired_rows_take_kwargs_and_report_the_split():
    from prefalign.data.unpaired import UNPAIRED_ROWS, tokenize_unpaired

    tok = _tok(THINKING)
    rows = [{"prompt": [_user("Hi")], "completion": [_bot("Hello")], "label": True,
             "chat_template_kwargs": {"enable_thinking": False}},
            {"prompt": [_user("Hi")], "completion": [_bot("Go")], "label": False}]
    out, report = tokenize_unpaired(rows, tok, TokenizeSettings(), kl_chunk=None)
    assert ["no_think" in tok.decode(o["prompt_ids"]) for o in out] == [True, False]
    assert report.prompt_rerendered == [{"row": 1, "field": "completion"}]
    assert tok.decode(out[0]["chosen_ids"]) == "Hello<|im_end|>\n"
    assert "chat_template_kwargs" in UNPAIRED_ROWS.columns


def test_prepare_keeps_a_rows_kwargs(tmp_path):
    from prefalign.data.prepare import PrepareSettings, prepare_rows

    path = tmp_path / "rows.jsonl"
    base = {"prompt": [_user("Hi")], "chosen": [_bot("Hello")], "rejected": [_bot("Go")]}
    path.write_text(json.dumps({**base, "chat_template_kwargs": {"enable_thinking": False}}) + "\n"
                    + json.dumps({**base, "chosen": [_bot("Hey")]}) + "\n")
    rows, _ = prepare_rows(str(path), PrepareSettings())
    assert [r.get("chat_template_kwargs") for r in rows] == [{"enable_thinking": False}, None]


# Gemma / zephyr-7b-gemma style: the end-of-sequence token follows only the final turn, so a conversation cut after
# an earlier assistant turn renders that turn with an EOS the whole conversation does not have there.
EOS_LAST = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% if loop.last and m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_assistant_turns_under_a_template_that_marks_the_last_turn():
    tok = _tok(EOS_LAST)
    rows = [{"messages": [_user("Hi"), _bot("Hello there"), _user("And you?"), _bot("Fine, thanks")]},
            {"messages": [_user("One turn"), _bot("One reply")]}]
    examples, report = tokenize_sft_rows(rows, tok, SFTTokenizeSettings())
    assert report.prompt_rerendered == [{"row": 1, "field": "messages[1]"}]  # the last turn renders as a prefix
    ids, mask = examples[0]["input_ids"], examples[0]["loss_mask"]
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    # each assistant turn's content and end-of-turn token, nothing of the user turns or headers
    assert trained == "Hello there<|im_end|>\nFine, thanks<|im_end|>\n<|endoftext|>"
    assert tok.decode(ids).count("<|endoftext|>") == 1
