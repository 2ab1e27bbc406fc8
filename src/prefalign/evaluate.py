"""Held-out evaluation of a policy against its reference model, written as JSON and Markdown.

Two views, as the field's practice asks: on held-out *pairs*, does the policy prefer chosen over rejected more
than the reference does (DPO's implicit reward, reward accuracy, margin, log-probs); on held-out *prompts*, do its
greedy generations score better under a judge (pass rate, mean score, win rate against the reference, length),
plus a handful of edge-case prompts shown as generated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import speed
from .data.collate import PairCollator, PrefixSharedCollator
from .data.tokenize import TokenizeSettings, tokenize_rows
from .errors import one_line
from .generate import generate, prompt_kwargs, prompt_text
from .judges import Judge, call_score
from .logps import mask_kind, pair_logps


@torch.no_grad()
def sequence_logps(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], *, max_length: int = 1024,
                   batch_size: int = 8, progress: Callable[[int], None] | None = None,
                   config: Any = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs ``(chosen [N], rejected [N])`` of every pair under ``model``, through the same fast
    path and prefix-shared batches as training (``config``: any object with the configs' speed fields)."""
    from .reference import batched_pair_logps

    model.eval()
    ids, _ = tokenize_rows(pairs, tokenizer, TokenizeSettings(max_length=max_length,
                                                              chat_template_kwargs=chat_template_kwargs))
    shared = mask_kind(model) is not None
    collate = PrefixSharedCollator(tokenizer.pad_token_id) if shared else PairCollator(tokenizer.pad_token_id)
    with speed.enable(model, config) as fast:
        return batched_pair_logps(lambda batch: pair_logps(model, batch, fast.path), ids, collate, batch_size,
                                  next(model.parameters()).device, progress)


@dataclass
class PairMetrics:
    """DPO implicit-reward view of held-out pairs: rewards are beta * (log pi - log pi_ref)."""

    pairs: int
    beta: float
    reward_accuracy: float
    reward_margin: float
    logps_chosen: float
    logps_rejected: float
    ref_logps_chosen: float
    ref_logps_rejected: float
    # Fraction of pairs where the model itself gives chosen a higher log-prob than rejected (no reference needed).
    policy_prefers_chosen: float
    reference_prefers_chosen: float


def pair_metrics(policy_logps: tuple[torch.Tensor, torch.Tensor], ref_logps: tuple[torch.Tensor, torch.Tensor],
                 beta: float) -> PairMetrics:
    pc, pr = policy_logps
    rc, rr = ref_logps
    margins = beta * ((pc - rc) - (pr - rr))
    return PairMetrics(
        pairs=len(pc), beta=beta, reward_accuracy=(margins > 0).float().mean().item(),
        reward_margin=margins.mean().item(), logps_chosen=pc.mean().item(), logps_rejected=pr.mean().item(),
        ref_logps_chosen=rc.mean().item(), ref_logps_rejected=rr.mean().item(),
        policy_prefers_chosen=(pc > pr).float().mean().item(), reference_prefers_chosen=(rc > rr).float().mean().item())


@dataclass
class GenerationMetrics:
    """Judge scores of greedy generations on held-out prompts."""

    prompts: int
    judged: int
    pass_rate: float
    mean_score: float
    mean_words: float
    mean_tokens: float
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def generation_metrics(prompts: Sequence[str], replies: Sequence[str], scores: Sequence[float | None],
                       judge: Judge, tokenizer: Any, groups: Sequence[str | None]) -> GenerationMetrics:
    judged = [s for s in scores if s is not None]
    by_group: dict[str, dict[str, float]] = {}
    for g in sorted({g for g in groups if g}):
        gs = [s for s, gg in zip(scores, groups, strict=True) if gg == g and s is not None]
        by_group[g] = {"n": len(gs), "pass_rate": _mean([float(s >= judge.pass_threshold) for s in gs]),
                       "mean_score": _mean(gs)}
    return GenerationMetrics(
        prompts=len(prompts), judged=len(judged),
        pass_rate=_mean([float(s >= judge.pass_threshold) for s in judged]), mean_score=_mean(judged),
        mean_words=_mean([len(r.split()) for r in replies]),
        mean_tokens=_mean([len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]),
        by_group=by_group)


