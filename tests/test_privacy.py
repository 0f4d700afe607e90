"""Clipping, Gaussian mechanisms and the RDP accounting of ``fed_essam.privacy``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

import fed_essam.privacy as privacy
from fed_essam.privacy import (
    DPAccountant,
    accounting_noise_multiplier,
    clip_scalars,
    epsilon,
    privatize_aggregate,
    privatize_local,
    round_event,
)

DELTA = 1e-5


def library_epsilon(event: dp_event.DpEvent, delta: float = DELTA) -> float:
    """dp-accounting's own number for ``event``, computed without the module under test."""
    acc = RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.5, 3.0, 1e4])
def test_clip_bounds_norm_and_keeps_direction(scale):
    rng = np.random.default_rng(0)
    clip = 0.7
    for _ in range(20):
        v = scale * rng.normal(size=32)
        out = clip_scalars(v, clip)
        norm = np.linalg.norm(v)
        assert np.linalg.norm(out) <= clip * (1 + 1e-12)
        if norm <= clip:
            np.testing.assert_array_equal(out, v)  # untouched below C
        else:
            assert np.linalg.norm(out) == pytest.approx(clip, rel=1e-12)
            np.testing.assert_allclose(out, v * (clip / norm), rtol=1e-12)
        # same direction: a positive multiple of v
        assert float(out @ v) / (np.linalg.norm(out) * norm) == pytest.approx(1.0, abs=1e-12)


def test_clip_edge_cases():
    v = np.array([3.0, 4.0])
    out = clip_scalars(v, 1.0)
    np.testing.assert_allclose(out, [0.6, 0.8])
    np.testing.assert_array_equal(v, [3.0, 4.0])  # input not modified
    np.testing.assert_array_equal(clip_scalars(np.zeros(4), 1.0), np.zeros(4))
    np.testing.assert_array_equal(clip_scalars(v, 5.0), v)  # exactly at C: unchanged
    assert clip_scalars([1, 2], 10.0).dtype == np.float64
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            clip_scalars(v, bad)
    with pytest.raises(ValueError):
        clip_scalars(np.array([1.0, math.nan]), 1.0)
    with pytest.raises(ValueError):
        clip_scalars(np.array([1.0, math.inf]), 1.0)


# --------------------------------------------------------------------------- mechanisms

# 200k i.i.d. coordinates: the sample std has relative standard error 1/sqrt(2n) ~ 0.16%,
# so a 1% tolerance is > 6 standard errors.
DRAWS = 200_000


def test_local_noise_std_matches_z_times_c():
    clip, z = 0.5, 1.3
    v = np.full(DRAWS, 10.0)  # far above C: clipped to the constant C / sqrt(DRAWS) per entry
    out = privatize_local(v, clip, z, np.random.default_rng(1234))
    noise = out - clip_scalars(v, clip)
    assert noise.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(noise.mean()) < 5 * z * clip / math.sqrt(DRAWS)


def test_local_noise_over_repeated_releases():
    """The same small vector released many times: per-coordinate std z C around the clipped value."""
    clip, z = 2.0, 0.8
    v = np.array([0.3, -1.2, 5.0])
    rng = np.random.default_rng(7)
    outs = np.stack([privatize_local(v, clip, z, rng) for _ in range(20_000)])
    np.testing.assert_allclose(outs.std(axis=0), z * clip, rtol=0.03)
    np.testing.assert_allclose(outs.mean(axis=0), clip_scalars(v, clip), atol=5 * z * clip / math.sqrt(20_000))


