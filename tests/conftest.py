"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefalign_home_dir() -> Path:
    """One PREFALIGN_HOME for the whole session (and across sessions), so the embedded model is converted once."""
    home = os.environ.get("PREFALIGN_HOME") or str(REPO_ROOT / ".pytest_cache" / "prefalign_home")
    path = Path(home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _prefalign_home_env(prefalign_home_dir: Path) -> Iterator[None]:
    """Point prefalign at the session home so no test writes into the user's ~/.cache/prefalign."""
    previous = os.environ.get("PREFALIGN_HOME")
    os.environ["PREFALIGN_HOME"] = str(prefalign_home_dir)
    yield
    if previous is None:
        os.environ.pop("PREFALIGN_HOME", None)
    else:
        os.environ["PREFALIGN_HOME"] = previous
