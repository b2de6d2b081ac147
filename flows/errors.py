"""Errors the command line prints as one line, without a traceback (each names the problem)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""