def test_local_seeded_reproducible_default_from_os_entropy():
    v = np.array([0.1, 0.2, 0.3])
    a = privatize_local(v, 1.0, 1.0, np.random.default_rng(5))
    b = privatize_local(v, 1.0, 1.0, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    c = privatize_local(v, 1.0, 1.0)  # rng=None: OS entropy
    d = privatize_local(v, 1.0, 1.0)
    assert not np.array_equal(c, d)
    np.testing.assert_array_equal(privatize_local(v, 1.0, 0.0, np.random.default_rng(0)), v)  # z = 0: clip only


def test_central_noise_scale_is_z_c_over_n():
    clip, z, n = 1.5, 1.1, 8
    mean = np.zeros(DRAWS)
    out = privatize_aggregate(mean, clip, z, n, np.random.default_rng(99))
    assert out.std() == pytest.approx(z * clip / n, rel=0.01)
    with pytest.raises(ValueError):
        privatize_aggregate(mean[:3], clip, z, 0)
    with pytest.raises(ValueError):
        privatize_aggregate(mean[:3], clip, z, 2.5)


def test_central_equals_noise_on_the_sum_divided_by_n():
    """mean + N(0, (zC/n)^2) is (sum + N(0, (zC)^2)) / n for the same standard normal draw."""
    clip, z = 1.0, 2.0
    rows = np.random.default_rng(3).normal(scale=3.0, size=(5, 16))
    clipped = np.stack([clip_scalars(r, clip) for r in rows])
    out = privatize_aggregate(clipped.mean(axis=0), clip, z, len(rows), np.random.default_rng(11))
    xi = np.random.default_rng(11).normal(0.0, 1.0, size=16)
    np.testing.assert_allclose(out, (clipped.sum(axis=0) + z * clip * xi) / len(rows), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- accounting


def test_accounting_noise_multiplier_matches_sensitivity():
    assert accounting_noise_multiplier(1.2, "central") == 1.2  # sum sensitivity C
    assert accounting_noise_multiplier(1.2, "local") == 0.6  # any two client datasets: 2C
    with pytest.raises(ValueError):
        accounting_noise_multiplier(1.0, "global")


def test_round_event_structure():
    assert round_event(0.1, 1.5) == dp_event.PoissonSampledDpEvent(
        0.1, dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.5), 2))
    assert round_event(0.1, 1.5, releases_per_round=1, same_cohort=False) == dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.5)), 1)
    # an int multiplier is stored as a float (dp-accounting rejects ints inside PoissonSampledDpEvent)
    assert isinstance(round_event(0.5, 1).event.event.noise_multiplier, float)
    assert math.isfinite(epsilon(10, 0.5, 1, DELTA))


def test_epsilon_composes_the_expected_event(monkeypatch):
    """epsilon() hands the accountant exactly T rounds of PoissonSampled(q, G_z twice)."""
    composed = []

    class Recording(RdpAccountant):
        def compose(self, event, count=1):
            composed.append((event, count))
            return super().compose(event, count)

    monkeypatch.setattr(privacy, "RdpAccountant", Recording)
    eps = epsilon(250, 0.05, 3.5, DELTA)
    expected = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.05, dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(3.5), 2)), 250)
    assert composed == [(expected, 1)]
    monkeypatch.undo()
    assert eps == library_epsilon(expected)


def test_reference_value_against_library():
    """The classic DP-SGD setting z=1.1, q=0.01, 1000 steps, delta=1e-5 (one release per step)."""
    ours = epsilon(1000, 0.01, 1.1, DELTA, releases_per_round=1)
    direct = library_epsilon(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 1000))
    assert ours == direct
    assert 0.5 < ours < 5.0  # "a few epsilon"


def test_two_releases_same_cohort_is_one_gaussian_with_z_over_sqrt2():
    """G_z composed twice on the same sample is G_{z/sqrt 2}; fresh sampling per exchange would claim less."""
    z, q, t = 1.1, 0.01, 1000
    ours = epsilon(t, q, z, DELTA)
    merged = library_epsilon(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z / math.sqrt(2))), t))
    assert ours == pytest.approx(merged, rel=1e-9)
    independent = epsilon(t, q, z, DELTA, same_cohort=False)
    assert independent == library_epsilon(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), 2 * t))
    assert independent < ours
    assert epsilon(t, q, z, DELTA, releases_per_round=1) < ours


