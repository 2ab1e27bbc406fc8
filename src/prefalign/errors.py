"""User-facing errors: one line that names where the problem is and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence


def row_list(rows: Sequence[int], limit: int = 10) -> str:
    """Row numbers for a message: the first ``limit``, then "..." when there are more."""
    return ", ".join(str(r) for r in rows[:limit]) + (" ..." if len(rows) > limit else "")


def one_line(text: object) -> str:
    """Collapse a message onto one line: every user error is printed as a single ``prefalign: error:`` line."""
    return " ".join(str(text).split())


class PrefalignError(Exception):
    """An error caused by the user's input or configuration, not by a bug.

    The CLI prints ``str(err)`` on one line and exits with code 2; the library raises it so callers can catch it.
    """

    exit_code = 2


class DataError(PrefalignError, ValueError):
    """A problem in a preference dataset, located by file, row and field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None,
                 fix: str | None = None, row_label: str = "row") -> None:
        parts = []
        where = []
        if source:
            where.append(str(source))
        if row is not None:
            where.append(f"{row_label} {row}")
        if field:
            where.append(f"field '{field}'")
        if where:
            parts.append(", ".join(where) + ": ")
        parts.append(message)
        if fix:
            parts.append(f" Fix: {fix}")
        super().__init__("".join(parts))
        self.source, self.row, self.field, self.fix, self.message = source, row, field, fix, message


class ConfigError(PrefalignError, ValueError):
    """An invalid option value or unknown option name."""


class NonFiniteError(PrefalignError):
    """Training produced a NaN or inf loss or gradient."""
