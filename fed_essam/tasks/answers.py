"""Final-answer extraction, normalisation and comparison.

Answers are looked for in this order of priority:

1. ``#### 42`` (GSM8K style; the first ``####`` that carries an answer, since
   a model trained on GSM8K-style targets stops there),
2. ``\\boxed{42}`` (the last one),
3. ``The answer is 42`` / ``Answer: 42`` (case-insensitive, the last one),
4. the last number in the text.

Numbers are normalised to a canonical string: thousands separators, currency
signs (``$ € £``), percent signs, spaces, a trailing period and trailing zeros
of decimals are removed (``"$1,234.00"`` -> ``"1234"``), fractions are reduced
(``"6/8"`` -> ``"3/4"``). Two answers are equal when both are numbers within a
relative tolerance of 1e-6 (so ``3/4`` equals ``0.75``), otherwise when their
normalised strings are equal.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

REL_TOL = 1e-6
"""Relative tolerance of the numeric comparison in :func:`is_correct`."""

_MAX_NUMBER_CHARS = 200
_MAX_TEXT_ANSWER_CHARS = 64

# A number as written in math text: optional sign and currency, digits with
# optional thousands separators, optional decimals, an optional "/denominator",
# an optional percent sign. The look-behind keeps "x2", "5-3" and "1.2.3" from
# producing glued or negative tokens.
_NUMBER = (
    r"(?<![\w./])"
    r"(?:[-\u2212+]\s?)?[$\u20ac\u00a3]?\s?[-\u2212]?"
    r"(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+|(?=\.\d))(?:\.\d+)?"
    r"(?:/\d+(?:\.\d+)?)?"
    r"(?:\s?%)?"
)
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(rf"\s*{_NUMBER}\s*")
_EXPRESSION_RE = re.compile(r"[\d\s+\-*/().]*\d[\d\s+\-*/().]*")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|was|:|=)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_LATEX_NOISE_RE = re.compile(r"\\[,!;: ]|\\\$|\\%|\$|\\\(|\\\)|\\\[|\\\]")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def _to_fraction(token: str) -> Fraction | None:
    """Parse a cleaned numeric token (``-12.5``, ``3/4``) into a fraction."""
    if len(token) > _MAX_NUMBER_CHARS:
        return None
    try:
        if "/" in token:
            numerator, denominator = token.split("/", 1)
            den = Fraction(Decimal(denominator))
            if den == 0:
                return None
            return Fraction(Decimal(numerator)) / den
        return Fraction(Decimal(token))
    except (InvalidOperation, ValueError, ZeroDivisionError, OverflowError):
        return None


def _clean_number(token: str) -> str:
    """Strip spaces, currency, separators, percent and sign noise from a token."""
    cleaned = token.replace("\u2212", "-")
    cleaned = re.sub(r"[\s$\u20ac\u00a3,%]", "", cleaned)
    negative = cleaned.count("-") % 2 == 1
    cleaned = cleaned.replace("-", "").lstrip("+")
    return f"-{cleaned}" if negative else cleaned


def _format_fraction(value: Fraction, as_fraction: bool) -> str:
    """Render a number canonically: integer, shortest decimal or reduced ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    if as_fraction:
        return f"{value.numerator}/{value.denominator}"
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    return format(decimal.normalize(), "f")


def _canonical_number(token: str) -> str | None:
    """Canonical string of one numeric token, or ``None`` if it is not a number."""
    cleaned = _clean_number(token)
    value = _to_fraction(cleaned)
    if value is None:
        return None
    return _format_fraction(value, as_fraction="/" in cleaned)


def _strip_latex(text: str) -> str:
    """Turn the LaTeX that wraps answers (``\\frac``, ``\\text``, ``$``) into plain text."""
    text = _FRAC_RE.sub(r"\1/\2", text)
    text = _TEXT_RE.sub(r"\1", text)
    text = _LATEX_NOISE_RE.sub("", text)
    return text.replace("\\%", "%")


def _normalize_text(text: str) -> str | None:
    """Canonical string of a non-numeric answer (lower case, no spaces)."""
    compact = re.sub(r"\s+", "", text).rstrip(".").lower()
    if not compact or len(compact) > _MAX_TEXT_ANSWER_CHARS:
        return None
    return compact


def _first_number(text: str) -> str | None:
    """Canonical form of the first number in ``text``."""
    for match in _NUMBER_RE.finditer(text):
        canonical = _canonical_number(match.group(0))
        if canonical is not None:
            return canonical
    return None


