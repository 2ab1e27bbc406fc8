"""``prefalign chat``: try a model by hand, optionally next to its reference, interactively or on given prompts."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, PrefalignError
from ..options import parse_template_kwargs
from . import PROG, print_error

COMMANDS_HELP = """\
commands:
  /reset   forget the conversation (every model's history; the system message stays)
  /quit    leave (also /exit, Ctrl-D, or Ctrl-C at the prompt)
  /help    this list
An empty line sends an empty message (an edge case worth trying); start a message with // to send one that begins
with /. Ctrl-C during a reply stops it, and that turn is kept in no model's history."""

MIN_COLUMNS_WIDTH = 60


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first (options, prompts), then load the models and chat or answer the prompts."""
    from ..chat import GenerationOptions, read_chat_prompts

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                seed=args.seed).validate()
    prompts: list[Any] = list(args.prompt or [])
    if args.prompts:
        prompts += read_chat_prompts(args.prompts)
    given = bool(args.prompt) or bool(args.prompts)
    if args.json and not given:
        raise ConfigError("--json is for answering given prompts. Fix: add --prompt TEXT or --prompts FILE")
    sessions = _load(args, options, parse_template_kwargs(args.chat_template_kwargs))
    width = shutil.get_terminal_size().columns
    columns = args.layout == "columns" and len(sessions) > 1 and width >= MIN_COLUMNS_WIDTH
    if given:
        try:
            return _answer(sessions, prompts, as_json=args.json, columns=columns, width=width)
        except KeyboardInterrupt:
            print_error("interrupted")
            return 130
    return _interactive(sessions, args, options, columns=columns, width=width)


def _load(args: argparse.Namespace, options: Any, kwargs: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """(label, session) per model: the run's model alone ("model"), or "policy" and "reference" with --against."""
    from ..chat import ChatSession, chat_tokenizer_source
    from ..models import load_model, load_tokenizer

    names = [args.run_dir] + ([args.against] if args.against else [])
    labels = ["policy", "reference"] if args.against else ["model"]
    sessions = []
    for label, name in zip(labels, names, strict=True):
        print(f"{PROG}: loading {label} {name} ...", file=sys.stderr, flush=True)
        tokenizer = load_tokenizer(chat_tokenizer_source(name))
        sessions.append((label, ChatSession(load_model(name), tokenizer, options, system=args.system,
                                            chat_template_kwargs=kwargs)))
    return sessions


def _turn(sessions: Sequence[tuple[str, Any]], prompt: Any, *, columns: bool, width: int) -> list[str]:
    """Every model's reply to one prompt: streamed in labelled blocks, or printed side by side once complete."""
    from ..chat import side_by_side

    replies = []
    if columns:
        print(f"({' and '.join(label for label, _ in sessions)} replying ...)", flush=True)
    for label, session in sessions:
        shown: list[str] = []

        def show(text: str, shown: list[str] = shown) -> None:
            if not shown:
                text = text.lstrip()  # the reply is stripped; so is what is shown of it
                if not text:
                    return
            shown.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()

        if not columns:
            print(f"{label}> ", end="", flush=True)
        reply, dropped = session.respond(prompt, None if columns else show)
        if not columns:
            print("" if reply else "(empty reply)", flush=True)
        if dropped:
            print(f"({label}: the {dropped} oldest turns were dropped to fit the model's context)", flush=True)
        replies.append(reply)
    if columns:
        print(side_by_side([(f"{label}>", r or "(empty reply)") for (label, _), r in zip(sessions, replies,
                                                                                         strict=True)], width))
    return replies


def _answer(sessions: Sequence[tuple[str, Any]], prompts: Sequence[Any], *, as_json: bool, columns: bool,
            width: int) -> int:
    """Each prompt answered from a fresh conversation: its reply (and the reference's), as text or JSON lines."""
    from ..generate import prompt_text

    for prompt in prompts:
        for _, session in sessions:
            session.reset()
        if as_json:
            row: dict[str, Any] = {"prompt": prompt}
            for label, session in sessions:
                row["reply" if label in ("model", "policy") else "reference_reply"] = session.respond(prompt)[0]
            print(json.dumps(row, ensure_ascii=False), flush=True)
            continue
        print(f"prompt> {prompt_text(prompt)}")
        _turn(sessions, prompt, columns=columns, width=width)
        print()
    return 0


def _interactive(sessions: Sequence[tuple[str, Any]], args: argparse.Namespace, options: Any, *, columns: bool,
                 width: int) -> int:
    """The read-reply loop; /quit, EOF and Ctrl-C at the prompt leave with exit code 0."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and ↑ history for input())
    who = f"{args.run_dir}" + (f" (policy) against {args.against} (reference)" if args.against else "")
    print(f"{PROG} chat: {who}; {options.describe()}.")
    if args.system is not None:
        print(f"system: {args.system}")
    print("/help lists the commands, /quit leaves.", flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip().split(maxsplit=1)[0].lower() if line.strip().startswith("/") else ""
        if command and not line.strip().startswith("//"):
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                for _, session in sessions:
                    session.reset()
                print("(conversation reset)", flush=True)
            elif command == "/help":
                print(COMMANDS_HELP, flush=True)
            else:
                print(f"(unknown command {command}; /help lists the commands)", flush=True)
            continue
        prompt = line.strip()[1:] if line.strip().startswith("//") else line
        try:
            replies = _turn(sessions, prompt, columns=columns, width=width)
        except KeyboardInterrupt:
            print("\n(interrupted; this turn is not kept)", flush=True)
            continue
        except PrefalignError as e:
            print_error(e)
            continue
        for (_, session), reply in zip(sessions, replies, strict=True):
            session.record(prompt, reply)
