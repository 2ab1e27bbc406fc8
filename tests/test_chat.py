"""`prefalign chat`: the session's history and context fitting, the answers to given prompts (equal to greedy
generation), and the interactive loop driven through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prefalign.chat import ChatSession, GenerationOptions, side_by_side
from prefalign.errors import ConfigError
from prefalign.models import load_model, load_tokenizer
from tiny import save_tiny

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return save_tiny(root / "policy", seed=0), save_tiny(root / "reference", seed=1)


def _greedy_reply(model_dir: str, messages: list[dict[str, str]], n: int) -> str:
    """What the chat should answer: the chat template with a generation prompt, greedy, n new tokens."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def _session(model_dir: str, system: str | None = None, **options) -> ChatSession:
    return ChatSession(load_model(model_dir), load_tokenizer(model_dir), GenerationOptions(**options).validate(),
                       system=system)


def test_history_is_recorded_and_reset(models):
    s = _session(models[0], max_new_tokens=3, system="be brief")
    reply, dropped = s.respond("hi")
    assert dropped == 0 and s.history == []  # respond alone keeps nothing
    assert reply == _greedy_reply(models[0], [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}], 3)
    s.record("hi", reply)
    assert s.messages("again") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    s.reset()
    assert s.messages("again") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]


def test_oldest_turns_dropped_to_fit_context(models):
    s = _session(models[0], max_new_tokens=4)
    one_turn = len(s._encode(s.messages("q0")))
    s.context = 3 * one_turn  # room for about two turns and a reply
    for i in range(6):
        s.record(f"q{i}", f"a{i}")
    ids, dropped = s.fit("last")
    assert dropped > 0 and len(ids) + 4 <= s.context
    assert s.history[0] == {"role": "user", "content": f"q{dropped}"}  # whole turns, oldest first
    s.context = 5
    s.reset()
    with pytest.raises(ConfigError, match="over the model's context"):
        s.fit("a prompt far too long " * 4)


def test_side_by_side_columns():
    text = side_by_side([("policy>", "one two three four"), ("reference>", "x")], 30)
    lines = text.splitlines()
    assert lines[0].startswith("policy>") and " | reference>" in lines[0]
    assert all(len(line) <= 30 for line in lines)
    assert "one two" in text and "x" in lines[2]


def test_given_prompts_as_json_equal_greedy_generation(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nwhat is 2+2?\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "prefalign", "chat", models[0], "--against", models[1], "--prompts",
                          str(prompts), "--json", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "what is 2+2?"]  # blank line skipped; each from a fresh chat
    for r in rows:
        msgs = [{"role": "user", "content": r["prompt"]}]
        assert r["reply"] == _greedy_reply(models[0], msgs, 5)
        assert r["reference_reply"] == _greedy_reply(models[1], msgs, 5)


def test_json_without_prompts_is_a_one_line_error(models):
    out = subprocess.run([sys.executable, "-m", "prefalign", "chat", models[0], "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "--prompt" in out.stderr


def test_interactive_session_in_a_terminal(models):
    child = pexpect.spawn(sys.executable, ["-m", "prefalign", "chat", models[0], "--against", models[1],
                                           "--max-new-tokens", "4"], encoding="utf-8", timeout=180,
                          dimensions=(40, 120))
    try:
        child.expect_exact("/help lists the commands")
        child.expect_exact("you> ")
        child.sendline("hello")
        child.expect_exact("you> ")
        first = child.before.replace("\r", "")
        assert "policy> " in first and "reference> " in first.split("policy> ", 1)[1]
        child.sendline("/help")
        child.expect_exact("/reset   forget the conversation")
        child.expect_exact("you> ")
        child.sendline("/bogus")
        child.expect_exact("(unknown command /bogus")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("you> ")
        child.sendline("hello")  # after /reset the same first turn again: the same greedy replies
        child.expect_exact("you> ")
        assert child.before.replace("\r", "") == first
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    policy = _greedy_reply(models[0], [{"role": "user", "content": "hello"}], 4)
    reference = _greedy_reply(models[1], [{"role": "user", "content": "hello"}], 4)
    assert f"policy> {policy}\n" in first and f"reference> {reference}\n" in first
