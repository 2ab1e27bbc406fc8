"""``prefalign eval``: a model against its reference on held-out pairs, judged prompts and edge-case probes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..options import parse_template_kwargs
from . import PROG, progress_bar


def run(args: argparse.Namespace) -> int:
    """Load policy and reference, evaluate, write eval.json and eval.md, print the Markdown."""
    from ..data.load import load_preference_dataset
    from ..evaluate import evaluate_models
    from ..generate import EDGE_CASE_PROMPTS, read_prompt_rows
    from ..judges import load_judge
    from ..models import DEFAULT_MODEL, load_model, load_tokenizer

    if not args.pairs and not args.prompts:
        raise ConfigError("nothing to evaluate. Fix: give --pairs FILE, --prompts FILE, or both.")
    kwargs = parse_template_kwargs(args.chat_template_kwargs)
    pairs = load_preference_dataset(args.pairs).to_list() if args.pairs else []
    prompts = read_prompt_rows(args.prompts) if args.prompts else []
    judge = load_judge(args.judge, args.pass_threshold)
    ref_name = args.ref or DEFAULT_MODEL
    tok = load_tokenizer(args.model)
    policy, reference = load_model(args.model), load_model(ref_name)
    report = evaluate_models(policy, reference, tok, judge, policy_name=args.model, reference_name=ref_name,
                             pair_rows=pairs, prompt_rows=prompts, beta=args.beta,
                             edge_cases=() if args.no_edge_cases or not prompts else EDGE_CASE_PROMPTS,
                             max_new_tokens=args.max_new_tokens, progress=progress_bar, chat_template_kwargs=kwargs)
    out = args.output_dir or (args.model if Path(args.model).is_dir() else "runs/eval")
    js, md = report.write(out)
    print(report.to_markdown())
    print(f"{PROG}: wrote {js} and {md}")
    return 0
