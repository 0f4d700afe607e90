"""Flower apps of fed-essam and :func:`run_federated` (the only fed_essam module that imports Flower).

* :data:`server_app` / :data:`client_app` -- module-level apps for ``flwr run .``
  (``[tool.flwr.app.components]`` in pyproject.toml). They compose ``conf/``
  with Hydra's compose API from the run config: ``overrides`` (Hydra overrides,
  space-separated, e.g. ``"method=es num_rounds=5"``) and ``run-dir``.
* :func:`make_server_app` / :func:`make_client_app` -- the same apps bound to a
  resolved configuration (YAML text held by small picklable handler objects,
  :class:`ServerMain` and :class:`ClientMain`: no closures, so Ray ships them
  to its workers as plain objects).
* :func:`run_federated` -- one simulation: Flower's ``run_simulation`` (Ray
  backend, ``federation.backend=ray``, the default) or the in-process
  :class:`~strategies.local_grid.LocalGrid` (``federation.backend=local``).

The ServerApp (:func:`run_server`) keeps the server's replica, runs
:class:`~strategies.essam.ESSAMStrategy` through ``Strategy.start``, and in
``evaluate_fn`` (after every round) writes ``metrics.jsonl``, evaluates the
held-out set every ``eval.every`` rounds, checkpoints every
``checkpoint_every`` rounds, and at the end writes ``summary.json`` and
``metrics.png``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from clients.handler import handle
from strategies.essam import ESSAMSettings, ESSAMStrategy

CONFIG_KEY = "config-yaml"
OVERRIDES_KEY = "overrides"
RUN_DIR_KEY = "run-dir"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
def config_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML (the ``hydra`` node dropped)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def find_conf_dir() -> Path:
    """``conf/`` next to the package (a source checkout), else in a ``sys.path`` entry (a Flower FAB)."""
    import sys

    for folder in [CONF_DIR, *(Path(entry) / "conf" for entry in sys.path if entry)]:
        if (folder / "config.yaml").is_file():
            return folder.resolve()
    raise FileNotFoundError(f"no conf/config.yaml next to the package ({CONF_DIR}) or on sys.path")


def compose_config(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = find_conf_dir() if config_dir is None else config_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="config", overrides=list(overrides or []))


def config_from_run_config(run_config: dict[str, Any]) -> DictConfig:
    """The run configuration carried by a Flower run config (YAML, or Hydra overrides)."""
    if CONFIG_KEY in run_config:
        return OmegaConf.create(str(run_config[CONFIG_KEY]))
    return compose_config(str(run_config.get(OVERRIDES_KEY, "")).split())


# --------------------------------------------------------------------------- #
# Apps
# --------------------------------------------------------------------------- #
class ClientMain:
    """ClientApp handler bound to a configuration (YAML text), or reading it from the run config."""

    def __init__(self, yaml_text: str | None = None) -> None:
        self.yaml_text = yaml_text

    def config(self, context: Context) -> DictConfig:
        """The run configuration."""
        return OmegaConf.create(self.yaml_text) if self.yaml_text else config_from_run_config(dict(context.run_config))

    def __call__(self, message: Message, context: Context) -> Message:
        """Serve one ascent or descent request (see :func:`clients.handler.handle`)."""
        return handle(message, context, self.config(context))


def make_client_app(yaml_text: str | None = None) -> ClientApp:
    """A ClientApp answering ``train.ascent`` and ``train.descent``."""
    app = ClientApp()
    handler = ClientMain(yaml_text)
    app.train("ascent")(handler)
    app.train("descent")(handler)
    return app


class ServerMain:
    """ServerApp main bound to a configuration and run folder, or reading them from the run config."""

    def __init__(self, yaml_text: str | None = None, run_dir: str | None = None, min_available: int | None = None) -> None:
        self.yaml_text, self.run_dir, self.min_available = yaml_text, run_dir, min_available

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run the federation on ``grid``."""
        run_config = dict(context.run_config)
        cfg = OmegaConf.create(self.yaml_text) if self.yaml_text else config_from_run_config(run_config)
        run_dir = self.run_dir or run_config.get(RUN_DIR_KEY) or f"outputs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
        run_server(grid, cfg, run_dir, min_available=self.min_available)


def make_server_app(yaml_text: str | None = None, run_dir: str | None = None,
                    min_available: int | None = None) -> ServerApp:
    """A ServerApp running :func:`run_server`."""
    app = ServerApp()
    app.main()(ServerMain(yaml_text, run_dir, min_available))
    return app


# --------------------------------------------------------------------------- #
# The server's run
# --------------------------------------------------------------------------- #
def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def comm_summary(strategy: ESSAMStrategy, parameter_bytes: int) -> dict[str, Any]:
    """Communication of the run: means over (round, participating client) pairs, totals, FedAvg's cost."""
    def per_client(attr: str) -> list[int]:
        return [b for r in strategy.rounds for b in getattr(r, attr).values()]

    down, up = per_client("bytes_down"), per_client("bytes_up")
    return {
        "bytes_down_per_client_round": _mean(down), "bytes_up_per_client_round": _mean(up),
        "bytes_down_max_client_round": max(down, default=0), "bytes_up_max_client_round": max(up, default=0),
        "bytes_down_total": sum(down), "bytes_up_total": sum(up),
        "wire_bytes_down_per_client_round": _mean(per_client("wire_down")),
        "wire_bytes_up_per_client_round": _mean(per_client("wire_up")),
        "fedavg_bytes_per_client_round": parameter_bytes,
        "bytes_counted_as": "Flower 1.42 deflate() of the message's records (wire_*: plus Message and RecordDict envelope)",
    }


