"""Pluggable judges: something that scores a reply to a prompt.

A judge spec is one of
- a judge name: one given to `register_judge`, or else an entry point of the ``prefalign.judges`` group, so an
  installed package can add judges without this module knowing about it (prefalign's own: ``demo``, the bundled
  task's deterministic judge);
- ``module:function``: any importable callable ``f(prompt: str, response: str) -> float | None``
  (None: the judge has no opinion on this prompt, and it is left out of pass rates);
- ``reward-model:PATH`` (or a local model directory whose config is a sequence classifier): a reward model loaded
  with ``AutoModelForSequenceClassification``; the score is its logit for the chat-formatted (prompt, reply).
A judge's ``prompt`` is always text: a prompt given as a list of messages (eval_prompts, ``--prompts`` rows) reaches it
as its last user message's text (`prefalign.generate.prompt_text`), so ``f(prompt, response)`` judges keep working.
A reply passes when its score is at least ``pass_threshold`` (default 1.0, 0.0 for reward models; a named judge
whose factory returns a `Judge` brings its own).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, PrefalignError, one_line

ScoreFn = Callable[[str, str], float | None]
ENTRY_POINT_GROUP = "prefalign.judges"


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


JudgeFactory = Callable[[], ScoreFn | Judge]
_REGISTRY: dict[str, JudgeFactory] = {}


def register_judge(name: str, factory: JudgeFactory) -> None:
    """Make ``load_judge(name)`` call ``factory()`` for its score function (or a whole `Judge`).

    A factory rather than the function itself, so a costly judge (a model to load) costs nothing until it is used.
    A registered name wins over an entry point of the same name.
    """
    if not name or ":" in name:
        raise ValueError(f"judge name {name!r} must be non-empty and contain no ':' (that would read as a spec)")
    _REGISTRY[name] = factory


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def judge_names() -> list[str]:
    """Every judge name `load_judge` knows: registered ones and the ``prefalign.judges`` entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _named_judge(spec: str, pass_threshold: float | None) -> Judge | None:
    """The judge registered or installed (entry point) under ``spec``, or None if there is none."""
    factory = _REGISTRY.get(spec)
    if factory is None:
        ep = _entry_points().get(spec)
        if ep is None:
            return None
        factory = ep.load  # an entry point names the score function itself
    try:
        made = factory()
    except PrefalignError:
        raise
    except Exception as err:
        raise ConfigError(f"judge '{spec}' could not be loaded ({type(err).__name__}: {one_line(err)}). Fix: "
                          "check the package that provides it.") from None
    if isinstance(made, Judge):
        threshold = made.pass_threshold if pass_threshold is None else pass_threshold
        return Judge(spec, made.score, threshold)
    if not callable(made):
        raise ConfigError(f"judge '{spec}' is not callable. Fix: register a function f(prompt, response) -> float.")
    return Judge(spec, made, 1.0 if pass_threshold is None else pass_threshold)


def _is_classifier_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_judge(spec: str, pass_threshold: float | None = None) -> Judge:
    """Resolve a judge spec (see module docstring) into a `Judge`; a bad spec is a one-line `ConfigError`."""
    named = _named_judge(spec, pass_threshold)
    if named is not None:
        return named
    rm_path = spec.removeprefix("reward-model:")
    if spec.startswith("reward-model:") or _is_classifier_dir(Path(rm_path)):
        rm = RewardModelJudge(rm_path)
        judge = Judge(f"reward-model:{rm_path}", rm, 0.0 if pass_threshold is None else pass_threshold)
        judge.score_many = rm.score_batch  # type: ignore[method-assign]  # batched scoring
        return judge
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        names = ", ".join(judge_names()) or "none"
        raise ConfigError(f"judge '{spec}' is not a judge name (available: {names}) or spec. Fix: use one of those "
                          "names, 'module:function' or 'reward-model:PATH'.")
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


__all__ = ["Judge", "RewardModelJudge", "as_score_fn", "call_score", "judge_names", "load_judge", "register_judge"]