def test_unsampled_gaussian_matches_closed_form():
    """q = 1 (local mode vs the server): RDP of T' Gaussian releases is T' a / (2 z^2); eps via the
    Canonne-Kamath-Steinke conversion eps = min_a [rdp(a) + log(1 - 1/a) - log(delta a) / (a - 1)],
    over dp-accounting's default orders, written out here."""
    z_config, rounds = 4.0, 30
    z = accounting_noise_multiplier(z_config, "local")  # 2.0
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], float)
    rdp = 2 * rounds * orders / (2 * z**2)
    derived = float(np.min(rdp + np.log1p(-1 / orders) - np.log(DELTA * orders) / (orders - 1)))
    assert epsilon(rounds, 1.0, z, DELTA) == pytest.approx(derived, rel=1e-9)
    acc = DPAccountant(z_config, mode="local")
    for _ in range(rounds):
        acc.record_round()
    assert acc.epsilon(DELTA) == pytest.approx(derived, rel=1e-9)


def test_epsilon_monotonicity():
    base = dict(steps=200, sampling_rate=0.02, noise_multiplier=3.0, delta=DELTA)
    e0 = epsilon(**base)
    assert epsilon(**{**base, "noise_multiplier": 4.0}) < e0 < epsilon(**{**base, "noise_multiplier": 2.0})
    assert epsilon(**{**base, "steps": 50}) < e0 < epsilon(**{**base, "steps": 800})
    assert epsilon(**{**base, "sampling_rate": 0.01}) < e0 < epsilon(**{**base, "sampling_rate": 0.05})
    assert epsilon(**{**base, "delta": 1e-3}) < e0 < epsilon(**{**base, "delta": 1e-8})


def test_epsilon_edge_cases():
    assert epsilon(0, 0.1, 1.0, DELTA) == 0.0
    assert epsilon(10, 0.0, 1.0, DELTA) == 0.0
    assert epsilon(10, 0.1, 0.0, DELTA) == math.inf
    for kwargs in (dict(steps=-1), dict(sampling_rate=1.5), dict(noise_multiplier=-1.0), dict(delta=0.0),
                   dict(delta=1.0), dict(releases_per_round=0)):
        with pytest.raises(ValueError):
            epsilon(**{**dict(steps=10, sampling_rate=0.1, noise_multiplier=1.0, delta=DELTA), **kwargs})


def test_accountant_accumulates_rounds():
    z = 4.0
    acc = DPAccountant(z)
    assert acc.rounds == 0 and acc.epsilon(DELTA) == 0.0
    for _ in range(100):
        acc.record_round(0.1)
    assert acc.rounds == 100
    assert acc.epsilon(DELTA) == pytest.approx(epsilon(100, 0.1, z, DELTA), rel=1e-12)
    e100 = acc.epsilon(DELTA)
    for _ in range(50):
        acc.record_round(0.2)  # the cohort fraction changed (e.g. clients dropped out)
    acc.record_round(0.1)
    assert acc.rounds == 151
    expected = dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(round_event(0.1, z), 100),
        dp_event.SelfComposedDpEvent(round_event(0.2, z), 50),
        dp_event.SelfComposedDpEvent(round_event(0.1, z), 1),
    ])
    assert acc.ledger() == expected
    assert acc.epsilon(DELTA) == pytest.approx(library_epsilon(expected), rel=1e-12)
    assert acc.epsilon(DELTA) > e100


def test_accountant_modes():
    local = DPAccountant(2.0, mode="local", releases_per_round=1)
    assert local.accounting_noise_multiplier == 1.0
    with pytest.raises(ValueError, match="sampling_rate=1.0"):
        local.record_round(0.1)
    local.record_round()
    assert local.epsilon(DELTA) == epsilon(1, 1.0, 1.0, DELTA, releases_per_round=1)
    assert DPAccountant(0.0).epsilon(DELTA) == 0.0
    silent = DPAccountant(0.0)
    silent.record_round(0.5)
    assert silent.epsilon(DELTA) == math.inf
    with pytest.raises(ValueError):
        DPAccountant(1.0, mode="both")
