"""Build the bundled demo task (src/prefalign/resources/demo/) from the task generator and the embedded model.

Pairs are on-policy: for each prompt the embedded model samples K replies; every candidate (the samples and the
task's reference reply) is scored by the deterministic demo judge; (best, worst) become (chosen, rejected) and
ties are skipped. Held-out prompts come from pools the training prompts never use (see prefalign/demo/task.py).

    .venv/bin/python scripts/build_demo_data.py [--per-family 50] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from prefalign.demo.task import judge, make_prompts
from prefalign.generate import generate_pairs
from prefalign.models import load_model, load_tokenizer

OUT = Path(__file__).resolve().parent.parent / "src" / "prefalign" / "resources" / "demo"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def pairs_for(rows: list[dict], model, tok, args, seed: int, desc: str) -> tuple[list[dict], dict]:
    bar = tqdm(total=len(rows), desc=desc, file=sys.stderr)
    pairs, stats = generate_pairs(model, tok, rows, judge, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, batch_size=args.batch_size, seed=seed,
                                  progress=bar.update)
    bar.close()
    print(f"{desc}: {stats.line()}", file=sys.stderr)
    return pairs, {k: v for k, v in vars(stats).items() if k != "tie_rows"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-family", type=int, default=50)
    ap.add_argument("--heldout-pairs-per-family", type=int, default=10)
    ap.add_argument("--heldout-prompts-per-family", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    tok, model = load_tokenizer(), load_model()
    train = [p.as_row() for p in make_prompts("train", args.per_family, args.seed)]
    heldout = make_prompts("heldout", args.heldout_pairs_per_family + args.heldout_prompts_per_family, args.seed)
    # Split every family's held-out prompts in two, so both held-out files cover every family (small pools, such
    # as the 16 held-out harmful requests, are split in proportion).
    by_family: dict[str, list[dict]] = {}
    for p in heldout:
        by_family.setdefault(p.family, []).append(p.as_row())
    share = args.heldout_pairs_per_family / (args.heldout_pairs_per_family + args.heldout_prompts_per_family)
    cut = {f: round(len(rows) * share) for f, rows in by_family.items()}
    heldout_pair_rows = [r for f, rows in by_family.items() for r in rows[: cut[f]]]
    heldout_prompt_rows = [r for f, rows in by_family.items() for r in rows[cut[f]:]]
    OUT.mkdir(parents=True, exist_ok=True)
    train_pairs, train_stats = pairs_for(train, model, tok, args, args.seed, "train pairs")
    heldout_pairs, heldout_stats = pairs_for(heldout_pair_rows, model, tok, args, args.seed + 1, "held-out pairs")
    write_jsonl(OUT / "train.jsonl", train_pairs)
    write_jsonl(OUT / "heldout_pairs.jsonl", heldout_pairs)
    write_jsonl(OUT / "heldout_prompts.jsonl", heldout_prompt_rows)
    meta = {"built_with": "scripts/build_demo_data.py", "args": vars(args), "model": "smollm2-135m-instruct",
            "train": train_stats, "heldout_pairs": heldout_stats, "heldout_prompts": len(heldout_prompt_rows),
            "seconds": round(time.time() - t0, 1)}
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
