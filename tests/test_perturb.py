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


# -- the fused paths (float32 on the CPU): native C loops and NumPy blocks ----------------------------
FUSED_SHAPES = [(70_001,), (3, 5), (1,), (4097,), (9, 8, 7)]  # several blocks, odd tails, one element
FUSED_UPDATES = [
    SeedUpdate((3,), (1e-3,)),  # ~10% of the elements logged: bitmask entries
    SeedUpdate((4,), (1e-6,)),  # a few: int32 index entries
    SeedUpdate((5, 6, 7), (0.5, 0.0, -0.25)),  # several seeds, a zero coefficient, huge moves
    SeedUpdate((8, 9), (1e-4, 2e-4), "rademacher"),
    SeedUpdate((10,), (0.0,)),  # no move at all (but -0.0 + 0.0 = +0.0 still needs the log)
]


def _fused_params():
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in FUSED_SHAPES]
    flat = params[0].data.view(-1)
    flat[:5], flat[5:10], flat[10:15], flat[15:17] = -0.0, 1e-40, -1e-40, 3e38  # signed zeros, denormals, huge
    return params


def _logs_equal(a, b):
    if a.corrections.keys() != b.corrections.keys():
        return False
    for key in a.corrections:
        (wa, va), (wb, vb) = a.corrections[key], b.corrections[key]
        if wa.dtype != wb.dtype or not torch.equal(wa, wb) or not torch.equal(va.view(torch.int32), vb.view(torch.int32)):
            return False
    return True


def _assert_same_trace(a, b):
    """Same logs (add, reflect) and same tensors (at +delta, at -delta, after apply) at every update."""
    for (log_a, plus_a, mirrored_a, minus_a, applied_a), (log_b, plus_b, mirrored_b, minus_b, applied_b) in zip(a, b):
        assert _logs_equal(log_a, log_b) and _logs_equal(mirrored_a, mirrored_b)
        assert _bits_equal(plus_a, plus_b) and _bits_equal(minus_a, minus_b) and _bits_equal(applied_a, applied_b)
    assert len(a) == len(b) == len(FUSED_UPDATES)


def _trace(mode, chunk, monkeypatch):
    """Every intermediate state and log of add / reflect / undo / apply, per update, with one path."""
    from fed_essam.perturb import reflect

    monkeypatch.setenv("FED_ESSAM_NATIVE", "0" if mode == "numpy" else "1")
    backend = "torch" if mode == "torch" else "numpy"
    params, out = _fused_params(), []
    for upd in FUSED_UPDATES:
        before = [p.detach().clone() for p in params]
        log = add_reversibly(params, upd, backend=backend, chunk=chunk)
        plus = [p.detach().clone() for p in params]
        mirrored = reflect(params, upd, log, backend=backend, chunk=chunk)
        minus = [p.detach().clone() for p in params]
        undo(params, upd.scaled(-1.0), mirrored, backend=backend, chunk=chunk)
        assert _bits_equal(params, before), f"{mode}: not restored after {upd}"
        apply_update(params, upd, backend=backend, chunk=chunk)
        out.append((log, plus, mirrored, minus, [p.detach().clone() for p in params]))
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 1000, 2 * 65_536 + 3])
def test_native_loops_numpy_blocks_and_torch_ops_give_the_same_bits_and_logs(chunk, monkeypatch):
    from fed_essam import native_probe

    if native_probe.load() is None:
        pytest.skip(f"native loops unavailable: {native_probe.unavailable_reason()}")
    native = _trace("native", chunk, monkeypatch)
    for other in ("numpy", "torch"):
        _assert_same_trace(native, _trace(other, chunk, monkeypatch))
    encodings = {where.dtype for log, *_ in native for where, _ in log.corrections.values()}
    assert encodings == {torch.int32, torch.uint8}  # both log encodings were exercised


def test_the_numpy_fallback_is_taken_without_a_compiler(tmp_path, monkeypatch):
    from fed_essam import native_probe

    monkeypatch.setenv("FED_ESSAM_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there yet
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native_probe.reset()
    try:
        assert native_probe.load() is None
        assert "compiler" in native_probe.unavailable_reason()
        fallback = _trace("native", 1 << 20, monkeypatch)  # asks for native, gets the NumPy blocks
        torch_ops = _trace("torch", 1 << 20, monkeypatch)
        _assert_same_trace(fallback, torch_ops)
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.so"))
    finally:
        native_probe.reset()


def test_fed_essam_native_0_forces_the_fallback(monkeypatch):
    from fed_essam import native_probe

    monkeypatch.setenv("FED_ESSAM_NATIVE", "0")
    assert native_probe.load() is None and "FED_ESSAM_NATIVE" in native_probe.unavailable_reason()


def test_concurrent_builds_publish_one_complete_library(tmp_path, monkeypatch):
    import ctypes
    import shutil
    import threading

    from fed_essam import native_probe

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    target = tmp_path / "probe.so"
    errors = []

    def build():
        try:
            native_probe._build(target, [shutil.which("cc")], native_probe.FLAG_SETS[1])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["probe.so"]  # no temporary left behind
    assert native_probe._self_test(native_probe.NativeProbe(ctypes.CDLL(str(target))))


def test_only_float32_cpu_tensors_with_the_numpy_backend_take_the_fused_path():
    from fed_essam.perturb import _numpy_path

    cpu32 = torch.zeros(3)
    assert _numpy_path(cpu32, "auto") and _numpy_path(cpu32, "numpy")
    assert not _numpy_path(cpu32, "torch") and not _numpy_path(cpu32, "compiled")
    assert not _numpy_path(torch.zeros(3, dtype=torch.bfloat16), "auto")
    assert not _numpy_path(torch.zeros(3, device="meta"), "auto")  # any non-CPU device (CUDA) takes torch ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_undo_log_encodings_restore_on_the_torch_path(dtype):
    params = _params(dtype)
    before = [p.detach().clone() for p in params]
    for coeff in (1e-6, 1e-3, 0.3):  # sparse (indices) to dense (bitmask)
        upd = SeedUpdate((17,), (coeff,))
        log = add_reversibly(params, upd, backend="torch", chunk=64)
        undo(params, upd, log, backend="torch", chunk=64)
        assert _bits_equal(params, before)
