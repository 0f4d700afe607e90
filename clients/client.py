"""The ClientApp's work: catch up, probe the private batch, reply with scalars.

For a :class:`~fed_essam.protocol.ProbeRequest` of step ``t`` at version ``V``:

1. Update log. The node keeps the global update log in ``context.state`` (its
   private, persistent state). The request's pending updates (versions
   ``[pending_from, V)``) are appended; a node whose log is shorter than
   ``pending_from`` (it restarted and lost its state) replies
   :data:`~fed_essam.protocol.STATUS_LAGGING` with its log length, and the server
   sends the missing updates next time.
2. Catch-up. The process's one model copy (:mod:`clients.cache`) is brought to
   version ``V`` by replaying the log from wherever it stands (from the base
   model if needed; with a seed pool, one pass of at most ``K`` seeds).
   A *resync* request (the server saw this node's fingerprint differ from its
   own) replaces the node's log by the request's whole log and reloads the base
   model before replaying it: whatever went wrong in the log or the weights is gone.
3. Probes, exactly as :meth:`fed_essam.optim.ESSAM._probe`: for every seed
   ``s_i``, ``F_k(theta +/- sigma eps(s_i))`` on the client's batch of step ``t``,
   with exact reversible moves; in the descent, around
   ``theta_adv = theta + rho g_a`` rebuilt from the ascent (seed, coefficient) pairs:

   .. math:: d_{k,i} = F_k(\\theta' + \\sigma \\epsilon_i) - F_k(\\theta' - \\sigma \\epsilon_i)

4. Reply: the ``d_{k,i}`` (local DP: clipped and noised), the weight ``n_k``
   (target tokens for the loss fitness, examples for the reward), and the
   fingerprint of the parameters at ``V``. The first request a process serves
   is measured with :func:`fed_essam.memory.measure_peak_memory` (model as
   resident baseline) and its peak reported once.

The client's share is its partition of the run's training pool, or, on a
deployed node whose node config has ``data-path``, that whole file (the site's
own data). Its batch is ``step_batch(share, t, batch_size, seed_k, fixed)``: the
same for both exchanges of a step, a different stream per client
(``seed_k = derive_seed(seed, k)``), or the central run's stream with the
``shared`` partition.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from fed_essam import estimators
from fed_essam.fitness import LossFitness, RewardFitness, encode_batch, model_device
from fed_essam.noise import NoiseBackend, NoiseKind
from fed_essam.optim import antithetic_pair
from fed_essam.perturb import SeedUpdate, add_reversibly, perturbed, undo
from fed_essam.protocol import STATUS_LAGGING, ProbeReply, ProbeRequest, decode_updates, encode_updates

from clients import cache

#: name of the node's update log in ``context.state``.
LOG_KEY = "essam-log"


class InjectedFault(RuntimeError):
    """A failure simulated by ``federation.fault_rate`` (tests of the server's fault handling)."""


def read_log(state: dict | None, kind: NoiseKind) -> list[SeedUpdate]:
    """The node's update log from its stored record (``{}`` or ``None``: empty)."""
    if not state:
        return []
    return decode_updates(state.get("counts", []), state.get("seeds", []), state.get("coeffs", []), kind)


def write_log(log: Sequence[SeedUpdate]) -> dict:
    """The stored form of a log (inverse of :func:`read_log`)."""
    return encode_updates(log)


def merge_pending(log: list[SeedUpdate], request: ProbeRequest) -> list[SeedUpdate] | None:
    """The log extended by the request's pending updates, or ``None`` when a gap remains.

    The server's updates are authoritative: entries from ``pending_from`` on are replaced;
    a resync request replaces the whole log.
    """
    if request.resync:
        return list(request.pending)
    if request.pending_from > len(log):
        return None
    return log[: request.pending_from] + list(request.pending)


def probe(
    params: list[torch.Tensor],
    seeds: Sequence[int],
    sigma: float,
    closure: Callable[[], float],
    *,
    kind: NoiseKind,
    backend: NoiseBackend,
    antithetic: bool = True,
) -> tuple[np.ndarray, list[float]]:
    """Loss differences ``d_i`` around the current parameters, as :meth:`fed_essam.optim.ESSAM._probe`.

    Antithetic pairs use :func:`fed_essam.optim.antithetic_pair` (same moves,
    same bits); one-sided probes compare ``F(theta + sigma eps_i)`` with ``F(theta)``.
    Returns ``(d, losses)`` with every probe loss in evaluation order.
    """
    losses: list[float] = []
    base = None if antithetic else float(closure())
    if base is not None:
        losses.append(base)
    plus, minus = [], []
    for seed in seeds:
        direction = SeedUpdate((seed,), (sigma,), kind)
        if base is None:
            up, down = antithetic_pair(params, direction, closure, backend=backend)
            losses += [up, down]
        else:
            with perturbed(params, direction, backend=backend):
                up = float(closure())
            down = base
            losses.append(up)
        plus.append(up)
        minus.append(down)
    return estimators.probe_differences(np.array(plus), np.array(minus)), losses


def fault_draw(seed: int, step: int, phase: str, partition_id: int) -> float:
    """A uniform number in ``[0, 1)``, a pure function of its arguments (fault injection)."""
    digest = hashlib.sha256(f"fault/{seed}/{step}/{phase}/{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def client_seed(cfg: DictConfig, partition_id: int) -> int:
    """The seed of the client's batch stream (the run seed itself for the ``shared`` partition)."""
    from fed_essam.data import derive_seed

    return int(cfg.seed) if cfg.federation.partition == "shared" else derive_seed(int(cfg.seed), partition_id)


def _fitness(cfg: DictConfig, model: torch.nn.Module, tokenizer, problems) -> tuple[Callable[[], float], float]:
    """The closure ``F_k`` and the weight ``n_k`` it averages over."""
    template = cfg.model.get("template", "plain")
    if cfg.method.get("fitness", "loss") == "reward":
        fitness = RewardFitness(model, tokenizer, problems, max_new_tokens=cfg.eval.max_new_tokens,
                                format_bonus=cfg.method.get("format_bonus", 0.0), template=template)
        return fitness, float(len(problems))
    batch = encode_batch(tokenizer, problems, template=template, device=model_device(model))
    return LossFitness(model, batch), float(batch.num_target_tokens)


def run_request(
    cfg: DictConfig,
    request: ProbeRequest,
    log: list[SeedUpdate],
    partition_id: int,
    num_partitions: int,
    data_path: str | None = None,
) -> tuple[ProbeReply, list[SeedUpdate]]:
    """Serve one request (no Flower types): returns the reply and the node's new log.

    ``data_path`` (a deployed node's ``data-path``): the node's problems are that
    whole GSM8K-format JSONL file instead of share ``partition_id`` of the run's pool.
    """
    merged = merge_pending(log, request)
    if merged is None:
        return ProbeReply(step=request.step, phase=request.phase, version=len(log), status=STATUS_LAGGING), log
    f = cfg.federation
    if f.get("fault_rate", 0.0) > 0 and fault_draw(cfg.seed, request.step, request.phase, partition_id) < f.fault_rate:
        raise InjectedFault(f"injected fault: client {partition_id}, step {request.step}, {request.phase}")
    m = cfg.method
    kind, backend = m.noise, m.noise_backend
    with cache.LOCK:
        entry = cache.synced_model(cfg, merged, request.version, reload=request.resync)
        share = (cache.site_share(cfg, data_path) if data_path
                 else cache.client_share(cfg, partition_id, num_partitions))
        from fed_essam.data import step_batch

        problems = step_batch(share, request.step, cfg.batch_size, client_seed(cfg, partition_id), fixed=cfg.fixed_batch)
        closure, weight = _fitness(cfg, entry.model, entry.tokenizer, problems)
        params = entry.replica.params

        def probes() -> tuple[np.ndarray, list[float]]:
            undo_log = add_reversibly(params, request.ascent, backend=backend) if request.ascent else None
            try:
                return probe(params, request.seeds, request.sigma, closure, kind=kind, backend=backend,
                             antithetic=m.antithetic)
            finally:
                if undo_log is not None:
                    undo(params, request.ascent, undo_log, backend=backend)

        peak = 0
        if entry.peak_memory is None:  # measured once per process (the profiler slows the request)
            from fed_essam.memory import measure_peak_memory

            measured = measure_peak_memory(probes, resident=[entry.model], device=model_device(entry.model))
            (d, losses), peak = measured.result, measured.peak_bytes
            entry.peak_memory = peak
        else:
            d, losses = probes()
        fp = entry.replica.fingerprint()
    privacy = cfg.get("privacy", {})
    if privacy.get("enabled", False) and privacy.get("mode", "local") == "local":
        from fed_essam.privacy import privatize_local

        d = privatize_local(d, privacy.clip, privacy.noise_multiplier)  # OS-entropy noise
    reply = ProbeReply(
        step=request.step, phase=request.phase, version=request.version, diffs=tuple(float(v) for v in d),
        weight=weight, num_examples=len(problems), loss=float(np.mean(losses)) if losses else math.nan,
        fingerprint=fp, peak_memory=peak,
    )
    return reply, merged


__all__ = ["InjectedFault", "LOG_KEY", "client_seed", "fault_draw", "merge_pending", "probe", "read_log",
           "run_request", "write_log"]
