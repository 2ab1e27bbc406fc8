"""Token ids for each pair: prompt ids, chosen ids, rejected ids, with truncation counted, never silent.

The chat template is applied once to the prompt (with the generation prompt) and once to prompt + reply; the
completion is the tokens of prompt + reply after the longest prefix they share with the prompt's (as TRL >= 1.14).
Usually that is the whole prompt; a template that renders the prompt alone differently (Gemma's, a reasoning
template that drops earlier ``<think>`` blocks, a generation-prompt suffix the full conversation lacks) or text whose
boundary merges into one token leaves the prompt's differing end out. Such rows are trained, and counted and listed
(row + field) in ``TokenizeReport.prompt_rerendered``, never silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError, row_list
from .format import Example, common_prefix_len, to_example


@dataclass
class TokenizeSettings:
    """How pairs become tokens. ``max_prompt_length`` keeps the *end* of a long prompt (nearest the reply);
    ``max_completion_length`` keeps each reply's start; ``max_length`` then cuts so prompt + reply fits: replies
    from the right (``truncation_mode`` 'keep_start'), or the shared prompt's start, then the replies' starts
    ('keep_end')."""

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"
    chat: bool = True  # apply the chat template to plain-text rows when the tokenizer has one
    # TRL's ORPOTrainer adds these at token level; reproduced only in ORPOConfig(trl_compat=True).
    ensure_bos: bool = False
    ensure_eos: bool = False
    # the run's chat_template_kwargs (TRL's name), passed to every apply_chat_template; a row's own override them
    chat_template_kwargs: Mapping[str, Any] | None = None


@dataclass
class TokenizeReport:
    """Counts of what tokenisation changed, for logs and `prefalign data check`."""

    rows: int = 0
    prompt_truncated: list[int] = field(default_factory=list)
    chosen_truncated: list[int] = field(default_factory=list)
    rejected_truncated: list[int] = field(default_factory=list)
    sequence_truncated: list[int] = field(default_factory=list)  # SFT rows cut to max_length / max_prompt_length
    # rows left out under on_invalid_row="skip", by the loader or here: {"row", "field", "reason"}
    skipped: list[dict[str, Any]] = field(default_factory=list)
    converted_from: str | None = None  # a published format the rows were converted from
    pairing: dict[str, Any] | None = None  # scored completions paired (data/scored.py's counts)
    # rows whose templated prompt is not a token prefix of prompt + reply, split at the longest common prefix:
    # {"row", "field"} (the reply's column)
    prompt_rerendered: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.pairing and (self.pairing["ties"] or self.pairing["below_margin"] or self.pairing["too_few"]):
            p = self.pairing
            out.append(f"{p['rows']} {p['format']} rows gave {p['pairs']} pairs; left out: {p['ties']} ties, "
                       f"{p['below_margin']} below min_score_margin, {p['too_few']} with fewer than two scored "
                       "completions (rows in data_report.json)")
        if self.skipped:
            shown = "; ".join(f"{s['row']}: {s['reason']}" for s in self.skipped[:3]) + (
                " ..." if len(self.skipped) > 3 else "")
            out.append(f"{len(self.skipped)} invalid rows skipped (on_invalid_row=skip; all listed in "
                       f"data_report.json): {shown}")
        if self.prompt_rerendered:
            rows = sorted({r["row"] for r in self.prompt_rerendered})
            shown = "; ".join(f"{r['row']} ({r['field']})" for r in self.prompt_rerendered[:3]) + (
                " ..." if len(self.prompt_rerendered) > 3 else "")
            out.append(f"{len(rows)} of {self.rows} rows trained with the prompt split at the longest token prefix "
                       "it shares with prompt + reply (the chat template renders the prompt alone differently, or "
                       f"tokens merge at the boundary; all listed in data_report.json): {shown}")
        for name, rows in (("prompts cut to max_prompt_length", self.prompt_truncated),
                           ("chosen replies cut to max_length / max_completion_length", self.chosen_truncated),
                           ("rejected replies cut to max_length / max_completion_length", self.rejected_truncated),
                           ("sequences cut to max_length or max_prompt_length", self.sequence_truncated)):
            if rows:
                out.append(f"{len(rows)} of {self.rows} {name} (rows {row_list(rows)})")
        return out


def _ids(enc: Any) -> list[int]:
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    if ids and isinstance(ids[0], list):  # some tokenizers keep a batch dimension
        ids = ids[0]
    return list(ids)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer: Any, messages: list[dict], **kwargs: Any) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs))


def template_kwargs(run: Mapping[str, Any] | None, row: Mapping[str, Any] | None,
                    tools: list[Any] | None = None) -> dict[str, Any]:
    """The keyword arguments for apply_chat_template: a row's ``chat_template_kwargs`` merged over the run's (as
    TRL 1.16), and the row's ``tools`` (TRL's column) as ``tools=``. A row key whose value is None is left out:
    `datasets` fills the keys other rows use with None."""
    out = {**(run or {}), **{k: v for k, v in (row or {}).items() if v is not None}}
    if tools:
        out["tools"] = tools
    return out


def tokenize_example(ex: Example, tokenizer: Any, settings: TokenizeSettings, *, row: int | None = None,
                     source: str | None = None, row_label: str = "row",
                     rerendered: list[str] | None = None) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` for one pair, before truncation; ``rerendered`` (see
    tokenize_replies) collects the replies whose prompt was split at the common prefix."""
    out = tokenize_replies(ex.prompt, {"chosen": ex.chosen, "rejected": ex.rejected}, ex.conversational, tokenizer,
                           row=row, source=source, row_label=row_label, rerendered=rerendered,
                           template_kwargs=template_kwargs(settings.chat_template_kwargs, ex.chat_template_kwargs,
                                                           ex.tools))
    if settings.ensure_bos and tokenizer.bos_token_id is not None and out["prompt_ids"][:1] != [
            tokenizer.bos_token_id]:
        out["prompt_ids"] = [tokenizer.bos_token_id] + out["prompt_ids"]
    if settings.ensure_eos:
        for k in ("chosen_ids", "rejected_ids"):
            if out[k][-1:] != [tokenizer.eos_token_id]:
                out[k] = out[k] + [tokenizer.eos_token_id]
    if not out["prompt_ids"]:
        raise DataError("the prompt tokenizes to no tokens, so nothing predicts the reply's first token.",
                        source=source, row=row, row_label=row_label, field="prompt",
                        fix="give a prompt, or use a tokenizer that adds a BOS token or a chat template")
    return out