def _last_number(text: str) -> str | None:
    """Canonical form of the last number in ``text``."""
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        canonical = _canonical_number(match.group(0))
        if canonical is not None:
            return canonical
    return None


def _from_marked_span(span: str) -> str | None:
    """Answer written right after ``####`` or inside ``\\boxed{}``.

    A whole-span number wins; a bare arithmetic expression is kept as text
    (``countdown`` answers); otherwise the first number, else the text itself.
    """
    span = _strip_latex(span).strip()
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    span = span.strip().rstrip(".").strip()
    if not span:
        return None
    if _FULL_NUMBER_RE.fullmatch(span):
        return _canonical_number(span)
    if _EXPRESSION_RE.fullmatch(span):
        return _normalize_text(span)
    return _first_number(span) or _normalize_text(span)


def _from_answer_is_span(span: str) -> str | None:
    """First number of the sentence after "the answer is" (after its last ``=``)."""
    span = _strip_latex(span)
    end = _SENTENCE_END_RE.search(span)
    if end is not None:
        span = span[: end.start()]
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    return _first_number(span)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` with balanced braces, in order."""
    contents = []
    for match in _BOXED_RE.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[start:position])
                    break
    return contents


def extract_answer(text: str) -> str | None:
    """Extract the final answer of a solution or model completion.

    Parameters
    ----------
    text : str
        A worked solution or a model completion.

    Returns
    -------
    str or None
        The answer in canonical form (``"1234"``, ``"-2.5"``, ``"3/4"``, or a
        compact lower-case string for non-numeric answers), or ``None`` when
        no answer can be found. Never raises, whatever the input.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    for match in _HASHES_RE.finditer(text):
        answer = _from_marked_span(match.group(1))
        if answer is not None:
            return answer
    for content in reversed(_boxed_contents(text)):
        answer = _from_marked_span(content)
        if answer is not None:
            return answer
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        answer = _from_answer_is_span(match.group(1))
        if answer is not None:
            return answer
    return _last_number(_strip_latex(text))


def normalize_answer(answer: str) -> str | None:
    """Canonical form of a bare answer string (e.g. a gold answer).

    Parameters
    ----------
    answer : str
        An answer such as ``"$1,234.00"``, ``"75%"`` or ``"3/4"``; a full
        solution ending in ``#### <answer>`` is accepted too.

    Returns
    -------
    str or None
        Canonical form as returned by :func:`extract_answer`, or ``None`` for
        an empty or unusable answer.
    """
    if not isinstance(answer, str) or not answer.strip():
        return None
    if "####" in answer or "\\boxed" in answer:
        return extract_answer(answer)
    return _from_marked_span(answer)


def as_number(answer: str | None) -> Fraction | None:
    """Exact value of a canonical answer, or ``None`` if it is not a number.

    Parameters
    ----------
    answer : str or None
        A canonical answer from :func:`extract_answer` / :func:`normalize_answer`.

    Returns
    -------
    fractions.Fraction or None
        The value, or ``None`` for non-numeric or missing answers.
    """
    if answer is None or not _FULL_NUMBER_RE.fullmatch(answer):
        return None
    return _to_fraction(_clean_number(answer))


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Compare two canonical answers: numerically if both are numbers, else as strings.

    Parameters
    ----------
    predicted, gold : str or None
        Canonical answers; ``None`` (no answer) never matches.

    Returns
    -------
    bool
        ``True`` when the numbers agree within a relative tolerance of
        :data:`REL_TOL`, or when the normalised strings are equal.
    """
    if predicted is None or gold is None:
        return False
    predicted_value, gold_value = as_number(predicted), as_number(gold)
    if predicted_value is not None and gold_value is not None:
        if predicted_value == gold_value:
            return True
        try:
            return math.isclose(float(predicted_value), float(gold_value), rel_tol=REL_TOL)
        except OverflowError:
            return False
    return _normalize_text(predicted) == _normalize_text(gold)


def is_correct(completion: str, gold_answer: str) -> bool:
    """Whether the answer extracted from ``completion`` equals ``gold_answer``.

    Parameters
    ----------
    completion : str
        Model completion or worked solution.
    gold_answer : str
        Reference answer (``Problem.answer``), normalised the same way.

    Returns
    -------
    bool
        ``False`` when either side has no answer; never raises.
    """
    return answers_match(extract_answer(completion), normalize_answer(gold_answer))
