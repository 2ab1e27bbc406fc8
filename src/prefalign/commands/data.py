"""``prefalign data``: ``check`` reports on a preference dataset, ``prepare`` writes a cleaned one, ``generate``
builds on-policy pairs with a judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..options import parse_columns, parse_template_kwargs
from . import PROG, progress_bar


def check(args: argparse.Namespace) -> int:
    """Print `prefalign.data.check.check_dataset`'s report; exit code 2 if training would refuse the data."""
    from ..data.check import check_dataset, check_settings
    from ..models import DEFAULT_MODEL, load_tokenizer

    # --max-length not given: check_dataset's default, which is the config default.
    limits = {"max_length": args.max_length} if "max_length" in args.explicit else {}
    limits["max_prompt_length"] = args.max_prompt_length
    check_settings(**limits)  # bad options fail before the tokenizer loads
    columns = parse_columns(args.columns)
    kwargs = parse_template_kwargs(args.chat_template_kwargs)
    model = args.model or DEFAULT_MODEL
    report = check_dataset(args.source, tokenizer=load_tokenizer(model), tokenizer_name=model, split=args.split,
                           columns=columns, text_format=args.text_format, chat_template_kwargs=kwargs, **limits)
    print(report.to_json() if args.json else report.render_text())
    return 0 if report.ok else 2


def generate(args: argparse.Namespace) -> int:
    """Sample, judge and write pairs; refuses to replace an existing file without --overwrite."""
    from ..generate import generate_pairs, read_prompt_rows, write_jsonl_atomic
    from ..judges import as_score_fn, load_judge
    from ..models import load_model, load_tokenizer

    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples} is out of range: must be >= 1.")
    if Path(args.output).exists() and not args.overwrite:
        raise ConfigError(f"{args.output} already exists. Fix: choose another --output or pass --overwrite.")
    kwargs = parse_template_kwargs(args.chat_template_kwargs)
    rows = read_prompt_rows(args.prompts)
    judge = load_judge(args.judge)
    tok, model = load_tokenizer(args.model), load_model(args.model)
    progress = progress_bar("generating", len(rows))
    pairs, stats = generate_pairs(model, tok, rows, as_score_fn(judge), samples=args.samples,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  batch_size=args.batch_size, seed=args.seed, progress=progress,
                                  chat_template_kwargs=kwargs)
    write_jsonl_atomic(args.output, pairs)
    print(f"{PROG}: wrote {args.output}: {stats.line()}")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Clean and normalise a dataset into a conversational JSONL (data/prepare.py); refuses to replace a file."""
    from ..data.prepare import PrepareSettings, prepare_rows, split_prepared, write_prepared

    if (args.heldout is None) != (args.heldout_size is None):
        raise ConfigError("--heldout and --heldout-size go together. Fix: give both (--heldout heldout.jsonl "
                          "--heldout-size 200) or neither")
    outputs = [("--output", args.output)] + ([("--heldout", args.heldout)] if args.heldout else [])
    if args.heldout and Path(args.heldout).resolve() == Path(args.output).resolve():
        raise ConfigError("--heldout names the same file as --output. Fix: give the held-out rows their own file")
    for flag, out in outputs:
        if Path(out).exists() and not args.overwrite:
            raise ConfigError(f"{out} already exists. Fix: choose another {flag} or pass --overwrite.")
        if not Path(out).resolve().parent.is_dir():
            raise ConfigError(f"{flag} {out}: no such directory. Fix: create it first.")
    if args.min_score_margin < 0:
        raise ConfigError(f"--min-score-margin {args.min_score_margin} is out of range: must be >= 0.")
    settings = PrepareSettings(columns=parse_columns(args.columns), split=args.split, text_format=args.text_format,
                               pairing=args.pairing, min_score_margin=args.min_score_margin, seed=args.seed,
                               dedupe_prompts=args.dedupe_prompts, keep=args.keep, drop=args.drop,
                               max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    tokenizer = None
    if args.max_length is not None or args.max_prompt_length is not None:
        from ..data.check import check_settings
        from ..models import DEFAULT_MODEL, load_tokenizer

        if args.max_length is not None:
            check_settings(args.max_length, args.max_prompt_length)  # the config's rules for the limits
        tokenizer = load_tokenizer(args.model or DEFAULT_MODEL)
    rows, report = prepare_rows(args.source, settings, tokenizer)
    if args.heldout:
        rows, held, report, held_report = split_prepared(rows, report, args.heldout_size, args.seed, args.heldout)
        write_prepared(held, held_report, args.heldout)
    report_path = write_prepared(rows, report, args.output)
    print(f"{PROG}: {report.line()} (report: {report_path})")
    return 0
