"""Anthropic HH-RLHF dialogue text: ``"\\n\\nHuman: …\\n\\nAssistant: …"`` transcripts as conversations.

HH-RLHF (Bai et al. 2022) stores each pair as two whole transcripts that share every turn but the last assistant
reply. Taking their character-level common prefix as a prompt (TRL's ``extract_prompt``) puts the speaker tags into
one user message and misplaces the split when one reply starts with the other ("You're welcome." vs "You're
welcome. I'd be happy to …"). Here the turns are found by their tags: the prompt is the conversation up to the final
``Assistant:`` tag (roles ``user`` / ``assistant``, text stripped), each reply the text after it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

Messages = list[dict[str, str]]

_TAG = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class DialogueError(ValueError):
    """A row that looks like HH-RLHF text but cannot be split into a shared prompt and two replies."""

    def __init__(self, message: str, field: str, fix: str) -> None:
        super().__init__(message)
        self.field, self.fix = field, fix


def _normalised(text: str) -> str:
    """The transcript with exactly ``"\\n\\n"`` before its first tag (leading whitespace is not part of a turn)."""
    return "\n\n" + text.lstrip()


def is_dialogue_text(value: Any) -> bool:
    """Whether a string is an HH-RLHF transcript: it starts with a ``Human:`` turn and has an ``Assistant:`` tag."""
    if not isinstance(value, str):
        return False
    text = _normalised(value)
    return text.startswith("\n\nHuman:") and "\n\nAssistant:" in text


def is_dialogue_row(row: Mapping[str, Any]) -> bool:
    """A row in HH-RLHF form: chosen and rejected transcripts, or a transcript prompt ending in ``Assistant:``."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return is_dialogue_text(prompt) and prompt.rstrip().endswith("Assistant:")
    return is_dialogue_text(row.get("chosen")) and is_dialogue_text(row.get("rejected"))


def _turns(text: str) -> list[tuple[str, str, int]]:
    """``[(role, text, start of the text in the normalised transcript), ...]``."""
    text = _normalised(text)
    tags = list(_TAG.finditer(text))
    return [(_ROLES[m.group(1)], text[m.end():tags[i + 1].start() if i + 1 < len(tags) else len(text)].strip(),
             m.end()) for i, m in enumerate(tags)]


def split_turns(text: str) -> list[tuple[str, str]]:
    """``[(role, text), ...]`` of a transcript, roles ``user`` / ``assistant``, texts stripped."""
    return [(role, content) for role, content, _ in _turns(text)]


def _reply(text: str, start: int) -> str:
    """A reply: everything after its tag (later tags included: a reply may quote a dialogue), blank lines and
    trailing space removed, leading indentation kept."""
    return _normalised(text)[start:].strip("\n").rstrip()


def _messages(turns: list[tuple[str, str]]) -> Messages:
    return [{"role": role, "content": content} for role, content in turns]


def _prompt_and_reply(text: str, field: str) -> tuple[list[tuple[str, str]], str]:
    turns = split_turns(text)
    if not turns or turns[-1][0] != "assistant":
        raise DialogueError("does not end with an 'Assistant:' turn, so it has no reply.", field,
                            "end the transcript with '\\n\\nAssistant: <reply>'")
    return turns[:-1], turns[-1][1]


def _shared_prompt(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """The turns both transcripts share up to the assistant turn where they part, and the two replies from there.

    They must part at the last assistant turn of at least one of them; a reply may itself contain tags (one that
    quotes a dialogue), so the other's may run on. Anything else means they answer different prompts.
    """
    a, b = _turns(chosen), _turns(rejected)
    for name, turns in (("chosen", a), ("rejected", b)):
        if not any(t[0] == "assistant" for t in turns):
            raise DialogueError("has no 'Assistant:' turn, so it has no reply.", name,
                                "end the transcript with '\\n\\nAssistant: <reply>'")
    common = 0
    while common < min(len(a), len(b)) and a[common][:2] == b[common][:2]:
        common += 1
    split = min(common, len(a) - 1, len(b) - 1)
    last = {max(i for i, t in enumerate(turns) if t[0] == "assistant") for turns in (a, b)}
    if a[split][0] != "assistant" or b[split][0] != "assistant" or split not in last:
        raise DialogueError(f"chosen and rejected differ before their last reply (at turn {common + 1}), so they "
                            "do not answer the same prompt.", "rejected",
                            "pair two replies to the same conversation, or skip such rows (on_invalid_row: skip)")
    return [(role, content) for role, content, _ in a[:split]], _reply(chosen, a[split][2]), \
        _reply(rejected, b[split][2])


def dialogue_to_conversation(row: Mapping[str, Any]) -> dict[str, Any]:
    """An HH-RLHF row as a conversational row: ``prompt`` messages, ``chosen`` / ``rejected`` one assistant message
    each (other fields, e.g. ``system``, are kept). Raises DialogueError when the two transcripts differ before
    their last reply, or a transcript has no final assistant turn."""
    out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        turns = split_turns(prompt)
        if turns and turns[-1] == ("assistant", ""):
            turns = turns[:-1]  # the open "Assistant:" tag the reply follows
        replies = []
        for name in ("chosen", "rejected"):
            value = row[name]
            if is_dialogue_text(value):  # a whole transcript after all: its last reply
                value = _prompt_and_reply(value, name)[1]
            replies.append(value.strip("\n").rstrip().removeprefix(" ") if isinstance(value, str) else value)
        chosen, rejected = replies
    else:
        turns, chosen, rejected = _shared_prompt(row["chosen"], row["rejected"])
    if not turns or turns[0][0] != "user":
        raise DialogueError("has no 'Human:' turn before the reply.", "prompt" if prompt else "chosen",
                            "start the transcript with '\\n\\nHuman: <text>'")
    out.update(prompt=_messages(turns), chosen=[{"role": "assistant", "content": chosen}],
               rejected=[{"role": "assistant", "content": rejected}])
    return out
