"""Prompts as text or as message lists in every command that takes prompts (compare's scoring, eval, data generate,
chat); judges read the last user message's text."""

from __future__ import annotations

import json

import pytest

from prefalign.chat import ChatSession, GenerationOptions, read_chat_prompts
from prefalign.cli import main
from prefalign.compare.score import Heldout, reply_logps, score_model
from prefalign.judges import Judge, register_judge
from tiny import save_tiny, smollm2_tokenizer, tiny_llama

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a bird."}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=5)


def test_reply_logps_take_message_prompts():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, seed=1)
    text, _ = reply_logps(model, tok, ["Name a bird."], ["A sparrow."], max_length=256)
    as_messages, tokens = reply_logps(model, tok, [[{"role": "user", "content": "Name a bird."}]], ["A sparrow."],
                                      max_length=256)
    assert as_messages == pytest.approx(text, abs=1e-5)  # one user message is the text prompt
    longer, _ = reply_logps(model, tok, [CONVERSATION], ["A sparrow."], max_length=256)
    assert tokens == [len(tok("A sparrow.<|im_end|>\n")["input_ids"])] and longer[0] != pytest.approx(text[0])


def test_compare_scoring_with_message_prompts_judges_the_last_user_text():
    """What `prefalign compare` runs after training (generation, judge, KL) on message-list eval_prompts."""
    tok = smollm2_tokenizer()
    seen = []
    judge = Judge("rec", lambda prompt, reply: seen.append(prompt) or 1.0)
    held = Heldout([], [{"prompt": CONVERSATION}, {"prompt": "Say hi."}], judge, max_new_tokens=3)
    scores = score_model(tiny_llama(tok, seed=1), tok, held, reference=tiny_llama(tok, seed=2))
    assert seen == ["Name a bird.", "Say hi."] and scores.scores == [1.0, 1.0]
    assert len(scores.reply_logps) == 2 and scores.kl() is not None


def test_cli_eval_and_data_generate_with_message_prompts(tmp_path, tiny_dir, capsys):
    seen: list[str] = []
    register_judge("test_prompt_forms_len", lambda: lambda prompt, reply: seen.append(prompt) or float(len(reply)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CONVERSATION}) + "\n" + json.dumps({"prompt": "Name a fish."}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "generate", "--model", tiny_dir, "--prompts", str(prompts), "--judge", "test_prompt_forms_len",
                 "--samples", "3", "--max-new-tokens", "4", "--output", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and pairs[0]["prompt"][-1]["content"] in ("Name a bird.", "Name a fish.")
    assert set(seen) == {"Name a bird.", "Name a fish."}  # the judge reads the last user message's text
    rc = main(["eval", "--model", tiny_dir, "--ref", tiny_dir, "--pairs", str(out), "--prompts", str(prompts),
               "--judge", "test_prompt_forms_len", "--max-new-tokens", "4", "--no-edge-cases", "--output-dir",
               str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["policy_generation"]["prompts"] == 2 and report["policy_generation"]["judged"] == 2


def test_chat_prompts_as_text_or_messages(tmp_path):
    tok = smollm2_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": CONVERSATION}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    prompts = read_chat_prompts(str(path))
    assert prompts == [CONVERSATION, "Hi"]
    session = ChatSession(tiny_llama(tok, seed=1), tok, GenerationOptions(max_new_tokens=3))
    for p in prompts:
        reply, _ = session.respond(p)
        assert isinstance(reply, str)
        session.record(p, reply)
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant", "user",
                                                    "assistant"]
