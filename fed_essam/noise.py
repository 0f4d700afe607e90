"""Seed-defined noise that is bit-identical on every device.

``eps(seed, tensor_index)`` is a deterministic function of two integers and the
element index, computed with 32-bit integer arithmetic only, so a CPU server, a
CUDA client and a plain NumPy program produce the same float32 bits.

Construction, per element ``i`` of the flattened tensor (``0 <= i < 2**30``):

1. Keys: ``(k0, k1)``, the two 32-bit halves of ``splitmix64(splitmix64(seed) xor
   f(tensor_index))``, computed once per tensor on the host with Python ints.
2. Hash: ``h = mix32(mix32(i xor k0) xor k1)``, where ``mix32`` is the
   ``lowbias32`` finalizer (two xorshift-multiply rounds, multiplication mod 2**32).
3. Gaussian kind: the four bytes ``b_0..b_3`` of ``h`` give the Irwin-Hall sum
   ``S = sum(b) - 2 (M - 1)`` with ``M = 256`` (an exact integer, ``|S| <= 510``),
   and ``eps = float32(S) * sqrt(3 / (M**2 - 1))``. ``float32(S)`` is exact and the
   product is one correctly rounded IEEE multiply, hence bit-identical everywhere.
   ``E[eps] = 0``, ``Var[eps] = 1``, tails bounded by ``2 sqrt(3)`` (kurtosis 2.7).
   Rademacher kind: ``eps = +1 or -1`` from the top bit of ``h``.

Different tensors (and seeds) get independent keys, so same-shaped layers never
share noise (the ESSAM reference code reseeds every tensor with the same seed).

Backends that compute the same bits: ``"numpy"`` (native uint32, the fastest eager
path on a CPU), ``"torch"`` (int32 torch ops with masked shifts, any device),
``"compiled"`` (the torch function through ``torch.compile``: about 20 s to compile
once per process, then several times faster; for large models), and ``"auto"``
(NumPy for CPU tensors, torch elsewhere).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import numpy as np
import torch

NoiseKind = Literal["gaussian", "rademacher"]
NoiseBackend = Literal["auto", "numpy", "torch", "compiled"]

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
_MIX_C1 = 0x7FEB352D
_MIX_C2 = 0x846CA68B
_UNIFORM_LEVELS = 1 << 8
#: float32 scale that gives the Irwin-Hall sum of four 8-bit uniforms unit variance.
GAUSSIAN_SCALE = float(np.float32(math.sqrt(3.0 / (_UNIFORM_LEVELS**2 - 1))))
#: default number of elements generated per eager pass (bounds the temporaries).
DEFAULT_CHUNK = 1 << 16
MAX_ELEMENTS = 1 << 30


def splitmix64(x: int) -> int:
    """SplitMix64 finalizer on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _as_int32(word: int) -> int:
    """The int32 whose two's-complement bits are the uint32 ``word``."""
    return word - (1 << 32) if word >= (1 << 31) else word


