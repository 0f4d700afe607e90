"""Federated runs on the tiny model: equivalence with the centralized optimizer, and a real Flower simulation.

Equivalence: with full participation and every client probing the central run's
fixed batch (``federation.partition=shared``), a federation over the in-process
grid ends with the same parameters as ``fed_essam.training``'s central stepper,
bit for bit: every client computes the same float32 losses as the central run,
the weighted mean of identical per-client differences is exact (a shifted sum),
and the coefficient arithmetic, seeds and order of application are shared code.
With the data split between clients the federated loss difference is a float64
combination of per-client float32 means, the central one a float32 mean over
the union: the parameters then agree to rounding (checked relative to the update).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from omegaconf import OmegaConf, open_dict

from clients import cache
from fed_essam.app import compose_config, config_yaml, make_client_app, run_federated
from fed_essam.data import build_problem_sets, derive_seed, step_batch
from fed_essam.fitness import LossFitness, encode_batch, model_device
from fed_essam.optim import ESSAM
from fed_essam.partition import partition
from fed_essam.perturb import fingerprint, trainable_parameters
from fed_essam.replica import load_replica
from strategies.essam import ESSAMSettings, ESSAMStrategy
from strategies.local_grid import LocalGrid

SMALL = ["task.train_size=8", "eval.size=2", "eval.batch_size=2", "eval.max_new_tokens=4", "batch_size=2",
         "method.population=2", "method.ascent_population=2", "seed=3", "progress=false"]


def _federate(cfg, rounds: int) -> tuple[ESSAMStrategy, list[torch.Tensor]]:
    """Federate ``rounds`` steps over the in-process grid; also return a copy of the base tensors."""
    cache.clear()
    _, _, replica = load_replica(cfg)
    base = [p.detach().clone() for p in replica.params]
    strategy = ESSAMStrategy(replica, ESSAMSettings.from_config(cfg))
    grid = LocalGrid(make_client_app(config_yaml(cfg)), int(cfg.federation.num_clients))
    strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=60.0)
    return strategy, base


def _central_stepper(cfg):
    """The centralized run's own stepper (fed_essam.training), on a validated copy of the configuration."""
    from fed_essam.config import validate_config
    from fed_essam.training import load_run_model, make_stepper

    central_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    central_cfg.federation.partition = "iid"  # irrelevant to a central run
    central_cfg = validate_config(central_cfg)
    model, tokenizer = load_run_model(central_cfg)
    return model, make_stepper(central_cfg, model, tokenizer)


def test_federation_equals_the_centralized_run_bit_for_bit():
    cfg = compose_config([*SMALL, "federation.num_clients=2", "federation.partition=shared", "fixed_batch=true"])
    strategy, _ = _federate(cfg, 2)
    model, stepper = _central_stepper(cfg)
    assert strategy.fingerprints[0] == fingerprint(trainable_parameters(model)), "both must start from one base"
    train, _ = build_problem_sets(cfg)
    for t in range(2):
        stepper.step(step_batch(train, t, cfg.batch_size, cfg.seed, cfg.fixed_batch))
    assert strategy.fingerprint_mismatches == 0
    assert all(r.replies["descent"] == 2 for r in strategy.rounds)
    assert [u for u in strategy.log] == stepper.update_log
    assert strategy.replica.fingerprint() == fingerprint(trainable_parameters(model))


def test_federation_on_split_data_matches_the_central_union_to_rounding():
    # raw (MeZO-style d / 2 sigma) coefficients are linear in d; z-scores of two seeds would
    # amplify rounding by 1 / |d_1 - d_2| and hide what is being measured
    cfg = compose_config([*SMALL, "task.train_size=4", "federation.num_clients=2", "federation.partition=iid",
                          "fixed_batch=true", "method.shaping=raw", "method.lr=1e-5"])
    strategy, base = _federate(cfg, 2)
    train, _ = build_problem_sets(cfg)
    union = [p for k in range(2)
             for p in step_batch(partition(train, k, 2, scheme="iid", seed=cfg.seed), 0, 2, derive_seed(cfg.seed, k), True)]
    assert sorted(p.question for p in union) == sorted(p.question for p in train)
    entry = cache.cached_model()  # the client process's model copy, reset to the base: the central run
    params = entry.replica.params
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    m = cfg.method
    opt = ESSAM(params, lr=m.lr, sigma=m.sigma, rho=m.rho, population=m.population,
                ascent_population=m.ascent_population, shaping="raw", seed=cfg.seed)
    fitness = LossFitness(entry.model, encode_batch(entry.tokenizer, union, device=model_device(entry.model)))
    for _ in range(2):
        opt.step(fitness)
    flat = lambda tensors: torch.cat([t.detach().flatten() for t in tensors])  # noqa: E731
    relative = float((flat(strategy.replica.params) - flat(params)).norm() / (flat(params) - flat(base)).norm())
    print(f"split-data federated vs central union: relative difference of the update {relative:.2e}")
    assert relative < 1e-3, relative
    assert strategy.fingerprint_mismatches == 0


