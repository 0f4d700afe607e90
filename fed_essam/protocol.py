"""What crosses the network in federated ESSAM, as plain dicts (no Flower import).

One round = one ESSAM step ``t`` = two exchanges (ESSAM.md, section 4):

* ascent (skipped when ``rho = 0``): server -> client :class:`ProbeRequest` with the
  ascent seeds ``s_i``; client -> server :class:`ProbeReply` with ``d_{k,i}``;
* descent: the request adds the ascent ``rho g_a`` as (seed, coefficient) pairs,
  so the client rebuilds ``theta_adv`` itself, and fresh seeds ``s'_j``.

A request also carries the updates the client may lack: ``pending`` holds the
updates of versions ``[pending_from, version)`` of the global update log
(version ``v`` = the parameters after ``v`` steps; a skipped step is an empty
update). The client appends what it lacks to its own log and brings its
parameters to ``version`` before probing.

Down, a :class:`ProbeRequest` becomes a flat ``ConfigRecord``-compatible dict
(keys: ``step``, ``phase``, ``version``, ``sigma``, ``rho``, ``seeds``, ``resync``; the
pending updates ``upd-from``, ``upd-counts``, ``upd-seeds``, ``upd-coeffs``; the
ascent as ``adv-seeds``, ``adv-coeffs``) in which seed lists are packed as little-endian uint64 bytes (8 bytes a seed;
a protobuf varint would take 10) and coefficient lists as little-endian float32
bytes (4 bytes; coefficients are float32 values by construction, see
:class:`~fed_essam.perturb.SeedUpdate`, so this is lossless). Up, a
:class:`ProbeReply` becomes a flat ``MetricRecord``-compatible dict (ints,
floats, a list of float64 loss differences: kept in double so the server's
arithmetic equals the centralized one). Empty fields are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fed_essam.noise import NoiseKind
from fed_essam.perturb import SeedUpdate

Phase = Literal["ascent", "descent"]
PHASES: tuple[str, ...] = ("ascent", "descent")

#: Flower message types (``<category>.<action>``) of the two exchanges.
MESSAGE_TYPES: dict[str, str] = {"ascent": "train.ascent", "descent": "train.descent"}
#: name of the single record in every message and reply.
RECORD_KEY = "essam"

STATUS_OK = 0
#: the client lacks updates older than ``pending_from``; it reports its log length as ``version``.
STATUS_LAGGING = 1


class ProtocolError(ValueError):
    """A payload is missing fields or has inconsistent ones."""


def encode_updates(updates: Sequence[SeedUpdate]) -> dict[str, list[int] | list[float]]:
    """Flatten updates into ``counts`` (seeds per update), ``seeds`` and ``coeffs``."""
    return {
        "counts": [len(u.seeds) for u in updates],
        "seeds": [s for u in updates for s in u.seeds],
        "coeffs": [c for u in updates for c in u.coeffs],
    }


def decode_updates(counts: Sequence[int], seeds: Sequence[int], coeffs: Sequence[float], kind: NoiseKind) -> list[SeedUpdate]:
    """Inverse of :func:`encode_updates`."""
    if sum(counts) != len(seeds) or len(seeds) != len(coeffs):
        raise ProtocolError(f"update counts {list(counts)} do not match {len(seeds)} seeds / {len(coeffs)} coefficients")
    out, start = [], 0
    for n in counts:
        out.append(SeedUpdate(tuple(seeds[start : start + n]), tuple(coeffs[start : start + n]), kind))
        start += n
    return out


def pack_seeds(seeds: Sequence[int]) -> bytes:
    """Seeds (ints in ``[0, 2**63)``) as little-endian uint64 bytes."""
    return np.asarray(list(seeds), dtype="<u8").tobytes()


def unpack_seeds(data: bytes) -> tuple[int, ...]:
    """Inverse of :func:`pack_seeds`."""
    if len(data) % 8:
        raise ProtocolError(f"packed seeds of {len(data)} bytes (not a multiple of 8)")
    return tuple(int(s) for s in np.frombuffer(data, dtype="<u8"))


def pack_coeffs(coeffs: Sequence[float]) -> bytes:
    """float32-valued coefficients as little-endian float32 bytes (lossless; checked)."""
    packed = np.asarray(list(coeffs), dtype="<f4")
    if not np.array_equal(packed.astype(np.float64), np.asarray(list(coeffs), dtype=np.float64)):
        raise ProtocolError("coefficients must be float32 values (build them through SeedUpdate)")
    return packed.tobytes()


def unpack_coeffs(data: bytes) -> tuple[float, ...]:
    """Inverse of :func:`pack_coeffs`."""
    if len(data) % 4:
        raise ProtocolError(f"packed coefficients of {len(data)} bytes (not a multiple of 4)")
    return tuple(float(c) for c in np.frombuffer(data, dtype="<f4"))


def fingerprint_to_ints(fingerprint: str) -> tuple[int, int]:
    """A 16-hex-digit fingerprint as two 32-bit ints ``(high, low)`` (MetricRecord-safe)."""
    value = int(fingerprint, 16)
    return value >> 32, value & 0xFFFFFFFF


def ints_to_fingerprint(high: int, low: int) -> str:
    """Inverse of :func:`fingerprint_to_ints`."""
    return f"{(int(high) << 32) | int(low):016x}"


def _put(out: dict[str, Any], key: str, values: list | bytes) -> None:
    if len(values):
        out[key] = values


@dataclass(frozen=True)
class ProbeRequest:
    """Server -> client: probe these seeds at ``version`` (descent: around ``theta_adv``).

    Attributes
    ----------
    step : int
        ESSAM step ``t`` (0-based; Flower round ``t + 1``).
    phase : {"ascent", "descent"}
    version : int
        Model version to probe at (updates applied so far; equals ``step``).
    seeds : tuple of int
        Probe seeds of this exchange.
    sigma, rho : float
        Probe radius and SAM radius (``rho`` sent with the descent only, for
        information: the ascent coefficients already include it).
    pending_from : int
        Version of ``pending[0]``.
    pending : tuple of SeedUpdate
        Updates of versions ``[pending_from, version)``.
    ascent : SeedUpdate or None
        Descent only: ``theta_adv = theta + ascent``.
    resync : bool
        The server saw this node's fingerprint differ from its own: the node must
        drop its log and its parameters, reload the base model and replay
        ``pending``, which then holds the whole log (``pending_from = 0``).
    """

    step: int
    phase: Phase
    version: int
    seeds: tuple[int, ...]
    sigma: float
    rho: float = 0.0
    pending_from: int = 0
    pending: tuple[SeedUpdate, ...] = ()
    ascent: SeedUpdate | None = None
    resync: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ProtocolError(f"unknown phase {self.phase!r}")
        if self.resync and self.pending_from != 0:
            raise ProtocolError(f"a resync request carries the whole log (pending_from=0), not from {self.pending_from}")
        if self.pending_from + len(self.pending) != self.version:
            raise ProtocolError(
                f"pending updates cover versions [{self.pending_from}, {self.pending_from + len(self.pending)}), "
                f"not up to version {self.version}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Flat ConfigRecord-compatible dict."""
        out: dict[str, Any] = {
            "step": self.step, "phase": PHASES.index(self.phase), "version": self.version,
            "sigma": self.sigma, "upd-from": self.pending_from,
        }
        if self.phase == "descent":
            out["rho"] = self.rho
        if self.resync:
            out["resync"] = 1
        _put(out, "seeds", pack_seeds(self.seeds))
        pending = encode_updates(self.pending)
        _put(out, "upd-counts", pending["counts"])
        _put(out, "upd-seeds", pack_seeds(pending["seeds"]))
        _put(out, "upd-coeffs", pack_coeffs(pending["coeffs"]))
        if self.ascent is not None:
            _put(out, "adv-seeds", pack_seeds(self.ascent.seeds))
            _put(out, "adv-coeffs", pack_coeffs(self.ascent.coeffs))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], kind: NoiseKind = "gaussian") -> "ProbeRequest":
        """Inverse of :meth:`to_dict` (``kind`` is the run's noise kind)."""
        try:
            phase = PHASES[int(data["phase"])]
            pending = decode_updates(
                data.get("upd-counts", []), unpack_seeds(data.get("upd-seeds", b"")),
                unpack_coeffs(data.get("upd-coeffs", b"")), kind,
            )
            ascent = None
            if phase == "descent" and "adv-seeds" in data:
                ascent = SeedUpdate(unpack_seeds(data["adv-seeds"]), unpack_coeffs(data["adv-coeffs"]), kind)
            return cls(
                step=int(data["step"]), phase=phase, version=int(data["version"]),
                seeds=unpack_seeds(data.get("seeds", b"")), sigma=float(data["sigma"]),
                rho=float(data.get("rho", 0.0)), pending_from=int(data["upd-from"]),
                pending=tuple(pending), ascent=ascent, resync=bool(int(data.get("resync", 0))),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed probe request: {err!r}") from err


@dataclass(frozen=True)
class ProbeReply:
    """Client -> server: one loss difference per seed, the weight, and a fingerprint.

    Attributes
    ----------
    step : int
    phase : {"ascent", "descent"}
    version : int
        The version the client probed at (lagging: the length of its log).
    diffs : tuple of float
        ``d_{k,i} = F_k(+) - F_k(-)`` per seed, in request order.
    weight : float
        ``n_k``: what the client's fitness averages over (target tokens for the
        loss fitness, examples for the reward fitness).
    num_examples : int
        Problems in the client's batch.
    loss : float
        Mean of the client's probe losses (logging).
    fingerprint : str
        :func:`fed_essam.perturb.fingerprint` of the client's parameters at ``version``.
    status : int
        :data:`STATUS_OK` or :data:`STATUS_LAGGING`.
    peak_memory : int
        Peak bytes of the client's probing, measured once per client process (0: not measured).
    """

    step: int
    phase: Phase
    version: int
    diffs: tuple[float, ...] = ()
    weight: float = 0.0
    num_examples: int = 0
    loss: float = float("nan")
    fingerprint: str = "0" * 16
    status: int = STATUS_OK
    peak_memory: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Flat MetricRecord-compatible dict."""
        high, low = fingerprint_to_ints(self.fingerprint)
        out: dict[str, Any] = {
            "step": self.step, "phase": PHASES.index(self.phase), "version": self.version,
            "weight": float(self.weight), "num-examples": int(self.num_examples), "loss": float(self.loss),
            "fp-hi": high, "fp-lo": low, "status": int(self.status),
        }
        _put(out, "diffs", [float(d) for d in self.diffs])
        if self.peak_memory:
            out["peak-memory"] = int(self.peak_memory)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeReply":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                step=int(data["step"]), phase=PHASES[int(data["phase"])], version=int(data["version"]),
                diffs=tuple(float(d) for d in data.get("diffs", [])), weight=float(data["weight"]),
                num_examples=int(data["num-examples"]), loss=float(data["loss"]),
                fingerprint=ints_to_fingerprint(data["fp-hi"], data["fp-lo"]), status=int(data["status"]),
                peak_memory=int(data.get("peak-memory", 0)),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed probe reply: {err!r}") from err


def content_nbytes(payload: Mapping[str, Any]) -> int:
    """Raw content size of a flat payload: 8 bytes per int or float, string/bytes length, key lengths.

    (The count Flower's ``ConfigRecord.count_bytes`` makes; the wire size, with
    protobuf framing, is measured on the Flower side.)
    """
    total = 0
    for key, value in payload.items():
        total += len(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            total += len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8
    return total


__all__ = [
    "MESSAGE_TYPES", "PHASES", "RECORD_KEY", "STATUS_LAGGING", "STATUS_OK", "Phase", "ProbeReply",
    "ProbeRequest", "ProtocolError", "content_nbytes", "decode_updates", "encode_updates",
    "fingerprint_to_ints", "ints_to_fingerprint", "pack_coeffs", "pack_seeds", "unpack_coeffs", "unpack_seeds",
]
