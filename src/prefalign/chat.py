"""Chatting with a model by hand: one model's side of a conversation, streamed token by token.

``prefalign chat`` (see `prefalign.commands.chat`) puts one `ChatSession` per model on the same prompts, so a trained
model and its reference can be compared turn by turn on whatever the user types: the course's "test diverse
prompts, including edge cases". Each session keeps its own history (its own earlier replies), because a model
should continue the conversation it actually had. Greedy replies equal `prefalign.generate.generate`'s for the same
single prompt, so what one sees here is what ``prefalign eval`` scores. torch is imported on first use.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .generate import Prompt, prompt_messages


@dataclass(frozen=True)
class GenerationOptions:
    """How replies are generated. ``temperature`` 0 is greedy (deterministic); the sampling knobs apply above 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut (transformers' own default would be 50)
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> GenerationOptions:
        """Raise a one-line `ConfigError` naming the flag and its range, so bad values fail before any loading."""
        checks = [
            (self.max_new_tokens >= 1, "--max-new-tokens", self.max_new_tokens, "an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "--temperature", self.temperature,
             "a number >= 0 (0 = greedy)"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "--top-p", self.top_p, "a number in (0, 1]"),
            (self.top_k >= 0, "--top-k", self.top_k, "an integer >= 0 (0 = off)"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "--repetition-penalty",
             self.repetition_penalty, "a number > 0 (1 = off)"),
            (0 <= self.seed < 2**63, "--seed", self.seed, "an integer >= 0"),
        ]
        for ok, flag, value, wanted in checks:
            if not ok:
                raise ConfigError(f"{flag} {value} is out of range. Fix: give {wanted}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        """One line for the session banner."""
        how = "greedy" if self.greedy else (f"sampling (temperature {self.temperature}, top-p {self.top_p}, "
                                            f"top-k {self.top_k or 'off'}, seed {self.seed})")
        extra = f", repetition penalty {self.repetition_penalty}" if self.repetition_penalty != 1 else ""
        return f"{how}{extra}, up to {self.max_new_tokens} new tokens"

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` arguments; greedy passes no sampling knobs (as `prefalign.generate.generate` does)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers TextStreamer that hands decoded text to ``on_text`` instead of printing it.

    Generation stays in the calling thread (unlike TextIteratorStreamer), so Ctrl-C stops a reply mid-way.
    """
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """One model in a conversation: its history (system message, user turns, its own replies) and its generator.

    `respond` adds nothing to the history (it only drops the oldest turns when the context cannot hold them);
    `record` adds a finished turn, so a turn interrupted on either side of a comparison is left out of both.
    """

    def __init__(self, model: Any, tokenizer: Any, options: GenerationOptions, *, system: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None) -> None:
        import torch

        from .data.tokenize import has_chat_template

        self.model, self.tokenizer, self.options, self.system = model, tokenizer, options, system
        self.template_kwargs = dict(chat_template_kwargs or {})  # e.g. {"enable_thinking": False}
        self.history: list[dict[str, str]] = []
        self.templated = has_chat_template(tokenizer)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._rng = torch.Generator().manual_seed(options.seed)
        model.eval()

    def reset(self) -> None:
        """Forget the conversation (the system message stays); the sampling seed carries on."""
        self.history = []

    def record(self, prompt: Prompt, reply: str) -> None:
        """Add a finished turn to the history."""
        self.history += [*prompt_messages(prompt), {"role": "assistant", "content": reply}]

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        """The conversation the model sees for ``prompt``: system message, history, then the prompt's turns."""
        turns = [*self.history, *prompt_messages(prompt)]
        if self.system is not None and not any(m.get("role") == "system" for m in turns):
            turns.insert(0, {"role": "system", "content": self.system})
        return turns

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        if self.templated:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, **self.template_kwargs)["input_ids"])
        if len(messages) == 1:  # plain text, like prefalign.generate does for models without a template
            return list(self.tokenizer(messages[0]["content"])["input_ids"])
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return list(self.tokenizer(text)["input_ids"])

    def fit(self, prompt: Prompt) -> tuple[list[int], int]:
        """Token ids for ``prompt`` after the conversation so far, and how many old turns were dropped to fit.

        The oldest (user, reply) turns go first; a prompt that does not fit on its own is a `ConfigError`.
        """
        dropped = 0
        while True:
            ids = self._encode(self.messages(prompt))
            if self.context is None or len(ids) + self.options.max_new_tokens <= self.context:
                return ids, dropped
            if not self.history:
                raise ConfigError(f"the prompt is {len(ids)} tokens; with --max-new-tokens "
                                  f"{self.options.max_new_tokens} that is over the model's context of "
                                  f"{self.context} tokens. Fix: shorten it or lower --max-new-tokens")
            cut = next((i for i, m in enumerate(self.history[1:], start=1) if m.get("role") == "user"),
                       len(self.history))
            self.history = self.history[cut:]
            dropped += 1

    def respond(self, prompt: Prompt, on_text: Callable[[str], None] | None = None) -> tuple[str, int]:
        """The model's reply to ``prompt`` after the history (decoded without special tokens, stripped), and how
        many old turns were dropped to fit the context; ``on_text`` gets the text as it is generated."""
        import torch

        ids, dropped = self.fit(prompt)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs = self.options.generate_kwargs()
        if on_text is not None:
            kwargs["streamer"] = _streamer(self.tokenizer, on_text)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._rng)))
        with torch.no_grad():
            seqs = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       pad_token_id=pad, **kwargs)
        return self.tokenizer.decode(seqs[0, len(ids):], skip_special_tokens=True).strip(), dropped


def chat_tokenizer_source(model: str) -> str:
    """Where a model's tokenizer is: the directory itself, or for a bare PEFT adapter directory (no tokenizer files)
    the adapter's base model."""
    path = Path(model).expanduser()
    adapter = path / "adapter_config.json"
    if not path.is_dir() or not adapter.is_file() or (path / "tokenizer_config.json").is_file():
        return model
    try:
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return model
    return str(base) if base else model


def read_chat_prompts(source: str) -> list[Prompt]:
    """Prompts from a file: ``.txt`` one per line (blank lines skipped), else rows with ``prompt`` (text or
    messages) in any format `prefalign.generate.read_prompt_rows` reads."""
    from .generate import read_prompt_rows

    if Path(source).suffix.lower() != ".txt":
        return [row["prompt"] for row in read_prompt_rows(source)]
    try:
        lines = Path(source).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise DataError(f"cannot read the prompts file ({reason}).", source=source,
                        fix="give a readable UTF-8 text file, one prompt per line") from None
    prompts: list[Prompt] = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError("has no prompts (no non-blank lines).", source=source, fix="write one prompt per line")
    return prompts


def side_by_side(columns: Sequence[tuple[str, str]], width: int) -> str:
    """Texts in labelled columns of equal width, wrapped, separated by `` | ``; for replies already complete."""
    gap = " | "
    col = max(10, (width - len(gap) * (len(columns) - 1)) // len(columns))
    wrapped = []
    for label, text in columns:
        lines = [label[:col], "-" * min(col, max(len(label), 1))]
        for para in (text.splitlines() or [""]):
            lines += textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""]
        wrapped.append(lines)
    height = max(len(w) for w in wrapped)
    rows = []
    for i in range(height):
        cells = [(w[i] if i < len(w) else "").ljust(col) for w in wrapped]
        rows.append(gap.join(cells).rstrip())
    return "\n".join(rows)
