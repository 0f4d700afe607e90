"""Run outputs: per-step ``metrics.jsonl``, ``summary.json`` and ``metrics.png``.

* :class:`MetricsWriter` appends one JSON object per line (``step``,
  ``forward_passes`` so far, ``wall_seconds`` since the writer was created,
  plus whatever the caller passes: probe losses, held-out accuracy and loss...).
  Every line is flushed, so a crashed run keeps its history.
* :func:`write_summary` writes ``summary.json`` atomically (temporary file in the
  same folder, then ``os.replace``): readers never see half a file.
* :func:`plot_metrics` draws held-out accuracy and losses against forward
  passes into ``metrics.png`` (matplotlib's Agg canvas, no pyplot state).

Non-finite floats are written as ``null`` so the files are strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "metrics.png"


def to_jsonable(value: Any) -> Any:
    """Plain JSON value of ``value``: numpy / torch scalars to numbers, NaN and inf to ``None``.

    Containers are converted recursively; tuples become lists; other objects
    their ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return to_jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_jsonable(value.tolist())
    return str(value)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file is fsynced before the rename, so ``path`` holds either the old or
    the new content, never a mixture.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


class MetricsWriter:
    """Append-only ``metrics.jsonl`` of a run.

    Parameters
    ----------
    run_dir : path-like
        Folder of the run (created if needed).
    forward_passes : int
        Forward passes already spent (a resumed run continues its count).

    Examples
    --------
    >>> writer = MetricsWriter(run_dir)                       # doctest: +SKIP
    >>> writer.log(step=1, forward_passes=32, loss=2.31)      # doctest: +SKIP
    """

    def __init__(self, run_dir: str | os.PathLike, *, forward_passes: int = 0) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.forward_passes = int(forward_passes)
        self._start = time.perf_counter()

    @property
    def wall_seconds(self) -> float:
        """Seconds since the writer was created."""
        return time.perf_counter() - self._start

    def log(self, step: int, *, forward_passes: int | None = None, **fields: Any) -> dict[str, Any]:
        """Append one line ``{"step", "forward_passes", "wall_seconds", **fields}``.

        Parameters
        ----------
        step : int
            Steps done so far (0 = before training).
        forward_passes : int, optional
            Total forward passes so far; defaults to the last value logged.
        **fields
            Any JSON-able values (``loss``, ``accuracy``, ``eval_loss``...).

        Returns
        -------
        dict
            The record written.
        """
        if forward_passes is not None:
            self.forward_passes = int(forward_passes)
        record = {"step": int(step), "forward_passes": self.forward_passes,
                  "wall_seconds": round(self.wall_seconds, 3), **fields}
        record = to_jsonable(record)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        return record


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (an empty list when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` atomically (sorted keys, strict JSON)."""
    text = json.dumps(to_jsonable(dict(summary)), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(Path(run_dir) / SUMMARY_FILE, text)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Content of ``run_dir/summary.json``."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(forward_passes, value)`` of the records that have a numeric ``key``."""
    points = [(r["forward_passes"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(run_dir: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw ``metrics.png``: held-out accuracy (left) and losses (right) against forward passes.

    Reads ``accuracy``, ``eval_loss`` and the training probe ``loss`` from
    ``metrics.jsonl``; missing series are left out.

    Returns
    -------
    Path
        The image written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    x, y = _series(records, "accuracy")
    ax_acc.plot(x, [100 * v for v in y], marker="o", color="tab:green")
    ax_acc.set(xlabel="forward passes", ylabel="held-out exact match (%)", title="accuracy")
    for key, label, style in (("loss", "train probe loss", "-"), ("eval_loss", "held-out loss", "o-")):
        x, y = _series(records, key)
        if x:
            ax_loss.plot(x, y, style, label=label, alpha=0.8 if key == "loss" else 1.0)
    ax_loss.set(xlabel="forward passes", ylabel="token cross-entropy", title="loss")
    if ax_loss.lines:
        ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    target = Path(run_dir) / PLOT_FILE
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, target)
    return target


__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "MetricsWriter",
    "atomic_write_text",
    "plot_metrics",
    "read_metrics",
    "read_summary",
    "to_jsonable",
    "write_summary",
]
