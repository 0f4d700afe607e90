import copy

import pytest
import torch

import fed_essam
from fed_essam.perturb import SeedUpdate, add_reversibly, apply_update, direction_norm, fingerprint, perturbed, undo
from fed_essam.noise import noise

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (17, 5, 3), (1,)]
    out = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype)) for s in shapes]
    out[1].data.fill_(1.0)  # a norm weight sitting exactly on a binade edge
    out[2].data.view(-1)[:10] = 0.0  # exact zeros (signed-zero trap)
    return out


def _bits_equal(a, b):
    return all(torch.equal(x.detach().view(BITS[x.dtype]), y.detach().view(BITS[y.dtype])) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thousand_probes_leave_no_drift(dtype):
    params = _params(dtype)
    before = [p.detach().clone() for p in params]
    for s in range(1000):
        sigma = 1e-3 if s % 2 else -1e-3
        with perturbed(params, SeedUpdate((s,), (sigma,))) as log:
            assert not _bits_equal(params, before)  # the probe really moved theta
        assert _bits_equal(params, before), f"drift after probe {s} (log had {log.num_corrections} corrections)"


def test_naive_add_subtract_drifts_in_bfloat16():
    # the failure mode the undo log exists for: theta + d - d != theta
    params = _params(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for s in range(50):
            for i, p in enumerate(params):
                d = noise(s, i, p.shape) * 1e-3
                p.copy_((p.float() + d).bfloat16())
                p.copy_((p.float() - d).bfloat16())
    assert not _bits_equal(params, before)


def test_perturbed_moves_by_the_seed_defined_delta():
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    upd = SeedUpdate((3, 4), (0.5, -0.25))
    with perturbed(params, upd):
        for i, (p, b) in enumerate(zip(params, before)):
            want = b + (noise(3, i, p.shape) * 0.5 + noise(4, i, p.shape) * -0.25)
            assert torch.equal(p, want)


def test_restores_even_when_the_closure_raises():
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError):
        with perturbed(params, SeedUpdate((1,), (1e-2,))):
            raise RuntimeError("probe failed")
    assert _bits_equal(params, before)


def test_apply_update_replays_bit_exactly_and_chunking_is_invisible():
    a, b = _params(torch.float32), _params(torch.float32)
    for t in range(5):
        upd = SeedUpdate(tuple(range(10 * t, 10 * t + 8)), tuple(1e-3 * (k - 4) for k in range(8)))
        apply_update(a, upd)
        apply_update(b, upd, chunk=7)
    assert _bits_equal(a, b)
    assert fingerprint(a) == fingerprint(b)
    a[0].data[0, 0] += 1e-6
    assert fingerprint(a) != fingerprint(b)


def test_direction_norm_matches_materialized_vector():
    params = _params(torch.float32)
    upd = SeedUpdate((1, 2, 3), (0.3, -0.2, 0.1))
    full = torch.cat([sum(c * noise(s, i, p.shape).view(-1).double() for s, c in zip(upd.seeds, upd.coeffs)) for i, p in enumerate(params)])
    assert direction_norm(params, upd) == pytest.approx(full.norm().item(), rel=1e-6)


def test_undo_log_is_sparse():
    params = [torch.nn.Parameter(torch.randn(100_000) * 0.02)]
    log = add_reversibly(params, SeedUpdate((5,), (1e-3,)))
    assert 0 < log.num_corrections < 0.2 * params[0].numel()
    undo(params, SeedUpdate((5,), (1e-3,)), log)


def test_seed_update_coefficients_are_float32_and_roundtrip():
    upd = SeedUpdate((1, 2), (0.1, 1 / 3))
    assert upd.coeffs[0] == float(torch.tensor(0.1, dtype=torch.float32))
    assert SeedUpdate.from_dict(upd.to_dict()) == upd
    with pytest.raises(ValueError):
        SeedUpdate((1,), (0.1, 0.2))


def test_only_trainable_parameters_are_perturbed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    frozen = copy.deepcopy(model[0].state_dict())
    params = fed_essam.trainable_parameters(model)
    assert len(params) == 2
    apply_update(params, SeedUpdate((1,), (0.1,)))
    assert all(torch.equal(v, model[0].state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reflect_equals_undo_then_add_of_the_mirror(dtype):
    from fed_essam.perturb import reflect

    a, b = _params(dtype), _params(dtype)
    probe = SeedUpdate((21,), (3e-3,))
    log_a = add_reversibly(a, probe, chunk=100)
    log_b = add_reversibly(b, probe, chunk=100)
    log_a = reflect(a, probe, log_a, chunk=100)
    undo(b, probe, log_b, chunk=100)
    log_b = add_reversibly(b, probe.scaled(-1.0), chunk=100)
    assert _bits_equal(a, b)
    assert log_a.corrections.keys() == log_b.corrections.keys()
    for key in log_a.corrections:
        assert all(torch.equal(x, y) for x, y in zip(log_a.corrections[key], log_b.corrections[key]))
    before = _params(dtype)
    undo(a, probe.scaled(-1.0), log_a, chunk=100)
    assert _bits_equal(a, before)


def test_antithetic_pair_restores_and_reports_both_sides():
    from fed_essam.optim import antithetic_pair

    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    probe = SeedUpdate((8,), (1e-2,))
    plus, minus = antithetic_pair(params, probe, lambda: float(params[0].sum()))
    with perturbed(params, probe):
        want_plus = float(params[0].sum())
    with perturbed(params, probe.scaled(-1.0)):
        want_minus = float(params[0].sum())
    assert (plus, minus) == (want_plus, want_minus)
    assert _bits_equal(params, before)
