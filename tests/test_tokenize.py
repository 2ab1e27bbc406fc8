"""Tokenisation on the real SmolLM2 tokenizer (ChatML): prompt/completion split, formats, truncation, collation."""

from __future__ import annotations

import pytest
import torch
from trl import extract_prompt

from prefalign.data.collate import PairCollator
from prefalign.data.format import to_example
from prefalign.data.tokenize import TokenizeReport, TokenizeSettings, tokenize_rows
from prefalign.errors import DataError
from tiny import conversational_rows, row_reply_mask, smollm2_tokenizer, text_rows

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def tokenize(rows, tok, source=None, **settings):
    return tokenize_rows(rows, tok, TokenizeSettings(**settings), source=source)


def one(row, tok, **settings) -> dict[str, list[int]]:
    pairs, _ = tokenize([row], tok, **settings)
    return pairs[0]


def test_tokenizer_is_chatml(tok):
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with <|im_end|>: the masks must not mistake padding
    assert tok("Answer: ")["input_ids"][0] != tok.bos_token_id  # plain text gets no BOS


# ---------------------------------------------------------------- conversational rows


def test_conversational_prompt_and_completion_match_the_chat_template(tok):
    row = conversational_rows(3)[2]  # "What is 2 plus 2?" -> "4." / "I think it is 5, ..."
    pairs, report = tokenize([row], tok)
    p = pairs[0]
    assert p["prompt_ids"] == chat_ids(tok, row["prompt"], add_generation_prompt=True)
    assert p["prompt_ids"] + p["chosen_ids"] == chat_ids(tok, row["prompt"] + row["chosen"])
    assert p["prompt_ids"] + p["rejected_ids"] == chat_ids(tok, row["prompt"] + row["rejected"])
    assert tok.decode(p["prompt_ids"]).endswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert tok.decode(p["chosen_ids"]) == "4.<|im_end|>\n"
    assert tok.decode(p["rejected_ids"]) == "I think it is 5, but I am not sure at all.<|im_end|>\n"
    assert report == TokenizeReport(rows=1) and report.lines() == []


