"""The ClientApp handler, called directly with hand-built Messages (no simulation), on the tiny model."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import cache
from clients.client import LOG_KEY, read_log
from clients.handler import handle
from fed_essam.app import compose_config, config_yaml, make_client_app
from fed_essam.perturb import SeedUpdate
from fed_essam.protocol import RECORD_KEY, STATUS_LAGGING, STATUS_OK, ProbeReply, ProbeRequest
from fed_essam.replica import LineageError, Replica, load_replica, pool_seeds
from fed_essam.seeds import Phase, draw_seeds
from strategies.local_grid import ensure_task_identity

OVERRIDES = ["task.train_size=12", "eval.size=4", "batch_size=2", "federation.partition=iid",
             "federation.num_clients=2", "method.population=2", "method.ascent_population=2", "seed=5"]


@pytest.fixture(scope="module")
def cfg():
    ensure_task_identity()
    return compose_config(OVERRIDES)


def _log(cfg, steps: int, pool: int | None = None) -> list[SeedUpdate]:
    out = []
    for t in range(steps):
        seeds = draw_seeds(cfg.seed, t, Phase.DESCENT, 2, pool_size=pool)
        out.append(SeedUpdate(tuple(seeds), (1e-3 * (t + 1), -2e-3)) if t != 1 else SeedUpdate((), ()))
    return out


@pytest.fixture(scope="module")
def base(cfg):
    """The tiny model's trainable tensors at version 0 (loaded once)."""
    _, _, replica = load_replica(cfg)
    return [p.detach().clone() for p in replica.params]


def _server(base, log, version=None, pool=None) -> Replica:
    """A server-side replica at ``version`` of ``log`` (fresh copy of the base tensors)."""
    replica = Replica([p.clone() for p in base], pool=pool)
    replica.sync(log, version)
    return replica


def _context(partition_id: int = 0) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _message(request: ProbeRequest, node_id: int = 100) -> Message:
    return Message(RecordDict({RECORD_KEY: ConfigRecord(request.to_dict())}), dst_node_id=node_id,
                   message_type=f"train.{request.phase}", group_id=str(request.step + 1))


def _reply(message: Message) -> ProbeReply:
    return ProbeReply.from_dict(message.content.metric_records[RECORD_KEY])


def _request(cfg, log, version, start=0, phase="ascent", ascent=None) -> ProbeRequest:
    seeds = tuple(draw_seeds(cfg.seed, version, Phase.ASCENT if phase == "ascent" else Phase.DESCENT, 2))
    return ProbeRequest(step=version, phase=phase, version=version, seeds=seeds, sigma=float(cfg.method.sigma),
                        rho=float(cfg.method.rho), pending_from=start, pending=tuple(log[start:version]), ascent=ascent)


def test_late_client_catches_up_from_the_base_model_to_the_servers_fingerprint(cfg, base):
    cache.clear(data=False)
    log = _log(cfg, 3)
    server = _server(base, log)
    context = _context()
    reply = _reply(handle(_message(_request(cfg, log, 3)), context, cfg))
    assert reply.status == STATUS_OK and reply.version == 3
    assert reply.fingerprint == server.fingerprint()
    assert len(reply.diffs) == 2 and reply.weight > 0 and reply.num_examples == 2
    assert read_log(dict(context.state.config_records[LOG_KEY]), "gaussian") == log
    entry = cache.cached_model()
    assert entry.replica.version == 3 and entry.replica.fingerprint() == server.fingerprint()

    # the descent: probes around theta_adv rebuilt from (seed, coefficient) pairs; theta restored exactly
    ascent = SeedUpdate(tuple(draw_seeds(cfg.seed, 3, Phase.ASCENT, 2)), (1e-3, -1e-3))
    descent = _reply(handle(_message(_request(cfg, log, 3, start=3, phase="descent", ascent=ascent)), context, cfg))
    assert descent.fingerprint == server.fingerprint()
    from fed_essam.perturb import fingerprint

    assert fingerprint(entry.replica.params) == server.fingerprint()


def test_a_client_missing_old_updates_reports_lagging(cfg):
    log = _log(cfg, 3)
    reply = _reply(handle(_message(_request(cfg, log, 3, start=2)), _context(), cfg))
    assert reply.status == STATUS_LAGGING and reply.version == 0 and reply.diffs == ()


def test_one_model_per_process_follows_virtual_clients_at_different_versions(cfg, base):
    cache.clear(data=False)
    log = _log(cfg, 3)
    ahead = _reply(handle(_message(_request(cfg, log, 3)), _context(0), cfg))
    loads = cache.cached_model().loads
    behind = _reply(handle(_message(_request(cfg, log, 2), node_id=101), _context(1), cfg))
    assert ahead.fingerprint == _server(base, log).fingerprint()
    assert behind.fingerprint == _server(base, log, 2).fingerprint()
    assert cache.cached_model().loads == loads + 1  # the cache was ahead: reloaded from the base and replayed
    assert cache.cached_model().replica.version == 2


def test_seed_pool_catch_up_costs_at_most_k_regenerations(cfg, base):
    pool_cfg = compose_config([*OVERRIDES, "method.seed_pool=3"])
    cache.clear(data=False)
    log = _log(pool_cfg, 8, pool=3)
    server = _server(base, log, pool=pool_seeds(pool_cfg.seed, 3))
    reply = _reply(handle(_message(_request(pool_cfg, log, 8)), _context(), pool_cfg))
    assert reply.fingerprint == server.fingerprint()
    assert cache.cached_model().replica.regenerations <= 3
    assert server.regenerations <= 3


def test_local_dp_noises_the_reply_and_fault_injection_raises(cfg, base):
    from clients.client import InjectedFault

    log = _log(cfg, 1)
    plain = _reply(handle(_message(_request(cfg, log, 1)), _context(), cfg))
    dp_cfg = compose_config([*OVERRIDES, "privacy=dp", "privacy.clip=1e-3", "privacy.noise_multiplier=1.0"])
    noised = _reply(handle(_message(_request(dp_cfg, log, 1)), _context(), dp_cfg))
    assert noised.fingerprint == plain.fingerprint and noised.diffs != plain.diffs
    faulty = compose_config([*OVERRIDES, "federation.fault_rate=0.999"])
    with pytest.raises(InjectedFault):
        handle(_message(_request(faulty, log, 1)), _context(), faulty)


def test_sequential_replica_refuses_a_foreign_log(cfg):
    params = [torch.zeros(4)]
    replica = Replica(params)
    log = [SeedUpdate((1,), (0.5,)), SeedUpdate((2,), (0.25,))]
    assert replica.sync(log) == 2
    with pytest.raises(LineageError):
        replica.sync([SeedUpdate((3,), (0.5,))] + log[1:])
    with pytest.raises(LineageError):
        replica.sync(log, 1)
    pooled = Replica([torch.zeros(4)], pool=pool_seeds(0, 2))
    pooled.sync([SeedUpdate((pool_seeds(0, 2)[1],), (0.5,))])
    pooled.sync([], 0)  # the pool rule rebuilds any version from its base copy
    assert torch.equal(pooled.params[0], torch.zeros(4))


def test_the_client_app_routes_ascent_and_descent_to_the_handler(cfg, base):
    cache.clear(data=False)
    app = make_client_app(config_yaml(cfg))
    log = _log(cfg, 1)
    reply = app(_message(_request(cfg, log, 1)), _context())
    assert _reply(reply).fingerprint == _server(base, log).fingerprint()
    with pytest.raises(ValueError, match="No train function registered with name 'other'"):
        app(Message(RecordDict(), dst_node_id=100, message_type="train.other", group_id="1"), _context())
