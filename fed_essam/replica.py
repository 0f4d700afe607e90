"""A party's copy of the parameters, kept at a version of the global update log.

Every party of a federation (the server and each client process) holds one
:class:`Replica`. The global log ``U_0, U_1, ...`` (one :class:`SeedUpdate` per
ESSAM step; an empty one for a skipped step) defines the parameters at version
``v``; two rules, fixed per run, say how:

* sequential (default, no seed pool) -- exactly the centralized optimizer's
  arithmetic, so a federation reproduces a central run bit for bit:

  .. math:: \\theta_{v+1} = \\operatorname{round}(\\theta_v + \\delta(U_v))

  A replica at version ``u`` reaches ``v`` by applying ``U_u .. U_{v-1}``;
  a fresh one replays from the base model (cost: all the seeds since then).
* seed pool of size ``K`` (FedKSeed) -- the state is the base model plus one
  accumulated coefficient per pool seed, materialized in one pass:

  .. math:: A^v_k = \\sum_{u < v} \\sum_{(s, c) \\in U_u,\\ s = p_k} c, \\qquad
            \\theta_v = \\operatorname{round}(\\theta_0 + \\delta(\\{(p_k, A^v_k)\\}_k))

  ``A`` is summed in float64 in log order (the same bits everywhere) and
  rounded to float32 once. Reaching any version costs at most ``K`` noise
  regenerations, whatever the gap; the price is a kept copy of ``theta_0`` and
  ``K`` regenerations per step instead of ``N_b``. The bits differ (by rounding)
  from a sequential or centralized run with the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fed_essam.noise import NoiseBackend, NoiseKind
from fed_essam.perturb import SeedUpdate, apply_update, fingerprint, trainable_parameters
from fed_essam.seeds import pool_seed


class LineageError(RuntimeError):
    """The replica's history is not a prefix of the log it was asked to follow."""


def pool_seeds(run_seed: int, pool_size: int) -> list[int]:
    """The ``K`` seeds of the run's pool, in pool order (see :func:`fed_essam.seeds.pool_seed`)."""
    return [pool_seed(run_seed, k) for k in range(pool_size)]


def accumulate(log: Sequence[SeedUpdate], seeds: Sequence[int]) -> np.ndarray:
    """Per-pool-seed sums ``A_k`` of the log's coefficients (float64, log order).

    Raises
    ------
    LineageError
        If an update uses a seed outside the pool.
    """
    index = {s: k for k, s in enumerate(seeds)}
    total = np.zeros(len(seeds), dtype=np.float64)
    for version, update in enumerate(log):
        for seed, coeff in zip(update.seeds, update.coeffs):
            if seed not in index:
                raise LineageError(f"update {version} uses seed {seed}, which is not in the seed pool")
            total[index[seed]] += coeff
    return total


class Replica:
    """Parameters that follow the global update log.

    Parameters
    ----------
    params : list of Tensor
        The trainable tensors (noise ``tensor_index`` order), at version 0.
    kind : {"gaussian", "rademacher"}
    backend : noise backend
    pool : list of int, optional
        Seed pool (pool rule); ``None`` for the sequential rule. A copy of the
        version-0 parameters is kept on the CPU.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        kind: NoiseKind = "gaussian",
        backend: NoiseBackend = "auto",
        pool: Sequence[int] | None = None,
    ) -> None:
        self.params = params
        self.kind: NoiseKind = kind
        self.backend: NoiseBackend = backend
        self.pool = list(pool) if pool is not None else None
        self.base = [p.detach().to("cpu", copy=True) for p in params] if pool is not None else None
        self.applied: list[SeedUpdate] = []
        self.regenerations = 0
        self._fingerprint: str | None = None

    @property
    def version(self) -> int:
        """Number of log entries the parameters reflect."""
        return len(self.applied)

    def fingerprint(self) -> str:
        """:func:`fed_essam.perturb.fingerprint` of the parameters (cached per version).

        Exact probing restores the parameters bit for bit, so the value stays
        valid until the next :meth:`sync`.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.params)
        return self._fingerprint

    def sync(self, log: Sequence[SeedUpdate], version: int | None = None) -> int:
        """Bring the parameters to ``version`` (default: ``len(log)``) of ``log``.

        Returns the number of noise regenerations spent.

        Raises
        ------
        LineageError
            Sequential rule only: the replica is ahead of ``version`` or
            followed another log (the caller reloads the base model and syncs
            again). The pool rule rebuilds any version from its base copy.
        """
        version = len(log) if version is None else version
        if version > len(log):
            raise ValueError(f"version {version} is beyond the {len(log)} updates of the log")
        target = list(log[:version])
        if target == self.applied:
            return 0
        if self.pool is not None:
            cost = self._materialize(target)
        elif version < self.version or target[: self.version] != self.applied:
            raise LineageError(
                f"replica at version {self.version} is not on the path to version {version} of this log"
            )
        else:
            cost = self._apply_sequential(target[self.version :])
        self.applied = target
        self.regenerations += cost
        self._fingerprint = None
        return cost

    def _apply_sequential(self, updates: Sequence[SeedUpdate]) -> int:
        cost = 0
        for update in updates:
            if update.seeds:
                apply_update(self.params, update, backend=self.backend)
                cost += sum(1 for c in update.coeffs if c != 0.0)
        return cost

    @torch.no_grad()
    def _materialize(self, log: Sequence[SeedUpdate]) -> int:
        assert self.pool is not None and self.base is not None
        coeffs = accumulate(log, self.pool)
        for p, b in zip(self.params, self.base):
            p.copy_(b)
        total = SeedUpdate(tuple(self.pool), tuple(coeffs), self.kind)
        apply_update(self.params, total, backend=self.backend)
        return sum(1 for c in total.coeffs if c != 0.0)


def load_replica(cfg: Any) -> tuple[torch.nn.Module, Any, Replica]:
    """Load the base model of ``cfg.model`` on ``cfg.device``; wrap its trainable tensors in a version-0 replica.

    Returns ``(model, tokenizer, replica)``; the replica follows the rule of
    ``cfg.method.seed_pool`` with the run seed ``cfg.seed``.
    """
    from omegaconf import OmegaConf

    from fed_essam.models import load_model, resolve_device

    lora = cfg.model.get("lora")
    lora = OmegaConf.to_container(lora, resolve=True) if lora is not None and not isinstance(lora, dict) else lora
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, device=resolve_device(cfg.device),
                                  gguf_file=cfg.model.get("gguf_file"), lora=lora)
    m = cfg.method
    pool = pool_seeds(int(cfg.seed), int(m.seed_pool)) if m.get("seed_pool") else None
    replica = Replica(trainable_parameters(model), kind=m.noise, backend=m.noise_backend, pool=pool)
    return model, tokenizer, replica


__all__ = ["LineageError", "Replica", "accumulate", "load_replica", "pool_seeds"]