def dp_summary(cfg: DictConfig, strategy: ESSAMStrategy) -> dict[str, Any]:
    """Privacy spent (client-level epsilon at ``privacy.delta``, see :mod:`fed_essam.privacy`), when DP is on.

    Central mode: the strategy's accountant (one round per step, ``q`` = sampled /
    connected). Local mode: the guarantee against the server of the client that
    answered most often (``q = 1`` per round it took part in).
    """
    privacy = cfg.get("privacy") or {}
    if not privacy.get("enabled", False):
        return {}
    from fed_essam.privacy import DPAccountant

    z, delta = float(privacy.noise_multiplier), float(privacy.delta)
    releases = 2 if strategy.settings.rho > 0 else 1
    if strategy.accountant is not None:
        eps = strategy.accountant.epsilon(delta)
    else:
        accountant = DPAccountant(z, "local", releases_per_round=releases)
        for _ in range(max(strategy.rounds_answered.values(), default=0)):
            accountant.record_round(1.0)
        eps = accountant.epsilon(delta)
    return {"dp_mode": str(privacy.mode), "dp_epsilon": eps, "dp_delta": delta, "dp_noise_multiplier": z,
            "dp_clip": float(privacy.clip)}


def run_server(grid: Grid, cfg: DictConfig, run_dir: str | os.PathLike, *, min_available: int | None = None) -> dict[str, Any]:
    """The ServerApp's work: the federated run on ``grid``; writes the run folder, returns the summary."""
    from fed_essam.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from fed_essam.data import build_problem_sets
    from fed_essam.evaluation import evaluate
    from fed_essam.metrics import MetricsWriter, atomic_write_text, plot_metrics, write_summary
    from fed_essam.replica import load_replica

    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml(cfg))
    model, tokenizer, replica = load_replica(cfg)
    _, held_out = build_problem_sets(cfg)
    update_log, forward_passes = [], 0
    if cfg.get("resume"):
        path = latest_checkpoint(cfg.resume)
        if path is None:
            raise FileNotFoundError(f"resume={cfg.resume}: the folder holds no checkpoint")
        checkpoint = load_checkpoint(path)
        update_log, forward_passes = checkpoint.update_log, int(checkpoint.extra.get("forward_passes", 0))
    settings = ESSAMSettings.from_config(cfg, min_available=min_available)
    strategy = ESSAMStrategy(replica, settings, update_log)
    first, last = strategy.version, int(cfg.num_rounds)
    writer = MetricsWriter(run_dir, forward_passes=forward_passes)
    evaluations: dict[int, Any] = {}
    totals = {"forward_passes": forward_passes}

    def held_out_eval() -> Any:
        return evaluate(model, tokenizer, held_out, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, template=cfg.model.get("template", "plain"),
                        progress=False)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        step = strategy.version
        fields: dict[str, Any] = {}
        if server_round > 0:
            r = strategy.rounds[-1]
            totals["forward_passes"] += r.forward_passes
            fields.update({k: v for k, v in r.metrics().items() if k not in ("step", "forward_passes")})
            fields["clients"] = fields.pop("sampled")
            if r.skipped:
                fields["skipped_reason"] = r.skipped
        every_eval = int(cfg.eval.every)
        if server_round == 0 or step == last or (every_eval > 0 and step % every_eval == 0):
            result = held_out_eval()
            evaluations[step] = result
            fields.update({"accuracy": result.accuracy, "eval_loss": result.loss})
        fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        writer.log(step, forward_passes=totals["forward_passes"], **fields)
        every = int(cfg.checkpoint_every)
        if server_round > 0 and (step == last or (every > 0 and step % every == 0)):
            save_checkpoint(run_dir, model, step, strategy.log,
                            extra={"forward_passes": totals["forward_passes"], "method": cfg.method.name,
                                   "seed": int(cfg.seed), "mode": "federated"})
        if cfg.get("progress", True):
            _print_progress(step, last, fields)
        if step in evaluations:
            return MetricRecord({"accuracy": evaluations[step].accuracy, "eval_loss": evaluations[step].loss})
        return None

    strategy.start(grid, ArrayRecord(), num_rounds=max(last - first, 0),
                   timeout=float(cfg.federation.reply_timeout), evaluate_fn=evaluate_fn)

    before, after = evaluations[min(evaluations)], evaluations[max(evaluations)]
    parameter_bytes = sum(p.numel() * p.element_size() for p in replica.params)
    summary: dict[str, Any] = {
        "mode": "federated", "method": cfg.method.name, "seed": int(cfg.seed),
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "loss_before": before.loss, "loss_after": after.loss, "num_rounds": strategy.version,
        "forward_passes": totals["forward_passes"], "peak_memory_bytes": strategy.client_peak_memory,
        "peak_memory_method": "client probing, fed_essam.memory.measure_peak_memory (max over client processes)",
        "server_peak_rss_bytes": _peak_memory_bytes(), "wall_seconds": time.perf_counter() - start,
        "num_clients": int(cfg.federation.num_clients),
        "fingerprint_mismatches": strategy.fingerprint_mismatches, "resyncs": strategy.resyncs,
        "non_finite_replies": sum(r.non_finite for r in strategy.rounds),
        "skipped_rounds": sum(1 for r in strategy.rounds if r.skipped),
        "failed_replies": sum(r.failures for r in strategy.rounds),
        "final_fingerprint": replica.fingerprint(), "noise_regenerations_server": replica.regenerations,
        **comm_summary(strategy, parameter_bytes), **dp_summary(cfg, strategy),
    }
    write_summary(run_dir, summary)
    try:
        plot_metrics(run_dir, title=f"federated {cfg.method.name}, {cfg.federation.num_clients} clients")
    except Exception as err:  # pylint: disable=broad-exception-caught  # a plot never fails a run
        logger.warning("metrics.png not written: %s", err)
    return summary


