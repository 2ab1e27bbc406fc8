"""Every command in the README works from a fresh clone: each `prefalign ...` line parses against the CLI's parser
(and, for `prefalign train`, resolves its options), every repository path it names exists, the quick ones (--help)
run, and the Python example compiles."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from prefalign import options
from prefalign.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
TWO_COMMANDS = ("scripts/setup && .venv/bin/prefalign demo", "scripts/setup --dev && .venv/bin/python -m pytest -q")
REPO_DIRS = ("examples/", "src/", "scripts/", "tests/", "benchmarks/", "docs/")


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language fenced blocks."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str) -> list[list[str]]:
    """Each simple command of a shell block as its words: continuations joined, comments dropped, split at && ; |."""
    commands: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for word in shlex.split(line, comments=True):
            if word in ("&&", ";", "|", "||"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def prefalign_commands() -> list[list[str]]:
    """The argument lists of every `prefalign` / `.venv/bin/prefalign` command in the README's shell blocks."""
    return [c[1:] for block in code_blocks(README, "bash") for c in shell_commands(block)
            if Path(c[0]).name == "prefalign"]


def test_readme_keeps_the_two_commands_and_ci_runs_the_test_one():
    for command in TWO_COMMANDS:
        assert command in README, command
    assert TWO_COMMANDS[1] in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(README.splitlines()) <= 160  # a README a newcomer reads in five minutes


def test_readme_has_prefalign_commands():
    commands = prefalign_commands()
    assert ["demo"] in commands
    assert len(commands) >= 6  # the tour: data check, train, eval, compare, chat


@pytest.mark.parametrize("argv", prefalign_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    """Parses against build_parser(); train commands also resolve (option names and types); named files exist."""
    monkeypatch.chdir(REPO_ROOT)
    for word in argv:
        for part in word.split("="):
            if part.startswith(REPO_DIRS):
                assert (REPO_ROOT / part).exists(), f"README command names {part}, which is not in the repository"
    if "--help" in argv or "-h" in argv:
        result = subprocess.run([sys.executable, "-m", "prefalign", *argv], capture_output=True, text=True,
                                cwd=REPO_ROOT, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: prefalign"), result.stdout[:200]
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's error exit
        pytest.fail(f"README command 'prefalign {' '.join(argv)}' does not parse (exit {e.code})")
    assert callable(getattr(args, "func", None)), argv
    if args.command == "train":
        plan = options.resolve_plan(args)
        assert plan.method in options.METHODS


def test_readme_python_compiles():
    blocks = code_blocks(README, "python")
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")


def test_shell_commands_splits_chains_and_comments():
    block = ("# a comment\nscripts/setup && .venv/bin/prefalign demo   # trailing\n"
             "prefalign eval --model m \\\n  --judge demo\n")
    assert shell_commands(block) == [["scripts/setup"], [".venv/bin/prefalign", "demo"],
                                     ["prefalign", "eval", "--model", "m", "--judge", "demo"]]