def tensor_keys(seed: int, tensor_index: int) -> tuple[int, int]:
    """Two 32-bit keys (as signed int32 values) for one (seed, tensor) stream.

    ``seed`` may be any integer in ``[0, 2**63)``; ``tensor_index`` in ``[0, 2**31)``.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"noise seed must be in [0, 2**63), got {seed}")
    if not 0 <= tensor_index < 2**31:
        raise ValueError(f"tensor_index must be in [0, 2**31), got {tensor_index}")
    word = splitmix64(splitmix64(seed) ^ ((tensor_index + 1) * 0xD1B54A32D192ED03 & MASK64))
    return _as_int32(word & 0xFFFFFFFF), _as_int32(word >> 32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finalizer (C. Wellons) on int32 tensors with uint32 semantics.

    Multiplication wraps mod 2**32 (two's complement); ``>>`` is made logical by
    masking the sign-extended bits.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _as_int32(_MIX_C1)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _as_int32(_MIX_C2)
    return x ^ ((x >> 16) & 0xFFFF)


def noise_from_index(index: torch.Tensor, key0: int | torch.Tensor, key1: int | torch.Tensor, kind: NoiseKind) -> torch.Tensor:
    """float32 noise at the int32 element indices ``index`` (any shape).

    ``h = mix32(mix32(index xor key0) xor key1)``; Gaussian kind: the four bytes
    of ``h`` summed, centred and scaled; Rademacher kind: the sign of ``h``.
    """
    h = _mix32(_mix32(index ^ key0) ^ key1)
    if kind == "rademacher":
        return (1 - 2 * ((h >> 31) & 1)).to(torch.float32)
    s = (h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + ((h >> 24) & 0xFF)
    return (s - 2 * (_UNIFORM_LEVELS - 1)).to(torch.float32) * GAUSSIAN_SCALE


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint32 array, in place (wrapping multiplication)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(_MIX_C1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_MIX_C2)
    x ^= x >> np.uint32(16)
    return x


def noise_numpy_into(out: np.ndarray, h: np.ndarray, offset: int, key0: int, key1: int, kind: NoiseKind) -> np.ndarray:
    """Write the noise of indices ``[offset, offset + len(out))`` into ``out`` (float32).

    ``h`` is uint32 scratch of the same length (overwritten). One cache-sized block
    of :func:`noise_numpy`, without allocating the output: callers that stream
    parameters (:mod:`fed_essam.perturb`) reuse their buffers block after block.
    """
    n = out.shape[0]
    h = h[:n]
    h[:] = np.arange(offset, offset + n, dtype=np.uint32)
    h ^= np.uint32(key0 & MASK32)
    _mix32_numpy(h)
    h ^= np.uint32(key1 & MASK32)
    _mix32_numpy(h)
    if kind == "rademacher":
        np.copyto(out, np.where(h >> np.uint32(31), np.float32(-1.0), np.float32(1.0)))
        return out
    pairs = (h & np.uint32(0x00FF00FF)) + ((h >> np.uint32(8)) & np.uint32(0x00FF00FF))  # two 16-bit lanes
    total = (pairs & np.uint32(0xFFFF)) + (pairs >> np.uint32(16))  # sum of the 4 bytes
    centred = total.astype(np.int32) - np.int32(2 * (_UNIFORM_LEVELS - 1))
    np.multiply(centred.astype(np.float32), np.float32(GAUSSIAN_SCALE), out=out)
    return out


def noise_numpy(offset: int, count: int, key0: int, key1: int, kind: NoiseKind, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """The same noise as :func:`noise_from_index` for indices ``[offset, offset + count)``, in NumPy.

    Works on cache-sized chunks; the byte sum uses two 16-bit lanes (SWAR).
    """
    out = np.empty(count, dtype=np.float32)  # (count,)
    h = np.empty(min(chunk, count), dtype=np.uint32)  # scratch, reused
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        noise_numpy_into(out[start:stop], h, offset + start, key0, key1, kind)
    return out


@functools.cache
def _compiled_noise_range() -> Callable[..., torch.Tensor]:
    """``noise_from_index`` over ``arange(n) + start`` fused by ``torch.compile``."""

    def noise_range(start: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor, n: int, kind: str):
        index = torch.arange(n, dtype=torch.int32, device=start.device) + start  # (n,)
        return noise_from_index(index, key0, key1, kind)  # type: ignore[arg-type]

    return torch.compile(noise_range, dynamic=True)


def noise(
    seed: int,
    tensor_index: int,
    shape: tuple[int, ...] | torch.Size,
    *,
    kind: NoiseKind = "gaussian",
    device: torch.device | str = "cpu",
    offset: int = 0,
    count: int | None = None,
    backend: NoiseBackend = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Seed-defined noise ``eps(seed, tensor_index)`` as a float32 tensor.

    Parameters
    ----------
    seed, tensor_index : int
        Define the stream. Different tensor indices give independent noise.
    shape : tuple of int
        Shape of the full tensor the noise belongs to.
    kind : {"gaussian", "rademacher"}
        Unit-variance Irwin-Hall(4) approximation of N(0, 1), or +/-1.
    device : torch.device or str
        Where to compute it; the bits do not depend on it.
    offset, count : int
        Return only the flat elements ``[offset, offset + count)`` (1-D), so that
        callers can stream a large tensor in chunks. ``count=None`` returns the
        whole tensor reshaped to ``shape``.
    backend : {"auto", "numpy", "torch", "compiled"}
        How to compute it; the bits do not depend on it.
    chunk : int
        Elements per pass of the torch backend (bounds the int32 temporaries).

    Returns
    -------
    torch.Tensor
        float32, ``shape`` (or ``(count,)`` when ``count`` is given).
    """
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise ValueError(f"a tensor of {numel} elements exceeds the noise limit of 2**30 elements")
    whole = count is None
    if whole:
        offset, count = 0, numel
    if offset < 0 or count < 0 or offset + count > numel:
        raise ValueError(f"noise slice [{offset}, {offset + count}) is outside a tensor of {numel} elements")
    key0, key1 = tensor_keys(seed, tensor_index)
    device = torch.device(device)
    if backend == "auto":
        backend = "numpy" if device.type == "cpu" else "torch"
    if backend == "numpy":
        out = torch.from_numpy(noise_numpy(offset, count, key0, key1, kind)).to(device)
    elif backend == "compiled":
        as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
        out = _compiled_noise_range()(as_tensor(offset), as_tensor(key0), as_tensor(key1), count, kind)
    elif backend == "torch":
        out = torch.empty(count, dtype=torch.float32, device=device)  # (count,)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            index = torch.arange(offset + start, offset + stop, dtype=torch.int32, device=device)
            out[start:stop] = noise_from_index(index, key0, key1, kind)
    else:
        raise ValueError(f"unknown noise backend {backend!r}; use 'auto', 'numpy', 'torch' or 'compiled'")
    return out.view(tuple(shape)) if whole else out
