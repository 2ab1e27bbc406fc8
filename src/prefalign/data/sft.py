"""SFT rows: what supervised fine-tuning trains on, validated and tokenized to ids + a loss mask.

Four kinds of rows, one per dataset (read off the first row, like the preference formats):

- ``text``: language modelling, loss on every token (EOS appended, as TRL);
- ``messages``: a conversation, loss on the assistant turns (``assistant_only_loss: false``: on everything);
- ``prompt`` + ``completion`` (text or messages): loss on the completion;
- preference rows (``prompt`` / ``chosen`` / ``rejected``, any format the preference loaders take): prompt +
  chosen, the course's "instruction + preference data" (the rejected reply is not used).

A tokenized row is ``{"input_ids", "loss_mask"}``: ``loss_mask[t]`` is 1 where token ``t`` is predicted and
counted in the loss (never the first token: nothing predicts it). Truncation keeps a sequence's start (or its end,
``truncation_mode: keep_end``), is counted by source row, and a row left with no loss token is an error (or
skipped under ``on_invalid_row: skip``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .format import common_prefix_len, is_messages, parse_tools, to_example
from .format import messages as to_messages
from .load import (
    Problem,
    RawData,
    RowSchema,
    _check_messages,
    _type_name,
    duplicate_of,
    template_kwargs_problems,
    tools_problems,
    validate_rows,
)
from .tokenize import TokenizeReport, _template, has_chat_template, template_kwargs, tokenize_replies

SFT_KINDS = ("tokenized", "text", "messages", "prompt_completion", "preference")
TOKENIZED_MASKS = ("completion_mask", "assistant_masks", "attention_mask", "labels")


def row_kind(row: dict[str, Any]) -> str | None:
    """Which kind of SFT row this is, by the columns it fills (``input_ids``: already tokenized, as TRL)."""
    for kind, column in (("tokenized", "input_ids"), ("text", "text"), ("messages", "messages"),
                         ("prompt_completion", "completion"), ("preference", "chosen")):
        if row.get(column) is not None:
            return kind
    return None


def _text_problems(r: dict[str, Any], n: int) -> list[Problem]:
    v = r["text"]
    if not isinstance(v, str):
        return [Problem(n, "text", f"is {_type_name(v)}; expected text.", "store text as a string")]
    if not v.strip():
        return [Problem(n, "text", "is empty, so there is nothing to learn.", "write the text, or drop the row")]
    return []


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _tokenized_problems(r: dict[str, Any], n: int) -> list[Problem]:
    """Pre-tokenized rows: ``input_ids`` a non-empty list of token ids; each mask (``completion_mask``,
    ``assistant_masks``, ``attention_mask``: 0/1) and ``labels`` (an id or -100) one entry per token."""
    ids = r["input_ids"]
    if not _int_list(ids) or not ids:
        return [Problem(n, "input_ids", f"is {_type_name(ids) if not _int_list(ids) else 'an empty list'}; expected "
                        "a non-empty list of token ids.", "store input_ids as a list of integers")]
    out = []
    for name in TOKENIZED_MASKS:
        v = r.get(name)
        if v is None:
            continue
        if not _int_list(v) or len(v) != len(ids):
            out.append(Problem(n, name, f"is not a list of {len(ids)} integers (one per input_ids entry).",
                               f"give {name} one entry per token"))
        elif name == "labels" and any(label not in (-100, t) for label, t in zip(v, ids, strict=True)):
            out.append(Problem(n, name, "holds a value that is neither the token's id nor -100.",
                               "give labels equal to input_ids, with -100 where no loss (they are not shifted)"))
        elif name != "labels" and any(m not in (0, 1) for m in v):
            out.append(Problem(n, name, "holds a value other than 0 and 1.", f"make {name} a 0/1 mask"))
    return out


def _messages_problems(r: dict[str, Any], n: int) -> list[Problem]:
    v = r["messages"]
    if not is_messages(v):
        return [Problem(n, "messages", f"is {_type_name(v)}; expected a list of {{role, content}} messages.",
                        "store messages as a list of {\"role\": ..., \"content\": ...}")]
    return list(_check_messages(v, n, "messages"))


def _prompt_completion_problems(r: dict[str, Any], n: int) -> list[Problem]:
    out: list[Problem] = []
    for name in ("prompt", "completion", "system"):
        v = r.get(name)
        if v is None and name != "completion":
            continue
        if isinstance(v, str):
            if name == "completion" and not v.strip():
                out.append(Problem(n, name, "is empty, so there is nothing to learn.",
                                   "write the completion, or drop the row"))
        elif is_messages(v) and name != "system":
            out.extend(_check_messages(v, n, name))
        else:
            want = "text" if name == "system" else "text or a list of {role, content} messages"
            out.append(Problem(n, name, f"is {_type_name(v)}; expected {want}.", f"store {name} as {want}"))
    if not out and isinstance(r.get("prompt"), list) and isinstance(r["completion"], str):
        out.append(Problem(n, "completion", "is text but the prompt is a list of messages.",
                           "give the completion as [{\"role\": \"assistant\", \"content\": ...}]"))
    return out


def validate_sft_rows(raw: RawData) -> list[Problem]:
    """Every problem in every SFT row; one kind of row per dataset; duplicates are kept and reported."""
    problems: list[Problem] = []
    first = next((row_kind(r) for r in raw.rows if row_kind(r) is not None), None)
    preference = [i for i, r in enumerate(raw.rows) if row_kind(r) == "preference"]
    if first == "preference" and preference:
        sub = RawData(raw.source, raw.kind, [raw.rows[i] for i in preference], raw.columns, raw.row_label,
                      [raw.row_numbers[i] for i in preference])
        # only the prompt and chosen reply are trained on: a problem of the rejected reply alone is not one here
        problems.extend(p for p in validate_rows(sub) if p.field != "rejected" or not p.fatal)
    seen: dict[str, int] = {}
    first_row = None
    for r, n in zip(raw.rows, raw.row_numbers, strict=True):
        kind = row_kind(r)
        if kind is None:
            problems.append(Problem(n, None, "has none of text, messages, completion or chosen.",
                                    "give one of them (see README 'SFT data')"))
            continue
        if kind != first:
            problems.append(Problem(n, None, f"is a {kind} row but {raw.row_label} {first_row} is a {first} row; a "
                                    "dataset must use one kind.", "convert all rows to one kind"))
            continue
        first_row = first_row or n
        if kind == "preference":
            continue  # validated above
        row_problems = {"tokenized": _tokenized_problems, "text": _text_problems, "messages": _messages_problems,
                        "prompt_completion": _prompt_completion_problems}[kind](r, n) + template_kwargs_problems(r, n) \
            + tools_problems(r, n)
        if not any(p.fatal for p in row_problems):
            row_problems.extend(duplicate_of(seen, [r.get(c) for c in ("system", "text", "messages", "prompt",
                                                                       "completion", "input_ids")], n,
                                             raw.row_label))
        problems.extend(row_problems)
    return problems


SFT_ROWS = RowSchema(
    "sft", ("text", "messages", "prompt", "completion", "chosen", "rejected", "system", "chat_template_kwargs",
            "tools", "input_ids", *TOKENIZED_MASKS),
    (("messages",), ("text",), ("completion",), ("chosen",), ("input_ids",)), validate_sft_rows,
    {"text": ("content", "document"), "messages": ("conversations", "conversation", "chat"),
     "completion": ("response", "output", "answer", "target")},
    "SFT rows: text, messages, prompt + completion, preference pairs, or input_ids")


@dataclass
class SFTTokenizeSettings:
    """How SFT rows become tokens. ``completion_only_loss`` (prompt-completion and preference rows) and
    ``assistant_only_loss`` (messages): None or True, loss on the completion / assistant turns; False, on every
    token. ``chat``: text prompt / completion rows as a user turn and an assistant reply under the tokenizer's chat
    template (when it has one). ``truncation_mode``: what max_length keeps, the sequence's start or its end."""

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    completion_only_loss: bool | None = None
    assistant_only_loss: bool | None = None
    chat: bool = True
    chat_template_kwargs: Mapping[str, Any] | None = None  # the run's; a row's own are merged over them


