"""The report's error type, in its own module so every stage can raise it without cycles."""

from __future__ import annotations

__all__ = ["ReportError"]


class ReportError(ValueError):
    """Bad report input (no runs, unknown claim or format, unwritable output); one-line message.

    A ``ValueError`` so callers that already catch bad-input errors (the CLI turns them into a
    one-line message and exit code 2) need no special case.
    """
