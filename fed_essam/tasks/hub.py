"""GSM8K from the Hugging Face hub (``openai/gsm8k``), for users with hub access."""

from __future__ import annotations

import warnings
from typing import Any

from fed_essam.tasks.errors import TaskDataError, TaskDataWarning
from fed_essam.tasks.gsm8k_format import problem_from_record
from fed_essam.tasks.problem import Problem

HUB_DATASET = "openai/gsm8k"
HUB_CONFIG = "main"
_OFFLINE_HINT = "without the hub, use task=jsonl task.path=FILE with a GSM8K-format JSONL file"


def load_hub(
    *,
    split: str = "train",
    dataset: str = HUB_DATASET,
    config: str = HUB_CONFIG,
    on_error: str = "raise",
    **load_kwargs: Any,
) -> list[Problem]:
    """Load GSM8K-format problems with ``datasets.load_dataset``.

    Parameters
    ----------
    split : str, optional
        Dataset split (``"train"`` or ``"test"`` for GSM8K).
    dataset : str, optional
        Hub dataset id.
    config : str, optional
        Dataset configuration (``"main"``; GSM8K also has ``"socratic"``).
    on_error : {"raise", "skip"}, optional
        What to do with a malformed row.
    **load_kwargs
        Passed to ``datasets.load_dataset`` (e.g. ``cache_dir``, ``revision``).

    Returns
    -------
    list of Problem
        In dataset order; ``metadata`` holds ``task="gsm8k"``, ``difficulty``,
        ``dataset``, ``split`` and ``row``.

    Raises
    ------
    TaskDataError
        If ``datasets`` is not installed, the hub is unreachable (offline, e.g.
        ``HF_DATASETS_OFFLINE=1`` without a cached copy) or a row is malformed;
        the message points to the ``jsonl`` source.
    """
    try:
        import datasets
    except ImportError as error:
        raise TaskDataError(
            f"task source 'hub' needs the Hugging Face `datasets` package (pip install 'fed-essam[hub]'), "
            f"which is not installed; {_OFFLINE_HINT}"
        ) from error
    try:
        rows = datasets.load_dataset(dataset, config, split=split, **load_kwargs)
    except Exception as error:  # noqa: BLE001 - datasets raises many types when offline
        raise TaskDataError(
            f"cannot load {dataset!r} (config {config!r}, split {split!r}) from the Hugging Face hub "
            f"({type(error).__name__}: {error}); offline or no hub access? {_OFFLINE_HINT}"
        ) from error
    problems, skipped = [], []
    for row_number, row in enumerate(rows):
        metadata = {"dataset": dataset, "split": split, "row": row_number}
        try:
            problems.append(problem_from_record(dict(row), source=f"hub:{dataset}", metadata=metadata))
        except (ValueError, TypeError) as error:
            reason = f"{dataset} ({split}) row {row_number}: {error}"
            if on_error == "raise":
                raise TaskDataError(reason) from error
            skipped.append(reason)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} invalid row(s); first: {skipped[0]}", TaskDataWarning, stacklevel=2)
    if not problems:
        raise TaskDataError(f"{dataset!r} (config {config!r}, split {split!r}) holds no problems; {_OFFLINE_HINT}")
    return problems
