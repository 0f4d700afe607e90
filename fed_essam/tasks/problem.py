"""One math problem, whatever its source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """A math problem with its reference solution.

    Attributes
    ----------
    question : str
        The problem statement shown to the model.
    solution : str
        Reference solution text used as the teacher-forcing target of the loss
        fitness; it ends with the final answer (GSM8K style: ``... #### 42``).
    answer : str
        The final answer as a string (a number for most sources, an expression
        for ``countdown``).
    source : str
        Where the problem comes from, e.g. ``"gsm_symbolic"`` or ``"jsonl:path"``.
        Sources with their own checker (reasoning-gym) are graded by it.
    metadata : dict
        Source-specific extras (reasoning-gym entry metadata, difficulty, task
        type used by non-IID partitioning, file line number, ...).
    """

    question: str
    solution: str
    answer: str
    source: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