def _assistant_mask(messages: list[dict], tokenizer: Any, ids: list[int], where: dict[str, Any],
                    kw: Mapping[str, Any], rerendered: list[str] | None) -> list[int]:
    """1 on the tokens of every assistant turn (its content and end-of-turn tokens), found by rendering the
    conversation up to each assistant turn: the tokens between the generation prompt and the turn's end.

    A template that renders a turn differently when it is the last one (an end token only after the final turn,
    earlier ``<think>`` blocks dropped) makes those renders no prefix of the whole: the turn is then bounded by the
    longest token prefix each shares with the whole conversation, as the prompt split of pairs (TRL >= 1.14), and its
    field goes to ``rerendered``."""
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True, **kw) if i else []
        upto = _template(tokenizer, messages[:i + 1], **kw)
        start, end = common_prefix_len(before, ids), common_prefix_len(upto, ids)
        if end <= start:
            raise DataError(f"the chat template renders the conversation up to message {i} so differently from the "
                            "whole conversation that its assistant tokens cannot be located.", **where,
                            field=f"messages[{i}]",
                            fix="set assistant_only_loss: false to train on every token, or check the template")
        if (start, end) != (len(before), len(upto)) and rerendered is not None:
            rerendered.append(f"messages[{i}]")
        mask[start:end] = [1] * (end - start)
    return mask


