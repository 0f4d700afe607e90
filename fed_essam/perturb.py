"""Pure functions that move parameters along seed-defined directions.

Every change to the parameters in this project is a :class:`SeedUpdate`, a list of
(seed, coefficient) pairs that stands for ``delta = sum_k c_k eps(s_k)``. Whoever
holds the same parameters and applies the same ``SeedUpdate`` gets the same bits,
on any device, because

* ``eps`` is integer-defined (:mod:`fed_essam.noise`),
* ``delta`` is accumulated in float32 one seed at a time, in order, with a
  separate multiply and add (``acc = acc + fl(c_k * eps_k)``; never a fused
  multiply-add, whose rounding differs between devices), and
* the parameter is updated once, ``theta = round_dtype(theta + delta)``.

Probing must never leave the parameters changed, in any dtype. Adding and then
subtracting the same ``delta`` does not give back ``theta`` in floating point:
``fl(fl(theta + delta) - delta) != theta`` for a fraction of the elements that grows
with ``|delta| / |theta|`` (measured on the bench model in float32: about 11.6% for a
probe at sigma 2e-3, about 15% for a two-seed ascent move at rho 4e-3, 1.2% for a
move of size 1e-4, the ESSAM paper's rho). So :func:`add_reversibly` records, while it adds, exactly the elements
that the subtraction would get wrong (their original values, and where they are),
and :func:`undo` subtracts and then writes those back. Memory: the log only, never a
full copy. Where the logged elements are is stored per chunk as int32 indices when
they are few, else as a bitmask (an eighth of a byte per element): at 11-15% the log
costs 0.6-0.7 bytes per parameter (15-18% of float32 weights), against 12 bytes per
logged element (1.4-1.8 bytes per parameter) with int64 indices.

Parameters are streamed in chunks, so the temporaries are bounded by the chunk
size, not the largest tensor. Float32 tensors on the CPU (with the ``"auto"`` or
``"numpy"`` noise backend) take a fused path that finishes every cache-sized block
in one pass: native C loops (:mod:`fed_essam.native_probe`, built on first use) or,
without a C compiler or with ``FED_ESSAM_NATIVE=0``, NumPy blocks. Every path gives
the same bits and the same logs (tested).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_essam import native_probe
from fed_essam.noise import DEFAULT_CHUNK, NoiseBackend, NoiseKind, noise, noise_numpy_into, tensor_keys

#: elements per streamed chunk of a parameter tensor.
STREAM_CHUNK = 1 << 20

_BITS_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def as_float32(value: float) -> float:
    """Round a Python float to the nearest float32 value (returned as a float)."""
    return float(np.float32(value))


@dataclass(frozen=True)
class SeedUpdate:
    """A seed-defined change ``delta = sum_k coeffs[k] * eps(seeds[k])``.

    Coefficients are float32 values, so that the record means the same to every
    party. ``kind`` is the noise distribution.
    """

    seeds: tuple[int, ...]
    coeffs: tuple[float, ...]
    kind: NoiseKind = "gaussian"

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.coeffs):
            raise ValueError(f"{len(self.seeds)} seeds but {len(self.coeffs)} coefficients")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "coeffs", tuple(as_float32(c) for c in self.coeffs))

    def scaled(self, factor: float) -> "SeedUpdate":
        """The same direction with every coefficient multiplied by ``factor``."""
        return SeedUpdate(self.seeds, tuple(c * factor for c in self.coeffs), self.kind)

    def to_dict(self) -> dict:
        """Plain JSON-able form (seeds as ints, coefficients as floats)."""
        return {"seeds": list(self.seeds), "coeffs": list(self.coeffs), "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict) -> "SeedUpdate":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["seeds"]), tuple(data["coeffs"]), data.get("kind", "gaussian"))


@dataclass
class UndoLog:
    """What :func:`undo` needs to restore parameters bit for bit.

    ``corrections[(i, start)] = (where, values)`` covers the chunk of parameter ``i``
    that starts at flat element ``start``: the elements that ``fl(fl(theta + delta) -
    delta)`` gets wrong and their original values (in index order). ``where`` is their
    chunk-local indices (int32, 4 bytes each) or, when that is smaller (more than one
    element in 32 logged), a uint8 bitmask of the chunk (bit ``k % 8`` of byte ``k // 8``;
    an eighth of a byte per element); :func:`entry_indices` decodes either. Every path
    (torch ops, NumPy blocks, native loops) makes the same entries.
    """

    num_tensors: int = 0
    corrections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_corrections(self) -> int:
        """How many elements needed an explicit correction."""
        return sum(int(values.numel()) for _, values in self.corrections.values())

    @property
    def nbytes(self) -> int:
        """Memory held by the log."""
        return sum(idx.numel() * idx.element_size() + val.numel() * val.element_size()
                   for idx, val in self.corrections.values())


def trainable_parameters(params: Sequence[torch.nn.Parameter] | torch.nn.Module) -> list[torch.Tensor]:
    """The parameters that ESSAM perturbs: those with ``requires_grad``, in order.

    The position of a tensor in this list is its ``tensor_index`` in the noise,
    so every party must build the list from the same architecture.
    """
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    out = [p for p in params if p.requires_grad]
    for i, p in enumerate(out):
        if p.dtype not in _BITS_VIEW:
            raise TypeError(f"parameter {i} has dtype {p.dtype}; ESSAM perturbs floating-point tensors only")
        if not p.is_contiguous():
            raise ValueError(f"parameter {i} is not contiguous; call .contiguous() on it before optimizing")
    return out


def _chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def delta_chunk(
    update: SeedUpdate,
    tensor_index: int,
    shape: torch.Size,
    offset: int,
    count: int,
    device: torch.device,
    backend: NoiseBackend = "auto",
) -> torch.Tensor:
    """float32 ``sum_k c_k eps(s_k)`` over flat elements ``[offset, offset + count)``.

    Accumulated seed by seed in order with a separate multiply and add,
    ``acc = fl(c_0 eps_0)``, ``acc = fl(acc + fl(c_k eps_k))``, so the bits do not
    depend on the device. Zero coefficients are skipped.
    """
    acc = None
    for seed, coeff in zip(update.seeds, update.coeffs):
        if coeff == 0.0:
            continue
        eps = noise(seed, tensor_index, shape, kind=update.kind, device=device,
                    offset=offset, count=count, backend=backend)  # (count,)
        term = eps.mul_(coeff)  # fl(c_k * eps_k)
        acc = term if acc is None else acc.add_(term)
    return torch.zeros(count, dtype=torch.float32, device=device) if acc is None else acc


def _round_add(theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``round_dtype(theta + delta)`` with the sum formed in float32 (or float64)."""
    if theta.dtype in (torch.float32, torch.float64):
        return theta + delta
    return (theta.float() + delta).to(theta.dtype)