def test_local_backend_writes_the_run_folder(tmp_path):
    cfg = compose_config([*SMALL, "num_rounds=2", "federation.num_clients=2", "federation.partition=iid",
                          "federation.backend=local", "eval.every=1", "checkpoint_every=1"])
    summary = run_federated(cfg, tmp_path)
    for key in ("accuracy_before", "accuracy_after", "loss_before", "loss_after", "num_rounds", "forward_passes",
                "peak_memory_bytes", "bytes_down_per_client_round", "bytes_up_per_client_round",
                "fedavg_bytes_per_client_round", "fingerprint_mismatches"):
        assert key in summary, key
    assert summary["num_rounds"] == 2 and summary["fingerprint_mismatches"] == 0
    assert summary["peak_memory_bytes"] > sum(p.numel() * 4 for p in cache.cached_model().replica.params)
    assert summary["forward_passes"] == 2 * 2 * (2 * 2 + 2 * 2)  # rounds x clients x (ascent + descent) passes
    assert 0 < summary["bytes_down_per_client_round"] < summary["fedavg_bytes_per_client_round"] / 1000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2] and all("accuracy" in line for line in lines)
    assert (tmp_path / "metrics.png").is_file() and (tmp_path / "checkpoints" / "step-000002").is_dir()


def test_ray_simulation_three_clients_two_rounds(tmp_path):
    cfg = compose_config([*SMALL, "num_rounds=2", "federation.num_clients=3", "federation.partition=iid",
                          "federation.backend=ray", "eval.every=0", "checkpoint_every=0",
                          "+federation.ray_init_args.num_cpus=2"])
    summary = run_federated(cfg, tmp_path)
    _, _, base = load_replica(cfg)
    assert summary["final_fingerprint"] != base.fingerprint(), "the parameters must change"
    assert summary["fingerprint_mismatches"] == 0, "every client replica must match the server's"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if line["step"] > 0]
    assert [(r["ascent_replies"], r["descent_replies"], r["clients"]) for r in rounds] == [(3, 3, 3)] * 2
    assert summary["bytes_up_per_client_round"] > 0 and summary["failed_replies"] == 0


def _round(strategy: ESSAMStrategy, grid: LocalGrid, server_round: int) -> None:
    """One round, hook by hook, as ``Strategy.start`` runs it."""
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    messages = strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
    strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))


def test_a_diverged_client_is_told_to_resync_and_agrees_again():
    """Real divergence of the client's weights (not of its reported fingerprint), then a resync."""
    from clients.client import LOG_KEY, read_log, write_log

    cfg = compose_config([*SMALL, "federation.num_clients=2", "federation.partition=iid",
                          "federation.min_clients=1"])
    cache.clear()
    _, _, replica = load_replica(cfg)
    strategy = ESSAMStrategy(replica, ESSAMSettings.from_config(cfg, min_available=2))
    grid = LocalGrid(make_client_app(config_yaml(cfg)), 2)
    for server_round in (1, 2):
        _round(strategy, grid, server_round)
    assert strategy.fingerprint_mismatches == 0 and strategy.resyncs == 0
    loads = cache.cached_model().loads

    # (a) the client process's weights go wrong (a flipped value; its log and version look fine)
    with torch.no_grad():
        cache.cached_model().replica.params[0].view(-1)[0] += 1e-3
    _round(strategy, grid, 3)
    r = strategy.rounds[-1]
    assert r.mismatches == 2 and r.replies["ascent"] == 0 and r.skipped  # both nodes share that process
    assert strategy.resync == set(grid.node_ids)
    _round(strategy, grid, 4)
    r = strategy.rounds[-1]
    assert r.resyncs == 2 and r.mismatches == 0 and r.replies == {"ascent": 2, "descent": 2} and not r.skipped
    assert cache.cached_model().loads > loads  # reloaded from the base model and replayed
    entry = cache.cached_model()  # one update behind the server: it gets U_t with the next message
    assert entry.replica.version == strategy.version - 1
    assert entry.replica.fingerprint() == strategy.fingerprints[entry.replica.version]

    # (b) one node's own state goes wrong: a coefficient of its stored log; replaying it gives other weights
    bad = grid.node_ids[1]
    log = read_log(dict(grid.contexts[bad].state.config_records[LOG_KEY]), cfg.method.noise)
    log[0] = type(log[0])(log[0].seeds, tuple(c * 2 for c in log[0].coeffs), log[0].kind)
    grid.contexts[bad].state[LOG_KEY] = ConfigRecord(write_log(log))
    _round(strategy, grid, 5)
    r = strategy.rounds[-1]
    assert r.mismatches == 1 and r.replies == {"ascent": 1, "descent": 1} and strategy.resync == {bad}
    assert bad not in r.answered
    for server_round in (6, 7):
        _round(strategy, grid, server_round)
        r = strategy.rounds[-1]
        assert r.mismatches == 0 and r.replies == {"ascent": 2, "descent": 2} and bad in r.answered
    assert [r.resyncs for r in strategy.rounds] == [0, 0, 0, 2, 0, 1, 0]
    assert [r.mismatches for r in strategy.rounds] == [0, 0, 2, 0, 1, 0, 0]
    fixed = read_log(dict(grid.contexts[bad].state.config_records[LOG_KEY]), cfg.method.noise)
    assert fixed == strategy.log[: len(fixed)]


