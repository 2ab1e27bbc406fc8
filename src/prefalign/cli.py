"""The ``prefalign`` command line: argument parsing and dispatch to `prefalign.commands`.

``prefalign train [CONFIG.yaml] [--set key=value ...] [flags]`` trains with DPO or ORPO and writes a run directory
(see `prefalign.runs`; options resolved by `prefalign.options`); ``prefalign data check SOURCE`` reports a preference
dataset's format, problems and token lengths without training; ``data generate``, ``eval`` and ``demo`` build pairs,
evaluate and run the bundled demo; ``report RUN_DIR`` writes a run's curves and report.html; ``compare CONFIG.yaml``
trains a grid of runs and writes one report; ``chat RUN_DIR`` tries a
model by hand (optionally next to a reference); ``dpo|orpo|cpo|kto|sft [--config FILE.yaml] [--OPTION VALUE ...]``
is TRL's command line (parsed by `prefalign.commands.trl_cli`), the same run as ``train``. User errors print
``prefalign: error: <one line>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from .commands import PROG, print_error, trl_cli
from .commands import chat as chat_command
from .commands import compare as compare_command
from .commands import data as data_command
from .commands import demo as demo_command
from .commands import eval as eval_command
from .commands import report as report_command
from .commands import train as train_command
from .errors import PrefalignError, one_line
from .options import METHODS


# ----- parsing ---------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error, like every other prefalign error, and no abbreviated options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _count_or_fraction(text: str) -> int | float:
    """A row count (200) or a fraction of the rows (0.2), for --heldout-size; the range is checked against the rows."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row count or a fraction, got {text!r}") from None


def _int_or_none(text: str) -> int | None:
    """An integer option that also takes 'none' (no limit), e.g. --max-length none."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each (sub)command sets ``func``, the `prefalign.commands` function that runs it."""
    parser = _Parser(prog=PROG, description="Preference alignment (DPO, ORPO) for causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train_parser(sub)
    _add_data_parser(sub)
    _add_eval_parser(sub)
    _add_demo_parser(sub)
    _add_report_parser(sub)
    _add_compare_parser(sub)
    _add_chat_parser(sub)
    for name in trl_cli.COMMANDS:  # parsed by trl_cli (see main); listed here for --help
        sub.add_parser(name, add_help=False, help=f"TRL's `trl {name}` command line: [--config FILE.yaml] [--OPTION "
                                                  f"VALUE ...] (see '{PROG} {name} --help')")
    return parser


TRAIN_EPILOG = """\
CONFIG.yaml is a flat mapping of run keys (method, model, ref_model, dataset, split, eval_dataset, eval_split,
columns, dataset_mixture, eval_split_size) and any field of DPOConfig / ORPOConfig (which extend
transformers.TrainingArguments), e.g.

  method: orpo
  model: smollm2-135m-instruct
  dataset: pairs.jsonl
  columns: {prompt: question, chosen: good, rejected: bad}
  learning_rate: 5.0e-6
  max_length: 512

TRL / alignment-handbook recipes work too (model_name_or_path, torch_dtype, dataset_name, dataset_mixture, use_peft,
lora_r, ...; pass --method, which TRL takes from its subcommand); see the README's recipe section.

Precedence: CONFIG.yaml < --set < the explicit flags. Defaults that differ from the library: logging_steps 1,
report_to none, save_strategy no (the final model is saved anyway), cpu_allocator_cache true (this process is the
run), use_cpu when there is no CUDA.
The run directory gets the model + tokenizer, config.yaml (the resolved config: `prefalign train config.yaml`
repeats the run), metrics.jsonl, data_report.json, and report.html with plots/*.png (see prefalign report)."""


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model on preference pairs (DPO, ORPO, CPO, SimPO)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a causal LM on preference pairs and write a run directory.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML file of options (see below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_pairs",
                   help="set any option; VALUE is read as YAML (numbers, true/false, [lists]). Repeatable")
    p.add_argument("--method", choices=METHODS, help="training method (default: dpo; simpo is cpo with SimPO's "
                                                      "loss and defaults)")
    p.add_argument("--model", help="embedded model name, local directory or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--ref-model", help="DPO reference model (default: a frozen copy of --model)")
    p.add_argument("--dataset", metavar="SRC", help=".jsonl/.json/.csv/.parquet file (optionally .gz/.bz2/.xz/.zst), "
                                                    "saved dataset dir or hub id")
    p.add_argument("--eval-dataset", metavar="SRC", help="evaluation pairs, evaluated once after training "
                                                         "(split: eval_split, default test)")
    p.add_argument("--columns", metavar="prompt=q,chosen=a,...", help="map your column names onto prompt, chosen, "
                                                                      "rejected, system")
    p.add_argument("--split", help="dataset split to train on (default: train)")
    p.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<method>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--beta", type=float, metavar="B",
                   help="DPO: beta (KL strength). ORPO: sets orpo_alpha, the odds-ratio weight (TRL's ORPO beta). "
                        "CPO / SimPO: beta (the reward temperature)")
    p.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate")
    p.add_argument("--batch-size", type=int, metavar="N", help="pairs per device per step "
                                                               "(per_device_train_batch_size)")
    p.add_argument("--max-length", type=_int_or_none, metavar="N", help="max tokens of prompt + reply ('none': no "
                                                                        "limit)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", action="store_true", help="continue from the output directory's latest complete "
                                                         "checkpoint (same config; exact: weights, optimizer, RNG, "
                                                         "data order)")
    p.set_defaults(func=train_command.run)


