"""Native (C) loops for the probing passes over float32 CPU tensors: same bits, ~3x faster.

The NumPy path of :mod:`fed_essam.perturb` spends most of its time making the noise
(about twenty NumPy passes over every block) and compacting the check mask. Here one
C loop per block computes the hash, ``eps``, ``delta = sum_k fl(c_k eps_k)``, the
move, the round-trip check and the log, with the same IEEE float32 operations in the
same order. Built without ``-ffast-math`` and with ``-ffp-contract=off`` (no FMA
contraction, no reassociation), so the bits equal the NumPy and torch paths; a
self-test at load time checks that against the NumPy noise and refuses a library
that disagrees.

Used only for float32 tensors on the CPU with the ``"auto"`` or ``"numpy"`` noise
backend (never on CUDA, never with ``"torch"`` / ``"compiled"``). The library is
compiled on first use with the system C compiler (``$CC``, else ``cc``) into a
per-user cache, ``$FED_ESSAM_CACHE_DIR`` or ``$XDG_CACHE_HOME/fed-essam/native``
(default ``~/.cache/fed-essam/native``), under a name keyed by the source, the flags
and the CPU; the build writes to a temporary file in that directory and renames it
into place, so concurrent processes and threads never load a half-written file.
:func:`load` returns ``None``, and :mod:`fed_essam.perturb` uses its NumPy blocks
(identical bits, ~3x slower), when ``FED_ESSAM_NATIVE=0`` is set (checked on every
call), when there is no compiler, or when the build, the load or the self-test fails;
:func:`unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fed_essam.noise import GAUSSIAN_SCALE, MASK32, NoiseKind, noise_numpy, tensor_keys

_LOG = logging.getLogger(__name__)

#: tried in order; the first that builds and passes the self-test is used.
FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"),
    ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"),
)
BUILD_TIMEOUT_S = 120

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define BLOCK 4096  /* a multiple of 8: bitmask bytes never straddle blocks */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16; return x;
}

/* d = sum_t fl(c_t * eps_t) over one block, term by term (separate multiply and add). */
static void delta_block(float *d, int64_t n, uint32_t off, const uint32_t *k0, const uint32_t *k1,
                        const float *c, int K, int kind, float scale) {
    for (int t = 0; t < K; t++) {
        const uint32_t a = k0[t], b = k1[t]; const float ct = c[t];
        for (int64_t i = 0; i < n; i++) {
            uint32_t h = mix32(mix32((off + (uint32_t)i) ^ a) ^ b);
            float e;
            if (kind) {
                e = (h >> 31) ? -1.0f : 1.0f;
            } else {
                uint32_t p = (h & 0x00FF00FFu) + ((h >> 8) & 0x00FF00FFu);
                int32_t s = (int32_t)((p & 0xFFFFu) + (p >> 16)) - 510;
                e = (float)s * scale;
            }
            e = e * ct;
            d[i] = (t == 0) ? e : d[i] + e;
        }
    }
    if (K == 0) for (int64_t i = 0; i < n; i++) d[i] = 0.0f;
}

static inline uint32_t bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* The old log of a chunk: chunk-local int32 indices (old_mask == 0) or a little-endian
   bitmask (old_idx == 0), with the values in index order. Writes the entries that fall
   in [b0, b0 + m) into the block o (block-local); *j is the cursor into old_val. */
static void write_back(float *o, int64_t b0, int64_t m, const int32_t *old_idx, const uint8_t *old_mask,
                       const float *old_val, int64_t old_n, int64_t *j) {
    if (old_n == 0) return;
    if (old_idx) {
        for (; *j < old_n && old_idx[*j] < b0 + m; (*j)++) o[old_idx[*j] - b0] = old_val[*j];
        return;
    }
    for (int64_t byte = b0 >> 3; byte < ((b0 + m + 7) >> 3); byte++) {
        uint32_t w = old_mask[byte];
        while (w) {
            int bit = __builtin_ctz(w);
            o[(byte << 3) + bit - b0] = old_val[(*j)++];
            w &= w - 1;
        }
    }
}

/* One chunk: (restore: theta <- theta - delta, then the old log) then theta <- theta +/- delta,
   logging the elements (value before the move) whose round trip differs bitwise, both as
   chunk-local indices (idx, room for n + 1: branch-free compaction) and as a bitmask
   (mask, (n + 7) / 8 bytes), values in val (room for n + 1). Returns the number logged. */
int64_t add_checked(float *th, int64_t n, uint32_t off, const uint32_t *k0, const uint32_t *k1,
                    const float *c, int K, int kind, float scale, int negate, int restore,
                    const int32_t *old_idx, const uint8_t *old_mask, const float *old_val, int64_t old_n,
                    int32_t *idx, uint8_t *mask, float *val) {
    float d[BLOCK], o[BLOCK];
    int64_t cnt = 0, j = 0;
    memset(mask, 0, (size_t)((n + 7) >> 3));
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        int64_t m = n - b0 < BLOCK ? n - b0 : BLOCK;
        delta_block(d, m, off + (uint32_t)b0, k0, k1, c, K, kind, scale);
        float *t = th + b0;
        if (restore) {
            for (int64_t i = 0; i < m; i++) o[i] = t[i] - d[i];
            write_back(o, b0, m, old_idx, old_mask, old_val, old_n, &j);
        } else {
            memcpy(o, t, (size_t)m * sizeof(float));
        }
        for (int64_t i = 0; i < m; i++) {
            float mv = negate ? o[i] - d[i] : o[i] + d[i];
            float bk = negate ? mv + d[i] : mv - d[i];
            uint32_t wrong = bits(bk) != bits(o[i]);
            idx[cnt] = (int32_t)(b0 + i); val[cnt] = o[i];
            mask[(b0 + i) >> 3] |= (uint8_t)(wrong << ((b0 + i) & 7));
            cnt += wrong;
            t[i] = mv;
        }
    }
    return cnt;
}

/* theta <- theta - delta (sub) or theta + delta, then the old log written back. */
void shift(float *th, int64_t n, uint32_t off, const uint32_t *k0, const uint32_t *k1,
           const float *c, int K, int kind, float scale, int sub,
           const int32_t *old_idx, const uint8_t *old_mask, const float *old_val, int64_t old_n) {
    float d[BLOCK];
    int64_t j = 0;
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        int64_t m = n - b0 < BLOCK ? n - b0 : BLOCK;
        delta_block(d, m, off + (uint32_t)b0, k0, k1, c, K, kind, scale);
        float *t = th + b0;
        if (sub) for (int64_t i = 0; i < m; i++) t[i] = t[i] - d[i];
        else     for (int64_t i = 0; i < m; i++) t[i] = t[i] + d[i];
        write_back(t, b0, m, old_idx, old_mask, old_val, old_n, &j);
    }
}

/* The noise alone (the self-test compares it with the NumPy noise). */
void noise(float *out, int64_t n, uint32_t off, uint32_t k0, uint32_t k1, int kind, float scale) {
    float one = 1.0f;
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        int64_t m = n - b0 < BLOCK ? n - b0 : BLOCK;
        delta_block(out + b0, m, off + (uint32_t)b0, &k0, &k1, &one, 1, kind, scale);
    }
}
"""

