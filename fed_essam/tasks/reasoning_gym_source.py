"""Problems from reasoning-gym procedural generators (offline, seeded).

reasoning-gym entries are dicts ``{"question", "answer", "metadata"}``; item
``i`` of a dataset with seed ``s`` is generated from ``Random(s + i)``, so the
datasets of seeds ``s`` and ``s + 1`` are the same problems shifted by one.
:func:`generator_seed` therefore hashes the caller's ``(split, seed)`` into the
generator seed, which keeps different seeds and splits apart.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from fed_essam.tasks.arithmetic_steps import arithmetic_steps
from fed_essam.tasks.errors import TaskDataError, TaskDataWarning
from fed_essam.tasks.problem import Problem

REASONING_GYM_SOURCES: tuple[str, ...] = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown")
"""reasoning-gym generators offered as task sources."""

EXPRESSION_ANSWER_SOURCES: frozenset[str] = frozenset({"countdown"})
"""Sources whose answers are arithmetic expressions rather than numbers."""


def generator_seed(seed: int, split: str) -> int:
    """Seed given to a reasoning-gym generator for a ``(seed, split)`` pair.

    Parameters
    ----------
    seed : int
        The caller's seed.
    split : str
        Split name (``"train"``, ``"test"``, ...); each split gets its own seeds.

    Returns
    -------
    int
        A 32-bit seed, far from the seeds of other ``(seed, split)`` pairs.
    """
    digest = hashlib.sha256(f"{split}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _gsm_symbolic_solution(entry: dict[str, Any]) -> tuple[str, int]:
    """Worked solution and number of reasoning steps of a ``gsm_symbolic`` entry."""
    cot = str(entry["metadata"].get("answer_cot", "")).strip()
    steps = [line for line in cot.splitlines() if line.strip() and not line.lstrip().startswith("####")]
    return "\n".join(steps + [f"#### {entry['answer']}"]), max(len(steps), 1)


def _expression_solution(entry: dict[str, Any]) -> str:
    """``expr = step = ... = value`` worked solution of an arithmetic entry."""
    expression, answer = entry["metadata"]["expression"], entry["answer"]
    try:
        steps = arithmetic_steps(expression, floor_division=True)
    except ValueError:
        steps = [expression.strip()]
    if steps[-1] != answer:
        steps = [expression.strip(), answer]
    return f"{' = '.join(steps)}\n#### {answer}"


def _countdown_solution(entry: dict[str, Any]) -> str:
    """Worked solution of a ``countdown`` entry: the expression and its value."""
    expression, target = entry["answer"], entry["metadata"]["target"]
    return f"{expression} = {target}\n#### {expression}"


def solution_and_difficulty(name: str, entry: dict[str, Any]) -> tuple[str, int]:
    """Build the worked solution and a difficulty level for one entry.

    Parameters
    ----------
    name : str
        Generator name, one of :data:`REASONING_GYM_SOURCES`.
    entry : dict
        The reasoning-gym entry.

    Returns
    -------
    tuple of (str, int)
        Solution text ending in ``#### <answer>``, and the difficulty: number
        of reasoning steps (``gsm_symbolic``), number of terms plus digits per
        term (``basic_arithmetic``, ``chain_sum``), number of source numbers
        (``countdown``).
    """
    metadata = entry["metadata"]
    if name == "gsm_symbolic":
        return _gsm_symbolic_solution(entry)
    if name in ("basic_arithmetic", "chain_sum"):
        return _expression_solution(entry), int(metadata["num_terms"]) + int(metadata["num_digits"])
    if name == "countdown":
        return _countdown_solution(entry), len(metadata["numbers"])
    raise TaskDataError(f"unknown reasoning-gym source {name!r}; known: {', '.join(REASONING_GYM_SOURCES)}")


def _problem(name: str, entry: dict[str, Any], extras: dict[str, Any]) -> Problem:
    """Wrap one reasoning-gym entry into a :class:`Problem`."""
    solution, difficulty = solution_and_difficulty(name, entry)
    metadata = {
        "task": name,
        "difficulty": difficulty,
        "answer_kind": "expression" if name in EXPRESSION_ANSWER_SOURCES else "number",
        "rg_dataset": name,
        "rg_entry": {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]},
        **extras,
    }
    return Problem(
        question=entry["question"].strip(),
        solution=solution,
        answer=str(entry["answer"]),
        source=name,
        metadata=metadata,
    )


def create_generator(name: str, *, size: int, seed: int, **generator_kwargs: Any) -> Any:
    """Create a reasoning-gym dataset, turning bad settings into :class:`TaskDataError`.

    Parameters
    ----------
    name : str
        Generator name.
    size : int
        Number of items.
    seed : int
        The generator's own seed (see :func:`generator_seed`).
    **generator_kwargs
        Fields of the generator's config dataclass (e.g. ``min_terms``).

    Returns
    -------
    reasoning_gym.dataset.ProceduralDataset
        The dataset.

    Raises
    ------
    TaskDataError
        If reasoning-gym is missing or the settings are invalid.
    """
    try:
        import reasoning_gym
    except ImportError as error:
        raise TaskDataError(f"task source {name!r} needs the reasoning-gym package: {error}") from error
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **generator_kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise TaskDataError(
            f"cannot create reasoning-gym generator {name!r} with {generator_kwargs}: {type(error).__name__}: {error}"
        ) from error


def load_reasoning_gym(
    name: str,
    *,
    size: int,
    seed: int,
    split: str = "train",
    on_error: str = "raise",
    **generator_kwargs: Any,
) -> list[Problem]:
    """Generate ``size`` problems with a reasoning-gym generator.

    Parameters
    ----------
    name : str
        One of :data:`REASONING_GYM_SOURCES`.
    size : int
        Number of problems.
    seed : int
        Seed; the same ``(seed, split)`` always gives the same problems.
    split : str, optional
        Split name, mixed into the generator seed.
    on_error : {"raise", "skip"}, optional
        What to do when the generator fails on an item.
    **generator_kwargs
        Passed to the generator's config (difficulty knobs such as
        ``min_terms``, ``max_digits``, ``min_numbers``).

    Returns
    -------
    list of Problem
        Problems with ``metadata`` holding ``task``, ``difficulty``,
        ``rg_dataset``, ``rg_entry`` (for the dataset's own checker),
        ``rg_config`` and ``index``.

    Raises
    ------
    TaskDataError
        On an unknown generator, invalid settings, or (with
        ``on_error="raise"``) a generator failure.
    """
    if name not in REASONING_GYM_SOURCES:
        raise TaskDataError(f"unknown reasoning-gym source {name!r}; known: {', '.join(REASONING_GYM_SOURCES)}")
    rg_seed = generator_seed(seed, split)
    dataset = create_generator(name, size=size, seed=rg_seed, **generator_kwargs)
    problems, failures = [], []
    for index in range(size):
        extras = {"index": index, "split": split, "seed": seed, "rg_config": dict(generator_kwargs)}
        if name == "gsm_symbolic":
            extras["template"] = int(dataset.task_indices[index])
        try:
            problems.append(_problem(name, dataset[index], extras))
        except (ValueError, KeyError, ArithmeticError) as error:
            if on_error != "skip":
                raise TaskDataError(f"reasoning-gym {name!r} failed on item {index}: {error}") from error
            failures.append(index)
    if failures:
        warnings.warn(
            f"reasoning-gym {name!r}: skipped {len(failures)} of {size} items that failed to generate "
            f"(first: item {failures[0]})",
            TaskDataWarning,
            stacklevel=2,
        )
    return problems
