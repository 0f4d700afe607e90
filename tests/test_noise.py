import numpy as np
import pytest
import torch

from fed_essam.noise import noise
from tests import noise_reference

CASES = [(0, 0, (7,)), (1, 3, (33, 17)), (2**62 + 12345, 9, (4, 5, 6)), (987654321, 2**20, (70_001,))]


@pytest.mark.parametrize("seed,index,shape", CASES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bit_exact_against_numpy_reference(seed, index, shape, kind, backend):
    got = noise(seed, index, shape, kind=kind, backend=backend).numpy()
    want = noise_reference.noise(seed, index, shape, kind)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_chunked_slices_match_whole_tensor():
    whole = noise(5, 2, (1000,))
    for backend in ("numpy", "torch"):
        parts = torch.cat([noise(5, 2, (1000,), offset=o, count=c, chunk=37, backend=backend)
                           for o, c in [(0, 300), (300, 1), (301, 699)]])
        assert torch.equal(whole, parts)


def test_moments_of_gaussian_kind():
    x = noise(11, 0, (2_000_000,)).double()
    assert abs(x.mean().item()) < 3e-3  # std error 7e-4
    assert abs(x.var().item() - 1.0) < 5e-3
    kurtosis = (x**4).mean().item()
    assert 2.65 < kurtosis < 2.75  # Irwin-Hall(4): 3 - 6/(5*4) = 2.7
    assert x.abs().max().item() <= 2 * 3**0.5


def test_rademacher_is_balanced_signs():
    x = noise(3, 1, (1_000_000,), kind="rademacher")
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert abs(x.mean().item()) < 4e-3


def test_independent_across_tensor_indices_and_seeds():
    n = 1_000_000
    base = noise(42, 0, (n,))
    for other in (noise(42, 1, (n,)), noise(43, 0, (n,)), noise(42, 7, (n,))):
        corr = torch.corrcoef(torch.stack([base, other]))[0, 1].item()
        assert abs(corr) < 5e-3  # std error 1e-3
        assert not torch.equal(base, other)
    # same-shaped layers must not share noise (the reference code's bug)
    a, b = noise(1, 4, (64, 64)), noise(1, 5, (64, 64))
    assert (a == b).float().mean() < 0.05


def test_neighbouring_elements_uncorrelated():
    x = noise(9, 2, (1_000_001,))
    lag1 = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
    assert abs(lag1) < 5e-3


def test_compiled_backend_matches_eager():
    pytest.importorskip("torch._inductor")
    shape = (123, 45)
    try:
        compiled = noise(77, 3, shape, backend="compiled")
    except Exception as err:  # no C++ compiler on this machine
        pytest.skip(f"torch.compile unavailable: {err}")
    assert torch.equal(compiled.view(torch.int32), noise(77, 3, shape).view(torch.int32))
    part = noise(77, 3, shape, offset=100, count=1000, backend="compiled")
    assert torch.equal(part, noise(77, 3, shape).view(-1)[100:1100])


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**63), dict(tensor_index=-1)])
def test_rejects_out_of_range_integers(bad):
    args = dict(seed=1, tensor_index=0) | bad
    with pytest.raises(ValueError):
        noise(args["seed"], args["tensor_index"], (3,))


def test_rejects_bad_slice_and_backend():
    with pytest.raises(ValueError, match="outside"):
        noise(1, 0, (10,), offset=5, count=6)
    with pytest.raises(ValueError, match="backend"):
        noise(1, 0, (10,), backend="cuda-magic")


@pytest.mark.parametrize("seed,index,shape", CASES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_native_noise_is_bit_exact_against_numpy_reference(seed, index, shape, kind):
    from fed_essam import native_probe
    from fed_essam.noise import tensor_keys

    probe = native_probe.load()
    if probe is None:
        pytest.skip(f"native loops unavailable: {native_probe.unavailable_reason()}")
    count = int(np.prod(shape))
    got = probe.noise(0, count, *tensor_keys(seed, index), kind)
    want = noise_reference.noise(seed, index, shape, kind).reshape(-1)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
