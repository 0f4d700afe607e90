"""Per-seed aggregation of the clients' loss differences (pure NumPy, tested on hand-made replies).

Client ``k`` replies with ``d_{k,i}`` for every seed ``i`` of one exchange and a
weight ``n_k`` (the count its fitness is a mean over: target tokens for the loss
fitness, examples for the reward fitness). The server needs one ``d_i`` per seed:

* ``mean`` (default) -- the weighted mean, written around the first reply
  (a shifted sum, exact when all replies agree):

  .. math:: d_i = d_{1,i} + \\frac{\\sum_k n_k (d_{k,i} - d_{1,i})}{\\sum_k n_k}

  With the loss fitness and ``n_k`` = tokens this equals the loss difference of
  the union of the clients' batches (``F = sum s / sum n``), in exact arithmetic.
* ``median`` -- the per-seed median over clients (unweighted), robust to
  ``< K/2`` arbitrary replies.
* ``trimmed_mean`` -- per seed, drop the ``floor(beta K)`` smallest and largest
  values and average the rest (unweighted).

Malformed replies (wrong number of values, non-finite values, non-positive
weight) are rejected with a reason and never crash the round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fed_essam.protocol import ProbeReply

Method = Literal["mean", "median", "trimmed_mean"]
METHODS: tuple[str, ...] = ("mean", "median", "trimmed_mean")


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-seed weighted mean of ``values`` ``(K, N)`` with ``weights`` ``(K,)``, as a shifted sum.

    .. math:: m_i = v_{1,i} + \\sum_k w_k (v_{k,i} - v_{1,i}) / \\sum_k w_k

    Returns float64 ``(N,)``; exactly ``v_1`` when every row equals ``v_1``.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.ndim != 2 or weights.shape != (values.shape[0],) or values.shape[0] == 0:
        raise ValueError(f"expected values (clients, seeds) and weights (clients,), got {values.shape}, {weights.shape}")
    total = float(weights.sum())
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    ref = values[0]
    return ref + (weights[:, None] * (values - ref)).sum(axis=0) / total


def median(values: np.ndarray) -> np.ndarray:
    """Per-seed median over clients (rows) of ``values`` ``(K, N)``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"expected values (clients, seeds) with at least one client, got {values.shape}")
    return np.median(values, axis=0)


def trimmed_mean(values: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per-seed mean after dropping the ``floor(beta K)`` lowest and highest values.

    .. math:: m_i = \\frac{1}{K - 2t} \\sum_{r=t+1}^{K-t} v_{(r),i}, \\qquad t = \\lfloor \\beta K \\rfloor
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"expected values (clients, seeds) with at least one client, got {values.shape}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    cut = int(math.floor(trim_fraction * values.shape[0]))
    ordered = np.sort(values, axis=0)
    return ordered[cut : values.shape[0] - cut].mean(axis=0)


@dataclass
class Aggregate:
    """Outcome of :func:`aggregate_replies`.

    Attributes
    ----------
    diffs : np.ndarray or None
        ``(N,)`` per-seed loss differences; ``None`` when fewer than
        ``min_replies`` replies were usable.
    used : int
        Replies aggregated.
    total_weight : float
        ``sum_k n_k`` over the used replies.
    loss : float
        Weighted mean of the replies' mean probe losses (for logging).
    rejected : list of str
        One reason per rejected reply.
    """

    diffs: np.ndarray | None
    used: int
    total_weight: float
    loss: float
    rejected: list[str] = field(default_factory=list)


def check_reply(reply: ProbeReply, num_seeds: int) -> str | None:
    """Why ``reply`` cannot be aggregated (``None`` if it can)."""
    if len(reply.diffs) != num_seeds:
        return f"{len(reply.diffs)} values for {num_seeds} seeds"
    if not all(math.isfinite(v) for v in reply.diffs):
        return "non-finite loss difference"
    if not reply.weight > 0:
        return f"weight {reply.weight} is not positive"
    return None


def aggregate_replies(
    replies: Sequence[ProbeReply],
    num_seeds: int,
    *,
    method: Method = "mean",
    trim_fraction: float = 0.2,
    min_replies: int = 1,
) -> Aggregate:
    """Per-seed ``d_i`` from the usable replies of one exchange.

    Parameters
    ----------
    replies : sequence of ProbeReply
        Replies of one exchange (in a fixed order, e.g. by node id, so the
        result does not depend on arrival order).
    num_seeds : int
        Seeds probed in the exchange.
    method : {"mean", "median", "trimmed_mean"}
    trim_fraction : float
        ``beta`` of ``trimmed_mean``.
    min_replies : int
        Below this many usable replies ``diffs`` is ``None`` (the step is skipped).
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; use one of {', '.join(METHODS)}")
    good: list[ProbeReply] = []
    rejected: list[str] = []
    for reply in replies:
        reason = check_reply(reply, num_seeds)
        if reason is None:
            good.append(reply)
        else:
            rejected.append(reason)
    weights = np.array([r.weight for r in good], dtype=np.float64)  # (K,)
    total = float(weights.sum()) if good else 0.0
    loss = float(np.dot(weights, [r.loss for r in good]) / total) if good else math.nan
    if len(good) < max(min_replies, 1):
        return Aggregate(None, len(good), total, loss, rejected)
    values = np.array([r.diffs for r in good], dtype=np.float64).reshape(len(good), num_seeds)  # (K, N)
    if method == "mean":
        diffs = weighted_mean(values, weights)
    elif method == "median":
        diffs = median(values)
    else:
        diffs = trimmed_mean(values, trim_fraction)
    return Aggregate(diffs, len(good), total, loss, rejected)


__all__ = ["METHODS", "Aggregate", "Method", "aggregate_replies", "check_reply", "median", "trimmed_mean", "weighted_mean"]
