"""Forward-only optimizers with a PyTorch-style API: ESSAM, ESSAM-F, ES and MeZO.

::

    opt = fed_essam.ESSAM(model.parameters(), lr=1e-3, sigma=1e-3, rho=1e-2, population=8)
    for batch in batches:
        loss = opt.step(lambda: loss_fn(model, batch))  # no backward pass
        record = opt.last_record                       # seeds + coefficients of the update

One ESSAM step (ESSAM.md section 3), with ``d_i = F(theta + sigma eps_i) - F(theta - sigma eps_i)``:

1. ascent probes at ``theta`` (seeds ``s_i``, ``i < N_a``): ``a = shape(d)``,
   ``g_a = (1/N_a) sum_i a_i eps(s_i)``;
2. ``theta_adv = theta + rho g_a`` (ESSAM) or ``theta + rho g_a / ||g_a||`` (ESSAM-F);
3. descent probes at ``theta_adv`` (fresh seeds ``s'_j``, ``j < N_b``): ``b = shape(d')``;
4. back at the ORIGINAL point: ``theta <- theta - lr (1/N_b) sum_j b_j eps(s'_j)``.

ES is ESSAM with ``rho = 0`` (steps 3-4 only; same seeds, same result). MeZO is ES
with one antithetic probe and raw (``d / 2 sigma``) coefficients.

Probing never changes the parameters: every probe is an exact, reversible
in-place move (:func:`fed_essam.perturb.perturbed`), so memory stays at inference
level and the parameters come back bit for bit, in any dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_essam import estimators
from fed_essam.estimators import Shaping
from fed_essam.noise import NoiseBackend, NoiseKind
from fed_essam.perturb import (
    SeedUpdate,
    add_reversibly,
    apply_update,
    direction_norm,
    perturbed,
    reflect,
    trainable_parameters,
    undo,
)
from fed_essam.seeds import Phase, draw_seeds

Closure = Callable[[], float | torch.Tensor]


@dataclass
class StepRecord:
    """Everything that defines one step; :attr:`update` replays it on any copy.

    Attributes
    ----------
    step : int
        Index of the step (0-based).
    update : SeedUpdate or None
        The change applied to the parameters (``None`` when the step was skipped).
    ascent : SeedUpdate or None
        The move to the adversarial point (undone before the update; not needed to replay).
    ascent_losses, descent_losses : list of (float, float)
        The probe losses ``(F(+), F(-))`` (one-sided probes: ``(F(+), F(theta))``).
    loss : float
        Mean of the probe losses at ``theta`` (the ascent probes when there are
        any, else the descent probes): an ``O(sigma^2)`` estimate of ``F(theta)``.
    skipped : str or None
        Why the step made no update (non-finite losses, zero spread), else ``None``.
    forward_passes : int
        Closure calls made by this step.
    """

    step: int
    update: SeedUpdate | None
    ascent: SeedUpdate | None = None
    ascent_losses: list[tuple[float, float]] = field(default_factory=list)
    descent_losses: list[tuple[float, float]] = field(default_factory=list)
    loss: float = float("nan")
    skipped: str | None = None
    forward_passes: int = 0


def _as_float(value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().float().item())
    return float(value)


class ESSAM(torch.optim.Optimizer):
    """Evolution Strategy + Sharpness-Aware Minimization (forward passes only).

    Parameters
    ----------
    params : iterable of parameters
        Those with ``requires_grad`` are optimized (one parameter group).
    lr : float
        Step size ``alpha`` of the update ``theta -= lr * (1/N_b) sum_j b_j eps_j``.
    sigma : float
        Probe radius.
    rho : float
        SAM radius; ``0`` gives plain ES.
    population : int
        Descent probes ``N_b`` (antithetic pairs when ``antithetic``).
    ascent_population : int, optional
        Ascent probes ``N_a``; defaults to ``population``.
    normalize_ascent : bool
        ESSAM-F: ascend by ``rho g_a / ||g_a||`` (use a small ``ascent_population``).
    shaping : {"zscore", "raw"}
        Coefficients from loss differences (see :func:`fed_essam.estimators.shape_differences`).
    antithetic : bool
        Probe ``theta +/- sigma eps`` (default) or ``theta + sigma eps`` against ``F(theta)``.
    seed : int
        Run seed; the probe seeds of step ``t`` are ``draw_seeds(seed, t, phase, N)``.
    seed_pool : int, optional
        Draw seeds from a fixed pool of this size (FedKSeed).
    noise : {"gaussian", "rademacher"}
    noise_backend : {"auto", "numpy", "torch", "compiled"}
        How the noise is computed (same bits); "compiled" pays ~20 s once, for large models.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        *,
        lr: float,
        sigma: float,
        rho: float = 0.0,
        population: int = 8,
        ascent_population: int | None = None,
        normalize_ascent: bool = False,
        shaping: Shaping = "zscore",
        antithetic: bool = True,
        seed: int = 0,
        seed_pool: int | None = None,
        noise: NoiseKind = "gaussian",
        noise_backend: NoiseBackend = "auto",
    ) -> None:
        ascent_population = population if ascent_population is None else ascent_population
        _check_positive(lr=lr, sigma=sigma, population=population)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if rho > 0 and ascent_population < 1:
            raise ValueError(f"ascent_population must be >= 1 when rho > 0, got {ascent_population}")
        if shaping not in ("zscore", "raw"):
            raise ValueError(f"shaping must be 'zscore' or 'raw', got {shaping!r}")
        if shaping == "zscore" and population < 2:
            raise ValueError("shaping='zscore' needs population >= 2 (use shaping='raw' for one probe, as MeZO)")
        defaults = dict(
            lr=lr, sigma=sigma, rho=rho, population=population, ascent_population=ascent_population,
            normalize_ascent=normalize_ascent, shaping=shaping, antithetic=antithetic, seed=seed,
            seed_pool=seed_pool, noise=noise, noise_backend=noise_backend,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("fed_essam optimizers take one parameter group (one lr for the shared update)")
        self.state["step"] = 0
        self.last_record: StepRecord | None = None

    # -- helpers -----------------------------------------------------------------
    @property
    def hyper(self) -> dict:
        """The hyperparameters of the (single) parameter group."""
        return self.param_groups[0]

    def trainable(self) -> list[torch.Tensor]:
        """The perturbed tensors, in noise ``tensor_index`` order."""
        return trainable_parameters(self.param_groups[0]["params"])

    def _probe(self, params: list[torch.Tensor], seeds: list[int], closure: Closure) -> tuple[np.ndarray, list[tuple[float, float]], int]:
        """Loss differences ``d_i`` for ``seeds`` around the current parameters."""
        h = self.hyper
        kind, backend = h["noise"], h["noise_backend"]
        losses: list[tuple[float, float]] = []
        calls = 0
        base = None
        if not h["antithetic"]:
            base = _as_float(closure())
            calls += 1
        for seed in seeds:
            probe = SeedUpdate((seed,), (h["sigma"],), kind)
            if base is None:
                plus, minus = antithetic_pair(params, probe, closure, backend=backend)
                calls += 2
            else:
                with perturbed(params, probe, backend=backend):
                    plus = _as_float(closure())
                minus = base
                calls += 1
            losses.append((plus, minus))
        plus_arr, minus_arr = np.array([p for p, _ in losses]), np.array([m for _, m in losses])
        return estimators.probe_differences(plus_arr, minus_arr), losses, calls

    def _coefficients(self, d: np.ndarray) -> np.ndarray:
        h = self.hyper
        return estimators.shape_differences(d, h["sigma"], h["shaping"], antithetic=h["antithetic"])

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        """Do one step; ``closure()`` returns the loss at the current parameters.

        Returns the mean probe loss at ``theta`` (see :attr:`StepRecord.loss`);
        the full record is in :attr:`last_record`.
        """
        if closure is None:
            raise ValueError("forward-only optimizers need a closure that returns the loss")
        h = self.hyper
        t = self.state["step"]
        params = self.trainable()
        record = StepRecord(step=t, update=None)
        try:
            ascent = None
            if h["rho"] > 0:
                seeds_a = draw_seeds(h["seed"], t, Phase.ASCENT, h["ascent_population"], pool_size=h["seed_pool"])
                d_a, record.ascent_losses, calls = self._probe(params, seeds_a, closure)
                record.forward_passes += calls
                ascent = self._ascent(params, seeds_a, self._coefficients(d_a))
                record.ascent = ascent
            seeds_b = draw_seeds(h["seed"], t, Phase.DESCENT, h["population"], pool_size=h["seed_pool"])
            log = add_reversibly(params, ascent, backend=h["noise_backend"]) if ascent else None
            try:
                d_b, record.descent_losses, calls = self._probe(params, seeds_b, closure)
                record.forward_passes += calls
            finally:
                if ascent is not None and log is not None:
                    undo(params, ascent, log, backend=h["noise_backend"])
            b = self._coefficients(d_b)
        except FloatingPointError as err:
            record.skipped = f"non-finite probe loss ({err}); step skipped, parameters unchanged"
            warnings.warn(f"step {t}: {record.skipped}", RuntimeWarning, stacklevel=2)
        else:
            if not np.any(b):
                record.skipped = "all probe losses equal; no update"
            update = SeedUpdate(seeds_b, tuple(estimators.descent_coefficients(b, h["lr"])), h["noise"])
            apply_update(params, update, backend=h["noise_backend"])
            record.update = update
        at_theta = record.ascent_losses or record.descent_losses
        record.loss = float(np.mean([v for pair in at_theta for v in pair])) if at_theta else math.nan
        self.state["step"] = t + 1
        self.last_record = record
        return record.loss

    def _ascent(self, params: list[torch.Tensor], seeds: list[int], a: np.ndarray) -> SeedUpdate:
        h = self.hyper
        norm = None
        if h["normalize_ascent"]:
            unit = SeedUpdate(tuple(seeds), tuple(a / max(len(a), 1)), h["noise"])
            norm = direction_norm(params, unit, backend=h["noise_backend"])
        coeffs = estimators.ascent_coefficients(a, h["rho"], norm=norm)
        return SeedUpdate(tuple(seeds), tuple(coeffs), h["noise"])


class ES(ESSAM):
    """Evolution Strategies: ESSAM without the ascent (``rho = 0``)."""

    def __init__(self, params, *, lr: float, sigma: float, population: int = 8, **kwargs) -> None:
        kwargs.pop("rho", None)
        super().__init__(params, lr=lr, sigma=sigma, rho=0.0, population=population, **kwargs)


class MeZO(ESSAM):
    """MeZO / SPSA: one antithetic probe per step, ``theta -= lr * d / (2 sigma) * eps``."""

    def __init__(self, params, *, lr: float, sigma: float = 1e-3, population: int = 1, **kwargs) -> None:
        kwargs.pop("rho", None)
        kwargs.setdefault("shaping", "raw")
        super().__init__(params, lr=lr, sigma=sigma, rho=0.0, population=population, **kwargs)


def ESSAMF(params, *, lr: float, sigma: float, rho: float, population: int = 8, ascent_population: int = 4, **kwargs) -> ESSAM:
    """ESSAM-F: normalized ascent ``rho g_a / ||g_a||`` with a small ascent population."""
    return ESSAM(params, lr=lr, sigma=sigma, rho=rho, population=population,
                 ascent_population=ascent_population, normalize_ascent=True, **kwargs)


def antithetic_pair(params: list[torch.Tensor], probe: SeedUpdate, closure: Closure, *, backend: NoiseBackend = "auto") -> tuple[float, float]:
    """``(F(theta + delta), F(theta - delta))`` with exact restore, three noise passes.

    ``theta -> theta + delta`` (logged), ``-> theta - delta`` (:func:`reflect`),
    ``-> theta`` (undo); the parameters are restored even if ``closure`` raises.
    """
    mirror = probe.scaled(-1.0)
    log = add_reversibly(params, probe, backend=backend)
    try:
        plus = _as_float(closure())
    except BaseException:
        undo(params, probe, log, backend=backend)
        raise
    log = reflect(params, probe, log, backend=backend)
    try:
        minus = _as_float(closure())
    finally:
        undo(params, mirror, log, backend=backend)
    return plus, minus


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def replay(params: Iterable[torch.Tensor], records: Iterable[StepRecord | SeedUpdate], *, backend: NoiseBackend = "auto") -> None:
    """Apply the updates of ``records`` in order to ``params`` (in place)."""
    tensors = trainable_parameters(list(params))
    for record in records:
        update = record.update if isinstance(record, StepRecord) else record
        if update is not None:
            apply_update(tensors, update, backend=backend)
