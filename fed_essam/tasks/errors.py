"""Errors and warnings raised while loading task data."""

from __future__ import annotations


class TaskDataError(ValueError):
    """Task data could not be loaded or is malformed.

    The message names the cause and, where there is one, the file and the
    1-based line number (``path:line: reason``).
    """


class TaskDataWarning(UserWarning):
    """Some task data was skipped (``on_error="skip"``) or could not be used."""
