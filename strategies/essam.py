"""ESSAMStrategy: one Flower round = one ESSAM step = an ascent and a descent exchange.

Flower's :meth:`Strategy.start` runs, per round, a *train* exchange
(``configure_train`` -> ``aggregate_train``) and then an *evaluate* exchange
(``configure_evaluate`` -> ``aggregate_evaluate``), and calls ``evaluate_fn``.
That is exactly the shape of an ESSAM step, so the strategy is pure hooks and
``start`` is not overridden:

========================  ==============================================================
hook                      ESSAM step ``t = round - 1`` (ESSAM.md, section 4)
========================  ==============================================================
``configure_train``       sample clients; ascent request: seeds ``s_i`` (empty for ES/MeZO)
``aggregate_train``       ``d_i`` per seed, ``a = shape(d)``, ``rho g_a`` as (seed, coeff) pairs
``configure_evaluate``    descent request: ``rho g_a`` and fresh seeds ``s'_j``
``aggregate_evaluate``    ``b = shape(d')``, ``U_t = {(s'_j, -lr b_j / N_b)}``, applied to the
                          server's replica and appended to the log
``evaluate_fn``           (the ServerApp's) held-out evaluation, checkpoint, metrics
========================  ==============================================================

Both exchanges use the message type category ``train`` with the actions
``ascent`` and ``descent`` (the evaluate hooks carry the descent, which is also
a probe exchange); the model never travels (``arrays`` is an empty ArrayRecord).

Coefficients use the same functions, in the same order, as
:class:`fed_essam.optim.ESSAM`: ``shape_differences`` -> ``ascent_coefficients``
(ESSAM-F: divided by ``||g_a||``, computed on the server's replica) and
``descent_coefficients``; seeds come from ``draw_seeds(seed, t, phase, N)``.
With full participation on identical data the federation therefore replays the
centralized run bit for bit (see tests/test_federated.py).

Faults: a round goes on with the replies that came (errors, timeouts, malformed
or mismatched replies are dropped and counted; a reply with a NaN or infinite
scalar is counted as ``non_finite``); with fewer than ``min_clients`` usable
replies in an exchange the step is skipped (an empty update, so versions keep
counting steps), logged, and training continues.

Divergence: a reply whose fingerprint differs from the server's at its version
(the node's parameters or log went wrong: a bit flip, a bad disk, a bug) is left
out, and the node's next request is a *resync*: ``resync=True`` with the whole
update log (``pending_from = 0``). The node drops its log and its parameters,
reloads the base model and replays the log (:mod:`clients.client`), so it agrees
with the server again and is used from that request on.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fed_essam import estimators
from fed_essam.privacy import DPAccountant, clip_scalars, privatize_aggregate
from fed_essam.perturb import SeedUpdate, direction_norm
from fed_essam.protocol import (
    MESSAGE_TYPES, RECORD_KEY, STATUS_LAGGING, STATUS_OK, ProbeReply, ProbeRequest, ProtocolError,
)
from fed_essam.replica import Replica
from fed_essam.seeds import Phase, draw_seeds

from strategies.aggregation import aggregate_replies
from strategies.wire import message_nbytes, payload_nbytes


@dataclass(frozen=True)
class ESSAMSettings:
    """Hyperparameters of the federated step (``cfg.method``, ``cfg.federation``, ``cfg.privacy``).

    Attributes mirror :class:`fed_essam.optim.ESSAM` (``lr``, ``sigma``, ``rho``,
    ``population`` = ``N_b``, ``ascent_population`` = ``N_a``, ``normalize_ascent``,
    ``shaping``, ``antithetic``, ``seed``, ``seed_pool``, ``noise``,
    ``noise_backend``) plus the federation's sampling and aggregation and the
    central-DP settings (``dp_central``: ``(clip, noise_multiplier)`` or ``None``;
    see :mod:`fed_essam.privacy`: clipped replies averaged over the sampled
    cohort, Gaussian noise on the server, a :class:`~fed_essam.privacy.DPAccountant`).
    """

    lr: float
    sigma: float
    rho: float = 0.0
    population: int = 8
    ascent_population: int = 8
    normalize_ascent: bool = False
    shaping: str = "zscore"
    antithetic: bool = True
    seed: int = 0
    seed_pool: int | None = None
    noise: str = "gaussian"
    noise_backend: str = "auto"
    fraction: float = 1.0
    min_clients: int = 1
    min_available: int = 1
    wait_timeout: float = 600.0
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    dp_central: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, min_available: int | None = None) -> "ESSAMSettings":
        """Settings from a composed run configuration."""
        m, f = cfg.method, cfg.federation
        name = str(m.get("name", "essam"))
        if name == "backprop":
            raise ValueError("method=backprop needs gradients and runs in mode=central only")
        privacy = cfg.get("privacy") or {}
        dp = None
        if privacy.get("enabled", False) and privacy.get("mode", "local") == "central":
            dp = (float(privacy["clip"]), float(privacy["noise_multiplier"]))
        # as fed_essam.training.build_optimizer: ES and MeZO never ascend, ESSAM-F always normalizes
        rho = 0.0 if name in ("es", "mezo") else float(m.get("rho", 0.0))
        return cls(
            lr=float(m.lr), sigma=float(m.sigma), rho=rho, population=int(m.population),
            ascent_population=int(m.get("ascent_population") or (m.population if rho > 0 else 0)),
            normalize_ascent=bool(m.get("normalize_ascent", False)) or name == "essam_f", shaping=str(m.shaping),
            antithetic=bool(m.antithetic), seed=int(cfg.seed), seed_pool=m.get("seed_pool"),
            noise=str(m.noise), noise_backend=str(m.noise_backend), fraction=float(f.fraction),
            min_clients=int(f.min_clients),
            min_available=int(min_available if min_available is not None else f.min_clients),
            wait_timeout=float(f.reply_timeout), aggregation=str(f.aggregation),
            trim_fraction=float(f.trim_fraction), dp_central=dp,
        )

    @property
    def probes_per_reply(self) -> dict[str, int]:
        """Forward passes a client spends per exchange."""
        per = (lambda n: 2 * n) if self.antithetic else (lambda n: n + 1)
        return {"ascent": per(self.ascent_population) if self.rho > 0 else 0, "descent": per(self.population)}


@dataclass
class RoundLog:
    """What happened in one round (one ESSAM step)."""

    step: int
    nodes: list[int] = field(default_factory=list)
    skipped: str | None = None
    ascent: SeedUpdate | None = None
    descent_nodes: list[int] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=lambda: {"ascent": 0, "descent": 0})
    failures: int = 0
    lagging: int = 0
    mismatches: int = 0
    resyncs: int = 0
    rejected: int = 0
    non_finite: int = 0
    loss: float = math.nan
    forward_passes: int = 0
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    wire_down: dict[int, int] = field(default_factory=dict)
    wire_up: dict[int, int] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)
    seconds: float = 0.0

    def metrics(self) -> dict[str, int | float]:
        """Scalar summary (a MetricRecord / a metrics.jsonl line)."""
        return {
            "step": self.step, "sampled": len(self.nodes), "ascent_replies": self.replies["ascent"],
            "descent_replies": self.replies["descent"], "failures": self.failures, "lagging": self.lagging,
            "fingerprint_mismatches": self.mismatches, "resyncs": self.resyncs, "rejected": self.rejected,
            "non_finite": self.non_finite, "skipped": int(self.skipped is not None),
            "loss": self.loss, "forward_passes": self.forward_passes,
            "bytes_down": sum(self.bytes_down.values()), "bytes_up": sum(self.bytes_up.values()),
            "wire_bytes_down": sum(self.wire_down.values()), "wire_bytes_up": sum(self.wire_up.values()),
            "round_seconds": self.seconds,
        }


def _count(payload: dict[int, int], wire: dict[int, int], node: int, message: Message) -> None:
    """Add the message's payload and wire bytes to the node's totals (see :mod:`strategies.wire`)."""
    payload[node] = payload.get(node, 0) + payload_nbytes(message)
    wire[node] = wire.get(node, 0) + message_nbytes(message)


def sample_size(available: int, fraction: float, minimum: int) -> int:
    """Clients to sample: ``max(floor(fraction * available), minimum)``, at most ``available``."""
    return min(available, max(int(available * fraction), minimum))


class ESSAMStrategy(Strategy):
    """Federated ESSAM / ESSAM-F / ES / MeZO over seeds and scalars.

    Parameters
    ----------
    replica : Replica
        The server's own copy of the parameters (evaluation, checkpoints,
        ESSAM-F norms, fingerprints); at the version ``len(update_log)``.
    settings : ESSAMSettings
    update_log : list of SeedUpdate, optional
        Updates applied so far (a resumed run); step ``t`` of round ``r`` is
        ``len(update_log) + r - 1``.
    """

    def __init__(self, replica: Replica, settings: ESSAMSettings, update_log: list[SeedUpdate] | None = None) -> None:
        if settings.rho > 0 and settings.ascent_population < 1:
            raise ValueError("rho > 0 needs ascent_population >= 1")
        if (settings.seed_pool is None) != (replica.pool is None):
            raise ValueError("the server replica must follow the seed-pool rule exactly when method.seed_pool is set")
        if settings.dp_central is not None and settings.aggregation != "mean":
            raise ValueError("central DP averages clipped replies; use federation.aggregation=mean")
        self.replica = replica
        self.settings = settings
        self.log: list[SeedUpdate] = list(update_log or [])
        self.first_step = len(self.log)
        self.replica.sync(self.log)
        self.fingerprints: dict[int, str] = {self.version: replica.fingerprint()}
        self.known: dict[int, int] = {}
        self.resync: set[int] = set()  # nodes whose next request carries resync=True and the whole log
        self.rounds_answered: dict[int, int] = {}
        self.client_peak_memory = 0
        self.rounds: list[RoundLog] = []
        self.accountant = DPAccountant(settings.dp_central[1], "central",
                                       releases_per_round=2 if settings.rho > 0 else 1) if settings.dp_central else None
        self._round: RoundLog | None = None
        self._available = 0
        self._started = 0.0

    # -- state ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Steps applied (length of the update log)."""
        return len(self.log)

    @property
    def fingerprint_mismatches(self) -> int:
        """Replies whose fingerprint differed from the server's at their version, over the run."""
        return sum(r.mismatches for r in self.rounds)

    @property
    def resyncs(self) -> int:
        """Resync requests sent over the run (see the module docstring)."""
        return sum(r.resyncs for r in self.rounds)

    def summary(self) -> None:
        """Log the configuration."""
        s = self.settings
        kind = "ESSAM-F" if s.normalize_ascent else "ESSAM" if s.rho > 0 else "ES/MeZO"
        log(INFO, "\t├──> %s: N_a=%d N_b=%d sigma=%g rho=%g lr=%g shaping=%s antithetic=%s pool=%s",
            kind, s.ascent_population if s.rho > 0 else 0, s.population, s.sigma, s.rho, s.lr, s.shaping,
            s.antithetic, s.seed_pool)
        log(INFO, "\t└──> sampling: fraction=%.2f min_clients=%d aggregation=%s%s", s.fraction, s.min_clients,
            s.aggregation, f" central-DP(C={s.dp_central[0]}, z={s.dp_central[1]})" if s.dp_central else "")

    # -- helpers -------------------------------------------------------------------
    def _seeds(self, step: int, phase: Phase) -> list[int]:
        s = self.settings
        count = s.ascent_population if phase == Phase.ASCENT else s.population
        return draw_seeds(s.seed, step, phase, count, pool_size=s.seed_pool)

    def _sample(self, grid: Grid, step: int) -> list[int]:
        """This step's clients: wait (up to ``wait_timeout``) for ``min_available`` nodes, then sample.

        Flower's grid may list no node yet in the first round; the sample is a
        pure function of (run seed, step, connected node ids).
        """
        s = self.settings
        deadline = time.monotonic() + s.wait_timeout
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < s.min_available:
            log(INFO, "Waiting for nodes: %d connected (need %d)", len(nodes), s.min_available)
        while len(nodes) < s.min_available and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(grid.get_node_ids())
        count = sample_size(len(nodes), s.fraction, s.min_clients)
        return sorted(random.Random(f"{s.seed}/{step}").sample(nodes, count))

    def _request(self, node: int, phase: str, seeds: list[int], server_round: int,
                 ascent: SeedUpdate | None = None) -> Message:
        resync = node in self.resync
        if resync:  # sent once; a node still wrong afterwards mismatches again and is asked again
            self.resync.discard(node)
            self._round.resyncs += 1
            log(INFO, "step %d %s: node %d resyncs (base model + the %d updates of the log)",
                self._round.step, phase, node, self.version)
        start = 0 if resync else min(self.known.get(node, 0), self.version)
        request = ProbeRequest(
            step=self._round.step, phase=phase, version=self.version, seeds=tuple(seeds),
            sigma=self.settings.sigma, rho=self.settings.rho if phase == "descent" else 0.0, pending_from=start,
            pending=tuple(self.log[start:]), ascent=ascent, resync=resync,
        )
        message = Message(RecordDict({RECORD_KEY: ConfigRecord(request.to_dict())}), dst_node_id=node,
                          message_type=MESSAGE_TYPES[phase], group_id=str(server_round))
        _count(self._round.bytes_down, self._round.wire_down, node, message)
        return message

    def _collect(self, replies: Iterable[Message], phase: str, num_seeds: int) -> list[tuple[int, ProbeReply]]:
        """Usable replies of one exchange, by node id; counts everything else."""
        r = self._round
        good: list[tuple[int, ProbeReply]] = []
        for message in replies:
            node = message.metadata.src_node_id
            _count(r.bytes_up, r.wire_up, node, message)
            if message.has_error():
                r.failures += 1
                log(WARNING, "step %d %s: node %d failed: %s", r.step, phase, node, message.error.reason)
                continue
            try:
                reply = ProbeReply.from_dict(message.content.metric_records[RECORD_KEY])
            except (KeyError, ProtocolError) as err:
                r.rejected += 1
                log(WARNING, "step %d %s: node %d sent a malformed reply: %s", r.step, phase, node, err)
                continue
            if reply.status == STATUS_LAGGING:
                r.lagging += 1
                self.known[node] = min(reply.version, self.version)
                log(INFO, "step %d %s: node %d lags at version %d; it gets the missing updates next time",
                    r.step, phase, node, reply.version)
                continue
            if reply.status != STATUS_OK or reply.step != r.step or reply.phase != phase:
                r.rejected += 1
                continue
            self.known[node] = reply.version
            self.client_peak_memory = max(self.client_peak_memory, reply.peak_memory)
            r.forward_passes += self.settings.probes_per_reply[phase]
            if reply.version != self.version or reply.fingerprint != self.fingerprints.get(reply.version):
                r.mismatches += 1
                self.resync.add(node)
                log(WARNING, "step %d %s: node %d parameters differ from the server's (version %d, %s != %s); "
                    "it resyncs with its next request", r.step, phase, node, reply.version, reply.fingerprint,
                    self.fingerprints.get(reply.version))
                continue
            good.append((node, reply))
        good.sort(key=lambda item: item[0])
        r.replies[phase] = len(good)
        r.answered.update(node for node, _ in good)
        return good

    def _combine(self, good: list[tuple[int, ProbeReply]], num_seeds: int) -> np.ndarray | None:
        """Per-seed ``d`` from usable replies (``None``: too few), logging the clients' mean loss."""
        s = self.settings
        agg = aggregate_replies([rep for _, rep in good], num_seeds, method=s.aggregation,
                                trim_fraction=s.trim_fraction, min_replies=s.min_clients)
        self._round.rejected += len(agg.rejected)
        self._round.non_finite += sum(1 for reason in agg.rejected if reason.startswith("non-finite"))
        for reason in agg.rejected:
            log(WARNING, "step %d: a reply was left out: %s", self._round.step, reason)
        if math.isnan(self._round.loss):
            self._round.loss = agg.loss
        if agg.diffs is None:
            self._skip(f"{agg.used} usable replies, fewer than federation.min_clients={s.min_clients}")
            return None
        if s.dp_central is not None:
            clip, z = s.dp_central
            cohort = len(self._round.nodes)  # the public denominator: the cohort asked, not the replies
            mean = np.sum([clip_scalars(np.asarray(rep.diffs), clip) for _, rep in good], axis=0) / cohort
            return privatize_aggregate(mean, clip, z, cohort)  # OS-entropy noise
        return agg.diffs

    def _shape(self, d: np.ndarray) -> np.ndarray | None:
        try:
            return estimators.shape_differences(d, self.settings.sigma, self.settings.shaping,
                                                antithetic=self.settings.antithetic)
        except FloatingPointError as err:
            self._skip(f"non-finite probe loss ({err})")
            return None

    def _skip(self, reason: str) -> None:
        if self._round.skipped is None:
            self._round.skipped = reason
            log(WARNING, "step %d skipped: %s", self._round.step, reason)

    # -- ascent: the train exchange -------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's clients and send them the ascent seeds (none when ``rho = 0``)."""
        self._started = time.monotonic()
        step = self.first_step + server_round - 1
        if step != self.version:
            raise RuntimeError(f"round {server_round} is step {step} but the server is at version {self.version}")
        self._round = RoundLog(step=step, nodes=self._sample(grid, step))
        self._available = max(self._available, len(list(grid.get_node_ids())))
        if len(self._round.nodes) < self.settings.min_clients:
            self._skip(f"{len(self._round.nodes)} nodes available, fewer than federation.min_clients="
                       f"{self.settings.min_clients}")
            return []
        if self.settings.rho <= 0:
            return []
        seeds = self._seeds(step, Phase.ASCENT)
        return [self._request(node, "ascent", seeds, server_round) for node in self._round.nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the ascent replies into ``rho g_a`` (kept for the descent)."""
        r = self._round
        if r.skipped is not None or self.settings.rho <= 0:
            r.descent_nodes = list(r.nodes) if r.skipped is None else []
            return None, None
        seeds = self._seeds(r.step, Phase.ASCENT)
        good = self._collect(replies, "ascent", len(seeds))
        d = self._combine(good, len(seeds))
        a = self._shape(d) if d is not None else None
        if a is None:
            return None, None
        s = self.settings
        norm = None
        if s.normalize_ascent:
            unit = SeedUpdate(tuple(seeds), tuple(a / max(len(a), 1)), s.noise)
            norm = direction_norm(self.replica.params, unit, backend=s.noise_backend)
        coeffs = estimators.ascent_coefficients(a, s.rho, norm=norm)
        r.ascent = SeedUpdate(tuple(seeds), tuple(coeffs), s.noise)
        r.descent_nodes = [node for node, _ in good]
        return None, MetricRecord({"ascent_replies": len(good), "ascent_loss": r.loss})

    # -- descent: the evaluate exchange ---------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the descent: ``rho g_a`` and fresh seeds, to the clients that answered the ascent."""
        r = self._round
        if r.skipped is not None:
            return []
        seeds = self._seeds(r.step, Phase.DESCENT)
        return [self._request(node, "descent", seeds, server_round, r.ascent) for node in r.descent_nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Form ``U_t`` from the descent replies, apply it to the server's replica, log the round."""
        r, s = self._round, self.settings
        update = SeedUpdate((), (), s.noise)
        if r.skipped is None:
            seeds = self._seeds(r.step, Phase.DESCENT)
            good = self._collect(replies, "descent", len(seeds))
            d = self._combine(good, len(seeds))
            b = self._shape(d) if d is not None else None
            if b is not None:
                update = SeedUpdate(tuple(seeds), tuple(estimators.descent_coefficients(b, s.lr)), s.noise)
        self.log.append(update)
        self.replica.sync(self.log)
        self.fingerprints[self.version] = self.replica.fingerprint()
        for node in r.answered:
            self.rounds_answered[node] = self.rounds_answered.get(node, 0) + 1
        if self.accountant is not None and r.replies["descent"]:
            self.accountant.record_round(len(r.nodes) / max(self._available, 1))
        r.seconds = time.monotonic() - self._started
        self.rounds.append(r)
        return MetricRecord({k: v for k, v in r.metrics().items() if not (isinstance(v, float) and math.isnan(v))})


__all__ = ["ESSAMSettings", "ESSAMStrategy", "RoundLog", "sample_size"]
