"""A plain NumPy implementation of fed_essam's noise, written from the spec in
fed_essam/noise.py's docstring, used to check the torch output bit for bit."""

import numpy as np

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def keys(seed: int, tensor_index: int) -> tuple[np.uint32, np.uint32]:
    word = splitmix64(splitmix64(seed) ^ (((tensor_index + 1) * 0xD1B54A32D192ED03) & M64))
    return np.uint32(word & 0xFFFFFFFF), np.uint32(word >> 32)


def mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def noise(seed: int, tensor_index: int, shape, kind: str = "gaussian") -> np.ndarray:
    k0, k1 = keys(seed, tensor_index)
    i = np.arange(int(np.prod(shape)), dtype=np.uint32)
    h = mix32(mix32(i ^ k0) ^ k1)
    if kind == "rademacher":
        out = np.where(h >> np.uint32(31), np.float32(-1), np.float32(1))
    else:
        s = sum(((h >> np.uint32(8 * b)) & np.uint32(0xFF)).astype(np.int32) for b in range(4)) - 510
        scale = np.float32(np.sqrt(3.0 / (256**2 - 1)))
        out = s.astype(np.float32) * scale
    return out.astype(np.float32).reshape(shape)