def _add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect preference datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser, required=True)
    p = data_sub.add_parser("check", help="report format, problems and token lengths of a dataset",
                            description="Report a dataset's format, every problem row, and token lengths under the "
                                        "model's chat template. Exit code 0 if training would accept it, else 2.")
    p.add_argument("source", metavar="SOURCE", help="file, saved dataset directory or hub id")
    p.add_argument("--model", help="model whose tokenizer and chat template to use (default: smollm2-135m-instruct)")
    p.add_argument("--split", default="train", help="split to check (default: train)")
    p.add_argument("--columns", metavar="prompt=q,chosen=a,...", help="map your column names onto prompt, chosen, "
                                                                      "rejected, system")
    p.add_argument("--max-length", type=_int_or_none, metavar="N", help="count rows this would cut or reject "
                                                                        "(default: the config default)")
    p.add_argument("--max-prompt-length", type=_int_or_none, metavar="N", help="count prompts this would cut")
    p.add_argument("--text-format", choices=("auto", "raw"), default="auto",
                   help="auto: HH-RLHF dialogue text becomes conversations, as training reads it; raw: text as is")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--chat-template-kwargs", metavar="JSON", help=CHAT_TEMPLATE_KWARGS_HELP)
    p.set_defaults(func=data_command.check)

    q = data_sub.add_parser("prepare", help="write a cleaned, normalised conversational JSONL and a report",
                            description="Read any supported source (compressed, HH-RLHF text, scored completions), "
                                        "drop invalid rows, duplicates, rows filtered by --keep / --drop and rows "
                                        "over the length limits, each counted with its source row, and write the "
                                        "rest as conversations (prefalign train reads the file with no further "
                                        "options) plus OUTPUT.report.json; with --heldout, a seeded, "
                                        "prompt-disjoint part goes to that file instead (with its own report). "
                                        "Files appear whole or not at all.")
    q.add_argument("source", metavar="SOURCE", help="file (optionally compressed), saved dataset directory or hub id")
    q.add_argument("--output", required=True, metavar="OUT.jsonl", help="where to write the cleaned rows")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    q.add_argument("--split", default="train", help="split to read (default: train)")
    q.add_argument("--columns", metavar="prompt=q,chosen=a,...", help="map your column names onto prompt, chosen, "
                                                                      "rejected, system")
    q.add_argument("--text-format", choices=("auto", "raw"), default="auto",
                   help="auto: HH-RLHF dialogue text becomes conversations; raw: text as is")
    q.add_argument("--pairing", choices=("best_worst", "best_random", "all_pairs"), default="best_worst",
                   help="how scored completions become pairs (default: best_worst)")
    q.add_argument("--min-score-margin", type=float, default=0.0, metavar="M",
                   help="keep scored pairs whose scores differ by at least M (ties are always dropped)")
    q.add_argument("--seed", type=int, default=0, help="seed of best_random pairing and of the held-out rows "
                                                       "(default: 0)")
    q.add_argument("--heldout", metavar="HELDOUT.jsonl", help="write a held-out part of the cleaned rows here, "
                                                              "prompt-disjoint from --output's (rows opening with "
                                                              "the same user message stay together)")
    q.add_argument("--heldout-size", type=_count_or_fraction, metavar="N", help="rows held out: a count (200) or "
                                                                                "a fraction (0.2); with --heldout")
    q.add_argument("--dedupe-prompts", action="store_true", help="keep only the first pair of each prompt")
    q.add_argument("--keep", metavar="REGEX", help="keep only rows whose prompt matches (Python regex, searched)")
    q.add_argument("--drop", metavar="REGEX", help="drop rows whose prompt matches (Python regex, searched)")
    q.add_argument("--max-length", type=_int_or_none, metavar="N", help="drop rows whose prompt + longer reply is "
                                                                        "over N tokens under the model's template")
    q.add_argument("--max-prompt-length", type=_int_or_none, metavar="N", help="drop rows whose prompt is over N "
                                                                               "tokens")
    q.add_argument("--model", help="tokenizer and chat template for the length limits (default: "
                                   "smollm2-135m-instruct)")
    q.set_defaults(func=data_command.prepare)

    g = data_sub.add_parser("generate", help="sample replies, score them with a judge, write (best, worst) pairs",
                            description="On-policy pair generation: sample K replies per prompt from the model, "
                                        "score each (and the row's optional 'reference' reply) with the judge, and "
                                        "write (best, worst) as (chosen, rejected) with their scores. Ties are "
                                        "skipped and counted.")
    g.add_argument("--model", help="model to sample from (default: smollm2-135m-instruct)")
    g.add_argument("--prompts", required=True, metavar="FILE", help="rows with 'prompt' (text or messages) and "
                                                                     "optionally 'reference'; other fields are kept")
    g.add_argument("--judge", required=True, metavar="SPEC", help=JUDGE_HELP)
    g.add_argument("--samples", type=int, default=4, metavar="K", help="replies sampled per prompt (default: 4)")
    g.add_argument("--output", required=True, metavar="FILE.jsonl", help="where to write the pairs")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit (default: 48)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.add_argument("--chat-template-kwargs", metavar="JSON", help=CHAT_TEMPLATE_KWARGS_HELP)
    g.set_defaults(func=data_command.generate)


