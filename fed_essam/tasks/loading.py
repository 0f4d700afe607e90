"""One entry point for every task source: :func:`load_problems`."""

from __future__ import annotations

import random
from typing import Any

from fed_essam.tasks.errors import TaskDataError
from fed_essam.tasks.hub import load_hub
from fed_essam.tasks.jsonl import ON_ERROR_CHOICES, load_jsonl
from fed_essam.tasks.problem import Problem
from fed_essam.tasks.reasoning_gym_source import REASONING_GYM_SOURCES, load_reasoning_gym

FILE_SOURCES: tuple[str, ...] = ("jsonl", "hub", "gsm8k_hub")
"""Sources that read existing problems (``gsm8k_hub`` is an alias of ``hub``)."""

SOURCE_NAMES: tuple[str, ...] = REASONING_GYM_SOURCES + FILE_SOURCES
"""Every source name :func:`load_problems` accepts."""


def _subsample(problems: list[Problem], size: int | None, seed: int) -> list[Problem]:
    """Seeded sample of ``size`` problems, kept in their original order."""
    if size is None or size >= len(problems):
        return problems
    chosen = sorted(random.Random(seed).sample(range(len(problems)), size))
    return [problems[index] for index in chosen]


def load_problems(
    source: str,
    *,
    size: int | None,
    seed: int,
    path: str | None = None,
    split: str = "train",
    on_error: str = "raise",
    **source_kwargs: Any,
) -> list[Problem]:
    """Load or generate problems from a named source.

    Parameters
    ----------
    source : str
        One of :data:`SOURCE_NAMES`: a reasoning-gym generator
        (``gsm_symbolic``, ``basic_arithmetic``, ``chain_sum``, ``countdown``),
        ``jsonl`` (GSM8K-format file at ``path``) or ``hub`` / ``gsm8k_hub``
        (``openai/gsm8k`` through ``datasets``).
    size : int or None
        Number of problems. Generators make exactly ``size``; file sources
        return a seeded sample of ``size`` (in file order), or everything when
        ``size`` is ``None`` or at least the number available.
    seed : int
        Seed of the generator or of the sample.
    path : str, optional
        File of the ``jsonl`` source.
    split : str, optional
        Split: mixed into generator seeds (train and test never share seeds),
        the hub split for ``hub``, ignored by ``jsonl``.
    on_error : {"raise", "skip"}, optional
        Raise :class:`TaskDataError` on bad data, or skip it with one warning.
    **source_kwargs
        Generator config fields (e.g. ``min_terms=2, max_digits=2``) for
        reasoning-gym; ``dataset``, ``config`` and ``datasets.load_dataset``
        arguments for ``hub``.

    Returns
    -------
    list of Problem
        Every problem's ``metadata`` holds ``task`` and ``difficulty``.

    Raises
    ------
    TaskDataError
        On an unknown source, bad arguments or bad data.
    """
    if source not in SOURCE_NAMES:
        raise TaskDataError(f"unknown task source {source!r}; known sources: {', '.join(SOURCE_NAMES)}")
    if on_error not in ON_ERROR_CHOICES:
        raise TaskDataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise TaskDataError(f"size must be a positive integer (or None for a whole file), got {size!r}")
    if source in REASONING_GYM_SOURCES:
        if size is None:
            raise TaskDataError(f"task source {source!r} generates problems: give a size")
        return load_reasoning_gym(source, size=size, seed=seed, split=split, on_error=on_error, **source_kwargs)
    if source == "jsonl":
        if not path:
            raise TaskDataError("task source 'jsonl' needs a path (task.path=FILE, a GSM8K-format JSONL file)")
        if source_kwargs:
            raise TaskDataError(f"task source 'jsonl' takes no extra options, got {sorted(source_kwargs)}")
        return _subsample(load_jsonl(path, on_error=on_error), size, seed)
    return _subsample(load_hub(split=split, on_error=on_error, **source_kwargs), size, seed)