def test_multi_turn_prompt(tok):
    prompt = [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"},
              {"role": "user", "content": "Backwards?"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "3 2 1"}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    p = one(row, tok)
    assert p["prompt_ids"] == chat_ids(tok, prompt, add_generation_prompt=True)
    assert tok.decode(p["chosen_ids"]) == "3 2 1<|im_end|>\n"
    assert tok.decode(p["rejected_ids"]) == "No.<|im_end|>\n"


def test_system_column_becomes_the_first_message(tok):
    row = dict(conversational_rows(1)[0], system="Be terse.")
    p = one(row, tok)
    assert p["prompt_ids"] == chat_ids(tok, [{"role": "system", "content": "Be terse."}] + row["prompt"],
                                       add_generation_prompt=True)
    text = tok.decode(p["prompt_ids"])
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n")
    assert SMOL_DEFAULT_SYSTEM not in text
    # a prompt that already has a system message keeps it, and the column is not added twice
    own = [{"role": "system", "content": "Mine."}] + row["prompt"]
    ex = to_example(dict(row, prompt=own), chat=True)
    assert ex.prompt == own


def test_implicit_conversational_prompt_is_the_shared_messages(tok):
    explicit = conversational_rows(2)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    assert tokenize(implicit, tok)[0] == tokenize(explicit, tok)[0]
    # multi-turn: everything up to the differing final reply is prompt, including earlier assistant turns
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ex = to_example({"chosen": turns + [{"role": "assistant", "content": "yes"}],
                     "rejected": turns + [{"role": "assistant", "content": "no"}]}, chat=True)
    assert ex.prompt == turns
    assert ex.chosen == [{"role": "assistant", "content": "yes"}]
    with pytest.raises(DataError, match="share no leading messages") as info:
        to_example({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
                   chat=True, row_number=4, source="d.jsonl")
    assert str(info.value).startswith("d.jsonl, row 4: ")


def test_conversational_data_without_a_chat_template(tok):
    plain = smollm2_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError) as info:
        tokenize(conversational_rows(2), plain, source="c.jsonl")
    msg = str(info.value)
    assert "chat template" in msg and msg.startswith("c.jsonl, row 1: ") and "\n" not in msg
    # plain-text rows fall back to plain text: same ids as chat=False on the templated tokenizer
    assert tokenize(text_rows(2), plain)[0] == tokenize(text_rows(2), tok, chat=False)[0]


# ---------------------------------------------------------------- plain-text rows


def test_text_rows_with_chat_are_wrapped_as_user_and_assistant(tok):
    row = text_rows(1)[0]  # "Q: name a colour number 0.\nA:" -> " Blue 0."
    p = one(row, tok, chat=True)
    user = [{"role": "user", "content": row["prompt"]}]
    assert p["prompt_ids"] == chat_ids(tok, user, add_generation_prompt=True)
    full = chat_ids(tok, user + [{"role": "assistant", "content": row["chosen"]}])
    assert p["prompt_ids"] + p["chosen_ids"] == full
    assert tok.decode(p["chosen_ids"]) == " Blue 0.<|im_end|>\n"


def test_text_rows_without_chat_get_eos_appended(tok):
    row = text_rows(1)[0]
    p = one(row, tok, chat=False)
    assert p["prompt_ids"] == tok(row["prompt"])["input_ids"]
    assert tok.decode(p["prompt_ids"]) == row["prompt"]
    assert tok.decode(p["chosen_ids"]) == " Blue 0.<|im_end|>"
    assert tok.decode(p["rejected_ids"]) == " I refuse to answer question 0.<|im_end|>"
    assert p["chosen_ids"][-1] == tok.eos_token_id and p["chosen_ids"].count(tok.eos_token_id) == 1
    # a reply that already ends with EOS does not get a second one
    p2 = one(dict(row, chosen=" Blue 0.<|im_end|>"), tok, chat=False)
    assert p2["chosen_ids"] == p["chosen_ids"]


def test_text_system_column(tok):
    row = dict(text_rows(1)[0], system="Be kind.")
    p = one(row, tok, chat=True)
    assert p["prompt_ids"] == chat_ids(tok, [{"role": "system", "content": "Be kind."},
                                             {"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    p = one(row, tok, chat=False)
    assert tok.decode(p["prompt_ids"]) == "Be kind.\n\n" + row["prompt"]


def test_implicit_text_prompt_is_the_shared_characters(tok):
    ex = to_example({"chosen": "The sky is blue.", "rejected": "The sky is black."}, chat=False)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("The sky is bl", "ue.", "ack.")
    assert extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is black."}) == {
        "prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
    with pytest.raises(DataError, match="prefix of the other") as info:
        to_example({"chosen": "Yes", "rejected": "Yes, really"}, chat=False, row_number=2)
    assert "row 2, field 'chosen'" in str(info.value)


def test_implicit_text_prompt_leaves_the_space_to_the_replies(tok):
    row = {"chosen": "Q: colour of the sky?\nA: blue", "rejected": "Q: colour of the sky?\nA: green"}
    ex = to_example(row, chat=False)
    assert {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected} == extract_prompt(row)
    p = one(row, tok, chat=False)
    assert tok.decode(p["chosen_ids"]) == " blue<|im_end|>"


def test_prompt_that_is_not_a_token_prefix_is_split_at_the_common_prefix_and_reported(tok):
    # BPE merges the prompt's trailing space into the reply's first word: "Answer: " + "yes" -> ["Answer", ":", " yes"]
    prompt_ids = tok("Answer: ")["input_ids"]
    assert tok("Answer: yes")["input_ids"][: len(prompt_ids)] != prompt_ids
    rows = [text_rows(1)[0], {"prompt": "Answer: ", "chosen": "yes", "rejected": "no"}]
    pairs, report = tokenize(rows, tok, source="t.jsonl", chat=False)
    # as TRL >= 1.14: the completion starts where prompt and prompt + reply diverge
    assert pairs[1]["prompt_ids"] == tok("Answer:")["input_ids"]
    assert tok.decode(pairs[1]["chosen_ids"]) == " yes<|im_end|>"
    assert tok.decode(pairs[1]["rejected_ids"]) == " no<|im_end|>"
    assert report.prompt_rerendered == [{"row": 2, "field": "chosen"}, {"row": 2, "field": "rejected"}]
    assert any("1 of 2 rows trained with the prompt split" in line and "2 (chosen)" in line
               for line in report.lines())
    # digits are never merged with a space in SmolLM2's vocabulary, so "Answer: " + "42" is a clean split
    pairs, report = tokenize([{"prompt": "Answer: ", "chosen": "42", "rejected": "41"}], tok, chat=False)
    assert tok.decode(pairs[0]["chosen_ids"]) == "42<|im_end|>" and report.prompt_rerendered == []


def test_prompt_ending_with_an_assistant_message(tok):
    row = {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is"}],
           "chosen": [{"role": "assistant", "content": " 4"}], "rejected": [{"role": "assistant", "content": " 5"}]}
    p = one(row, tok)
    assert tok.decode(p["chosen_ids"]) == " 4<|im_end|>\n"


# ---------------------------------------------------------------- truncation


def _long_chosen_row():
    return {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}],
            "chosen": [{"role": "assistant", "content": "It is two, because one and one make two in base ten."}],
            "rejected": [{"role": "assistant", "content": "3."}]}


def test_max_prompt_length_keeps_the_end(tok):
    row = conversational_rows(1)[0]
    full = one(row, tok, max_length=None)
    assert len(full["prompt_ids"]) > 20
    pairs, report = tokenize([row, row], tok, max_length=None, max_prompt_length=12)
    assert pairs[0]["prompt_ids"] == full["prompt_ids"][-12:]
    assert tok.decode(pairs[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert pairs[0]["chosen_ids"] == full["chosen_ids"] and pairs[0]["rejected_ids"] == full["rejected_ids"]
    assert report.prompt_truncated == [1, 2] and report.chosen_truncated == report.rejected_truncated == []
    assert report.lines() == ["2 of 2 prompts cut to max_prompt_length (rows 1, 2)"]
    _, report = tokenize([row], tok, max_prompt_length=len(full["prompt_ids"]))
    assert report.prompt_truncated == []  # exactly at the limit is not a cut


def test_max_length_cuts_replies_from_the_right_and_counts_each_side(tok):
    rows = [conversational_rows(1)[0], _long_chosen_row()]
    full = tokenize(rows, tok, max_length=None)[0]
    n_prompt = len(full[0]["prompt_ids"])
    assert n_prompt == len(full[1]["prompt_ids"])
    # row 1: chosen "0.<|im_end|>\n" is 4 tokens, rejected 17; row 2: chosen long, rejected "3.<|im_end|>\n" 4 tokens
    assert [len(full[0]["chosen_ids"]), len(full[0]["rejected_ids"]), len(full[1]["rejected_ids"])] == [4, 17, 4]
    assert len(full[1]["chosen_ids"]) > 6
    pairs, report = tokenize(rows, tok, max_length=n_prompt + 6)
    assert pairs[0]["chosen_ids"] == full[0]["chosen_ids"]
    assert pairs[0]["rejected_ids"] == full[0]["rejected_ids"][:6]
    assert pairs[1]["chosen_ids"] == full[1]["chosen_ids"][:6]
    assert pairs[1]["rejected_ids"] == full[1]["rejected_ids"]
    assert pairs[0]["prompt_ids"] == full[0]["prompt_ids"]
    assert (report.prompt_truncated, report.chosen_truncated, report.rejected_truncated) == ([], [2], [1])
    assert report.lines() == ["1 of 2 chosen replies cut to max_length / max_completion_length (rows 2)",
                              "1 of 2 rejected replies cut to max_length / max_completion_length (rows 1)"]
    # both limits: the prompt is cut first, the replies then fit into what is left
    pairs, report = tokenize(rows, tok, max_prompt_length=10, max_length=13)
    assert [len(pairs[0]["prompt_ids"]), len(pairs[0]["chosen_ids"]), len(pairs[0]["rejected_ids"])] == [10, 3, 3]
    assert [len(pairs[1]["chosen_ids"]), len(pairs[1]["rejected_ids"])] == [3, 3]
    assert (report.prompt_truncated, report.chosen_truncated, report.rejected_truncated) == ([1, 2], [1, 2], [1, 2])


def test_prompt_with_no_room_for_a_reply(tok):
    long_prompt = [{"role": "user", "content": "Please tell me, in as few words as you can, what is 2 plus 2?"}]
    rows = [conversational_rows(1)[0], dict(conversational_rows(1)[0], prompt=long_prompt)]
    n_prompt = len(one(rows[1], tok)["prompt_ids"])
    assert len(one(rows[0], tok)["prompt_ids"]) < n_prompt - 5
    with pytest.raises(DataError) as info:
        tokenize(rows, tok, source="prefs.jsonl", max_length=n_prompt)
    msg = str(info.value)
    assert msg.startswith(f"prefs.jsonl, row 2, field 'prompt': the prompt alone is {n_prompt} tokens")
    assert f"max_length={n_prompt}" in msg and "max_prompt_length" in msg and "\n" not in msg
    pairs, _ = tokenize(rows[1:], tok, max_length=n_prompt + 1)
    assert len(pairs[0]["chosen_ids"]) == 1  # one token of room is enough


# ---------------------------------------------------------------- ensure_bos / ensure_eos


def test_ensure_bos_and_eos_only_when_missing(tok):
    row = text_rows(1)[0]
    plain = one(row, tok, chat=False)
    forced = one(row, tok, chat=False, ensure_bos=True, ensure_eos=True)
    assert forced["prompt_ids"] == [tok.bos_token_id] + plain["prompt_ids"]
    assert forced["chosen_ids"] == plain["chosen_ids"]  # already ends with EOS
    assert forced["rejected_ids"] == plain["rejected_ids"]
    chat = one(row, tok, chat=True)
    chat_forced = one(row, tok, chat=True, ensure_bos=True, ensure_eos=True)
    assert chat["prompt_ids"][0] == tok.bos_token_id  # ChatML starts with <|im_start|>, SmolLM2's BOS
    assert chat_forced["prompt_ids"] == chat["prompt_ids"]
    assert chat["chosen_ids"][-2:] == [tok.eos_token_id, tok("\n")["input_ids"][0]]  # "<|im_end|>\n"
    assert chat_forced["chosen_ids"] == chat["chosen_ids"] + [tok.eos_token_id]
    assert chat_forced["rejected_ids"] == chat["rejected_ids"] + [tok.eos_token_id]


# ---------------------------------------------------------------- collation


def test_pair_collator_layout_and_masks(tok):
    rows = [conversational_rows(2)[1], _long_chosen_row()]
    pairs, _ = tokenize(rows, tok)
    for i, p in enumerate(pairs):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = -1.5 - i, -2.5 - i
    batch = PairCollator(pad_token_id=tok.pad_token_id)(pairs)
    seqs = [(p, "chosen", r) for p, r in zip(pairs, rows, strict=True)] + \
        [(p, "rejected", r) for p, r in zip(pairs, rows, strict=True)]  # chosen rows first, then rejected
    length = max(len(p["prompt_ids"]) + len(p[f"{k}_ids"]) for p, k, _ in seqs)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "predictor", "pair_index", "prompt_mask",
                          "chosen_mask", "rejected_mask", "ref_chosen_logps", "ref_rejected_logps"}
    for key in ("input_ids", "attention_mask", "position_ids", "predictor"):
        assert batch[key].shape == (4, length) and batch[key].dtype == torch.long
    # pair layout [prompt | chosen | rejected]: chosen tokens from row i, rejected ones from row 2 + i
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = (len(p[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        pair_ids = batch["input_ids"].flatten()[batch["pair_index"][i, :n_p + n_c + n_r]].tolist()
        assert pair_ids == p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]
        assert batch["chosen_mask"][i].sum() == n_c and batch["rejected_mask"][i].sum() == n_r
        assert batch["prompt_mask"][i, :n_p].all() and not batch["prompt_mask"][i, n_p:].any()
    for i, (p, kind, row) in enumerate(seqs):
        prompt, reply = p["prompt_ids"], p[f"{kind}_ids"]
        n = len(prompt) + len(reply)
        assert batch["input_ids"][i, :n].tolist() == prompt + reply
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert row_reply_mask(batch)[i].tolist() == [0] * len(prompt) + [1] * len(reply) + [0] * (length - n)
        # the masked tokens are exactly the reply text and its end-of-turn
        picked = batch["input_ids"][i][row_reply_mask(batch)[i].bool()]
        assert tok.decode(picked) == row[kind][0]["content"] + "<|im_end|>\n"
    assert any(batch["attention_mask"][i, -1] == 0 for i in range(4))  # there is padding to check
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.5, -3.5]
    assert batch["ref_chosen_logps"].dtype == torch.float32


def test_pair_collator_pad_to_multiple_of(tok):
    pairs, _ = tokenize(conversational_rows(3), tok)
    plain = PairCollator(pad_token_id=tok.pad_token_id)(pairs)
    padded = PairCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=16)(pairs)
    length = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape == (6, -(-length // 16) * 16)
    assert padded["input_ids"].shape[1] > length
    for key in ("input_ids", "attention_mask", "position_ids", "predictor"):
        assert torch.equal(padded[key][:, :length], plain[key])
    assert (padded["attention_mask"][:, length:] == 0).all() and (row_reply_mask(padded)[:, length:] == 0).all()
    assert torch.equal(row_reply_mask(padded)[:, :length], row_reply_mask(plain))
    assert (padded["input_ids"][:, length:] == tok.pad_token_id).all()
    assert "ref_chosen_logps" not in padded
