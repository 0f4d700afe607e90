"""Grading a completion against a problem, with reasoning-gym's own checker when it has one."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from fed_essam.tasks.answers import as_number, extract_answer, is_correct
from fed_essam.tasks.problem import Problem

SCORE_THRESHOLD = 1.0
"""A reasoning-gym ``score_answer`` at or above this counts as correct (1.0 = exact)."""

_MAX_EXPRESSION_CHARS = 200
_EXPRESSION_RE = re.compile(r"[\d\s+\-*/().]+")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_SYMBOLS = (("\\times", "*"), ("\\cdot", "*"), ("\u00d7", "*"), ("\\div", "/"), ("\u00f7", "/"), ("\u2212", "-"))


def _clean_expression(text: str) -> str | None:
    """Keep a candidate only if it is plain ``+ - * / ( )`` integer arithmetic."""
    for symbol, replacement in _SYMBOLS:
        text = text.replace(symbol, replacement)
    text = re.sub(r"[$`]|\\[()\[\]]", "", text).strip().rstrip(".").strip()
    sides = [side.strip() for side in text.split("=")]
    with_operator = [side for side in sides if re.search(r"\d\s*[-+*/]\s*[\d(]", side)]
    text = with_operator[0] if with_operator else sides[0]
    if not text or len(text) > _MAX_EXPRESSION_CHARS or "**" in text or "//" in text:
        return None
    return text if _EXPRESSION_RE.fullmatch(text) else None


def extract_expression(text: str) -> str | None:
    """Extract an arithmetic-expression answer (``countdown``) from a completion.

    Looks, in order, at the text after the first ``####``, the last
    ``\\boxed{}``, the last "answer is"/"answer:" and the last non-empty line;
    ``\\times``/``×`` become ``*``, ``÷`` becomes ``/``, and a trailing
    ``= <target>`` is dropped.

    Parameters
    ----------
    text : str
        Model completion.

    Returns
    -------
    str or None
        The expression, or ``None`` if no candidate is plain integer
        ``+ - * / ( )`` arithmetic (which also keeps anything else away from
        sympy's ``parse_expr`` inside the checker). Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    hashes = [match.group(1) for match in _HASHES_RE.finditer(text)][:1]
    boxed = [match.group(1) for match in _BOXED_RE.finditer(text)][-1:]
    answer_is = [match.group(1) for match in _ANSWER_IS_RE.finditer(text)][-1:]
    last_line = [line for line in text.splitlines() if line.strip()][-1:]
    for candidate in hashes + boxed + answer_is + last_line:
        expression = _clean_expression(candidate)
        if expression is not None:
            return expression
    return None


def _reasoning_gym_checker(dataset_name: str, config: dict[str, Any]) -> Callable[[str | None, dict], float] | None:
    """``score_answer`` of the named dataset if the dataset overrides the generic one."""
    import reasoning_gym
    from reasoning_gym.dataset import ProceduralDataset

    dataset = reasoning_gym.create_dataset(dataset_name, size=1, seed=0, **config)
    if type(dataset).score_answer is ProceduralDataset.score_answer:
        return None
    return dataset.score_answer


def _as_plain_number(answer: str) -> str:
    """Write a canonical fraction answer as a decimal when it terminates (``3/4`` -> ``0.75``)."""
    value = as_number(answer)
    if value is None or "/" not in answer:
        return answer
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return answer
    return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")


def grade(problem: Problem, completion: str) -> bool:
    """Whether ``completion`` solves ``problem``.

    reasoning-gym problems whose dataset has its own checker (``countdown``,
    ``chain_sum``, ``gsm_symbolic``) are graded by ``dataset.score_answer``
    on the answer extracted from the completion (the expression for
    ``countdown``, see :func:`extract_expression`), correct when the score is
    at least :data:`SCORE_THRESHOLD`. The checker is re-created from
    ``problem.metadata["rg_dataset"]``, ``["rg_config"]`` and ``["rg_entry"]``.
    Every other problem is graded by :func:`is_correct` against
    ``problem.answer``.

    Parameters
    ----------
    problem : Problem
        The problem.
    completion : str
        Model completion (the text generated after the prompt).

    Returns
    -------
    bool
        ``True`` if correct; a missing answer is ``False``.
    """
    dataset_name = problem.metadata.get("rg_dataset")
    entry = problem.metadata.get("rg_entry")
    if dataset_name and entry is not None:
        checker = _reasoning_gym_checker(dataset_name, dict(problem.metadata.get("rg_config") or {}))
        if checker is not None:
            if problem.metadata.get("answer_kind") == "expression":
                candidate = extract_expression(completion)
            else:
                extracted = extract_answer(completion)
                candidate = None if extracted is None else _as_plain_number(extracted)
            if candidate is None:
                return False
            try:
                return float(checker(candidate, entry)) >= SCORE_THRESHOLD
            except Exception:  # noqa: BLE001 - a checker crash on model output means "not correct"
                return False
    if problem.metadata.get("answer_kind") == "expression":
        return extract_expression(completion) == problem.answer
    return is_correct(completion, problem.answer)
