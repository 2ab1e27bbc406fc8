"""The documentation builds with warnings as errors, offline, and its generated references follow the code."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from prefalign import options
from prefalign.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent


def _text(path: Path) -> str:
    """A built page's text, tags dropped."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))


def test_mkdocs_build_strict(tmp_path: Path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.exists(), f"{mkdocs} is missing. Fix: scripts/setup --dev (the dev extra installs mkdocs)"
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    result = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(site)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]

    # The options reference names every field of every method's config class, and the run keys.
    page = _text(site / "reference" / "options" / "index.html")
    for method in options.METHODS:
        for name in options.config_fields(options.config_class(method)):
            assert name in page, f"options reference lacks {method}'s {name}"
    for key in options.RUN_KEYS:
        assert key in page, key
    assert "<!-- generated" not in (site / "reference" / "options" / "index.html").read_text(encoding="utf-8")

    # The CLI reference has every subcommand and every option string of the parser.
    page = _text(site / "reference" / "cli" / "index.html")
    stack = [("prefalign", build_parser())]
    while stack:
        name, parser = stack.pop()
        assert name in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in page, f"CLI reference lacks {name} {flag}"
            if isinstance(action, argparse._SubParsersAction):
                stack += [(f"{name} {sub_name}", sub) for sub_name, sub in action.choices.items()]

    # The API reference rendered the public classes from their docstrings.
    page = _text(site / "reference" / "api" / "index.html")
    for name in ("DPOTrainer", "ORPOTrainer", "CPOTrainer", "KTOTrainer", "SFTTrainer", "DPOConfig", "SimPOConfig",
                 "load_preference_dataset", "dpo_loss", "register_judge", "Direct Preference Optimization"):
        assert name in page, name
    # The site makes no request outside itself for fonts (offline build and reading).
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")
