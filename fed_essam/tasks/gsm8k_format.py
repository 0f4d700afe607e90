"""The GSM8K record format: ``{"question": ..., "answer": "...worked solution...\\n#### 42"}``."""

from __future__ import annotations

import re
from typing import Any

from fed_essam.tasks.answers import as_number, normalize_answer
from fed_essam.tasks.problem import Problem

_CALCULATOR_RE = re.compile(r"<<[^<>\n]*>>")


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"2*3=<<2*3=6>>6"`` -> ``"2*3=6"``.

    Parameters
    ----------
    text : str
        A GSM8K worked solution.

    Returns
    -------
    str
        The text without ``<<...>>`` spans.
    """
    return _CALCULATOR_RE.sub("", text)


def problem_from_record(record: Any, *, source: str, metadata: dict[str, Any]) -> Problem:
    """Build a :class:`Problem` from one GSM8K-format record.

    Parameters
    ----------
    record : Any
        The decoded record; must be a mapping with non-empty string fields
        ``question`` and ``answer``, the answer ending in ``#### <number>``.
    source : str
        ``Problem.source`` value.
    metadata : dict
        Extra metadata (file, line, ...); ``task`` defaults to ``"gsm8k"`` and
        ``difficulty`` is set to the number of reasoning lines.

    Returns
    -------
    Problem
        Solution without calculator annotations, ending in ``#### <answer>``,
        and the answer in canonical form (``"1,000"`` -> ``"1000"``).

    Raises
    ------
    ValueError
        With a message naming the problem (missing field, no ``####`` number).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with 'question' and 'answer', got {type(record).__name__}")
    for key in ("question", "answer"):
        if key not in record:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
    body, hashes, final = record["answer"].rpartition("####")
    answer = normalize_answer(final) if hashes else None
    if answer is None or as_number(answer) is None:
        raise ValueError("answer has no final '#### <number>' line")
    steps = [line.strip() for line in strip_calculator_annotations(body).strip().splitlines() if line.strip()]
    solution = "\n".join(steps + [f"#### {answer}"])
    full_metadata = {"task": "gsm8k", "difficulty": max(len(steps), 1), **metadata}
    return Problem(
        question=record["question"].strip(),
        solution=solution,
        answer=answer,
        source=source,
        metadata=full_metadata,
    )
