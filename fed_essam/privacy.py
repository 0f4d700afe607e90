"""Differential privacy for the per-seed scalars a client sends (pure NumPy; accountant from dp-accounting).

In one exchange (ascent or descent) a sampled client ``k`` replies with a vector
``d_k`` in ``R^N`` of loss differences, one per shared seed. DP treats that vector
as the client's whole contribution and protects the client's *entire local
dataset* (client-level DP), not single examples.

Clipping bounds each contribution in L2,

.. math:: \\bar d_k = d_k \\, \\min\\left(1, \\frac{C}{\\lVert d_k \\rVert_2}\\right),
          \\qquad \\lVert \\bar d_k \\rVert_2 \\le C,

and Gaussian noise with noise multiplier ``z`` hides it:

* **local** (:func:`privatize_local`): the client sends
  ``\\bar d_k + \\mathcal N(0, (zC)^2 I_N)``. Protects against the server itself.
  Adjacency: *any* two datasets of client ``k`` (the local-DP definition), so the
  L2 sensitivity is ``\\lVert \\bar d_k - \\bar d_k' \\rVert_2 \\le 2C`` and the
  accounting noise multiplier is ``z / 2``.
* **central** (:func:`privatize_aggregate`): the server releases
  ``\\frac1n \\sum_k \\bar d_k + \\mathcal N(0, (zC/n)^2 I_N)``, i.e. noise
  ``\\mathcal N(0, (zC)^2)`` on the sum, scaled by the *fixed, public*
  denominator ``n``. Protects against whoever sees the released aggregate (the
  coefficients in the update log, which every client receives), *not* against the
  server, which sees each ``d_k`` in the clear. Adjacency: add/remove one client's
  whole dataset; the sum's sensitivity is ``C`` and the accounting noise
  multiplier is ``z``.

Accounting (:func:`epsilon`, :class:`DPAccountant`): one ESSAM round releases
twice on the same client data (ascent scalars at ``theta +/- sigma eps(s_i)``,
then descent scalars at ``theta_adv +/- sigma eps(s'_j)``), to the *same* sampled
cohort. A round is therefore one sampling of the cohort followed by two adaptive
Gaussian releases:

.. math:: \\mathcal M_t = \\mathrm{PoissonSample}_q\\big(G_z \\circ G_z\\big)
          \\equiv \\mathrm{PoissonSample}_q\\big(G_{z/\\sqrt 2}\\big),

self-composed over the rounds, with the RDP accountant. Composing ``2T``
*independently* sampled events instead would assume fresh sampling per exchange
and understate epsilon.

Noise RNG: in deployment the noise generator must come from OS entropy
(``rng=None`` here, i.e. ``np.random.default_rng()``), never from the shared seeds
or anything else the server knows or can guess, or the server subtracts it. Pass
a seeded ``np.random.Generator`` only in tests.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

Mode = Literal["local", "central"]
MODES: tuple[Mode, ...] = ("local", "central")
RELEASES_PER_ROUND = 2
"""Gaussian releases of a client's data per ESSAM round: the ascent and the descent exchange."""


# --------------------------------------------------------------------------- mechanisms


def _check_clip(clip: float) -> float:
    clip = float(clip)
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clipping norm must be a finite number > 0, got {clip}")
    return clip