def _peak_memory_bytes() -> int:
    """Peak resident set of this (server) process, in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _print_progress(step: int, last: int, fields: dict[str, Any]) -> None:
    def fmt(key: str, spec: str) -> str:
        value = fields.get(key)
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    clients = fields.get("clients") or 0
    per_client = {k: f"{fields[k] / clients:.0f}" if clients and k in fields else "-" for k in ("bytes_down", "bytes_up")}
    print(f"[fed-essam] round {step}/{last}  loss {fmt('loss', '.4f')}  acc {fmt('accuracy', '.3f')}  "
          f"clients {fields.get('descent_replies', '-')}/{clients or '-'}  "
          f"bytes/client down {per_client['bytes_down']} up {per_client['bytes_up']}"
          + (f"  SKIPPED: {fields['skipped_reason']}" if fields.get("skipped_reason") else ""), flush=True)


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def check_client_data(cfg: DictConfig) -> None:
    """Load the task data and split it as the simulated clients will, before any model or worker starts.

    Raises
    ------
    fed_essam.tasks.TaskDataError
        Unreadable or malformed data files (naming the file and line).
    fed_essam.config.ConfigError
        A client would get an empty share (naming ``federation.num_clients`` and the client).
    """
    from fed_essam.config import ConfigError
    from fed_essam.data import build_problem_sets
    from fed_essam.partition import PartitionError, partition

    train, _ = build_problem_sets(cfg)
    f = cfg.federation
    n = int(f.num_clients)
    for k in range(n):
        try:
            share = partition(train, k, n, scheme=f.partition, alpha=f.dirichlet_alpha, seed=cfg.seed)
        except PartitionError as err:
            raise ConfigError(f"federation.num_clients={n}: {err}") from err
        if not share:
            raise ConfigError(f"federation.num_clients={n}: client {k}'s data partition is empty "
                              f"({len(train)} training problems)")


def run_federated(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run a federated simulation of ``cfg`` and return its summary (also in ``run_dir/summary.json``).

    ``federation.backend``: ``ray`` (default; Flower's ``run_simulation``, one
    Ray actor per ``client_resources`` share, one model copy per actor) or
    ``local`` (:class:`~strategies.local_grid.LocalGrid`, everything in this process).
    """
    from fed_essam.metrics import read_summary

    check_client_data(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    yaml_text = config_yaml(cfg)
    f = cfg.federation
    num_clients = int(f.num_clients)
    backend = str(f.get("backend", "ray"))
    if backend == "local":
        from strategies.local_grid import LocalGrid

        grid = LocalGrid(make_client_app(yaml_text), num_clients)
        return run_server(grid, cfg, run_dir, min_available=num_clients)
    if backend != "ray":
        raise ValueError(f"federation.backend must be 'ray' or 'local', got {backend!r}")
    from flwr.simulation import run_simulation

    resources = OmegaConf.to_container(f.client_resources, resolve=True) if f.get("client_resources") else {}
    backend_config = {
        "client_resources": {"num_cpus": resources.get("num_cpus", 1), "num_gpus": resources.get("num_gpus", 0.0)},
        "init_args": {"include_dashboard": False, **dict(f.get("ray_init_args") or {})},
    }
    run_simulation(
        server_app=make_server_app(yaml_text, str(run_dir), min_available=num_clients),
        client_app=make_client_app(yaml_text),
        num_supernodes=num_clients,
        backend_config=backend_config,
    )
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the federated run ended without writing {summary_path}; see the log above")
    return read_summary(run_dir)


#: ``flwr run .`` apps (configuration from the run config; see the module docstring).
server_app = make_server_app()
client_app = make_client_app()

__all__ = [
    "ClientMain", "ServerMain", "client_app", "compose_config", "config_from_run_config", "config_yaml",
    "make_client_app", "make_server_app", "run_federated", "run_server", "server_app",
]
