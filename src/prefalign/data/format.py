"""Normalise validated rows into one shape: prompt + chosen + rejected, as messages or as plain text.

Handles the dataset formats users bring (standard text or conversational messages; explicit prompt column or an
implicit prompt shared by chosen and rejected; an optional system column) so that tokenisation sees one shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class DataFormat:
    """What kind of preference data a dataset holds, as `prefalign data check` reports it."""

    conversational: bool
    explicit_prompt: bool
    has_system: bool

    def describe(self) -> str:
        kind = "conversational (message lists)" if self.conversational else "standard (plain text)"
        prompt = "explicit prompt" if self.explicit_prompt else "implicit prompt (shared prefix of chosen/rejected)"
        return f"{kind}, {prompt}" + (", system column" if self.has_system else "")


@dataclass(frozen=True)
class Example:
    """One pair in normal form. Messages when ``conversational``, else plain strings."""

    prompt: Messages | str
    chosen: Messages | str
    rejected: Messages | str
    conversational: bool
    chat_template_kwargs: Mapping[str, Any] | None = None  # the row's own (TRL's column), merged over the run's
    tools: list[Any] | None = None  # the row's tool schemas (TRL's column), the template's ``tools=``


def is_messages(value: Any) -> bool:
    """A conversation: a list of message mappings (an empty list counts; load.py reports it as a problem)."""
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def detect_format(row: Mapping[str, Any]) -> DataFormat:
    """Format of a dataset, read off its first row (load.validate_rows has checked that rows agree in kind)."""
    prompt = row.get("prompt")
    return DataFormat(
        conversational=is_messages(row["chosen"]),
        explicit_prompt=prompt is not None and prompt != [],
        has_system=row.get("system") is not None,
    )


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """How many leading items ``a`` and ``b`` share (messages, characters or token ids)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def message(m: Mapping[str, Any]) -> dict[str, Any]:
    """One validated message for the chat template: its role and content (an assistant message that only calls
    tools has content ""), and its other keys (``tool_calls``, ``name``, ``tool_call_id``, ...) that are set
    (`datasets` fills keys other messages use with None, which templates would read as given)."""
    extra = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
    return {"role": str(m["role"]), "content": m.get("content") or "", **extra}


def messages(value: Any) -> Messages:
    return [message(m) for m in value]


_messages = messages


def parse_tools(value: Any) -> list[Any] | None:
    """A row's ``tools``: a list of tool schemas, or that list as JSON text (as TRL); ValueError if neither."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"is text that is not JSON ({e})") from None
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError("is not a list of tool schemas (objects)")
    return value


def _without_prompt(reply: Messages, prompt: Messages) -> Messages:
    """A reply conversation that repeats the prompt's messages (ultrafeedback_binarized: a ``prompt`` column and full
    ``chosen`` / ``rejected`` conversations) without them; anything else as it is."""
    for head in (prompt, [m for m in prompt if m["role"] != "system"]):
        n = len(head)
        if n and len(reply) > n and reply[:n] == head:
            return reply[n:]
    return reply


def to_example(row: Mapping[str, Any], *, chat: bool, row_number: int | None = None,
               source: str | None = None, row_label: str = "row") -> Example:
    """Normal form of one row.

    ``chat``: plain-text rows become a user message and assistant replies, so a chat model sees the template it
    was trained with. An implicit prompt is the longest shared prefix: whole messages for conversations, characters
    for text (as TRL's ``extract_prompt``). A system column becomes a leading system message (or, for raw text,
    a paragraph before the prompt).
    """
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    system = row.get("system")
    kwargs = row.get("chat_template_kwargs")  # load.py validated it: a mapping or None
    tools = parse_tools(row.get("tools"))
    if is_messages(prompt) and prompt and isinstance(chosen, str) and isinstance(rejected, str):
        # a conversation prompt with text replies (held-out prompts scored by compare / eval): assistant turns
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    conversational = is_messages(chosen)

    def fail(message: str, fix: str, field: str | None = None) -> DataError:
        return DataError(message, source=source, row=row_number, field=field, fix=fix, row_label=row_label)

    if prompt is None or prompt == []:
        if conversational:
            n = common_prefix_len(chosen, rejected)
            while n > 0 and chosen[n - 1].get("role") == "assistant" and n == min(len(chosen), len(rejected)):
                n -= 1  # never swallow the reply being compared
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise fail("chosen and rejected share no leading messages, so there is no prompt.",
                           "add a prompt column, or start both conversations with the same user turn")
        else:
            n = common_prefix_len(chosen, rejected)
            if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
                n -= 1  # the space before the first differing word belongs to the replies (as TRL)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not chosen or not rejected:
                raise fail("one response is a prefix of the other, so it has no completion of its own.",
                           "add a prompt column so the responses can be told apart", "chosen" if not chosen else
                           "rejected")

    if conversational:
        prompt_msgs = _messages(prompt) if is_messages(prompt) else [{"role": "user", "content": str(prompt)}]
        if system is not None and (not prompt_msgs or prompt_msgs[0]["role"] != "system"):
            prompt_msgs = [{"role": "system", "content": system}] + prompt_msgs
        chosen, rejected = (_without_prompt(_messages(m), prompt_msgs) for m in (chosen, rejected))
        return Example(prompt_msgs, chosen, rejected, True, kwargs, tools)
    if chat:
        prompt_msgs = [{"role": "user", "content": prompt}]
        if system is not None:
            prompt_msgs.insert(0, {"role": "system", "content": system})
        return Example(prompt_msgs, [{"role": "assistant", "content": chosen}],
                       [{"role": "assistant", "content": rejected}], True, kwargs, tools)
    if system is not None:
        prompt = f"{system}\n\n{prompt}"
    return Example(prompt, chosen, rejected, False, kwargs)
