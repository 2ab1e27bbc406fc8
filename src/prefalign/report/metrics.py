"""A run directory's numbers: ``metrics.jsonl`` (one record per Trainer log) and the resolved ``config.yaml``.

Reading is strict, like every prefalign input: a line that is not a JSON object stops with its line number, and
values that are not finite are counted (the page says how many were left out of the plots) rather than hidden.
A resumed run appends records for steps it logged before; a series keeps the last value per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, DataError
from ..runs import CONFIG_FILE, METRICS_FILE

# Keys of the Trainer's end-of-run record and throughput numbers: shown as run facts, not as metrics.
TIMING_SUFFIXES = ("_runtime", "_per_second")
TIMING_KEYS = {"total_flos"}
NOT_METRICS = {"step", "epoch"}


def is_timing(key: str) -> bool:
    """Throughput and wall-time keys (``train_runtime``, ``eval_samples_per_second``, ``total_flos``)."""
    return key in TIMING_KEYS or key.endswith(TIMING_SUFFIXES)


def is_summary(record: Mapping[str, Any]) -> bool:
    """The Trainer's last record of ``train()`` (``train_runtime``, ``train_loss``): not a training step."""
    return "train_runtime" in record


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class Series:
    """One metric over steps: parallel ``steps`` and finite ``values``; ``nonfinite`` counts NaN / inf left out."""

    steps: tuple[float, ...]
    values: tuple[float, ...]
    nonfinite: int = 0

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Run:
    """One run directory's records and resolved config (empty when the run has none, e.g. a library run)."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def step_records(self) -> list[dict[str, Any]]:
        """The per-log records (training steps and evaluations), without the end-of-run summary."""
        return [r for r in self.records if not is_summary(r)]

    def keys(self, *, eval_: bool) -> list[str]:
        """Numeric metric names logged during training (``eval_=False``) or evaluation, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.step_records():
            for key, value in record.items():
                if key in NOT_METRICS or is_timing(key) or _number(value) is None:
                    continue
                if key.startswith("eval_") == eval_:
                    seen.setdefault(key, None)
        return list(seen)

    def series(self, key: str) -> Series:
        """``key`` over steps; a step logged twice (a resumed run, the final evaluate()) keeps its last value."""
        by_step: dict[float, float] = {}
        for index, record in enumerate(self.step_records()):
            value = _number(record.get(key))
            if value is not None:
                step = _number(record.get("step"))
                by_step[index if step is None else step] = value
        finite = {s: v for s, v in by_step.items() if math.isfinite(v)}
        steps = sorted(finite)
        return Series(tuple(steps), tuple(finite[s] for s in steps), len(by_step) - len(finite))

    def final(self, *, eval_: bool) -> dict[str, float]:
        """The last logged value of every training (or eval) metric: the summary table's numbers."""
        out: dict[str, float] = {}
        for key in self.keys(eval_=eval_):
            for record in reversed(self.step_records()):
                value = _number(record.get(key))
                if value is not None:
                    out[key] = value
                    break
        return out

    def summary(self) -> dict[str, float]:
        """The end-of-run numbers (train_runtime, train_loss, throughput); empty for an unfinished run."""
        for record in reversed(self.records):
            if is_summary(record):
                return {k: v for k, v in record.items() if k not in NOT_METRICS and _number(v) is not None}
        return {}

    def steps(self) -> int:
        """The last optimizer step logged."""
        return max((int(r.get("step", 0)) for r in self.records if _number(r.get("step")) is not None), default=0)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl``; a line that is not a JSON object is an error naming its line."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such file; a run directory holds one once training has logged a step.",
                        source=str(path), fix="pass the run's output_dir") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read it ({type(e).__name__}: {e}).", source=str(path)) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg}).", source=str(path), row=number, row_label="line",
                            fix="remove or repair that line (a killed run can leave a half-written last line)"
                            ) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}.", source=str(path), row=number,
                            row_label="line")
        records.append(record)
    if not records:
        raise DataError("holds no records; the run logged nothing yet.", source=str(path),
                        fix="train for at least logging_steps steps")
    return records


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml``, or ``{}`` when there is none (runs started from Python have none)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it ({one_reason(e)}). Fix: repair or remove it") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(config).__name__}. Fix: repair or "
                          "remove it")
    return config


def one_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """A run directory as a `Run`; errors (not a directory, no or unreadable metrics.jsonl) are one line."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ConfigError(f"run directory '{run_dir}' {what}. Fix: pass the output_dir of a training run")
    records = read_metrics(path / METRICS_FILE)
    return Run(name=name or path.resolve().name, path=path, records=records, config=read_config(path))


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Several runs, named by their directory (for a compare page); duplicate names get their parent too."""
    runs = [load_run(d) for d in run_dirs]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    return runs


def union_keys(runs: Sequence[Run], *, eval_: bool) -> list[str]:
    """Metric names over several runs, first-seen order."""
    seen: dict[str, None] = {}
    for run in runs:
        for key in run.keys(eval_=eval_):
            seen.setdefault(key, None)
    return list(seen)