def _check_noise_multiplier(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    return noise_multiplier


def clip_scalars(values: np.ndarray, clip: float) -> np.ndarray:
    """Scale a client's per-seed loss differences to L2 norm at most ``C``.

    .. math:: \\bar v = v \\, \\min\\left(1, \\frac{C}{\\lVert v \\rVert_2}\\right)

    Parameters
    ----------
    values : np.ndarray
        The client's vector ``v`` of loss differences (one per seed), any shape;
        the norm is taken over all entries.
    clip : float
        The clipping norm ``C > 0``.

    Returns
    -------
    np.ndarray
        A new float64 array: ``v`` itself if ``||v|| <= C``, else ``v`` rescaled to
        norm ``C`` (same direction).

    Raises
    ------
    ValueError
        If ``C`` is not a positive finite number or ``v`` has a non-finite entry
        (a NaN or inf reply must be rejected, not clipped).
    """
    clip = _check_clip(clip)
    v = np.array(values, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite to be clipped")
    norm = float(np.linalg.norm(v))
    if norm > clip:
        v *= clip / norm
    return v


def privatize_local(
    values: np.ndarray,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A client's local-DP release: clip, then add Gaussian noise per coordinate.

    .. math:: \\tilde d_k = \\bar d_k + \\xi, \\qquad \\xi \\sim \\mathcal N(0, (zC)^2 I_N)

    Against the server, any two datasets of the client give clipped vectors at most
    ``2C`` apart, so one release is a Gaussian mechanism with noise multiplier
    ``z / 2`` (see :func:`accounting_noise_multiplier`).

    Parameters
    ----------
    values : np.ndarray
        The client's per-seed loss differences ``d_k``.
    clip : float
        Clipping norm ``C``.
    noise_multiplier : float
        ``z``: noise standard deviation in units of ``C``.
    rng : np.random.Generator, optional
        Source of the noise. ``None`` (the default, and the only correct choice in
        deployment) draws a generator from OS entropy. It must never be derived from
        the shared seeds or other values the server knows, or the server can
        regenerate and subtract the noise. Seed it only in tests.

    Returns
    -------
    np.ndarray
        ``\\bar d_k + \\xi`` (float64, same shape as ``values``).
    """
    clipped = clip_scalars(values, clip)
    scale = _check_noise_multiplier(noise_multiplier) * _check_clip(clip)
    rng = np.random.default_rng() if rng is None else rng
    return clipped + rng.normal(0.0, scale, size=clipped.shape)


def privatize_aggregate(
    mean_of_clipped: np.ndarray,
    clip: float,
    noise_multiplier: float,
    num_clients: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The server's central-DP release of the mean of ``n`` clipped client vectors.

    .. math:: \\tilde d = \\frac1n \\sum_{k=1}^n \\bar d_k + \\xi,
              \\qquad \\xi \\sim \\mathcal N\\left(0, \\left(\\frac{zC}{n}\\right)^2 I_N\\right)

    equivalently ``(sum_k \\bar d_k + N(0, (zC)^2 I)) / n``.

    Adjacency: add/remove one client (its whole dataset), with ``n`` a fixed public
    denominator (the cohort size the server asked for, or the expected cohort size
    ``qK`` under Poisson sampling), not the count of replies that happened to
    arrive. Adding or removing client ``k`` changes the sum by ``\\bar d_k``, so the
    sum's sensitivity is ``C`` and the mean's is ``C / n``: the noise multiplier is
    ``z``. Under replace-one adjacency the sensitivity would be ``2C / n`` and the
    same noise only gives ``z / 2``; the Poisson-subsampled accountant used here is
    the add/remove one.

    Parameters
    ----------
    mean_of_clipped : np.ndarray
        ``(1/n) sum_k clip_scalars(d_k, C)``: clip *every* client's vector before
        averaging, and average without example-count weights (a weight ``n_k``
        would scale one client's influence beyond ``C / n``).
    clip : float
        Clipping norm ``C`` used on each client vector.
    noise_multiplier : float
        ``z``.
    num_clients : int
        The denominator ``n >= 1``.
    rng : np.random.Generator, optional
        Server-side noise source; ``None`` draws from OS entropy. Seed only in tests.

    Returns
    -------
    np.ndarray
        The noised mean (float64).
    """
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients}")
    mean = np.asarray(mean_of_clipped, dtype=np.float64)
    if not np.all(np.isfinite(mean)):
        raise ValueError("mean_of_clipped must be finite")
    scale = _check_noise_multiplier(noise_multiplier) * _check_clip(clip) / int(num_clients)
    rng = np.random.default_rng() if rng is None else rng
    return mean + rng.normal(0.0, scale, size=mean.shape)


# --------------------------------------------------------------------------- accounting


def accounting_noise_multiplier(noise_multiplier: float, mode: Mode) -> float:
    """Noise standard deviation over L2 sensitivity, the ``z`` an accountant needs.

    .. math:: z_{\\text{acc}} = \\frac{zC}{\\Delta_2}, \\quad
              \\Delta_2 = \\begin{cases} C & \\text{central (add/remove one client, on the sum)} \\\\
                                        2C & \\text{local (any two datasets of one client)} \\end{cases}

    Parameters
    ----------
    noise_multiplier : float
        The configured ``z`` (noise std ``zC``).
    mode : {"local", "central"}

    Returns
    -------
    float
        ``z`` (central) or ``z / 2`` (local).
    """
    z = _check_noise_multiplier(noise_multiplier)
    if mode == "central":
        return z
    if mode == "local":
        return z / 2.0
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_rate(sampling_rate: float) -> float:
    q = float(sampling_rate)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {sampling_rate}")
    return q


def round_event(
    sampling_rate: float,
    noise_multiplier: float,
    releases_per_round: int = RELEASES_PER_ROUND,
    same_cohort: bool = True,
) -> dp_event.DpEvent:
    """The dp-accounting event of one round.

    .. math:: \\text{same cohort: } \\mathrm{PoissonSampled}_q\\big(G_z^{\\circ r}\\big)
              \\qquad \\text{fresh cohort per exchange: } \\big(\\mathrm{PoissonSampled}_q(G_z)\\big)^{\\circ r}

    with ``r = releases_per_round``. ESSAM asks the same sampled clients for the
    ascent and the descent scalars, hence ``same_cohort=True``.

    Parameters
    ----------
    sampling_rate : float
        ``q``: probability that a given client is in the round's cohort.
    noise_multiplier : float
        Accounting noise multiplier (std / sensitivity, see
        :func:`accounting_noise_multiplier`).
    releases_per_round : int
        Gaussian releases of the cohort's data per round (2 for ESSAM).
    same_cohort : bool
        Whether every release of the round uses the same sampled cohort.
    """
    q = _check_rate(sampling_rate)
    z = _check_noise_multiplier(noise_multiplier)  # a float: dp-accounting rejects an int here
    if releases_per_round < 1:
        raise ValueError(f"releases_per_round must be >= 1, got {releases_per_round}")
    gaussian = dp_event.GaussianDpEvent(z)
    if same_cohort:
        return dp_event.PoissonSampledDpEvent(q, dp_event.SelfComposedDpEvent(gaussian, int(releases_per_round)))
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, gaussian), int(releases_per_round))


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def _epsilon_of(event: dp_event.DpEvent, delta: float) -> float:
    """``epsilon`` of ``event`` at ``delta`` with a fresh RDP accountant (add/remove adjacency)."""
    delta = _check_delta(delta)
    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon(
    steps: int,
    sampling_rate: float,
    noise_multiplier: float,
    delta: float,
    releases_per_round: int = RELEASES_PER_ROUND,
    same_cohort: bool = True,
) -> float:
    """``epsilon`` after ``steps`` rounds at a constant sampling rate (RDP accountant).

    .. math:: \\varepsilon(\\delta) \\text{ of } \\big(\\mathrm{PoissonSampled}_q(G_z^{\\circ r})\\big)^{\\circ T}

    Parameters
    ----------
    steps : int
        ``T``: rounds (ESSAM steps).
    sampling_rate : float
        ``q``. Central mode: fraction of clients sampled per round (amplification
        holds only if who was sampled stays secret from the adversary). Local mode
        against the server: ``1``, with ``T`` the rounds the client took part in
        (the server knows who it asked).
    noise_multiplier : float
        Accounting noise multiplier (see :func:`accounting_noise_multiplier`).
    delta : float
        Target ``delta`` in ``(0, 1)``.
    releases_per_round, same_cohort
        See :func:`round_event`.

    Returns
    -------
    float
        ``0`` for no steps or ``q = 0``; ``inf`` for ``z = 0``.
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    _check_delta(delta)
    q = _check_rate(sampling_rate)
    if steps == 0 or q == 0.0:
        return 0.0
    if _check_noise_multiplier(noise_multiplier) == 0.0:
        return math.inf
    event = round_event(q, noise_multiplier, releases_per_round, same_cohort)
    return _epsilon_of(dp_event.SelfComposedDpEvent(event, int(steps)), delta)


class DPAccountant:
    """Running privacy ledger of a federated ESSAM run.

    Parameters
    ----------
    noise_multiplier : float
        The configured ``z`` (``privacy.noise_multiplier``).
    mode : {"central", "local"}
        ``central``: one server-side ledger; call :meth:`record_round` every round
        with ``q`` = sampled clients / clients. ``local``: the guarantee of *one*
        client against the server; call :meth:`record_round` for each round that
        client answered, with ``q = 1`` (no amplification: the server chose it). A
        server reporting local-DP epsilon for all clients uses the client with the
        most participations (or every round, an upper bound).
    releases_per_round : int
        2 for ESSAM (ascent + descent), 1 for ES / MeZO.
    same_cohort : bool
        See :func:`round_event`.

    Notes
    -----
    Rounds are stored as run-length ``(q, count)`` pairs (:meth:`ledger` is their
    composed event). :meth:`epsilon` adds up ``count`` times the per-round RDP
    curve of each rate, which dp-accounting computes once per distinct ``q`` and
    this object caches (the fractional orders cost about 0.3 s per rate), then
    converts with dp-accounting's ``compute_epsilon``: the same numbers as
    composing :meth:`ledger` into a fresh ``RdpAccountant``.
    """

    def __init__(
        self,
        noise_multiplier: float,
        mode: Mode = "central",
        releases_per_round: int = RELEASES_PER_ROUND,
        same_cohort: bool = True,
    ) -> None:
        self.mode: Mode = mode
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self.accounting_noise_multiplier = accounting_noise_multiplier(noise_multiplier, mode)
        if releases_per_round < 1:
            raise ValueError(f"releases_per_round must be >= 1, got {releases_per_round}")
        self.releases_per_round = int(releases_per_round)
        self.same_cohort = bool(same_cohort)
        self._runs: list[tuple[float, int]] = []
        self._rdp_per_round: dict[float, np.ndarray] = {}
        self._orders = np.asarray(RdpAccountant().orders, dtype=np.float64)

    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return sum(count for _, count in self._runs)

    def record_round(self, sampling_rate: float = 1.0) -> None:
        """Record one round at client sampling rate ``q``.

        Raises
        ------
        ValueError
            In local mode if ``q != 1`` (subsampling does not amplify against the
            server that does the sampling).
        """
        q = _check_rate(sampling_rate)
        if self.mode == "local" and q != 1.0:
            raise ValueError(
                "local DP is a guarantee against the server, which knows whom it sampled: "
                "record each round this client answered with sampling_rate=1.0"
            )
        if self._runs and self._runs[-1][0] == q:
            self._runs[-1] = (q, self._runs[-1][1] + 1)
        else:
            self._runs.append((q, 1))

    def ledger(self) -> dp_event.DpEvent:
        """The composed dp-accounting event of all recorded rounds."""
        events: list[dp_event.DpEvent] = [
            dp_event.SelfComposedDpEvent(
                round_event(q, self.accounting_noise_multiplier, self.releases_per_round, self.same_cohort), count)
            for q, count in self._runs
        ]
        return dp_event.ComposedDpEvent(events)

    def epsilon(self, delta: float) -> float:
        """``epsilon`` at ``delta`` of the rounds so far (``0`` before any, ``inf`` for ``z = 0``)."""
        _check_delta(delta)
        if not any(q > 0 for q, _ in self._runs):
            return 0.0
        if self.accounting_noise_multiplier == 0.0:
            return math.inf
        total = np.zeros_like(self._orders)
        for q, count in self._runs:
            total += count * self._round_rdp(q)
        eps, _ = compute_epsilon(self._orders, total, delta)
        return float(eps)

    def _round_rdp(self, sampling_rate: float) -> np.ndarray:
        """RDP curve (over the accountant's orders) of one round at rate ``q``, cached per ``q``."""
        if sampling_rate not in self._rdp_per_round:
            accountant = RdpAccountant(orders=self._orders)
            accountant.compose(
                round_event(sampling_rate, self.accounting_noise_multiplier, self.releases_per_round, self.same_cohort))
            self._rdp_per_round[sampling_rate] = np.array(accountant.rdp, dtype=np.float64)
        return self._rdp_per_round[sampling_rate]


__all__ = [
    "DPAccountant",
    "MODES",
    "Mode",
    "RELEASES_PER_ROUND",
    "accounting_noise_multiplier",
    "clip_scalars",
    "epsilon",
    "privatize_aggregate",
    "privatize_local",
    "round_event",
]