_P = ctypes.c_void_p
_I64, _U32, _INT, _F32 = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_float
#: a log entry of one chunk: (int32 chunk-local indices or uint8 bitmask, float32 values).
Entry = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Terms:
    """The non-zero terms of a :class:`~fed_essam.perturb.SeedUpdate` for one tensor, as C arrays."""

    key0: np.ndarray
    key1: np.ndarray
    coeffs: np.ndarray
    kind: int

    @classmethod
    def of(cls, seeds: tuple[int, ...], coeffs: tuple[float, ...], kind: NoiseKind, tensor_index: int) -> "Terms":
        keys = [(tensor_keys(s, tensor_index), c) for s, c in zip(seeds, coeffs) if c != 0.0]
        return cls(np.array([k[0] & MASK32 for k, _ in keys], np.uint32), np.array([k[1] & MASK32 for k, _ in keys], np.uint32),
                   np.array([c for _, c in keys], np.float32), int(kind == "rademacher"))

    def args(self) -> tuple:
        return (self.key0.ctypes.data, self.key1.ctypes.data, self.coeffs.ctypes.data, len(self.coeffs), self.kind,
                GAUSSIAN_SCALE)


@dataclass
class Checked:
    """What :meth:`NativeProbe.add_checked` found in one chunk: ``count`` elements, in three buffers.

    ``idx[:count]`` (int32 chunk-local indices), ``mask`` (the same set as a bitmask)
    and ``val[:count]`` (their values before the move). Torch-allocated, so that
    :func:`fed_essam.memory.measure_peak_memory` sees them when they live.
    """

    count: int
    idx: torch.Tensor
    mask: torch.Tensor
    val: torch.Tensor


