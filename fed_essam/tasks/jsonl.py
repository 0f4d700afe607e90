"""Problems from a GSM8K-format JSON-lines file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from fed_essam.tasks.errors import TaskDataError, TaskDataWarning
from fed_essam.tasks.gsm8k_format import problem_from_record
from fed_essam.tasks.problem import Problem

ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")


def load_jsonl(path: str | Path, *, on_error: str = "raise") -> list[Problem]:
    """Read every problem of a GSM8K-format JSONL file.

    Parameters
    ----------
    path : str or Path
        File with one ``{"question": ..., "answer": "...\\n#### 42"}`` object
        per line; blank lines are ignored.
    on_error : {"raise", "skip"}, optional
        On a bad line (invalid UTF-8 or JSON, missing field, no ``####``
        number): raise, or skip it and warn once with the count skipped.

    Returns
    -------
    list of Problem
        In file order; ``metadata`` holds ``task="gsm8k"``, ``difficulty``
        (reasoning lines), ``path`` and ``line`` (1-based).

    Raises
    ------
    TaskDataError
        If the file is missing, unreadable or holds no problem, or (with
        ``on_error="raise"``) on the first bad line, as ``"<path>:<line>: <reason>"``.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise TaskDataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    file = Path(path)
    try:
        raw_lines = file.read_bytes().splitlines()
    except FileNotFoundError as error:
        raise TaskDataError(
            f"{file}: file not found (task=jsonl needs task.path=FILE, a GSM8K-format JSONL file)"
        ) from error
    except OSError as error:
        raise TaskDataError(f"{file}: cannot read file: {error}") from error
    problems, skipped = [], []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}") from error
            metadata = {"path": str(file), "line": number}
            problems.append(problem_from_record(record, source=f"jsonl:{file}", metadata=metadata))
        except ValueError as error:
            reason = f"{file}:{number}: {error}"
            if on_error == "raise":
                raise TaskDataError(reason) from error
            skipped.append(reason)
    if skipped:
        warnings.warn(
            f"{file}: skipped {len(skipped)} invalid line(s); first: {skipped[0]}", TaskDataWarning, stacklevel=2
        )
    if not problems:
        detail = f" ({len(skipped)} invalid line(s) skipped)" if skipped else ""
        raise TaskDataError(f"{file}: the file contains no problems{detail}")
    return problems
