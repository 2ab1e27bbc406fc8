"""Run the alignment-handbook's 22 recipes (tests/handbook/) through `prefalign train` on tiny local stand-ins and
print recipe → ran / failed (with the one-line error) and the count. The acceptance check of issue 22, item 5.

    PYTHONPATH=src python scripts/handbook_check.py [-k SUBSTRING] [--keep DIR] [--layout saved]

``--layout saved`` gives the datasets as ``save_to_disk`` directories instead of hub snapshots: a diagnostic that
shows what fails behind the snapshot layout (the target is the default, ``hub``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from handbook_fixtures import recipe_id, recipe_paths, run_one  # noqa: E402

from tiny import save_tiny  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default="", help="only recipes whose path contains this")
    p.add_argument("--layout", choices=("hub", "saved"), default="hub", help="dataset stand-ins as hub snapshots "
                   "(the target) or save_to_disk directories (a diagnostic)")
    p.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one, removed)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        import datasets  # its cache keys a local directory by name, not contents: use a fresh one

        datasets.config.HF_DATASETS_CACHE = work / "hf-datasets-cache"
        model = save_tiny(work / "tiny-model")
        results = []
        for path in [p for p in recipe_paths() if args.k in recipe_id(p)]:
            start = time.perf_counter()
            ok, message = run_one(path, work / "runs", model, work / f"data-{args.layout}",
                                  args.layout)
            message = message.replace(str(work), "<work>")
            results.append((recipe_id(path), ok, message, time.perf_counter() - start))
            print(f"{'ran   ' if ok else 'FAILED'} {recipe_id(path):45s} {message}", flush=True)
    width = max(len(r[0]) for r in results)
    print(f"\n| recipe{' ' * (width - 6)} | result | s | error |\n|{'-' * (width + 2)}|---|---|---|")
    for rid, ok, message, secs in results:
        print(f"| {rid:{width}s} | {'ran' if ok else 'failed'} | {secs:.0f} | {'' if ok else message} |")
    print(f"\n{sum(r[1] for r in results)}/{len(results)} recipes ran")
    return 0 if all(r[1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
