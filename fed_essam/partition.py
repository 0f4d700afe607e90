"""Private data per client: IID, non-IID (Dirichlet over task type and difficulty), or shared.

Pure functions, no Flower. Every client computes its own share from the same
inputs (the training pool, ``num_partitions``, the scheme and the run seed), so
no assignment is ever sent: client ``k`` keeps ``partition_indices(...)[k]``.

Schemes
-------
``"iid"``
    A seeded permutation of the pool cut into ``P`` contiguous, nearly equal
    parts (sizes differ by at most one).
``"dirichlet"``
    Non-IID by group ``g`` = (task type, difficulty) (:func:`group_of`). For
    every group independently, client proportions are drawn as

    .. math:: (p_{g,1}, \\dots, p_{g,P}) \\sim \\operatorname{Dir}(\\alpha \\mathbf{1}_P)

    and the group's (seeded, shuffled) examples are cut at the cumulative
    proportions, ``cut_j = round(n_g \\sum_{k \\le j} p_{g,k})``. Small ``alpha``
    gives clients few groups each; ``alpha -> inf`` approaches IID. A draw with
    an empty partition is redrawn with the next sub-seed, at most
    :data:`DIRICHLET_ATTEMPTS` times, then :class:`PartitionError` is raised.
``"shared"``
    Every client holds the whole pool (not private; for equivalence tests, where
    every client and a centralized run must probe the same data).

Guarantees (tested): deterministic given the seed; ``iid`` and ``dirichlet``
parts are disjoint and cover the pool; no part is empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, TypeVar

import numpy as np

from fed_essam.tasks import Problem

Scheme = Literal["iid", "dirichlet", "shared"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shared")

#: redraws of a Dirichlet split that left a client empty before giving up.
DIRICHLET_ATTEMPTS = 20

T = TypeVar("T")


class PartitionError(ValueError):
    """The data cannot be split as asked (too few examples, empty part, bad arguments)."""


def group_of(problem: Problem) -> tuple[str, str]:
    """Non-IID group of a problem: ``(task type, difficulty)`` from its metadata.

    Missing keys fall back to the problem's source and ``"?"``.
    """
    task = problem.metadata.get("task", problem.source)
    return str(task), str(problem.metadata.get("difficulty", "?"))


def _check(num_items: int, num_partitions: int, scheme: str, alpha: float) -> None:
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise PartitionError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if scheme != "shared" and num_items < num_partitions:
        raise PartitionError(
            f"cannot give {num_partitions} clients a non-empty private share of {num_items} examples; "
            "raise task.train_size or lower federation.num_clients"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise PartitionError(f"federation.dirichlet_alpha must be > 0, got {alpha}")


def _iid(num_items: int, num_partitions: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(num_items)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_partitions)]


def _dirichlet_once(groups: list[np.ndarray], num_partitions: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for members in groups:
        members = rng.permutation(members)
        proportions = rng.dirichlet(np.full(num_partitions, alpha))  # (P,)
        cuts = np.rint(np.cumsum(proportions)[:-1] * len(members)).astype(int)  # (P-1,)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return [sorted(part) for part in parts]


def partition_indices(
    labels: Sequence[Hashable],
    num_partitions: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[int]]:
    """Split item indices ``0..len(labels)-1`` among ``num_partitions`` clients.

    Parameters
    ----------
    labels : sequence of hashable
        One group label per item (used by ``"dirichlet"`` only).
    num_partitions : int
        Number of clients ``P``.
    scheme : {"iid", "dirichlet", "shared"}
    alpha : float
        Dirichlet concentration (``"dirichlet"`` only).
    seed : int
        Run seed; the split is a pure function of the arguments.

    Returns
    -------
    list of list of int
        ``P`` sorted index lists.

    Raises
    ------
    PartitionError
        Bad arguments, fewer items than clients, or an empty part after
        :data:`DIRICHLET_ATTEMPTS` Dirichlet draws.
    """
    num_items = len(labels)
    _check(num_items, num_partitions, scheme, alpha)
    if scheme == "shared":
        return [list(range(num_items)) for _ in range(num_partitions)]
    if scheme == "iid":
        return _iid(num_items, num_partitions, np.random.default_rng([seed, 0x11D]))
    index: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        index.setdefault(label, []).append(i)
    groups = [np.asarray(index[key], dtype=np.int64) for key in sorted(index, key=repr)]
    for attempt in range(DIRICHLET_ATTEMPTS):
        parts = _dirichlet_once(groups, num_partitions, alpha, np.random.default_rng([seed, 0xD1C, attempt]))
        if all(parts):
            return parts
    raise PartitionError(
        f"Dirichlet split (alpha={alpha}) of {num_items} examples in {len(groups)} groups left a client "
        f"without data in {DIRICHLET_ATTEMPTS} draws; raise federation.dirichlet_alpha or task.train_size, "
        "or lower federation.num_clients"
    )


def partition(
    items: Sequence[T],
    partition_id: int,
    num_partitions: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    labels: Sequence[Hashable] | None = None,
) -> list[T]:
    """The share of client ``partition_id`` (in pool order).

    ``labels`` default to :func:`group_of` of each item (items must then be
    :class:`~fed_essam.tasks.Problem`).
    """
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    if labels is None:
        labels = [group_of(item) for item in items]  # type: ignore[arg-type]
    if len(labels) != len(items):
        raise PartitionError(f"{len(labels)} labels for {len(items)} items")
    chosen = partition_indices(labels, num_partitions, scheme=scheme, alpha=alpha, seed=seed)[partition_id]
    return [items[i] for i in chosen]


__all__ = ["DIRICHLET_ATTEMPTS", "SCHEMES", "PartitionError", "Scheme", "group_of", "partition", "partition_indices"]
