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
subtracting the same ``delta`` does not give back ``theta`` in floating point
(``fl(fl(theta + delta) - delta) != theta`` for a few percent of the elements),
so :func:`add_reversibly` records, while it adds, exactly the elements that the
subtraction would get wrong (their indices and original values, a sparse log),
and :func:`undo` subtracts and then writes those back. Memory: the log, a few
percent of the parameters; never a full copy.

Parameters are streamed in chunks, so the temporaries are bounded by the chunk
size, not the largest tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_essam.noise import DEFAULT_CHUNK, NoiseBackend, NoiseKind, noise

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

    ``corrections[(i, start)]`` holds, for the chunk of parameter ``i`` that starts
    at flat element ``start``, the chunk-local indices and original values of the
    elements that ``fl(fl(theta + delta) - delta)`` gets wrong.
    """

    num_tensors: int = 0
    corrections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_corrections(self) -> int:
        """How many elements needed an explicit correction."""
        return sum(int(idx.numel()) for idx, _ in self.corrections.values())

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
        flat = p.view(-1)
        for start, count in _chunks(flat.numel(), chunk):
            delta = delta_chunk(update, index, p.shape, start, count, p.device, backend)
            flat[start : start + count] = _round_add(flat[start : start + count], delta)


def _log_wrong(theta: torch.Tensor, moved: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indices and values of ``theta`` where ``back`` (the undo of ``moved``) differs bitwise."""
    bits = _BITS_VIEW[theta.dtype]
    idx = (back.view(bits) != theta.view(bits)).nonzero().squeeze(1)  # (n_wrong,)
    return (idx, theta[idx].clone()) if idx.numel() else None


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
        idx, values = log.corrections[key]
        original[idx] = values
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
    "direction_norm",
    "fingerprint",
    "parameter_count",
    "perturbed",
    "reflect",
    "trainable_parameters",
    "undo",
]