class NativeProbe:
    """The loaded library; chunks are float32 NumPy views of the parameters (modified in place)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.add_checked.restype = _I64
        lib.add_checked.argtypes = [_P, _I64, _U32, _P, _P, _P, _INT, _INT, _F32, _INT, _INT, _P, _P, _P, _I64, _P, _P, _P]
        lib.shift.restype = None
        lib.shift.argtypes = [_P, _I64, _U32, _P, _P, _P, _INT, _INT, _F32, _INT, _P, _P, _P, _I64]
        lib.noise.restype = None
        lib.noise.argtypes = [_P, _I64, _U32, _U32, _U32, _INT, _F32]

    @staticmethod
    def _old(entry: Entry | None) -> tuple:
        """``(indices, bitmask, values, count)`` pointers of an old log entry (``None`` for the absent one)."""
        if entry is None:
            return None, None, None, 0
        where, values = entry
        if where.dtype == torch.int32:
            return where.data_ptr(), None, values.data_ptr(), values.numel()
        if where.dtype == torch.uint8:
            return None, where.data_ptr(), values.data_ptr(), values.numel()
        raise TypeError(f"undo log entry of dtype {where.dtype}; expected int32 indices or a uint8 bitmask")

    def add_checked(self, theta: np.ndarray, start: int, terms: Terms, *, negate: bool = False,
                    restore: bool = False, old: Entry | None = None) -> Checked:
        """See the C source (``add_checked``)."""
        n = theta.size
        idx = torch.empty(n + 1, dtype=torch.int32)
        mask = torch.empty((n + 7) // 8, dtype=torch.uint8)
        val = torch.empty(n + 1, dtype=torch.float32)
        count = self.lib.add_checked(theta.ctypes.data, n, start, *terms.args(), int(negate), int(restore),
                                     *self._old(old), idx.data_ptr(), mask.data_ptr(), val.data_ptr())
        return Checked(int(count), idx, mask, val)

    def shift(self, theta: np.ndarray, start: int, terms: Terms, *, sub: bool, old: Entry | None = None) -> None:
        """``theta -/+= delta`` in place, then the old log entry written back."""
        self.lib.shift(theta.ctypes.data, theta.size, start, *terms.args(), int(sub), *self._old(old))

    def noise(self, offset: int, count: int, key0: int, key1: int, kind: NoiseKind) -> np.ndarray:
        """The noise of indices ``[offset, offset + count)`` (as :func:`fed_essam.noise.noise_numpy`)."""
        out = np.empty(count, np.float32)
        self.lib.noise(out.ctypes.data, count, offset, key0 & MASK32, key1 & MASK32, int(kind == "rademacher"),
                       GAUSSIAN_SCALE)
        return out


def _cpu_tag() -> str:
    """Identifies the instruction set the library was built for (``-march=native``)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def cache_dir() -> Path:
    """Where the built library lives (per user): ``$FED_ESSAM_CACHE_DIR``, else the XDG cache."""
    if os.environ.get("FED_ESSAM_CACHE_DIR"):
        return Path(os.environ["FED_ESSAM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fed-essam" / "native"


def _build(target: Path, compiler: list[str], flags: tuple[str, ...]) -> None:
    """Compile into a temporary file next to ``target``, then rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        subprocess.run([*compiler, *flags, "-o", str(out), str(src)], check=True, capture_output=True,
                       timeout=BUILD_TIMEOUT_S)
        os.replace(out, target)  # atomic: concurrent builders never expose a half-written file


def _self_test(probe: NativeProbe) -> bool:
    """The native noise equals the NumPy noise bit for bit (both kinds, a few streams)."""
    for seed, index, offset, count in ((0, 0, 0, 9001), (2**62 + 7, 13, 12345, 5003)):
        key0, key1 = tensor_keys(seed, index)
        for kind in ("gaussian", "rademacher"):
            got = probe.noise(offset, count, key0, key1, kind)
            want = noise_numpy(offset, count, key0, key1, kind)  # type: ignore[arg-type]
            if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                return False
    return True


_UNAVAILABLE: dict[str, str] = {}
_LOCK = threading.Lock()


@functools.cache
def _load_library() -> NativeProbe | None:
    """Build (once per machine) and load the library; ``None`` (with the reason recorded) on failure."""
    _UNAVAILABLE.clear()
    if platform.system() not in ("Linux", "Darwin"):
        _UNAVAILABLE["reason"] = f"native loops are built on Linux and macOS only, not {platform.system()}"
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    found = shutil.which(compiler[0]) if compiler else None
    if found is None:
        _UNAVAILABLE["reason"] = f"no C compiler ({os.environ.get('CC') or 'cc'!r} not found)"
        return None
    compiler[0] = found
    errors = []
    for flags in FLAG_SETS:
        tag = hashlib.sha256("\0".join([SOURCE, *flags, _cpu_tag()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"probe-{tag}.so"
        try:
            if not target.exists():
                _build(target, compiler, flags)
            probe = NativeProbe(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        if _self_test(probe):
            return probe
        errors.append(f"{' '.join(flags)}: self-test failed (bits differ from the NumPy noise)")
    _UNAVAILABLE["reason"] = "; ".join(errors)
    _LOG.info("native probing loops unavailable, using NumPy: %s", _UNAVAILABLE["reason"])
    return None


def disabled() -> bool:
    """``FED_ESSAM_NATIVE=0`` (or ``false``/``no``/``off``): always use the NumPy blocks."""
    return os.environ.get("FED_ESSAM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def load() -> NativeProbe | None:
    """The native kernels, built on first use; ``None`` when disabled or unavailable (use NumPy)."""
    if disabled():
        return None
    with _LOCK:  # one build per process even when threads race here
        return _load_library()


def unavailable_reason() -> str | None:
    """Why :func:`load` returns ``None`` (``None`` when it does not, or has not been asked yet)."""
    if disabled():
        return "disabled by FED_ESSAM_NATIVE=0"
    return _UNAVAILABLE.get("reason")


def reset() -> None:
    """Forget the loaded library (the next :func:`load` looks again; for tests)."""
    with _LOCK:
        _load_library.cache_clear()
        _UNAVAILABLE.clear()


__all__ = ["Checked", "Entry", "NativeProbe", "Terms", "cache_dir", "disabled", "load", "reset", "unavailable_reason"]