# default suite: ~70 s of CPU (three runs, two of them fresh processes); the issue names this test
def test_sigkill_mid_run_and_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    """Real processes: ``python -m fed_essam`` killed with SIGKILL after its first checkpoint, then resumed.

    Checkpoints are written to a temporary folder and renamed into place (see
    ``tests/test_training.py::test_failed_checkpoint_write_leaves_previous_one``), so
    whatever the kill interrupted, the run folder holds only complete checkpoints.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from fed_essam.checkpoint import PARAMS_FILE, STATE_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
    from fed_essam.config import validate_config

    rounds = 6
    overrides = [*SMALL, f"num_rounds={rounds}", "federation.num_clients=2", "federation.partition=iid",
                 "federation.backend=local", "eval.every=0", "checkpoint_every=1"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    with open(tmp_path / "first.log", "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "fed_essam", *overrides, f"hydra.run.dir={killed}"],
                                   cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (killed / "checkpoints" / "step-000001").is_dir():
                assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    done = int(load_checkpoint(killed).step)
    assert 1 <= done < rounds, f"the run got to step {done} before the kill: nothing to resume"
    for folder in list_checkpoints(killed):  # whatever the kill interrupted, only complete checkpoints count
        assert (folder / PARAMS_FILE).is_file() and (folder / STATE_FILE).is_file()

    result = subprocess.run([sys.executable, "-m", "fed_essam", *overrides, f"resume={killed}",
                             f"hydra.run.dir={killed}"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    straight = tmp_path / "straight"
    cache.clear()
    run_federated(validate_config(compose_config(overrides)), straight)

    resumed, reference = latest_checkpoint(killed), latest_checkpoint(straight)
    assert resumed.name == reference.name == f"step-{rounds:06d}"
    assert (resumed / PARAMS_FILE).read_bytes() == (reference / PARAMS_FILE).read_bytes()  # the same bits
    a, b = load_checkpoint(resumed), load_checkpoint(reference)
    assert a.update_log == b.update_log and a.fingerprint == b.fingerprint
    assert json.loads((killed / "summary.json").read_text())["final_fingerprint"] == a.fingerprint
    print(f"killed after step {done} of {rounds}, resumed to {rounds}: params.safetensors identical")


DROPOUT = ["federation.backend=local", "federation.num_clients=4", "federation.partition=dirichlet",
           "federation.fault_rate=0.3", "federation.min_clients=1", "eval.every=0", "eval.size=100",
           "eval.batch_size=100", "eval.max_new_tokens=24", "checkpoint_every=0", "progress=false", "seed=0",
           "method=essam", "method.lr=0.03", "method.sigma=0.01", "method.rho=0.02"]


def _dropout_run(tmp_path, overrides):
    from fed_essam.config import validate_config

    cache.clear()
    summary = run_federated(validate_config(compose_config([*DROPOUT, *overrides])), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if line["step"] > 0]
    print(f"fault_rate=0.3: accuracy {summary['accuracy_before']:.2f} -> {summary['accuracy_after']:.2f}, "
          f"held-out loss {summary['loss_before']:.4f} -> {summary['loss_after']:.4f}, failures per round "
          f"{[r['failures'] for r in rounds]}, skipped {summary['skipped_rounds']}")
    return summary, rounds


def test_a_run_with_30_percent_dropouts_completes_counts_them_and_improves(tmp_path):
    summary, rounds = _dropout_run(tmp_path, ["num_rounds=6", "batch_size=8", "method.population=4",
                                              "method.ascent_population=4"])
    assert summary["num_rounds"] == 6 and len(rounds) == 6
    assert all("failures" in r for r in rounds) and sum(r["failures"] for r in rounds) == summary["failed_replies"] > 0
    # held-out loss: measured 1.047 -> 0.770. Exact match on 100 problems after 6 small rounds is noise
    # (measured 0.14 -> 0.13); the slow test below runs long enough to see it rise (0.14 -> 0.19)
    assert summary["loss_after"] < 0.9 * summary["loss_before"]
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.02


@pytest.mark.slow  # ~3 min of CPU; as `fed-essam federation.backend=local federation.fault_rate=0.3 num_rounds=12
# batch_size=8 method.population=8 method.ascent_population=8 eval.every=0`: accuracy 0.14 -> 0.19, loss 1.047 -> 0.522
def test_a_longer_run_with_30_percent_dropouts_improves_held_out_accuracy(tmp_path):
    summary, rounds = _dropout_run(tmp_path, ["num_rounds=12", "batch_size=8", "method.population=8",
                                              "method.ascent_population=8", "federation.min_clients=2"])
    assert summary["num_rounds"] == 12 and sum(r["failures"] for r in rounds) == summary["failed_replies"] > 0
    assert summary["loss_after"] < summary["loss_before"] and summary["accuracy_after"] > summary["accuracy_before"]


class MaliciousClientMain:
    """The real ClientApp handler; the node with partition-id 7 replaces its scalars by huge random ones.

    Test-only (production code has no attacker knob): it wraps :class:`fed_essam.app.ClientMain`.
    """

    def __init__(self, yaml_text: str) -> None:
        from fed_essam.app import ClientMain

        self.inner = ClientMain(yaml_text)

    def __call__(self, message, context):
        from flwr.app import Message, MetricRecord, RecordDict

        from fed_essam.protocol import RECORD_KEY

        reply = self.inner(message, context)
        if int(context.node_config["partition-id"]) == 7 and not reply.has_error():
            record = dict(reply.content[RECORD_KEY])
            rng = np.random.default_rng(int(record["step"]) * 2 + int(record["phase"]))
            record["diffs"] = [float(v) for v in rng.normal(0.0, 1e6, len(record["diffs"]))]
            reply = Message(RecordDict({RECORD_KEY: MetricRecord(record)}), reply_to=message)
        return reply


@pytest.mark.slow  # four 8-client runs of the tiny model: ~3-4 min of CPU
def test_one_malicious_client_of_eight_robust_aggregation_keeps_accuracy_and_mean_is_damaged(tmp_path):
    from fed_essam.app import run_server
    from fed_essam.config import validate_config

    base = ["federation.backend=local", "federation.num_clients=8", "federation.partition=iid",
            "federation.min_clients=2", "num_rounds=6", "batch_size=4", "method=essam", "method.lr=0.03",
            "method.sigma=0.01", "method.rho=0.02", "method.population=4", "method.ascent_population=4",
            "eval.every=0", "eval.size=100", "eval.batch_size=100", "eval.max_new_tokens=24", "checkpoint_every=0",
            "progress=false", "seed=0", "task.train_size=400", "federation.trim_fraction=0.2"]
    out = {}
    for name, aggregation, attacked in (("clean", "mean", False), ("mean+attack", "mean", True),
                                        ("median+attack", "median", True),
                                        ("trimmed_mean+attack", "trimmed_mean", True)):
        cfg = validate_config(compose_config([*base, f"federation.aggregation={aggregation}"]))
        cache.clear()
        yaml_text = config_yaml(cfg)
        handler = MaliciousClientMain(yaml_text) if attacked else make_client_app(yaml_text)
        out[name] = run_server(LocalGrid(handler, 8), cfg, tmp_path / name, min_available=8)
    for name, s in out.items():
        print(f"{name:20s} accuracy {s['accuracy_before']:.2f} -> {s['accuracy_after']:.2f}  "
              f"held-out loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}")
    # Measured (6 rounds): clean accuracy 0.14 -> 0.07, loss 1.047 -> 0.916; attacked mean 0.09, loss 1.349;
    # attacked median 0.07, loss 0.715; attacked trimmed mean 0.13, loss 0.674. Six rounds are too few for exact
    # match to rise (the clean run itself dips), so accuracy is checked one-sided: a robust run loses at most
    # 2 points against the clean run; the held-out loss is the clear signal.
    clean = out["clean"]
    assert clean["loss_after"] < clean["loss_before"]
    for name in ("median+attack", "trimmed_mean+attack"):
        assert out[name]["accuracy_after"] >= clean["accuracy_after"] - 0.02 - 1e-9, name
        assert out[name]["loss_after"] < clean["loss_before"], name  # it still learns
    damaged = out["mean+attack"]
    assert damaged["loss_after"] > damaged["loss_before"]  # the attacker steers the mean: worse than the start
    assert damaged["loss_after"] - clean["loss_after"] > 0.5 * (clean["loss_before"] - clean["loss_after"])
