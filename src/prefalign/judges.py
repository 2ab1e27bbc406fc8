"""Pluggable judges: something that scores a reply to a prompt.

A judge spec is one of
- ``demo``: the bundled task's deterministic judge (`prefalign.demo.task.judge`);
- ``module:function``: any importable callable ``f(prompt: str, response: str) -> float | None``
  (None: the judge has no opinion on this prompt, and it is left out of pass rates);
- ``reward-model:PATH`` (or a local model directory whose config is a sequence classifier): a reward model loaded
  with ``AutoModelForSequenceClassification``; the score is its logit for the chat-formatted (prompt, reply).
A reply passes when its score is at least ``pass_threshold`` (1.0 for the demo judge, 0.0 for reward models).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ScoreFn = Callable[[str, str], float | None]


@dataclass
class Judge:
    """A named scoring function with the threshold that counts as a pass."""

    name: str
    score: ScoreFn
    pass_threshold: float = 1.0

    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        return [self.score(p, r) for p, r in zip(prompts, responses, strict=True)]


class RewardModelJudge:
    """Score (prompt, reply) with a sequence-classification reward model: the logit of its first (or only) label."""

    def __init__(self, path: str, batch_size: int = 8) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except OSError as err:
            raise ConfigError(f"reward model '{path}' could not be loaded ({str(err).splitlines()[0]}). Fix: give a "
                              "local directory with a sequence-classification model and its tokenizer.") from None
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        return f"{prompt}\n{response}"

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        texts = [self._text(p, r) for p, r in zip(prompts, responses, strict=True)]
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=2048)
                out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out

    def __call__(self, prompt: str, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def _is_classifier_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_judge(spec: str, pass_threshold: float | None = None) -> Judge:
    """Resolve a judge spec (see module docstring) into a `Judge`; a bad spec is a one-line `ConfigError`."""
    if spec == "demo":
        from .demo.task import judge

        return Judge("demo", judge, 1.0 if pass_threshold is None else pass_threshold)
    rm_path = spec.removeprefix("reward-model:")
    if spec.startswith("reward-model:") or _is_classifier_dir(Path(rm_path)):
        rm = RewardModelJudge(rm_path)
        judge = Judge(f"reward-model:{rm_path}", rm, 0.0 if pass_threshold is None else pass_threshold)
        judge.score_many = rm.score_batch  # type: ignore[method-assign]  # batched scoring
        return judge
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"judge '{spec}' is not a judge spec. Fix: use 'demo', 'module:function' or "
                          "'reward-model:PATH'.")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"judge '{spec}' could not be imported ({err}). Fix: check the module is on PYTHONPATH "
                          "and defines that function.") from None
    if not callable(fn):
        raise ConfigError(f"judge '{spec}' is not callable. Fix: point at a function f(prompt, response) -> float.")
    return Judge(spec, fn, 1.0 if pass_threshold is None else pass_threshold)


def call_score(judge: Judge, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
    """Scores as floats (or None), with a clear error if a user judge returns something else."""
    scores = judge.score_many(prompts, responses)
    out: list[float | None] = []
    for s in scores:
        if s is not None and not isinstance(s, int | float):
            raise ConfigError(f"judge '{judge.name}' returned {type(s).__name__}; it must return a number or None.")
        out.append(None if s is None else float(s))
    return out


def as_score_fn(judge: Judge) -> ScoreFn:
    def fn(prompt: str, response: str) -> float | None:
        return call_score(judge, [prompt], [response])[0]

    return fn


__all__ = ["Judge", "RewardModelJudge", "as_score_fn", "call_score", "load_judge"]