JUDGE_HELP = ("a judge name ('demo': the bundled task's judge; packages add more under the prefalign.judges entry "
              "points), 'module:function' (f(prompt, reply) -> float or None), or 'reward-model:PATH' (a "
              "sequence-classification model)")


CHAT_TEMPLATE_KWARGS_HELP = ("keyword arguments for the chat template as a JSON object, e.g. "
                             "'{\"enable_thinking\": false}' (TRL's chat_template_kwargs); rows' own "
                             "chat_template_kwargs are merged over them")


def _add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="compare a model with its reference on held-out pairs and prompts",
                       description="Held-out evaluation: reward accuracy and margin on pairs (policy vs reference), "
                                   "judged greedy generations on prompts (pass rate, mean score, win rate, length), "
                                   "and edge-case prompts. Writes eval.json and eval.md.")
    p.add_argument("--model", required=True, help="the trained model (run directory, hub id or embedded name)")
    p.add_argument("--ref", help="reference model (default: smollm2-135m-instruct)")
    p.add_argument("--pairs", metavar="FILE", help="held-out preference pairs")
    p.add_argument("--prompts", metavar="FILE", help="held-out prompts (rows with 'prompt')")
    p.add_argument("--judge", default="demo", metavar="SPEC", help=JUDGE_HELP + " (default: demo)")
    p.add_argument("--pass-threshold", type=float, help="score that counts as a pass (default: 1.0; reward models 0)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward on pairs (default: 0.1)")
    p.add_argument("--output-dir", default=None, help="where to write eval.json/eval.md (default: the model dir, "
                                                      "or runs/eval)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-edge-cases", action="store_true", help="skip the built-in edge-case prompts")
    p.add_argument("--chat-template-kwargs", metavar="JSON", help=CHAT_TEMPLATE_KWARGS_HELP)
    p.set_defaults(func=eval_command.run)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="base vs DPO vs ORPO on the bundled task, judged on held-out data",
                       description="Train DPO and ORPO from the embedded model on the bundled task and compare them "
                                   "with the base model on held-out pairs and prompts; prints one table.")
    p.add_argument("--output-dir", default="runs/demo", help="where reports and models go (default: runs/demo)")
    p.add_argument("--model", help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo_command.run)