def tokenize_replies(prompt: Any, replies: dict[str, Any], conversational: bool, tokenizer: Any, *,
                     row: int | None = None, source: str | None = None, row_label: str = "row",
                     fields: dict[str, str] | None = None, template_kwargs: Mapping[str, Any] | None = None,
                     rerendered: list[str] | None = None) -> dict[str, list[int]]:
    """``{"prompt_ids", "<name>_ids" for each reply}``: the prompt once, each reply as the tokens of prompt + reply
    after the prompt's (chat template, or text + EOS). Shared by pairs, SFT prompt-completion rows and unpaired rows.
    ``fields`` names each reply's column in errors (default: its key). ``template_kwargs`` go to every
    apply_chat_template. When the prompt's tokens are not a prefix of prompt + reply, the prompt is its longest
    prefix common to all of them (as TRL >= 1.14) and the replies' fields are appended to ``rerendered``."""
    where = {"source": source, "row": row, "row_label": row_label}
    fields = fields or {}
    if conversational:
        if not has_chat_template(tokenizer):
            raise DataError("conversational data needs a chat template, and this tokenizer has none.", **where,
                            fix="give a base model ChatML with `chat_template: chatml` (`--set chat_template=chatml`; "
                                "in Python `model, tokenizer = prefalign.setup_chat_format(model, tokenizer)`), a "
                                "Jinja chat_template, a chat model's tokenizer, or plain-text rows")
        # Always open a new assistant turn (as TRL): the reply is a new message even after an assistant turn.
        kw = dict(template_kwargs or {})
        prompt_ids = _template(tokenizer, prompt, add_generation_prompt=True, **kw)
        full = {k: _template(tokenizer, prompt + v, **kw) for k, v in replies.items()}
    else:
        prompt_ids = _ids(tokenizer(prompt))
        eos = tokenizer.eos_token or ""
        full = {k: _ids(tokenizer(prompt + (v if v.endswith(eos) else v + eos))) for k, v in replies.items()}
    shared = min(common_prefix_len(prompt_ids, ids) for ids in full.values())
    if shared < len(prompt_ids) and rerendered is not None:
        rerendered.extend(fields.get(k, k) for k, ids in full.items() if common_prefix_len(prompt_ids, ids)
                          < len(prompt_ids))
    out = {"prompt_ids": prompt_ids[:shared]}
    for k, ids in full.items():
        out[f"{k}_ids"] = ids[shared:]
        if not out[f"{k}_ids"]:
            raise DataError("tokenizes to no completion tokens.", **where, field=fields.get(k, k),
                            fix="give a non-empty reply")
    return out


