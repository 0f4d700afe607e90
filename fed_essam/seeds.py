"""Where probe seeds come from: a pure function of (run seed, step, phase, index).

The server of a federation and a centralized run call the same function, so both
probe the same directions. With a seed pool of size ``K`` (FedKSeed), every seed
is one of ``K`` fixed seeds, so any model state is ``theta_0 + sum_k A_k eps(k)``
and a late client catches up with at most ``K`` noise regenerations.
"""

from __future__ import annotations

from enum import IntEnum

from fed_essam.noise import splitmix64

_SEED_MASK = (1 << 63) - 1


class Phase(IntEnum):
    """The two probe phases of an ESSAM step."""

    ASCENT = 0
    DESCENT = 1


def pool_seed(run_seed: int, index: int) -> int:
    """The ``index``-th seed of the run's fixed pool."""
    return splitmix64(splitmix64(run_seed ^ 0x5EED_F00D) + index) & _SEED_MASK


def draw_seeds(run_seed: int, step: int, phase: Phase | int, count: int, *, pool_size: int | None = None) -> list[int]:
    """``count`` probe seeds for one phase of one step.

    ``seed_i = splitmix64(splitmix64(splitmix64(run_seed) + step) * 2 + phase) + i``
    mixed once more; with ``pool_size=K`` each draw is mapped to one of the ``K``
    pool seeds (with replacement).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if pool_size is not None and pool_size < 1:
        raise ValueError(f"seed pool size must be >= 1, got {pool_size}")
    base = splitmix64(splitmix64(splitmix64(run_seed) + step) * 2 + int(phase))
    draws = [splitmix64(base + i) & _SEED_MASK for i in range(count)]
    if pool_size is None:
        return draws
    return [pool_seed(run_seed, d % pool_size) for d in draws]