def tokenize_sft_row(data: dict[str, Any], tokenizer: Any, settings: SFTTokenizeSettings, *, row: int | None = None,
                     source: str | None = None, row_label: str = "row",
                     rerendered: list[str] | None = None) -> tuple[dict[str, list[int]], bool]:
    """``({"input_ids", "loss_mask", "labels"}, cut)`` for one validated row (``data``); ``cut``: max_length or
    max_prompt_length cut it. ``rerendered``: as tokenize_replies' (a prompt split at the common prefix)."""
    where = {"source": source, "row": row, "row_label": row_label}
    kw = template_kwargs(settings.chat_template_kwargs, data.get("chat_template_kwargs"),
                         parse_tools(data.get("tools")))
    kind = row_kind(data)
    cut = False
    if kind == "tokenized":
        ids, mask = _tokenized(data, tokenizer, settings, where)
    elif kind == "text":
        eos = tokenizer.eos_token or ""
        text = data["text"] if data["text"].endswith(eos) else data["text"] + eos
        ids = list(tokenizer(text)["input_ids"])
        mask = [1] * len(ids)
    elif kind == "messages":
        if not has_chat_template(tokenizer):
            raise DataError("conversational data needs a chat template, and this tokenizer has none.", **where,
                            fix="set chat_template: chatml (ChatML for a base model), use a chat model's tokenizer, "
                                "or give text rows")
        messages = to_messages(data["messages"])
        if data.get("system") is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": data["system"]})
        ids = _template(tokenizer, messages, **kw)
        if settings.assistant_only_loss is not False:
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError("has no assistant message, so no token would carry the loss.", **where,
                                field="messages", fix="add the assistant reply, or set assistant_only_loss: false")
            mask = _assistant_mask(messages, tokenizer, ids, where, kw, rerendered)
        else:
            mask = [1] * len(ids)
    else:
        prompt, completion, conversational = _prompt_and_completion(data, kind, has_chat_template(tokenizer) and
                                                                    settings.chat, where)
        field = "completion" if kind == "prompt_completion" else "chosen"
        out = tokenize_replies(prompt, {"completion": completion}, conversational, tokenizer, **where,
                               fields={"completion": field}, template_kwargs=kw, rerendered=rerendered)
        prompt_ids = out["prompt_ids"]
        if settings.max_prompt_length is not None and len(prompt_ids) > settings.max_prompt_length:
            prompt_ids, cut = prompt_ids[-settings.max_prompt_length:], True
        ids = prompt_ids + out["completion_ids"]
        prompt_loss = 0 if settings.completion_only_loss is not False else 1
        mask = [prompt_loss] * len(prompt_ids) + [1] * len(out["completion_ids"])
    if settings.max_length is not None and len(ids) > settings.max_length:
        keep = slice(-settings.max_length, None) if settings.truncation_mode == "keep_end" else slice(
            settings.max_length)
        ids, mask, cut = ids[keep], mask[keep], True
    # TRL's labels column (user code reads it): the token where its mask says, the first one included (the model's
    # shift drops it); the loss mask leaves the first token out, as nothing predicts it
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    mask = [0, *mask[1:]] if mask else mask
    if not any(mask):
        field = {"text": "text", "messages": "messages", "tokenized": "input_ids"}.get(kind or "", "prompt")
        raise DataError(f"no token is left to train on under max_length={settings.max_length} (the prompt alone is "
                        f"{len(ids)} tokens or more).", **where, field=field,
                        fix="raise max_length, set max_prompt_length to cut long prompts, or drop the row")
    return {"input_ids": ids, "loss_mask": mask, "labels": labels}, cut


