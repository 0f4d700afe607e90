"""Training pool, held-out set and per-step batches: pure, seeded functions.

Two functions define what every run sees; the centralized loop and the federated
clients both use them:

* :func:`build_problem_sets` -- ``(train, held_out)`` from ``cfg.task``. The
  held-out set holds ``eval_size`` distinct problems of the ``test`` split of
  the task's generator, of ``task.eval_source`` / ``task.eval_path``, or (one
  JSONL file) of a seeded split of the file. The training pool comes from the
  ``train`` split, without any problem whose key (:func:`problem_key`) is held
  out, so the two sets never share a problem, even in a small problem space
  (2-term single-digit sums: 200 problems); generators are asked for more
  problems until ``train_size`` remain.
* :func:`site_problems` -- a deployed site's own GSM8K-format JSONL file
  (``flower-supernode --node-config "data-path='...'"``): the whole file is
  that node's partition, no sampling and no split.
* :func:`step_batch` -- the batch of step ``t``: consecutive slices of a seeded
  permutation of the pool, a fresh permutation every epoch (sampling without
  replacement within an epoch). With ``fixed=True`` every step gets the batch
  of step 0.

Both depend only on their arguments. The pool is generated from
``task.data_seed`` (default 0), not the run seed, so runs with different seeds
share the same problems and are scored on the same held-out set; the run seed
only orders the batches (and draws the probes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fed_essam.tasks import Problem, TaskDataError, load_problems
from fed_essam.tasks.loading import FILE_SOURCES

#: attempts (each doubling the request) to find enough held-out problems outside the pool.
HELD_OUT_ATTEMPTS = 4
_SPACES = re.compile(r"\s+")


def problem_key(problem: Problem) -> str:
    """Identity of a problem for the train / held-out overlap check.

    The arithmetic expression for reasoning-gym arithmetic (so that two phrasings
    of ``3 + 4 - 1`` count as the same problem), else the question with runs of
    whitespace collapsed and case folded.
    """
    entry = problem.metadata.get("rg_entry") or {}
    expression = (entry.get("metadata") or {}).get("expression")
    text = expression if expression else problem.question
    return _SPACES.sub(" ", str(text)).strip().casefold()


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``parts`` (e.g. a client id).

    ``derive_seed(s, k)`` gives unrelated streams for different ``k`` (NumPy
    ``SeedSequence`` mixing), useful as the ``seed`` of :func:`step_batch` for client ``k``.
    """
    words = [int(v) % (1 << 64) for v in (seed, *parts)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of ``range(n)`` used in ``epoch`` (PCG64 seeded by ``(seed, epoch)``)."""
    rng = np.random.default_rng([int(seed) % (1 << 64), int(epoch)])
    return rng.permutation(n)


def step_batch(
    problems: Sequence[Problem], step: int, batch_size: int, seed: int, fixed: bool = False
) -> list[Problem]:
    """The problems probed at ``step``.

    Positions ``step * B .. step * B + B - 1`` of the infinite stream
    ``perm_0 ++ perm_1 ++ ...``, where ``perm_e`` is a seeded permutation of the
    pool for epoch ``e``:

    .. math:: \\text{batch}_t = \\big(x_{\\pi_{e(p)}(p \\bmod n)}\\big)_{p = tB}^{tB + B - 1},
              \\qquad e(p) = \\lfloor p / n \\rfloor

    A batch larger than the pool wraps into the next epochs.

    Parameters
    ----------
    problems : sequence of Problem
        The pool (the whole training set, or one client's share).
    step : int
        Step index, >= 0.
    batch_size : int
        ``B`` >= 1.
    seed : int
        Order of the stream; use :func:`derive_seed` for per-client streams.
    fixed : bool
        Return the batch of step 0 whatever ``step`` is (``fixed_batch=true``).

    Returns
    -------
    list of Problem
        ``B`` problems; the same arguments always give the same list.
    """
    n = len(problems)
    if n == 0:
        raise ValueError("step_batch: the problem pool is empty")
    if batch_size < 1:
        raise ValueError(f"step_batch: batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step_batch: step must be >= 0, got {step}")
    start = 0 if fixed else step * batch_size
    first_epoch, last_epoch = start // n, (start + batch_size - 1) // n
    stream = np.concatenate([_epoch_order(n, seed, e) for e in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * n
    return [problems[int(i)] for i in stream[offset : offset + batch_size]]


# --------------------------------------------------------------------------- #
# Problem sets
# --------------------------------------------------------------------------- #
def _kwargs(value: Any) -> dict[str, Any]:
    """Plain dict of generator options (``None`` -> ``{}``)."""
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]
    return dict(value)


def _task_settings(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The task section as a plain dict with the defaults of :class:`fed_essam.config.TaskConfig`."""
    task = cfg["task"]
    eval_size = OmegaConf.select(cfg, "eval.size") if isinstance(cfg, DictConfig) else cfg.get("eval", {}).get("size")
    get = task.get
    return {
        "source": get("source"),
        "train_size": get("train_size"),
        "eval_size": get("eval_size") or eval_size,
        "path": get("path"),
        "on_error": get("on_error", "raise"),
        "kwargs": _kwargs(get("kwargs")),
        "eval_source": get("eval_source"),
        "eval_path": get("eval_path"),
        "eval_kwargs": get("eval_kwargs"),
        "data_seed": int(get("data_seed", 0) or 0),
    }


def _exclude(candidates: Sequence[Problem], seen: set[str], size: int) -> list[Problem]:
    """The first ``size`` candidates whose key is neither in ``seen`` nor repeated."""
    kept, keys = [], set(seen)
    for problem in candidates:
        key = problem_key(problem)
        if key not in keys:
            keys.add(key)
            kept.append(problem)
            if len(kept) == size:
                break
    return kept


def _split_one_file(t: dict[str, Any]) -> tuple[list[Problem], list[Problem]]:
    """Seeded split of one JSONL file into a held-out part and a training part."""
    everything = load_problems("jsonl", size=None, seed=t["data_seed"], path=t["path"], on_error=t["on_error"])
    order = np.random.default_rng([t["data_seed"], 1]).permutation(len(everything))
    shuffled = [everything[int(i)] for i in order]
    held = _exclude(shuffled, set(), t["eval_size"])
    held_keys = {problem_key(p) for p in held}
    train = [p for p in shuffled if problem_key(p) not in held_keys]
    if not train:
        raise TaskDataError(
            f"{t['path']}: {len(everything)} problems cannot give {t['eval_size']} held-out problems and a training "
            "pool; lower eval.size or give task.eval_path"
        )
    train = sorted(train, key=lambda p: p.metadata.get("line", 0))
    size = t["train_size"]
    return (train if size is None else train[:size]), held


def _eval_source(t: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """Source, path and generator options of the held-out set."""
    source = t["eval_source"] or ("jsonl" if t["eval_path"] else t["source"])
    path = t["eval_path"] if source == "jsonl" else None
    if source == t["source"] and t["eval_kwargs"] is None:
        return source, path, t["kwargs"]
    return source, path, _kwargs(t["eval_kwargs"])


def _distinct(source: str, size: int | None, exclude: set[str], load: Any) -> list[Problem]:
    """``size`` problems from ``load(request)`` whose keys are outside ``exclude``.

    A generator is asked for more problems (doubling, :data:`HELD_OUT_ATTEMPTS`
    times) until enough survive; a file is read once. Held-out sets
    (``exclude`` empty) are also made duplicate-free.
    """
    generated = source not in FILE_SOURCES
    want = size
    for _ in range(HELD_OUT_ATTEMPTS):
        request = 2 * want + 64 if generated and size is not None else size
        candidates = load(request)
        if exclude:
            kept = [p for p in candidates if problem_key(p) not in exclude][:size]
        else:
            kept = _exclude(candidates, set(), size if size is not None else len(candidates))
        if size is None or len(kept) == size or not generated:
            return kept
        want *= 2
    return kept


def _held_out(t: dict[str, Any]) -> list[Problem]:
    """``eval_size`` distinct problems of the ``test`` split (or of the eval source)."""
    source, path, kwargs = _eval_source(t)
    size = t["eval_size"]

    def load(request: int | None) -> list[Problem]:
        return load_problems(source, size=request, seed=t["data_seed"], path=path, split="test",
                             on_error=t["on_error"], **kwargs)

    held = _distinct(source, size, set(), load)
    if len(held) < size:
        raise TaskDataError(
            f"found only {len(held)} distinct held-out problems of {source!r} (eval.size={size}); "
            "enlarge the task (task.kwargs) or lower eval.size"
        )
    return held


def _train_pool(t: dict[str, Any], held_out: Sequence[Problem]) -> list[Problem]:
    """``train_size`` problems of the ``train`` split whose keys are not held out."""
    exclude = {problem_key(p) for p in held_out}

    def load(request: int | None) -> list[Problem]:
        return load_problems(t["source"], size=request, seed=t["data_seed"], path=t["path"], split="train",
                             on_error=t["on_error"], **t["kwargs"])

    train = _distinct(t["source"], t["train_size"], exclude, load)
    if not train:
        raise TaskDataError(
            f"task {t['source']!r} has no training problem outside the {len(held_out)} held-out ones; "
            "lower eval.size or enlarge the task (task.kwargs)"
        )
    return train


def site_problems(path: str | os.PathLike, on_error: str = "raise") -> list[Problem]:
    """Every problem of a site's own GSM8K-format JSONL file, in file order (a node's whole partition).

    Parameters
    ----------
    path : str or PathLike
        The file (``~`` expanded; a relative path is taken from the current
        directory and reported as an absolute one).
    on_error : {"raise", "skip"}
        ``task.on_error``: raise on the first bad line, or skip bad lines with one warning.

    Raises
    ------
    TaskDataError
        Missing, unreadable, empty or (``on_error="raise"``) malformed file; the
        message starts with the file's absolute path (``"<path>:<line>: <reason>"`` for a bad line).
    """
    file = Path(path).expanduser().absolute()
    if not file.exists():
        raise TaskDataError(f"{file}: file not found (the node's data-path, a GSM8K-format JSONL file of this site)")
    return load_problems("jsonl", size=None, seed=0, path=str(file), on_error=on_error)


def build_problem_sets(cfg: DictConfig | Mapping) -> tuple[list[Problem], list[Problem]]:
    """Training pool and held-out set of a run.

    Parameters
    ----------
    cfg : DictConfig or mapping
        Uses ``task.{source, train_size, eval_size, path, on_error, kwargs,
        eval_source, eval_path, eval_kwargs, data_seed}`` (``eval_size`` falls
        back to ``eval.size``).

    Returns
    -------
    train : list of Problem
        ``task.train_size`` problems of the ``train`` split (a whole file when
        ``None``).
    held_out : list of Problem
        ``task.eval_size`` problems, disjoint from ``train`` by :func:`problem_key`.

    Raises
    ------
    TaskDataError
        When a source fails, or too few held-out problems lie outside the pool.
    """
    t = _task_settings(cfg)
    if t["eval_size"] is None or t["eval_size"] < 1:
        raise TaskDataError(f"the held-out set needs eval.size >= 1, got {t['eval_size']!r}")
    if t["source"] == "jsonl" and not t["eval_path"] and t["eval_source"] in (None, "jsonl"):
        return _split_one_file(t)
    held_out = _held_out(t)
    return _train_pool(t, held_out), held_out


__all__ = ["build_problem_sets", "derive_seed", "problem_key", "site_problems", "step_batch"]