def _round_sub(theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if theta.dtype in (torch.float32, torch.float64):
        return theta - delta
    return (theta.float() - delta).to(theta.dtype)


@torch.no_grad()
def apply_update(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> None:
    """``theta_i <- round(theta_i + sum_k c_k eps(s_k, i))`` for every tensor ``i``, in place.

    Deterministic and device-independent: replaying the same updates on a copy
    of the same starting parameters gives bit-identical parameters.
    """
    for index, p in enumerate(params):
        if _numpy_path(p, backend):
            _numpy_pass(p, index, update, chunk, "apply")
            continue
        flat = p.view(-1)
        for start, count in _chunks(flat.numel(), chunk):
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            flat[start : start + count] = _round_add(flat[start : start + count], delta)


def _use_bitmask(count: int, numel: int) -> bool:
    """Whether a chunk's log entry stores a bitmask (``numel / 8`` bytes) rather than int32 indices (``4 count``)."""
    return 4 * count > (numel + 7) // 8


def _pack_bits(wrong: torch.Tensor) -> torch.Tensor:
    """A bool vector as a little-endian bitmask: bit ``i % 8`` of byte ``i // 8`` (uint8, any device)."""
    pad = (-wrong.numel()) % 8
    grouped = torch.nn.functional.pad(wrong.to(torch.uint8), (0, pad)).view(-1, 8)  # (bytes, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=wrong.device)
    return (grouped * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: the bool vector of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def entry_indices(entry: tuple[torch.Tensor, torch.Tensor], numel: int) -> torch.Tensor:
    """The chunk-local indices (int64, ascending) of a log entry, whichever its encoding."""
    where = entry[0]
    if where.dtype == torch.uint8:
        return _unpack_bits(where, numel).nonzero().squeeze(1)
    return where.long()


def _log_wrong(theta: torch.Tensor, moved: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The log entry of the elements of ``theta`` where ``back`` (the undo of ``moved``) differs bitwise.

    ``(where, values)``: ``where`` is the int32 chunk-local indices, or a uint8 bitmask
    when that is smaller (:func:`_use_bitmask`); ``values`` the original values, in
    index order. ``None`` when every element comes back by itself.
    """
    bits = _BITS_VIEW[theta.dtype]
    wrong = back.view(bits) != theta.view(bits)  # (count,)
    idx = wrong.nonzero().squeeze(1)  # (n_wrong,)
    if not idx.numel():
        return None
    if _use_bitmask(idx.numel(), wrong.numel()):
        return _pack_bits(wrong), theta[idx].clone()
    return idx.to(torch.int32), theta[idx].clone()


@torch.no_grad()
def add_reversibly(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> UndoLog:
    """Apply ``update`` in place and return the log that undoes it exactly.

    For every chunk: ``s = round(theta + delta)``, ``r = round(s - delta)``; the
    elements whose bits differ between ``r`` and ``theta`` are logged with their
    original values, then ``theta <- s``.
    """
    log = UndoLog(num_tensors=len(params))
    for index, p in enumerate(params):
        if _numpy_path(p, backend):
            log.corrections.update(_numpy_pass(p, index, update, chunk, "add"))
            continue
        flat = p.view(-1)
        for start, count in _chunks(flat.numel(), chunk):
            theta = flat[start : start + count]  # (count,) view
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            moved = _round_add(theta, delta)
            wrong = _log_wrong(theta, moved, _round_sub(moved, delta))
            if wrong is not None:
                log.corrections[(index, start)] = wrong
            theta.copy_(moved)
    return log


def _restore_chunk(theta: torch.Tensor, delta: torch.Tensor, log: UndoLog, key: tuple[int, int]) -> torch.Tensor:
    """``round(theta - delta)`` with the logged elements written back: the exact original."""
    original = _round_sub(theta, delta)
    if key in log.corrections:
        where, values = log.corrections[key]
        original[_unpack_bits(where, original.numel()) if where.dtype == torch.uint8 else where.long()] = values
    return original


@torch.no_grad()
def undo(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    log: UndoLog,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> None:
    """Exact inverse of :func:`add_reversibly`: ``theta <- round(theta - delta)``, then the log."""
    if log.num_tensors != len(params):
        raise ValueError(f"undo log covers {log.num_tensors} tensors, got {len(params)} parameters")
    for index, p in enumerate(params):
        if _numpy_path(p, backend):
            _numpy_pass(p, index, update, chunk, "undo", log)
            continue
        flat = p.view(-1)
        for start, count in _chunks(flat.numel(), chunk):
            theta = flat[start : start + count]
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            theta.copy_(_restore_chunk(theta, delta, log, (index, start)))


@torch.no_grad()
def reflect(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    log: UndoLog,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> UndoLog:
    """Move from ``theta + delta`` to ``theta - delta`` in one pass over the noise.

    Same result, bits and log as ``undo(params, update, log)`` followed by
    ``add_reversibly(params, update.scaled(-1))``, with one noise generation
    instead of two (an antithetic pair costs three instead of four).
    """
    if log.num_tensors != len(params):
        raise ValueError(f"undo log covers {log.num_tensors} tensors, got {len(params)} parameters")
    mirrored = UndoLog(num_tensors=len(params))
    for index, p in enumerate(params):
        if _numpy_path(p, backend):
            mirrored.corrections.update(_numpy_pass(p, index, update, chunk, "reflect", log))
            continue
        flat = p.view(-1)
        for start, count in _chunks(flat.numel(), chunk):
            theta = flat[start : start + count]
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            original = _restore_chunk(theta, delta, log, (index, start))
            moved = _round_sub(original, delta)
            wrong = _log_wrong(original, moved, _round_add(moved, delta))
            if wrong is not None:
                mirrored.corrections[(index, start)] = wrong
            theta.copy_(moved)
    return mirrored


# -- fused paths: float32 CPU tensors with the NumPy noise ----------------------------------------
# Same arithmetic, same bits and same logs as the torch path above, but every
# cache-sized block of a chunk is finished while it is in cache: the noise of every
# seed, its scaling and sum, the add, the check and the store, in reused buffers.
# Native C loops (fed_essam.native_probe) when they are available, else NumPy blocks.

Terms = list[tuple[int, int, np.float32]]
ChunkEntry = tuple[torch.Tensor, torch.Tensor]


def _numpy_path(p: torch.Tensor, backend: NoiseBackend) -> bool:
    """Whether ``p`` takes the fused path (float32 on the CPU, NumPy noise); never CUDA or the torch backends."""
    return p.dtype == torch.float32 and p.device.type == "cpu" and backend in ("auto", "numpy")


@dataclass
class _Scratch:
    """Buffers of one chunk's block loop, reused block after block."""

    h: np.ndarray
    eps: np.ndarray
    delta: np.ndarray
    moved: np.ndarray
    back: np.ndarray
    mask: np.ndarray

    @classmethod
    def for_count(cls, count: int) -> "_Scratch":
        n = min(DEFAULT_CHUNK, count)
        f32 = functools.partial(np.empty, n, dtype=np.float32)
        return cls(np.empty(n, np.uint32), f32(), f32(), f32(), f32(), np.empty(n, np.bool_))


def _np_terms(update: SeedUpdate, tensor_index: int) -> Terms:
    """``(key0, key1, coeff)`` of the non-zero terms of ``update`` for one tensor."""
    return [(*tensor_keys(seed, tensor_index), np.float32(coeff))
            for seed, coeff in zip(update.seeds, update.coeffs) if coeff != 0.0]


def _np_delta(terms: Terms, kind: NoiseKind, offset: int, n: int, buf: _Scratch) -> np.ndarray:
    """``delta`` of one block, accumulated exactly as :func:`delta_chunk` does (float32, in order)."""
    delta = buf.delta[:n]
    if not terms:
        delta.fill(0.0)
        return delta
    for k, (key0, key1, coeff) in enumerate(terms):
        eps = noise_numpy_into(buf.eps[:n], buf.h, offset, key0, key1, kind)
        np.multiply(eps, coeff, out=eps)  # fl(c_k * eps_k)
        if k == 0:
            np.copyto(delta, eps)
        else:
            np.add(delta, eps, out=delta)
    return delta


def _np_blocks(count: int) -> Iterator[tuple[int, int]]:
    """Blocks of a chunk; their starts are multiples of ``DEFAULT_CHUNK`` (of 8: whole bitmask bytes)."""
    return _chunks(count, DEFAULT_CHUNK)


class _Found:
    """The logged elements of one chunk, gathered block by block, then encoded as the torch path does."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.idx: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def check(self, original: np.ndarray, back: np.ndarray, mask: np.ndarray, at: int) -> None:
        """Record the elements of ``original`` whose round trip ``back`` differs bitwise."""
        np.not_equal(back.view(np.int32), original.view(np.int32), out=mask)
        self.masks.append(np.packbits(mask, bitorder="little"))
        wrong = np.flatnonzero(mask)
        if wrong.size:
            self.idx.append(wrong + at)
            self.values.append(original[wrong])  # fancy indexing copies

    def entry(self) -> ChunkEntry | None:
        count = sum(v.size for v in self.values)
        if not count:
            return None
        values = torch.empty(count, dtype=torch.float32)  # torch-owned: seen by the memory profiler
        np.concatenate(self.values, out=values.numpy())
        if _use_bitmask(count, self.numel):
            where = torch.empty((self.numel + 7) // 8, dtype=torch.uint8)
            np.concatenate(self.masks, out=where.numpy())
        else:
            where = torch.empty(count, dtype=torch.int32)
            np.concatenate(self.idx, out=where.numpy(), casting="same_kind")
        return where, values


def _np_entry_arrays(entry: ChunkEntry | None, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk-local indices (ascending) and values of a log entry, as NumPy arrays."""
    if entry is None:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    where, values = entry[0].numpy(), entry[1].numpy()
    if where.dtype == np.uint8:
        where = np.flatnonzero(np.unpackbits(where, count=numel, bitorder="little"))
    return where, values


def _np_write_back(theta: np.ndarray, idx: np.ndarray, values: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
    """Write the logged values with chunk-local indices in ``[lo, hi)`` into ``theta`` (block-local)."""
    a, b = (0, idx.size) if hi is None else np.searchsorted(idx, (lo, hi))
    theta[idx[a:b] - lo] = values[a:b]


def _np_add_reversibly(theta: np.ndarray, terms: Terms, kind: NoiseKind, start: int, entry: ChunkEntry | None) -> ChunkEntry | None:
    """The chunk ``theta`` (flat elements from ``start``) moves to ``theta + delta``; returns its log entry."""
    buf, found = _Scratch.for_count(theta.size), _Found(theta.size)
    for b, n in _np_blocks(theta.size):
        block = theta[b : b + n]
        delta = _np_delta(terms, kind, start + b, n, buf)
        moved, back = np.add(block, delta, out=buf.moved[:n]), buf.back[:n]
        np.subtract(moved, delta, out=back)
        found.check(block, back, buf.mask[:n], b)
        block[:] = moved
    return found.entry()


def _np_undo(theta: np.ndarray, terms: Terms, kind: NoiseKind, start: int, entry: ChunkEntry | None) -> None:
    """``theta <- round(theta - delta)`` over the chunk, then the logged elements."""
    buf = _Scratch.for_count(theta.size)
    for b, n in _np_blocks(theta.size):
        block = theta[b : b + n]
        np.subtract(block, _np_delta(terms, kind, start + b, n, buf), out=block)
    _np_write_back(theta, *_np_entry_arrays(entry, theta.size))


def _np_reflect(theta: np.ndarray, terms: Terms, kind: NoiseKind, start: int, entry: ChunkEntry | None) -> ChunkEntry | None:
    """``theta + delta -> theta - delta`` over the chunk, block by block; returns the mirrored entry."""
    buf, found = _Scratch.for_count(theta.size), _Found(theta.size)
    old_idx, old_values = _np_entry_arrays(entry, theta.size)
    for b, n in _np_blocks(theta.size):
        block = theta[b : b + n]
        delta = _np_delta(terms, kind, start + b, n, buf)
        original = np.subtract(block, delta, out=buf.eps[:n])  # eps is free once delta is formed
        _np_write_back(original, old_idx, old_values, b, b + n)
        moved, back = np.subtract(original, delta, out=buf.moved[:n]), buf.back[:n]
        np.add(moved, delta, out=back)
        found.check(original, back, buf.mask[:n], b)
        block[:] = moved
    return found.entry()


def _np_apply(theta: np.ndarray, terms: Terms, kind: NoiseKind, start: int, entry: ChunkEntry | None) -> None:
    """``theta <- round(theta + delta)`` over the chunk."""
    buf = _Scratch.for_count(theta.size)
    for b, n in _np_blocks(theta.size):
        block = theta[b : b + n]
        np.add(block, _np_delta(terms, kind, start + b, n, buf), out=block)


_NUMPY_KERNELS = {"add": _np_add_reversibly, "reflect": _np_reflect, "undo": _np_undo, "apply": _np_apply}


def _native_entry(found: native_probe.Checked, numel: int) -> ChunkEntry | None:
    """The log entry of a native check, encoded as :func:`_log_wrong` does (copied out of the scratch)."""
    if not found.count:
        return None
    where = found.mask.clone() if _use_bitmask(found.count, numel) else found.idx[: found.count].clone()
    return where, found.val[: found.count].clone()


def _native_kernel(native: native_probe.NativeProbe, op: str):
    """The native loop doing ``op`` on one chunk (same signature as the ``_np_*`` kernels)."""
    if op == "add":
        return lambda theta, terms, kind, start, old: _native_entry(native.add_checked(theta, start, terms), theta.size)
    if op == "reflect":
        return lambda theta, terms, kind, start, old: _native_entry(
            native.add_checked(theta, start, terms, negate=True, restore=True, old=old), theta.size)
    if op == "undo":
        return lambda theta, terms, kind, start, old: native.shift(theta, start, terms, sub=True, old=old)
    return lambda theta, terms, kind, start, old: native.shift(theta, start, terms, sub=False)


def _numpy_pass(p: torch.Tensor, index: int, update: SeedUpdate, chunk: int, op: str, log: UndoLog | None = None) -> dict:
    """Do ``op`` ("add", "reflect", "undo", "apply") over the chunks of ``p`` in place; returns new log entries.

    Native loops when :func:`fed_essam.native_probe.load` finds them, else the NumPy blocks.
    """
    flat = p.detach().view(-1).numpy()  # shares memory with p
    native = native_probe.load()
    if native is not None:
        kernel, terms = _native_kernel(native, op), native_probe.Terms.of(update.seeds, update.coeffs, update.kind, index)
    else:
        kernel, terms = _NUMPY_KERNELS[op], _np_terms(update, index)
    made = {}
    for start, count in _chunks(flat.size, chunk):
        old = None if log is None else log.corrections.get((index, start))
        entry = kernel(flat[start : start + count], terms, update.kind, start, old)
        if entry is not None:
            made[(index, start)] = entry
    torch.autograd.graph.increment_version(p)  # written through NumPy: tell autograd
    return made


@contextlib.contextmanager
def perturbed(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> Iterator[UndoLog]:
    """Context in which the parameters sit at ``theta + delta``; restored bit-exactly on exit."""
    log = add_reversibly(params, update, backend=backend, chunk=chunk)
    try:
        yield log
    finally:
        undo(params, update, log, backend=backend, chunk=chunk)


@torch.no_grad()
def direction_norm(
    params: Sequence[torch.Tensor],
    update: SeedUpdate,
    *,
    backend: NoiseBackend = "auto",
    chunk: int = STREAM_CHUNK,
) -> float:
    """``|| sum_k c_k eps(s_k) ||_2`` over all parameters, by regenerating the noise."""
    total = 0.0
    for index, p in enumerate(params):
        for start, count in _chunks(p.numel(), chunk):
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            total += float(delta.double().square().sum())
    return math.sqrt(total)


@torch.no_grad()
def fingerprint(params: Sequence[torch.Tensor], *, chunk: int = STREAM_CHUNK) -> str:
    """A short SHA-256 of the parameters' raw bytes: equal iff the replicas agree."""
    digest = hashlib.sha256()
    for p in params:
        flat = p.detach().view(-1)
        bits = _BITS_VIEW.get(p.dtype, torch.uint8)
        for start, count in _chunks(flat.numel(), chunk):
            digest.update(flat[start : start + count].view(bits).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def parameter_count(params: Sequence[torch.Tensor]) -> int:
    """Total number of elements."""
    return sum(p.numel() for p in params)


__all__ = [
    "DEFAULT_CHUNK",
    "SeedUpdate",
    "UndoLog",
    "add_reversibly",
    "apply_update",
    "as_float32",
    "delta_chunk",
    "entry_indices",
    "direction_norm",
    "fingerprint",
    "parameter_count",
    "perturbed",
    "reflect",
    "trainable_parameters",
    "undo",
]
