"""From probe losses to coefficients: the arithmetic of one ES / ESSAM step.

Pure NumPy functions shared by the centralized optimizers and the federated
server, so both turn the same loss differences into the same float32 coefficients.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Shaping = Literal["zscore", "raw"]

#: population standard deviation below which z-scores are undefined (step skipped).
MIN_STD = 1e-12


def probe_differences(plus: np.ndarray, minus: np.ndarray | float) -> np.ndarray:
    """``d_i = F(theta + sigma eps_i) - F(theta - sigma eps_i)`` (antithetic), or
    ``F(theta + sigma eps_i) - F(theta)`` when ``minus`` is the scalar base loss."""
    return np.asarray(plus, dtype=np.float64) - np.asarray(minus, dtype=np.float64)


def shape_differences(d: np.ndarray, sigma: float, shaping: Shaping, *, antithetic: bool = True) -> np.ndarray:
    """Coefficients ``a_i`` from loss differences ``d_i``.

    * ``"raw"``: ``a_i = d_i / (2 sigma)`` (antithetic) or ``d_i / sigma`` (one-sided),
      so that ``(1/N) sum_i a_i eps_i`` is an unbiased estimate of the gradient of
      the Gaussian-smoothed loss (MeZO / SPSA).
    * ``"zscore"``: ``a_i = d_i / std(d)`` with the population standard deviation
      (the ESSAM paper's normalization; scale-free, so ``lr`` is a step length).
      All-equal differences (``std < 1e-12``) give all-zero coefficients.

    Returns float64 coefficients.
    """
    d = np.asarray(d, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise FloatingPointError("non-finite loss differences")
    if shaping == "raw":
        return d / ((2.0 if antithetic else 1.0) * sigma)
    if shaping == "zscore":
        std = float(d.std()) if d.size > 1 else float(np.abs(d).max(initial=0.0))
        return np.zeros_like(d) if std < MIN_STD else d / std
    raise ValueError(f"unknown shaping {shaping!r}; use 'zscore' or 'raw'")


def ascent_coefficients(a: np.ndarray, rho: float, *, norm: float | None = None) -> np.ndarray:
    """Coefficients of ``rho * g_a`` with ``g_a = (1/N_a) sum_i a_i eps_i``.

    With ``norm = ||g_a||`` (ESSAM-F), the ascent is ``rho * g_a / ||g_a||``.
    """
    a = np.asarray(a, dtype=np.float64)
    coeffs = rho * a / max(a.size, 1)
    if norm is not None:
        coeffs = coeffs / norm if norm > 0 else np.zeros_like(coeffs)
    return coeffs


def descent_coefficients(b: np.ndarray, lr: float) -> np.ndarray:
    """Coefficients of the update ``-lr * (1/N_b) sum_j b_j eps_j``."""
    b = np.asarray(b, dtype=np.float64)
    return -lr * b / max(b.size, 1)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-seed ``sum_k w_k v_{k,i} / sum_k w_k`` over clients ``k`` (rows)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.ndim != 2 or weights.shape != (values.shape[0],):
        raise ValueError(f"expected values (clients, seeds) and weights (clients,), got {values.shape}, {weights.shape}")
    if weights.sum() <= 0:
        raise ValueError("weights must sum to a positive number")
    return (weights[:, None] * values).sum(axis=0) / weights.sum()
