"""Run directories: where a `prefalign train` run leaves its model, resolved config, metrics and data report.

A finished run directory holds a Hugging Face model + tokenizer (``save_pretrained``), ``config.yaml`` (the fully
resolved options, loadable back with ``prefalign train config.yaml``), ``metrics.jsonl`` (one record per log, written
by the trainer), ``data_report.json`` (what tokenisation cut, per dataset) and ``report.html`` + ``plots/*.png``
(`prefalign.report`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
ERROR_LOG_FILE = "error.log"


def default_run_dir(method: str, now: datetime | None = None) -> Path:
    """``runs/<method>-<YYYYmmdd-HHMMSS>`` under the current directory."""
    return Path("runs") / f"{method}-{(now or datetime.now()):%Y%m%d-%H%M%S}"


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())


def check_output_dir(path: str | os.PathLike, overwrite: bool, keep: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output directory that would lose data; with ``overwrite``, check that clearing it is safe.

    ``keep`` lists local inputs (dataset files, model directories) that must not live inside a directory we clear.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{path}' exists and is not a directory. Fix: choose another --output-dir")
    if not is_nonempty_dir(out):
        return
    if not overwrite:
        raise ConfigError(f"output_dir '{path}' already exists and is not empty. Fix: pass --overwrite to replace "
                          "it, or choose another --output-dir")
    resolved = out.resolve()
    protected = [Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)]
    if any(resolved == p or resolved in p.parents for p in protected):
        raise ConfigError(f"refusing to --overwrite '{path}': it is the current, home or root directory, or one of "
                          "their parents. Fix: choose a dedicated --output-dir")
    for item in keep:
        inside = Path(item).expanduser().resolve()
        if inside.exists() and (inside == resolved or resolved in inside.parents):
            raise ConfigError(f"refusing to --overwrite '{path}': it holds the input '{item}'. Fix: choose "
                              "another --output-dir or move the input")


def clear_dir(path: str | os.PathLike) -> None:
    """Delete everything inside ``path`` (the directory itself stays)."""
    for child in Path(path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_config(path: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write the resolved run config as YAML (keys in the given order)."""
    target = Path(path) / CONFIG_FILE
    target.write_text(yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


def data_report(reports: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{dataset name: {rows, <part>_truncated (count), <part>_truncated_rows (row numbers)}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        fields = asdict(report) if is_dataclass(report) else dict(report)
        entry: dict[str, Any] = {}
        for key, value in fields.items():
            if isinstance(value, Sequence) and not isinstance(value, str):
                entry[key] = len(value)
                entry[f"{key}_rows"] = list(value)
            else:
                entry[key] = value
        out[name] = entry
    return out


def write_data_report(path: str | os.PathLike, reports: Mapping[str, Any]) -> Path:
    target = Path(path) / DATA_REPORT_FILE
    target.write_text(json.dumps(data_report(reports), indent=2) + "\n", encoding="utf-8")
    return target


def final_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The last logged training loss and reward accuracy, and the last eval ones, from ``trainer.state``."""
    wanted = ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies")
    out: dict[str, float] = {}
    for record in log_history:
        for key in wanted:
            if key in record:
                out[key] = float(record[key])
    return out
