"""Server side: per-seed aggregation (hand-made replies), the wire protocol, and ESSAMStrategy's hooks.

The strategy runs through Flower's own ``Strategy.start`` on an in-process
:class:`~strategies.local_grid.LocalGrid` whose clients probe a quadratic
(no language model), so these tests take seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.client import merge_pending, probe, read_log, write_log
from fed_essam import ESSAM, ESSAMF
from fed_essam.perturb import SeedUpdate, add_reversibly, fingerprint, undo
from fed_essam.protocol import (
    RECORD_KEY, STATUS_LAGGING, ProbeReply, ProbeRequest, ProtocolError, content_nbytes, ints_to_fingerprint, fingerprint_to_ints,
)
from fed_essam.replica import Replica, pool_seeds
from strategies.aggregation import aggregate_replies, median, trimmed_mean, weighted_mean
from strategies.essam import ESSAMSettings, ESSAMStrategy, sample_size
from strategies.local_grid import LocalGrid
from strategies.wire import payload_nbytes

DIM = 12


# --------------------------------------------------------------------------- aggregation
def _reply(diffs, weight=1.0, loss=1.0):
    return ProbeReply(step=0, phase="descent", version=0, diffs=tuple(diffs), weight=weight, loss=loss)


def test_weighted_mean_weights_by_example_counts():
    replies = [_reply([1.0, 2.0], weight=1.0), _reply([4.0, -1.0], weight=3.0)]
    agg = aggregate_replies(replies, 2)
    np.testing.assert_allclose(agg.diffs, [(1 + 12) / 4, (2 - 3) / 4])
    assert (agg.used, agg.total_weight, agg.rejected) == (2, 4.0, [])


def test_weighted_mean_of_identical_replies_is_exact():
    value = np.array([0.1, 1e-3 / 3, -7.123456789e-5])
    out = weighted_mean(np.stack([value] * 3), np.array([17.0, 5.0, 311.0]))
    assert np.array_equal(out, value)


def test_missing_clients_and_malformed_replies_are_left_out():
    replies = [_reply([1.0, 1.0], 2.0), _reply([1.0]), _reply([math.nan, 0.0]), _reply([5.0, 5.0], 0.0),
               _reply([3.0, 3.0], 2.0)]
    agg = aggregate_replies(replies, 2, min_replies=2)
    np.testing.assert_allclose(agg.diffs, [2.0, 2.0])
    assert agg.used == 2 and len(agg.rejected) == 3


def test_below_the_minimum_there_is_no_aggregate():
    agg = aggregate_replies([_reply([1.0, 2.0])], 2, min_replies=2)
    assert agg.diffs is None and agg.used == 1
    assert aggregate_replies([], 2).diffs is None


def test_median_and_trimmed_mean_bound_an_outlier():
    values = np.array([[1.0, -1.0], [1.2, -0.8], [0.8, -1.2], [1e6, 1e6], [1.1, -0.9]])
    np.testing.assert_allclose(median(values), [1.1, -0.9])
    np.testing.assert_allclose(trimmed_mean(values, 0.2), [(1.0 + 1.2 + 1.1) / 3, (-1.0 - 0.8 - 0.9) / 3])
    robust = aggregate_replies([_reply(v) for v in values], 2, method="median")
    np.testing.assert_allclose(robust.diffs, [1.1, -0.9])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(values, 0.5)


def test_sample_size():
    assert sample_size(10, 0.3, 2) == 3
    assert sample_size(10, 0.1, 2) == 2
    assert sample_size(1, 1.0, 2) == 1


# --------------------------------------------------------------------------- protocol
def test_request_and_reply_round_trip_exactly():
    pending = (SeedUpdate((2**63 - 1, 5), (1e-3 / 3, -2.5)), SeedUpdate((), ()), SeedUpdate((7,), (0.125,)))
    ascent = SeedUpdate((11, 12), (1 / 3, -1 / 7))
    request = ProbeRequest(step=9, phase="descent", version=10, seeds=(1, 2, 3), sigma=1e-3, rho=0.05,
                           pending_from=7, pending=pending, ascent=ascent)
    assert ProbeRequest.from_dict(dict(ConfigRecord(request.to_dict()))) == request
    reply = ProbeReply(step=9, phase="ascent", version=10, diffs=(1e-17, -3.25), weight=123.0, num_examples=4,
                       loss=2.5, fingerprint="fedcba9876543210", peak_memory=123456789)
    assert ProbeReply.from_dict(dict(MetricRecord(reply.to_dict()))) == reply
    assert ints_to_fingerprint(*fingerprint_to_ints("00000000000000ff")) == "00000000000000ff"
    resync = ProbeRequest(step=3, phase="ascent", version=3, seeds=(1,), sigma=1e-3, pending=pending, resync=True)
    assert ProbeRequest.from_dict(dict(ConfigRecord(resync.to_dict()))) == resync
    assert merge_pending([SeedUpdate((9,), (9.0,))] * 5, resync) == list(pending)  # the server's whole log wins
    with pytest.raises(ProtocolError, match="whole log"):
        ProbeRequest(step=3, phase="ascent", version=3, seeds=(1,), sigma=1e-3, pending_from=2,
                     pending=pending[2:], resync=True)
    assert content_nbytes({"seeds": b"12345678", "step": 3}) == len("seeds") + 8 + len("step") + 8


# --------------------------------------------------------------------------- a model-free federation
def _targets(num_points: int, seed: int) -> torch.Tensor:
    return torch.randn(num_points, DIM, generator=torch.Generator().manual_seed(seed))  # (P, DIM)


def _quadratic(theta: torch.Tensor, points: torch.Tensor):
    """``F(theta) = mean_p ||theta - x_p||^2 / DIM`` as a closure (float32 arithmetic)."""
    return lambda: float(((theta - points) ** 2).mean())


def _base() -> torch.Tensor:
    return torch.zeros(DIM)


class QuadraticClient:
    """A ClientApp handler over a quadratic: same protocol, log and probes as the real client."""

    def __init__(self, data: list[torch.Tensor], antithetic: bool = True, pool: list[int] | None = None) -> None:
        self.data, self.antithetic, self.pool = data, antithetic, pool
        self.regenerations: list[int] = []
        self.fail_steps: set[int] = set()

    def __call__(self, message: Message, context: Context) -> Message:
        request = ProbeRequest.from_dict(message.content.config_records[RECORD_KEY])
        if request.step in self.fail_steps:
            raise RuntimeError("client crashed")
        stored = context.state.config_records.get("log")
        log = read_log(dict(stored) if stored else None, "gaussian")
        merged = merge_pending(log, request)
        pid = int(context.node_config["partition-id"])
        if merged is None:
            reply = ProbeReply(step=request.step, phase=request.phase, version=len(log), status=STATUS_LAGGING)
        else:
            context.state["log"] = ConfigRecord(write_log(merged))
            theta = _base()
            replica = Replica([theta], pool=self.pool)  # catch-up from the base model, every time
            self.regenerations.append(replica.sync(merged, request.version))
            points = self.data[pid]
            log_adv = add_reversibly([theta], request.ascent) if request.ascent else None
            d, losses = probe([theta], request.seeds, request.sigma, _quadratic(theta, points), kind="gaussian",
                              backend="auto", antithetic=self.antithetic)
            if log_adv is not None:
                undo([theta], request.ascent, log_adv)
            reply = ProbeReply(step=request.step, phase=request.phase, version=request.version,
                               diffs=tuple(d), weight=float(points.shape[0]), num_examples=int(points.shape[0]),
                               loss=float(np.mean(losses)), fingerprint=fingerprint([theta]))
        return Message(RecordDict({RECORD_KEY: MetricRecord(reply.to_dict())}), reply_to=message)


def _settings(**kwargs) -> ESSAMSettings:
    base = dict(lr=0.05, sigma=1e-2, rho=0.05, population=4, ascent_population=3, seed=11, min_clients=1,
                min_available=1, wait_timeout=1.0)
    base.update(kwargs)
    return ESSAMSettings(**base)


def _run(settings: ESSAMSettings, client: QuadraticClient, num_nodes: int, rounds: int, grid: LocalGrid | None = None):
    theta = _base()
    strategy = ESSAMStrategy(Replica([theta], pool=client.pool), settings)
    grid = grid or LocalGrid(client, num_nodes)
    strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=1.0)
    return strategy, theta, grid


def _central(optimizer_cls, data: torch.Tensor, rounds: int, **kwargs) -> torch.Tensor:
    theta = torch.nn.Parameter(_base())
    opt = optimizer_cls([theta], **kwargs)
    for _ in range(rounds):
        opt.step(_quadratic(theta.data, data))
    return theta.detach()


@pytest.mark.parametrize("variant", ["essam", "essam_f", "es"])
def test_federation_on_identical_data_equals_the_central_optimizer_bit_for_bit(variant):
    points = _targets(6, 0)
    kw = dict(lr=0.05, sigma=1e-2, population=4, seed=11)
    if variant == "essam":
        settings, central = _settings(), _central(ESSAM, points, 3, rho=0.05, ascent_population=3, **kw)
    elif variant == "essam_f":
        settings = _settings(normalize_ascent=True)
        central = _central(ESSAMF, points, 3, rho=0.05, ascent_population=3, **kw)
    else:
        settings = _settings(rho=0.0, ascent_population=0)
        central = _central(ESSAM, points, 3, rho=0.0, **kw)
    strategy, theta, _ = _run(settings, QuadraticClient([points] * 3), 3, 3)
    assert strategy.version == 3 and strategy.fingerprint_mismatches == 0
    assert torch.equal(theta, central)
    assert not torch.equal(theta, _base())


def test_federation_on_split_data_matches_the_central_union_to_rounding():
    points = _targets(8, 1)
    strategy, theta, _ = _run(_settings(), QuadraticClient([points[:3], points[3:]]), 2, 3)
    central = _central(ESSAM, points, 3, lr=0.05, sigma=1e-2, rho=0.05, population=4, ascent_population=3, seed=11)
    # Per-client float32 mean losses, combined in float64, against one float32 mean over the union:
    # the losses agree to ~1e-7 relative, the loss differences (~1e-2 of the loss) to ~1e-5.
    relative = float((theta - central).norm() / (central - _base()).norm())
    assert 0 < relative < 1e-4, relative


def test_strategy_counts_bytes_and_stays_under_1kb_each_way_at_16_plus_16_probes():
    settings = _settings(population=16, ascent_population=16)
    strategy, _, grid = _run(settings, QuadraticClient([_targets(4, 2)] * 2), 2, 4)
    for r in strategy.rounds[1:]:  # from round 2 on, every message carries the previous update
        for node in grid.node_ids:
            assert 0 < r.bytes_down[node] <= 1024, r.bytes_down
            assert 0 < r.bytes_up[node] <= 1024, r.bytes_up
            assert r.wire_down[node] > r.bytes_down[node]
    sent = grid.sent[-1]
    assert payload_nbytes(sent) == len(sent.content[RECORD_KEY].deflate())


def test_failures_are_dropped_and_below_the_minimum_the_step_is_skipped():
    client = QuadraticClient([_targets(4, 3)] * 3)
    client.fail_steps = {1}
    strategy, theta, grid = _run(_settings(min_clients=2), client, 3, 3)
    assert [r.skipped is not None for r in strategy.rounds] == [False, True, False]
    assert strategy.rounds[1].failures == 3
    assert strategy.log[1] == SeedUpdate((), ())
    assert strategy.version == 3 and strategy.fingerprint_mismatches == 0

    grid = LocalGrid(QuadraticClient([_targets(4, 3)] * 3), 3)
    grid.offline = {grid.node_ids[0]}
    strategy, _, _ = _run(_settings(min_clients=2), grid.handler, 3, 2, grid=grid)
    assert all(r.skipped is None and r.replies == {"ascent": 2, "descent": 2} for r in strategy.rounds)
    grid.offline = set(grid.node_ids[:2])
    strategy, theta, _ = _run(_settings(min_clients=2), grid.handler, 3, 2, grid=grid)
    assert all(r.skipped for r in strategy.rounds) and torch.equal(theta, _base())


def test_a_client_that_lost_its_log_reports_lagging_and_catches_up_next_round():
    client = QuadraticClient([_targets(4, 4)] * 2)
    grid = LocalGrid(client, 2)
    theta = _base()
    strategy = ESSAMStrategy(Replica([theta]), _settings())
    strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=1.0)
    lost = grid.node_ids[1]
    grid.contexts[lost].state = RecordDict()  # the node restarted
    for server_round in (3, 4):  # two more rounds, hook by hook as Strategy.start runs them
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        messages = strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))
    assert strategy.rounds[2].lagging == 1 and strategy.rounds[2].replies["ascent"] == 1
    assert strategy.rounds[3].lagging == 0 and strategy.rounds[3].replies["ascent"] == 2
    assert strategy.fingerprint_mismatches == 0


def test_a_diverged_replica_is_counted_and_left_out():
    class Corrupt(QuadraticClient):
        def __call__(self, message, context):
            reply = super().__call__(message, context)
            if context.node_config["partition-id"] == 0:
                record = dict(reply.content[RECORD_KEY])
                record["fp-lo"] = (record["fp-lo"] + 1) % 2**32
                reply = Message(RecordDict({RECORD_KEY: MetricRecord(record)}), reply_to=message)
            return reply

    strategy, _, _ = _run(_settings(), Corrupt([_targets(4, 5)] * 2), 2, 2)
    assert strategy.fingerprint_mismatches == 2  # one per round: a mismatched node gets no descent
    assert all(r.replies == {"ascent": 1, "descent": 1} for r in strategy.rounds)


def test_seed_pool_replicas_agree_and_catch_up_costs_at_most_k_regenerations():
    pool = pool_seeds(11, 5)
    client = QuadraticClient([_targets(4, 6)] * 2, pool=pool)
    strategy, theta, _ = _run(_settings(seed_pool=5), client, 2, 6)
    assert strategy.fingerprint_mismatches == 0 and not torch.equal(theta, _base())
    assert all(set(u.seeds) <= set(pool) for u in strategy.log)
    assert max(client.regenerations) <= 5  # from the base model to any version: one pass over <= K seeds
    with pytest.raises(ValueError, match="seed-pool rule"):
        ESSAMStrategy(Replica([_base()]), _settings(seed_pool=5))


def test_central_dp_noises_the_aggregate_and_keeps_an_accountant():
    settings = _settings(dp_central=(1.0, 1.0), fraction=0.5, min_clients=1)
    strategy, _, _ = _run(settings, QuadraticClient([_targets(4, 7)] * 4), 4, 2)
    assert strategy.accountant.rounds == 2
    assert 0 < strategy.accountant.epsilon(1e-5) < math.inf
    assert all(len(r.nodes) == 2 for r in strategy.rounds)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_client_with_non_finite_scalars_is_dropped_and_the_update_is_the_others_alone(bad):
    class Poisoned(QuadraticClient):
        def __call__(self, message, context):
            reply = super().__call__(message, context)
            if context.node_config["partition-id"] == 2:  # the third node sends one bad value per exchange
                record = dict(reply.content[RECORD_KEY])
                record["diffs"] = [bad] + list(record["diffs"][1:])
                reply = Message(RecordDict({RECORD_KEY: MetricRecord(record)}), reply_to=message)
            return reply

    data = [_targets(4, 8), _targets(5, 9), _targets(6, 10)]
    strategy, theta, _ = _run(_settings(min_clients=2), Poisoned(data), 3, 3)
    clean, theta_clean, _ = _run(_settings(min_clients=2), QuadraticClient(data[:2]), 2, 3)
    assert [r.non_finite for r in strategy.rounds] == [2, 2, 2]  # ascent and descent, every round
    assert all(r.rejected == 2 and r.metrics()["non_finite"] == 2 for r in strategy.rounds)
    assert all(r.replies == {"ascent": 3, "descent": 3} and not r.skipped for r in strategy.rounds)
    assert strategy.log == clean.log  # the same update as from the two other clients alone
    assert torch.equal(theta, theta_clean) and torch.all(torch.isfinite(theta))


class Malicious(QuadraticClient):
    """Partition 7 of 8 replies huge random scalars (a test-only attacker; production code has no such knob)."""

    def __call__(self, message, context):
        reply = super().__call__(message, context)
        if context.node_config["partition-id"] == 7:
            record = dict(reply.content[RECORD_KEY])
            rng = np.random.default_rng(int(record["step"]) * 2 + int(record["phase"]))
            record["diffs"] = [float(v) for v in rng.normal(0.0, 1e6, len(record["diffs"]))]
            reply = Message(RecordDict({RECORD_KEY: MetricRecord(record)}), reply_to=message)
        return reply


def test_median_and_trimmed_mean_bound_one_malicious_client_of_eight_and_mean_does_not():
    points = _targets(64, 12) * 0.5 + 1.0  # the optimum, about 1 in every coordinate, is far from the start 0
    data = [points[8 * k : 8 * k + 8] for k in range(8)]
    loss = lambda theta: float(((theta - points) ** 2).mean())  # noqa: E731  held-out: the honest union
    settings = dict(lr=0.1, rho=0.02, population=8, ascent_population=8)
    start = loss(_base())
    out = {}
    for method in ("mean", "median", "trimmed_mean"):
        for attacked in (False, True):
            client = (Malicious if attacked else QuadraticClient)(data)
            strategy, theta, _ = _run(_settings(aggregation=method, **settings), client, 8, 10)
            assert all(r.replies["descent"] == 8 and not r.skipped for r in strategy.rounds)
            out[method, attacked] = loss(theta)
    print({f"{m}{'+attack' if a else ''}": round(v, 4) for (m, a), v in out.items()}, "start", round(start, 4))
    gain = start - out["mean", False]
    assert gain > 0
    for method in ("median", "trimmed_mean"):  # the attacker is outvoted: nearly the clean run's progress
        assert out[method, True] < start - 0.8 * gain, (method, out)
    assert out["mean", True] > start - 0.3 * gain, out  # the attacker steers the mean: the progress is gone
