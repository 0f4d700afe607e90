"""Checkpoints: trainable parameters (safetensors) plus the seed update log (JSON).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-000010/``:

* ``params.safetensors`` -- the trainable tensors, raw bytes (bit-exact),
* ``state.json`` -- ``step``, tensor ``names`` (noise ``tensor_index`` order),
  the parameters' ``fingerprint``, the ``update_log`` (every
  :class:`~fed_essam.perturb.SeedUpdate` applied since the base model, so a
  party holding the base model can replay instead of downloading weights) and
  the caller's ``extra``.

Writes are atomic: both files go to a temporary folder next to the final one,
are fsynced, and the folder is renamed into place with ``os.replace``. A crash
leaves either the previous checkpoints or the new one, never a partial one;
:func:`latest_checkpoint` ignores leftovers of an interrupted write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fed_essam.metrics import to_jsonable
from fed_essam.perturb import SeedUpdate, fingerprint

CHECKPOINT_DIR = "checkpoints"
PARAMS_FILE = "params.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

Params = torch.nn.Module | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    path : Path
        The checkpoint folder.
    step : int
        Steps done when it was written.
    tensors : dict of str to Tensor
        The saved parameters, in saved order (CPU unless ``map_location``).
    update_log : list of SeedUpdate
        Updates applied since the base model, in order.
    fingerprint : str
        :func:`fed_essam.perturb.fingerprint` of the saved tensors.
    extra : dict
        Whatever the writer added (optimizer settings, metrics, ...).
    """

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    update_log: list[SeedUpdate] = field(default_factory=list)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def named_trainable(params: Params) -> dict[str, torch.Tensor]:
    """Name -> tensor of what a checkpoint stores.

    A module gives its parameters with ``requires_grad`` (named, in
    ``parameters()`` order, which is the noise ``tensor_index`` order); a
    sequence gives ``"00000", "00001", ...``; a mapping is taken as is.
    """
    if isinstance(params, torch.nn.Module):
        return {name: p for name, p in params.named_parameters() if p.requires_grad}
    if isinstance(params, Mapping):
        return dict(params)
    return {f"{i:05d}": p for i, p in enumerate(params)}


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (best effort; not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_files(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the two files of a checkpoint into ``folder`` and fsync them."""
    save_file(tensors, str(folder / PARAMS_FILE))
    with (folder / STATE_FILE).open("w", encoding="utf-8") as handle:
        json.dump(to_jsonable(state), handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    with (folder / PARAMS_FILE).open("rb") as handle:
        os.fsync(handle.fileno())


def _move_into_place(tmp: Path, final: Path) -> None:
    """``os.replace`` a finished folder onto ``final`` (an older one there is removed)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    params: Params,
    step: int,
    update_log: Sequence[SeedUpdate] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>`` atomically.

    Parameters
    ----------
    run_dir : path-like
        Folder of the run.
    params : Module, sequence of Tensor or mapping of str to Tensor
        What to save (a module: its trainable parameters; see :func:`named_trainable`).
    step : int
        Steps done.
    update_log : sequence of SeedUpdate
        Every update applied since the base model.
    extra : mapping, optional
        JSON-able extras stored in ``state.json``.

    Returns
    -------
    Path
        The checkpoint folder.
    """
    named = named_trainable(params)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in named.items()}
    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "names": list(tensors),
        "fingerprint": fingerprint(list(tensors.values())),
        "update_log": [u.to_dict() for u in update_log],
        "extra": dict(extra or {}),
    }
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{int(step):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        _write_files(tmp, tensors, state)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first."""
    root = Path(run_dir)
    if root.name != CHECKPOINT_DIR:
        root = root / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file() and (entry / PARAMS_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found under {path}")
    return latest


@torch.no_grad()
def copy_into(params: Params, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's tensors into ``params`` in place, bit for bit.

    Raises
    ------
    ValueError
        If names, shapes or dtypes differ, or the fingerprint does not match after the copy.
    """
    named = named_trainable(params)
    if list(named) != list(checkpoint.tensors):
        missing = sorted(set(checkpoint.tensors) ^ set(named))[:3]
        raise ValueError(f"checkpoint {checkpoint.path} holds other tensors than the model (e.g. {missing})")
    for name, target in named.items():
        source = checkpoint.tensors[name]
        if source.shape != target.shape or source.dtype != target.dtype:
            raise ValueError(
                f"checkpoint tensor {name!r} is {tuple(source.shape)} {source.dtype}, "
                f"the model's is {tuple(target.shape)} {target.dtype}"
            )
        target.copy_(source.to(target.device))
    if checkpoint.fingerprint and fingerprint(list(named.values())) != checkpoint.fingerprint:
        raise ValueError(f"parameters loaded from {checkpoint.path} do not match its fingerprint")


def load_checkpoint(
    path: str | os.PathLike, into: Params | None = None, *, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint (and optionally copy it into parameters).

    Parameters
    ----------
    path : path-like
        A checkpoint folder, or a run folder (its latest checkpoint).
    into : Module, sequence or mapping, optional
        Parameters to overwrite in place (see :func:`copy_into`).
    map_location : str or torch.device
        Where the loaded tensors live.

    Returns
    -------
    Checkpoint
    """
    folder = _resolve(path)
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported checkpoint format {state.get('format')!r}")
    raw = load_file(str(folder / PARAMS_FILE), device=str(map_location))
    tensors = {name: raw[name] for name in state["names"]}
    checkpoint = Checkpoint(
        path=folder,
        step=int(state["step"]),
        tensors=tensors,
        update_log=[SeedUpdate.from_dict(u) for u in state.get("update_log", [])],
        fingerprint=state.get("fingerprint", ""),
        extra=state.get("extra", {}),
    )
    if into is not None:
        copy_into(into, checkpoint)
    return checkpoint


__all__ = [
    "Checkpoint",
    "copy_into",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "named_trainable",
    "save_checkpoint",
]