def _tokenized(row: dict[str, Any], tokenizer: Any, settings: SFTTokenizeSettings,
               where: dict[str, Any]) -> tuple[list[int], list[int]]:
    """A pre-tokenized row's ids and loss mask, as TRL takes them: ``labels`` as given (-100: no loss), else
    ``completion_mask`` (unless completion_only_loss is False), else ``assistant_masks`` (unless assistant_only_loss
    is False), else every token; positions whose ``attention_mask`` is 0 (padding) are left out."""
    ids = list(row["input_ids"])
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise DataError(f"holds token id {bad}, outside the tokenizer's vocabulary of {vocab}.", **where,
                        field="input_ids", fix="tokenize with this model's tokenizer")
    if row.get("labels") is not None:
        mask = [int(label != -100) for label in row["labels"]]
    elif row.get("completion_mask") is not None and settings.completion_only_loss is not False:
        mask = list(row["completion_mask"])
    elif row.get("assistant_masks") is not None and settings.assistant_only_loss is not False:
        mask = list(row["assistant_masks"])
    else:
        mask = [1] * len(ids)
    keep = row.get("attention_mask") or [1] * len(ids)
    return [t for t, a in zip(ids, keep, strict=True) if a], [m for m, a in zip(mask, keep, strict=True) if a]


def _prompt_and_completion(row: dict[str, Any], kind: str, chat: bool, where: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(prompt, completion, conversational) of a prompt-completion or preference row, in one form."""
    if kind == "preference":
        ex = to_example(row, chat=chat, row_number=where["row"], source=where["source"],
                        row_label=where["row_label"])
        return ex.prompt, ex.chosen, ex.conversational
    prompt, completion, system = row.get("prompt"), row["completion"], row.get("system")
    if is_messages(completion):
        msgs = (to_messages(prompt) if is_messages(prompt)
                else [{"role": "user", "content": prompt}] if prompt else [])
        if system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs, to_messages(completion), True
    prompt = prompt or ""
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        return msgs, [{"role": "assistant", "content": completion}], True
    return (f"{system}\n\n{prompt}" if system is not None else prompt), completion, False


def tokenize_sft_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, settings: SFTTokenizeSettings, *,
                      source: str | None = None, row_numbers: Sequence[int] | None = None, row_label: str = "row",
                      skip_invalid: bool = False) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenize every row (see tokenize_sft_row); errors and the report use the loader's row numbers. With
    ``skip_invalid`` a row that cannot be trained on is left out and listed in ``report.skipped``."""
    report = TokenizeReport(rows=len(rows))
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    out = []
    for i, (r, n) in enumerate(zip(rows, numbers, strict=True)):
        try:
            rerendered: list[str] = []
            example, cut = tokenize_sft_row(r, tokenizer, settings, row=n, source=source, row_label=row_label,
                                            rerendered=rerendered)
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped.append({"row": n, "field": e.field, "reason": e.message, "index": i})
            continue
        if cut:
            report.sequence_truncated.append(n)
        report.prompt_rerendered.extend({"row": n, "field": f} for f in rerendered)
        out.append(example)
    return out, report
