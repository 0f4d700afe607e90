"""The per-process cache of the ClientApp: ONE model copy and the training pool per process.

A Flower simulation runs many virtual clients in few worker processes (Ray
actors); loading a model per virtual client would multiply memory by the number
of clients. So each process keeps:

* one :class:`CachedModel` -- the model, its tokenizer and a
  :class:`~fed_essam.replica.Replica` that remembers the version of the global
  update log the weights are at. Virtual clients served by the same process may
  be at different versions (a client sampled in round 3 but not in round 2):
  every request brings the shared weights to the version it asks for, replaying
  from the node's own update log, never trusting the cache's version blindly.
  If the cache is ahead of the request or followed another log (another run in
  the same process), the model is reloaded from the base checkpoint and replayed.
* the training pool and the partitions computed from it (every virtual client
  of the run derives its share from the same pool).

Both entries are keyed by the settings that define them (JSON of the relevant
config sections); a request with other settings replaces the entry (at most one
model is alive per process). This module-level dict is the only mutable global
state of the federated code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fed_essam.replica import LineageError, Replica, load_replica
from fed_essam.tasks import Problem

#: held by a client handler for a whole request (sync + probes mutate the one shared model).
LOCK = threading.RLock()
#: the process cache: ``{"model": CachedModel, "data": CachedData}`` (see the module docstring).
_CACHE: dict[str, Any] = {}


@dataclass
class CachedModel:
    """The process's model copy and where it stands in the update log."""

    key: str
    model: torch.nn.Module
    tokenizer: Any
    replica: Replica
    loads: int = 1
    peak_memory: int | None = None


@dataclass
class CachedData:
    """The run's training pool and the partitions computed from it so far."""

    key: str
    train: list[Problem]
    held_out: list[Problem]
    shares: dict[tuple[int, int], list[Problem]] = field(default_factory=dict)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_key(cfg: DictConfig) -> str:
    """What defines the model copy: model section, device, noise, seed pool and run seed."""
    m = cfg.method
    return json.dumps(
        [_plain(cfg.model), cfg.device, m.noise, m.noise_backend, m.get("seed_pool"), cfg.seed], sort_keys=True
    )


def data_key(cfg: DictConfig) -> str:
    """What defines the training pool: the task section and the held-out size."""
    return json.dumps([_plain(cfg.task), cfg.eval.size], sort_keys=True, default=str)


def synced_model(cfg: DictConfig, log: list, version: int,
                 loader: Callable[[DictConfig], tuple[torch.nn.Module, Any, Replica]] = load_replica,
                 *, reload: bool = False) -> CachedModel:
    """The process's model, brought to ``version`` of ``log`` (loaded or reloaded as needed).

    ``reload=True`` (a resync) drops the cached weights whatever version they claim
    and replays ``log`` on a fresh copy of the base model.
    """
    key = model_key(cfg)
    with LOCK:
        entry = _CACHE.get("model")
        if reload and entry is not None:
            _CACHE.pop("model", None)
            loads, peak = entry.loads + 1, entry.peak_memory if entry.key == key else None
            entry = None  # free the old copy before loading the new one
            entry = CachedModel(key, *loader(cfg), loads=loads, peak_memory=peak)
            _CACHE["model"] = entry
        elif entry is None or entry.key != key:
            _CACHE.pop("model", None)  # free the old copy before loading the new one
            entry = CachedModel(key, *loader(cfg))
            _CACHE["model"] = entry
        try:
            entry.replica.sync(log, version)
        except LineageError:
            _CACHE.pop("model", None)
            entry = CachedModel(key, *loader(cfg), loads=entry.loads + 1)
            _CACHE["model"] = entry
            entry.replica.sync(log, version)
        return entry


def client_share(cfg: DictConfig, partition_id: int, num_partitions: int) -> list[Problem]:
    """Client ``partition_id``'s private problems (see :mod:`fed_essam.partition`)."""
    from fed_essam.data import build_problem_sets
    from fed_essam.partition import partition

    key = data_key(cfg)
    with LOCK:
        data = _CACHE.get("data")
        if data is None or data.key != key:
            train, held_out = build_problem_sets(cfg)
            data = CachedData(key, train, held_out)
            _CACHE["data"] = data
        f = cfg.federation
        share_key = (partition_id, num_partitions, f.partition, float(f.dirichlet_alpha), int(cfg.seed))
        if share_key not in data.shares:
            data.shares[share_key] = partition(
                data.train, partition_id, num_partitions, scheme=f.partition, alpha=f.dirichlet_alpha, seed=cfg.seed
            )
        return data.shares[share_key]


def site_share(cfg: DictConfig, data_path: str) -> list[Problem]:
    """A deployed site's own problems: every problem of its ``data-path`` file (no further split).

    Cached per process by the file's absolute path, size and modification time
    (an edited file is read again); ``task.on_error`` applies to bad lines.
    """
    import os
    from pathlib import Path

    from fed_essam.data import site_problems

    file = Path(data_path).expanduser().absolute()
    on_error = str(cfg.task.get("on_error", "raise"))
    try:
        stat = os.stat(file)
        key = json.dumps([str(file), stat.st_size, stat.st_mtime_ns, on_error])
    except OSError:
        key = None  # site_problems names the file in its error
    with LOCK:
        site = _CACHE.get("site")
        if key is None or site is None or site[0] != key:
            site = (key, site_problems(file, on_error=on_error))
            _CACHE["site"] = site
        return site[1]


def clear(*, data: bool = True) -> None:
    """Drop the cached model (and the data unless ``data=False``); tests, freeing memory."""
    with LOCK:
        _CACHE.pop("model", None)
        if data:
            _CACHE.pop("data", None)
            _CACHE.pop("site", None)


def cached_model() -> CachedModel | None:
    """The cached model entry, if any (tests and diagnostics)."""
    return _CACHE.get("model")


__all__ = ["CachedData", "CachedModel", "cached_model", "clear", "client_share", "data_key", "model_key", "site_share",
           "synced_model"]
