"""Errors the command line prints as one line, without a traceback (each names the problem)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (MLflow's ``message`` when it has
    one), at most ``limit`` characters; its type's name when the message is empty."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""
