"""The ``prefalign`` commands, one module each; `prefalign.cli` parses the arguments and dispatches to them.

Every command takes the parsed ``argparse.Namespace`` and returns an exit code; user errors are raised as
`prefalign.errors.PrefalignError`, which the CLI prints as one ``prefalign: error: ...`` line. Modules import the
heavy libraries (torch, transformers) inside the command, so ``prefalign --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import one_line

PROG = "prefalign"


def print_error(message: object) -> None:
    """Print a message the way every prefalign user error looks: one ``prefalign: error: ...`` line on stderr."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


def progress_bar(desc: str, total: int) -> Callable[[int], None]:
    """A stderr bar counting ``total`` items; returns its ``update(n)``, the progress callback the library takes."""
    from ..progress import counter

    return counter(desc, total).update
