"""Command line: ``fed-essam [mode=central|federated] [group=option] [key=value ...]``.

Hydra composes ``conf/config.yaml`` with its groups (model, task, method,
federation, privacy) and the overrides; the configuration is validated before
any work (:func:`fed_essam.config.validate_config`), then

* ``mode=central`` runs :func:`fed_essam.training.train_central`,
* ``mode=federated`` (the default) runs :func:`fed_essam.app.run_federated`
  (Flower simulation),

with Hydra's run folder (``hydra.run.dir``) as the run folder. Mistakes a user
can fix (an invalid value, a missing file, a model that cannot be loaded, bad
task data) end the program with one line on stderr and exit status 2; add
``debug=true`` for the full traceback.

Examples
--------
::

    fed-essam mode=central                          # ESSAM on the embedded tiny model
    fed-essam mode=central method=es seed=1 num_rounds=30
    fed-essam federation.num_clients=8 privacy=dp   # federated, with differential privacy
    python -m fed_essam mode=central hydra.run.dir=/tmp/run
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fed_essam.config import ConfigError, validate_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra configuration folder (``conf/`` at the repository root)."""

EXIT_USER_ERROR = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions reported as one line without a traceback (the user can fix them).

    ``ModelLoadError`` is included once :mod:`fed_essam.models` has been imported
    (before that it cannot have been raised; importing it costs transformers).
    """
    from fed_essam.tasks import TaskDataError

    models = sys.modules.get("fed_essam.models")
    loading = (models.ModelLoadError,) if models is not None else ()
    return (ConfigError, TaskDataError, FileNotFoundError, *loading)


def one_line(error: BaseException) -> str:
    """The error's message on one line (continuation lines joined with spaces)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def run(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate ``cfg`` and run it in ``run_dir``; returns the run's summary.

    Raises
    ------
    ConfigError
        For invalid settings, or ``mode=federated`` without the Flower side installed.
    """
    cfg = validate_config(cfg)
    if cfg.mode == "central":
        from fed_essam.training import train_central

        return train_central(cfg, run_dir)
    try:
        from fed_essam.app import run_federated
    except ModuleNotFoundError as err:
        if err.name not in ("fed_essam.app", "flwr"):
            raise
        raise ConfigError(f"mode=federated needs {err.name}, which cannot be imported ({err}); "
                          "use mode=central") from err
    return run_federated(cfg, run_dir)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the configuration as the command line would, without running anything.

    Parameters
    ----------
    overrides : sequence of str
        Hydra overrides, e.g. ``["mode=central", "method=es", "num_rounds=3"]``.
    config_name : str
        Primary config in :data:`CONFIG_DIR`.

    Returns
    -------
    DictConfig
        The composed (not yet validated) configuration, without the ``hydra`` node.
        Inside a running Hydra app the app's search path is used.
    """
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=config_name, overrides=list(overrides))
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra.compose(config_name=config_name, overrides=list(overrides))


def run_reporting_errors(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    """:func:`run`, with user errors printed as one line on stderr; returns the exit status.

    With ``debug=true`` user errors propagate (full traceback).
    """
    try:
        run(cfg, run_dir)
    except user_error_types() as err:
        if cfg.get("debug", False):
            os.environ["HYDRA_FULL_ERROR"] = "1"
            raise
        print(f"fed-essam: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra task function: run in Hydra's output folder; exit 2 on a user error."""
    status = run_reporting_errors(cfg, HydraConfig.get().runtime.output_dir)
    if status:
        sys.exit(status)


def check_overrides(argv: Sequence[str]) -> str | None:
    """Compose the configuration of a command line first: Hydra's own error (an unknown
    option such as ``method=nope``, a malformed override) as one line, else ``None``.

    Hydra's flags (``--help``, ``--cfg``, ...) and ``hydra.*`` overrides are left to Hydra.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in argv):
        return None  # a Hydra flag: Hydra handles the whole command line
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra.")]
    try:
        GlobalHydra.instance().clear()
        compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return one_line(err).split(" Config search path:")[0]
    finally:
        GlobalHydra.instance().clear()
    return None


def main() -> None:
    """Console script ``fed-essam`` (and ``python -m fed_essam``)."""
    argv = sys.argv[1:]
    if not any(a.lstrip("+").startswith("debug=true") for a in argv):
        problem = check_overrides(argv)
        if problem is not None:
            print(f"fed-essam: error: {problem}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    _hydra_main()


__all__ = ["CONFIG_DIR", "check_overrides", "compose_config", "main", "one_line", "run", "run_reporting_errors", "user_error_types"]