def _add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write a run's training curves and report.html",
                       description="Read RUN_DIR/metrics.jsonl (and config.yaml) and write RUN_DIR/report.html, one "
                                   "self-contained page (summary of final train and eval metrics, training curves), "
                                   "and the curves as RUN_DIR/plots/*.png. prefalign train does this at its end.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the output_dir of a training run)")
    p.set_defaults(func=report_command.run)


def _add_compare_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="train a grid of methods and options, score them on held-out data, report",
                       description="Train every run of CONFIG.yaml's grid (a base recipe plus grid: {method: {option: "
                                   "[values]}}) into OUTPUT_DIR/<run>, score each against the base model on the "
                                   "held-out pairs and prompts, and write OUTPUT_DIR/report.html, report.md and "
                                   "summary.csv. Exit code 1 if a run failed (its row says why), 2 for bad input.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the compare recipe (see the README's Comparing runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_pairs",
                   help="set a key of the base recipe (every run) or of the compare; VALUE is YAML. Repeatable")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and cached scores, train the rest")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory's runs")
    p.set_defaults(func=compare_command.run)


CHAT_EPILOG = """\
Interactive commands: /reset (forget the conversation), /quit (also Ctrl-D, or Ctrl-C at the prompt), /help.
Each model keeps its own history (its own replies); --prompt / --prompts answer each prompt from a fresh
conversation and exit. Output: with --layout stacked (default) each reply streams as it is generated, in labelled
blocks one after the other (policy>, then reference>); --layout columns (with --against, in a terminal at least
60 columns wide, else stacked) prints both replies side by side once both are complete, without streaming."""


def _add_chat_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="talk to a model by hand, optionally next to its reference",
                       epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="An interactive session with a model (its chat template, streamed replies, "
                                   "history), showing with --against the reference model's reply to the same "
                                   "prompt: for trying diverse prompts and edge cases (empty, very long, off-task).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory, saved model or PEFT adapter directory, "
                                                      "embedded model name or hub id")
    p.add_argument("--against", metavar="REF", help="reference model to answer the same prompts (e.g. the base)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="answer TEXT and exit (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="answer each prompt and exit: .txt one per line, or rows with "
                                                     "'prompt' (text or messages) in .jsonl/.json/.csv/...")
    p.add_argument("--json", action="store_true", help="with --prompt/--prompts: one JSON object per prompt "
                                                       "(prompt, reply, reference_reply)")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of every conversation")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="reply length limit (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default), else sample")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (default: "
                                                                     "0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 0; 1 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--layout", choices=("stacked", "columns"), default="stacked",
                   help="how replies are shown next to the reference's (see below)")
    p.add_argument("--chat-template-kwargs", metavar="JSON", help=CHAT_TEMPLATE_KWARGS_HELP)
    p.set_defaults(func=chat_command.run)


# ----- logging and dispatch --------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """Show the library's warnings (truncation counts, duplicates) as ``prefalign: ...`` lines while a command runs."""

    class _Stderr(logging.StreamHandler):
        @property  # type: ignore[override]
        def stream(self) -> Any:  # the current sys.stderr, so captured streams in tests stay valid
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{PROG}: {record.levelname.lower()}: {one_line(record.getMessage())}"

    handler = _Stderr()
    handler.setFormatter(_Format())
    logger = logging.getLogger("prefalign")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' own bars ("Loading weights", "Writing model shards"); hub download bars stay."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5.x; without it the bars just show
    if set_hook is None:
        yield
        return
    previous = set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_hook(previous)


def _explicit_options(argv: Sequence[str]) -> set[str]:
    """Which --options were typed, so 'none' can be told from 'not given'."""
    return {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    """The console entry point: parse, run the command, turn a `PrefalignError` into one line and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] and argv[0] in trl_cli.COMMANDS:  # options built from the method's config class
            args = trl_cli.parse_args(argv[0], argv[1:], _Parser)
        else:
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    args.explicit = _explicit_options(argv)
    try:
        with cli_logging(), quiet_transformers_bars():
            return func(args)
    except PrefalignError as e:
        for line in getattr(e, "lines", None) or [e]:  # several start-up refusals: one line each
            print_error(line)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