@dataclass
class WinRate:
    """Policy against reference, prompt by prompt, on judge score."""

    wins: int
    losses: int
    ties: int

    @property
    def win_rate(self) -> float:
        n = self.wins + self.losses + self.ties
        return (self.wins + 0.5 * self.ties) / n if n else float("nan")

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval of the win rate (95% for z = 1.96), a tie counting as half a win: unlike the
        normal approximation it stays inside [0, 1] and is honest for the few dozen prompts of a held-out set."""
        return wilson_interval(self.wins + 0.5 * self.ties, self.wins + self.losses + self.ties, z)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """``(low, high)`` of the Wilson score interval for ``successes`` out of ``n``; (nan, nan) when n is 0.

    ``p = s / n``; centre ``(p + z²/2n) / (1 + z²/n)``, half-width ``z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(policy: Sequence[float | None], reference: Sequence[float | None]) -> WinRate:
    w = lo = t = 0
    for a, b in zip(policy, reference, strict=True):
        if a is None or b is None:
            continue
        w, lo, t = w + (a > b), lo + (a < b), t + (a == b)
    return WinRate(w, lo, t)


@dataclass
class EvalReport:
    """Everything `prefalign eval` measures, ready for JSON and Markdown."""

    policy: str
    reference: str
    judge: str
    pass_threshold: float
    pairs: PairMetrics | None
    policy_generation: GenerationMetrics | None
    reference_generation: GenerationMetrics | None
    win: WinRate | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    edge_cases: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.win is not None:
            data["win"]["win_rate"] = self.win.win_rate
        return data

    def to_markdown(self) -> str:
        lines = [f"# Evaluation: `{self.policy}` vs reference `{self.reference}`", ""]
        if self.pairs:
            p = self.pairs
            lines += ["## Held-out pairs", "", f"{p.pairs} pairs, implicit reward beta = {p.beta}.", "",
                      "| metric | value |", "|---|---|",
                      f"| reward accuracy (policy vs reference) | {p.reward_accuracy:.3f} |",
                      f"| mean reward margin | {p.reward_margin:.4f} |",
                      f"| mean log-prob chosen / rejected (policy) | {p.logps_chosen:.2f} / {p.logps_rejected:.2f} |",
                      f"| mean log-prob chosen / rejected (reference) | {p.ref_logps_chosen:.2f} / "
                      f"{p.ref_logps_rejected:.2f} |",
                      f"| policy prefers chosen | {p.policy_prefers_chosen:.3f} |",
                      f"| reference prefers chosen | {p.reference_prefers_chosen:.3f} |", ""]
        if self.policy_generation and self.reference_generation:
            a, b = self.policy_generation, self.reference_generation
            lines += ["## Held-out prompts (greedy generations)", "",
                      f"Judge `{self.judge}`, pass = score >= {self.pass_threshold}; {a.judged} of {a.prompts} "
                      "prompts judged.", "", "| | policy | reference |", "|---|---|---|",
                      f"| judge pass rate | {a.pass_rate:.3f} | {b.pass_rate:.3f} |",
                      f"| mean judge score | {a.mean_score:.3f} | {b.mean_score:.3f} |",
                      f"| mean reply length (words / tokens) | {a.mean_words:.1f} / {a.mean_tokens:.1f} | "
                      f"{b.mean_words:.1f} / {b.mean_tokens:.1f} |"]
            if self.win:
                lines.append(f"| win rate vs reference (wins / losses / ties) | {self.win.win_rate:.3f} "
                             f"({self.win.wins} / {self.win.losses} / {self.win.ties}) | |")
            for g, m in a.by_group.items():
                r = b.by_group.get(g, {})
                lines.append(f"| pass rate: {g} (n={m['n']:.0f}) | {m['pass_rate']:.3f} | "
                             f"{r.get('pass_rate', float('nan')):.3f} |")
            lines += ["", "### Samples", "", "| prompt | policy | score | reference | score |", "|---|---|---|---|---|"]
            for s in self.samples:
                lines.append(f"| {_cell(s['prompt'])} | {_cell(s['policy'])} | {_fmt(s['policy_score'])} | "
                             f"{_cell(s['reference'])} | {_fmt(s['reference_score'])} |")
            lines.append("")
        if self.edge_cases:
            lines += ["## Edge-case prompts", "", "| prompt | policy | reference |", "|---|---|---|"]
            for e in self.edge_cases:
                lines.append(f"| {_cell(e['prompt'] or '(empty)')} | {_cell(e['policy'])} | {_cell(e['reference'])} |")
            lines.append("")
        return "\n".join(lines)

    def write(self, out_dir: str | Path, stem: str = "eval") -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / f"{stem}.json", out / f"{stem}.md"
        js.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        md.write_text(self.to_markdown(), encoding="utf-8")
        return js, md


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cell(text: str, limit: int = 90) -> str:
    text = one_line(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class GenerationRun:
    """Generations and scores of one model on the held-out prompts (reusable across comparisons)."""

    replies: list[str]
    scores: list[float | None]
    edge_replies: list[str]


def run_generations(model: Any, tokenizer: Any, prompts: Sequence[Any], judge: Judge, *,
                    edge_cases: Sequence[str] = (), max_new_tokens: int = 48, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None,
                    prompt_kwargs: Sequence[Mapping[str, Any] | None] | None = None) -> GenerationRun:
    """Greedy replies to ``prompts`` (text or messages) and the edge cases; the judge reads each prompt's last user
    text. ``chat_template_kwargs`` / ``prompt_kwargs``: as `prefalign.generate.generate`'s."""
    replies = [r[0] for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, progress=progress,
                                      chat_template_kwargs=chat_template_kwargs, prompt_kwargs=prompt_kwargs)]
    scores = call_score(judge, [prompt_text(p) for p in prompts], replies)
    edge = [r[0] for r in generate(model, tokenizer, list(edge_cases), max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, chat_template_kwargs=chat_template_kwargs)] \
        if edge_cases else []
    return GenerationRun(replies, scores, edge)