def token_ids(data: Mapping[str, Any], tokenizer: Any, *, row: int | None = None, source: str | None = None,
              row_label: str = "row") -> dict[str, list[int]]:
    """A pre-tokenized pair's ids (load.py checked they are integer lists), each within the tokenizer's vocabulary."""
    vocab = len(tokenizer)
    out = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = list(data.get(name) or [])
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise DataError(f"holds token id {bad}, outside the tokenizer's vocabulary of {vocab}.", source=source,
                            row=row, row_label=row_label, field=name, fix="tokenize with this model's tokenizer")
        out[name] = ids
    if not out["prompt_ids"]:
        raise DataError("is empty, so nothing predicts the reply's first token.", source=source, row=row,
                        row_label=row_label, field="prompt_ids", fix="give at least one prompt token (a BOS)")
    return out


def truncate(pair: dict[str, list[int]], settings: TokenizeSettings, *, row: int | None = None,
             source: str | None = None, row_label: str = "row") -> tuple[dict[str, list[int]], set[str]]:
    """Apply max_prompt_length (keep the prompt's end), max_completion_length (keep replies' starts), then
    max_length as ``truncation_mode`` says (see `TokenizeSettings`).

    Returns the cut pair and the names of the parts that were cut. Under 'keep_start' a prompt that leaves no room
    for any reply token is an error, not a silent drop; 'keep_end' cuts such a prompt, keeping its last token (the
    one that predicts the reply's first).
    """
    cut: set[str] = set()
    prompt = pair["prompt_ids"]
    if settings.max_prompt_length is not None and len(prompt) > settings.max_prompt_length:
        prompt = prompt[-settings.max_prompt_length:]
        cut.add("prompt")
    replies = {k: pair[k] for k in ("chosen_ids", "rejected_ids")}
    if settings.max_completion_length is not None:
        for k, ids in replies.items():
            if len(ids) > settings.max_completion_length:
                replies[k] = ids[:settings.max_completion_length]
                cut.add(k.removesuffix("_ids"))
    keep_end = settings.truncation_mode == "keep_end"
    if keep_end and settings.max_length is not None:
        room = max(settings.max_length - max(len(ids) for ids in replies.values()), 1)
        if len(prompt) > room:
            prompt = prompt[-room:]
            cut.add("prompt")
    out = {"prompt_ids": prompt}
    for k, ids in replies.items():
        if settings.max_length is not None:
            room = settings.max_length - len(prompt)
            if room < 1:
                raise DataError(f"the prompt alone is {len(prompt)} tokens, leaving no room for a reply under "
                                f"max_length={settings.max_length}.", source=source, row=row, row_label=row_label,
                                field="prompt",
                                fix="raise max_length, set max_prompt_length to cut long prompts, or drop the row")
            if len(ids) > room:
                ids = ids[-room:] if keep_end else ids[:room]
                cut.add(k.removesuffix("_ids"))
        out[k] = ids
    return out, cut


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, settings: TokenizeSettings, *,
                  source: str | None = None, row_numbers: Sequence[int] | None = None, row_label: str = "row",
                  skip_invalid: bool = False) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenize and truncate every row. Errors and reports use ``row_numbers`` (the loader's: the source line),
    or 1, 2, ... when not given. With ``skip_invalid`` (on_invalid_row="skip") a row that cannot be trained on (a
    prompt leaving no room under max_length, a reply with no tokens, ...) is left out and listed in
    ``report.skipped`` (the pairs returned are then those of the other rows, in order)."""
    chat = settings.chat and has_chat_template(tokenizer)
    report = TokenizeReport(rows=len(rows))
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    out = []
    for i, (r, n) in enumerate(zip(rows, numbers, strict=True)):
        where = {"source": source, "row_label": row_label}
        try:
            rerendered: list[str] = []
            if r.get("chosen_ids") is not None:  # pre-tokenized (TRL's processed rows): no template
                ids = token_ids(r, tokenizer, row=n, **where)
            else:
                ex = to_example(r, chat=chat, row_number=n, **where)
                ids = tokenize_example(ex, tokenizer, settings, row=n, rerendered=rerendered, **where)
            pair, cut = truncate(ids, settings, row=n, **where)
        except DataError as e:
            if not skip_invalid:
                raise
            # "index": which of ``rows`` it was (several pairs can share a source row); callers pop it
            report.skipped.append({"row": n, "field": e.field, "reason": e.message, "index": i})
            continue
        for name in cut:
            getattr(report, f"{name}_truncated").append(n)
        report.prompt_rerendered.extend({"row": n, "field": f} for f in rerendered)
        out.append(pair)
    return out, report
