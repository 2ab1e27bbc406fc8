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


def is_dialogue_text(value: Any) -> bool:
    """Whether a string is an HH-RLHF transcript: it starts with a ``Human:`` turn and has an ``Assistant:`` tag."""
    if not isinstance(value, str):
        return False
    text = "\n\n" + value.lstrip("\n") if value.startswith("\n") else value
    return text.startswith("\n\nHuman:") and "\n\nAssistant:" in text


def is_dialogue_row(row: Mapping[str, Any]) -> bool:
    """A row in HH-RLHF form: chosen and rejected transcripts, or a transcript prompt ending in ``Assistant:``."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return is_dialogue_text(prompt) and prompt.rstrip().endswith("Assistant:")
    return is_dialogue_text(row.get("chosen")) and is_dialogue_text(row.get("rejected"))


def split_turns(text: str) -> list[tuple[str, str]]:
    """``[(role, text), ...]`` of a transcript, roles ``user`` / ``assistant``, texts stripped."""
    text = "\n\n" + text.lstrip("\n")
    parts = _TAG.split(text)  # ["", "Human", " text", "Assistant", " text", ...]
    return [(_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _messages(turns: list[tuple[str, str]]) -> Messages:
    return [{"role": role, "content": content} for role, content in turns]


def _prompt_and_reply(text: str, field: str) -> tuple[list[tuple[str, str]], str]:
    turns = split_turns(text)
    if not turns or turns[-1][0] != "assistant":
        raise DialogueError("does not end with an 'Assistant:' turn, so it has no reply.", field,
                            "end the transcript with '\\n\\nAssistant: <reply>'")
    return turns[:-1], turns[-1][1]


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
            replies.append(value.strip() if isinstance(value, str) else value)
        chosen, rejected = replies
    else:
        turns, chosen = _prompt_and_reply(row["chosen"], "chosen")
        rejected_turns, rejected = _prompt_and_reply(row["rejected"], "rejected")
        if rejected_turns != turns:
            at = next((i for i, (a, b) in enumerate(zip(turns, rejected_turns, strict=False)) if a != b),
                      min(len(turns), len(rejected_turns)))
            raise DialogueError(f"chosen and rejected differ before their last reply (at turn {at + 1}), so they do "
                                "not answer the same prompt.", "rejected",
                                "pair two replies to the same conversation, or skip such rows "
                                "(on_invalid_row: skip)")
    if not turns or turns[0][0] != "user":
        raise DialogueError("has no 'Human:' turn before the reply.", "prompt" if prompt else "chosen",
                            "start the transcript with '\\n\\nHuman: <text>'")
    out.update(prompt=_messages(turns), chosen=[{"role": "assistant", "content": chosen}],
               rejected=[{"role": "assistant", "content": rejected}])
    return out