def sample_indices(n: int, k: int) -> list[int]:
    """At most ``k`` of ``n`` items, evenly spaced from the first: the prompts a report shows replies for, the
    same ones for every model so they can be read side by side."""
    return list(range(0, n, max(1, n // k)))[:k] if k > 0 else []


def build_report(*, policy_name: str, reference_name: str, judge: Judge, tokenizer: Any,
                 prompt_rows: Sequence[dict[str, Any]], policy_run: GenerationRun | None,
                 reference_run: GenerationRun | None, pairs: PairMetrics | None,
                 edge_cases: Sequence[str] = (), n_samples: int = 12) -> EvalReport:
    """Assemble an `EvalReport` from generation runs (either may be None when only pairs were evaluated)."""
    gen_a = gen_b = win = None
    samples: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    if policy_run and reference_run:
        prompts = [prompt_text(r["prompt"]) for r in prompt_rows]
        groups = [r.get("family") or r.get("category") for r in prompt_rows]
        gen_a = generation_metrics(prompts, policy_run.replies, policy_run.scores, judge, tokenizer, groups)
        gen_b = generation_metrics(prompts, reference_run.replies, reference_run.scores, judge, tokenizer, groups)
        win = win_rate(policy_run.scores, reference_run.scores)
        samples = [{"prompt": prompts[i], "policy": policy_run.replies[i], "policy_score": policy_run.scores[i],
                    "reference": reference_run.replies[i], "reference_score": reference_run.scores[i]}
                   for i in sample_indices(len(prompts), n_samples)]
        if edge_cases:
            edges = [{"prompt": p, "policy": a, "reference": b} for p, a, b in
                     zip(edge_cases, policy_run.edge_replies, reference_run.edge_replies, strict=True)]
    return EvalReport(policy_name, reference_name, judge.name, judge.pass_threshold, pairs, gen_a, gen_b, win,
                      samples, edges)


def evaluate_models(policy: Any, reference: Any, tokenizer: Any, judge: Judge, *, policy_name: str,
                    reference_name: str, pair_rows: Sequence[dict[str, Any]] = (),
                    prompt_rows: Sequence[dict[str, Any]] = (), edge_cases: Sequence[str] = (), beta: float = 0.1,
                    max_length: int = 1024, max_new_tokens: int = 48, batch_size: int = 16,
                    progress: Callable[[str, int], Callable[[int], None]] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> EvalReport:
    """The whole `prefalign eval`: pairs (if any) and generations (if prompts) of policy against reference.
    ``chat_template_kwargs``: the run's, for every rendering (rows' own are merged over them)."""
    pairs = None
    if pair_rows:
        scored = [sequence_logps(m, tokenizer, pair_rows, max_length=max_length,
                                 progress=progress(f"{name}: scoring pairs", len(pair_rows)) if progress else None,
                                 chat_template_kwargs=chat_template_kwargs)
                  for name, m in (("policy", policy), ("reference", reference))]
        pairs = pair_metrics(scored[0], scored[1], beta)
    runs: list[GenerationRun | None] = [None, None]
    if prompt_rows:
        prompts = [r["prompt"] for r in prompt_rows]
        for i, (model, name) in enumerate(((policy, "policy"), (reference, "reference"))):
            update = progress(f"{name}: generating", len(prompts)) if progress else None
            runs[i] = run_generations(model, tokenizer, prompts, judge, edge_cases=edge_cases,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=update,
                                      chat_template_kwargs=chat_template_kwargs,
                                      prompt_kwargs=prompt_kwargs(prompt_rows))
    return build_report(policy_name=policy_name, reference_name=reference_name, judge=judge, tokenizer=tokenizer,
                        prompt_rows=prompt_rows, policy_run=runs[0], reference_run=runs[1], pairs=pairs,
                        edge_cases=edge_cases)
