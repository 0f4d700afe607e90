"""Structured run configuration: typed schema plus value checks, before any work.

The Hydra groups in ``conf/`` compose a plain ``DictConfig``; :func:`validate_config`
merges it into the dataclass schema :class:`RunConfig` (types are converted or
rejected by OmegaConf, missing optional keys get their defaults) and then checks
every value that a run would otherwise trip over minutes later. Each failure is
a :class:`ConfigError` with a one-line message that starts with the key::

    method.sigma must be > 0 (probe radius), got -0.1

The federation and privacy sections are open (extra keys allowed), so the
federated side can add settings without touching this schema.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

METHODS: tuple[str, ...] = ("essam", "essam_f", "es", "mezo", "backprop")
"""Training methods; ``backprop`` (AdamW) is a central-mode reference only."""

MODES: tuple[str, ...] = ("federated", "central")
SHAPINGS: tuple[str, ...] = ("zscore", "raw")
NOISE_KINDS: tuple[str, ...] = ("gaussian", "rademacher")
NOISE_BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch", "compiled")
FITNESSES: tuple[str, ...] = ("loss", "reward")
DTYPES: tuple[str, ...] = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")
TEMPLATES: tuple[str, ...] = ("plain", "chat", "auto")
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed_mean")
DP_MODES: tuple[str, ...] = ("local", "central")
ON_ERROR: tuple[str, ...] = ("raise", "skip")
LORA_KEYS: frozenset[str] = frozenset({"r", "alpha", "target_modules", "dropout"})
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the key."""


# --------------------------------------------------------------------------- #
# Schema
# --------------------------------------------------------------------------- #
@dataclass
class ModelConfig:
    """``conf/model/*.yaml``: what :func:`fed_essam.models.load_model` receives."""

    name: str = "tiny"
    dtype: str = "float32"
    gguf_file: Optional[str] = None
    template: str = "plain"
    lora: Optional[dict[str, Any]] = None


@dataclass
class TaskConfig:
    """``conf/task/*.yaml``: the training pool and the held-out set (see :mod:`fed_essam.data`)."""

    source: str = "chain_sum"
    train_size: Optional[int] = 1000
    eval_size: int = 100
    path: Optional[str] = None
    on_error: str = "raise"
    kwargs: dict[str, Any] = field(default_factory=dict)
    eval_source: Optional[str] = None
    eval_path: Optional[str] = None
    eval_kwargs: Optional[dict[str, Any]] = None
    data_seed: int = 0


@dataclass
class MethodConfig:
    """``conf/method/*.yaml``: optimizer hyperparameters (see :mod:`fed_essam.optim`)."""

    name: str = "essam"
    lr: float = 0.03
    sigma: float = 0.01
    rho: float = 0.0
    population: int = 16
    ascent_population: int = 0
    normalize_ascent: bool = False
    shaping: str = "zscore"
    antithetic: bool = True
    noise: str = "gaussian"
    noise_backend: str = "auto"
    seed_pool: Optional[int] = None
    fitness: str = "loss"
    format_bonus: float = 0.0
    weight_decay: float = 0.0


@dataclass
class FederationConfig:
    """``conf/federation/*.yaml`` (open: the federated side may add keys)."""

    num_clients: int = 4
    fraction: float = 1.0
    min_clients: int = 1
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    reply_timeout: float = 600.0
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    fault_rate: float = 0.0
    client_resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrivacyConfig:
    """``conf/privacy/*.yaml`` (open: the federated side may add keys)."""

    enabled: bool = False
    mode: str = "local"
    clip: float = 0.25
    noise_multiplier: float = 1.0
    delta: float = 1e-5


@dataclass
class EvalConfig:
    """Held-out evaluation: every ``every`` steps (0: before and after only)."""

    every: int = 4
    size: int = 100
    batch_size: int = 100
    max_new_tokens: int = 24
    sharpness_directions: int = 0
    sharpness_radius: float = 0.01


@dataclass
class RunConfig:
    """The whole run (``conf/config.yaml`` plus its groups)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mode: str = "federated"
    seed: int = 0
    num_rounds: int = 12
    device: str = "auto"
    threads: Optional[int] = None
    batch_size: int = 8
    fixed_batch: bool = False
    checkpoint_every: int = 4
    resume: Optional[str] = None
    progress: bool = True
    debug: bool = False


OPEN_SECTIONS: tuple[str, ...] = ("federation", "privacy")
"""Sections where keys unknown to the schema are kept rather than rejected."""


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _typed(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` into the :class:`RunConfig` schema and resolve interpolations.

    Raises
    ------
    ConfigError
        On a value of the wrong type, an unknown key or a missing mandatory value.
    """
    schema = OmegaConf.structured(RunConfig)
    for section in OPEN_SECTIONS:
        OmegaConf.set_struct(schema[section], False)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(schema, plain)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(err).splitlines()[0].strip()
        raise ConfigError(f"{key}: {reason}") from None
    if missing:
        raise ConfigError(f"{missing[0]} is required (set it on the command line, e.g. {missing[0]}=VALUE)")
    return merged


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ``ConfigError("<key> <rule>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in choices, key, f"must be one of {', '.join(choices)}", value)


def _positive(cfg: DictConfig, key: str, what: str = "") -> None:
    value = OmegaConf.select(cfg, key)
    note = f" ({what})" if what else ""
    _require(value is not None and math.isfinite(value) and value > 0, key, f"must be > 0{note}", value)


def _at_least(cfg: DictConfig, key: str, low: float) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value is not None and value >= low, key, f"must be >= {low}", value)


def _check_run(cfg: DictConfig) -> None:
    _choice(cfg, "mode", MODES)
    _positive(cfg, "num_rounds", "optimizer steps")
    _positive(cfg, "batch_size", "problems per probe batch")
    _at_least(cfg, "checkpoint_every", 0)
    if cfg.threads is not None:
        _positive(cfg, "threads", "torch CPU threads")
    _require(bool(_DEVICE_RE.match(str(cfg.device))), "device", "must be auto, cpu, cuda or cuda:N", cfg.device)
    if str(cfg.device).startswith("cuda"):
        import torch

        _require(torch.cuda.is_available(), "device", "asks for CUDA, which is not available here", cfg.device)
    if cfg.resume is not None:
        _require(os.path.isdir(cfg.resume), "resume", "must be an existing run folder", cfg.resume)


def _looks_like_path(name: str) -> bool:
    """As :func:`fed_essam.models.looks_like_path` (kept here: importing models costs transformers)."""
    return (name.startswith((".", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name
            or name.endswith(".gguf"))


def _check_model(cfg: DictConfig) -> None:
    _require(bool(str(cfg.model.name).strip()), "model.name", "must name a model", cfg.model.name)
    name = str(cfg.model.name)
    if _looks_like_path(name):
        _require(os.path.exists(os.path.expanduser(name)), "model.name",
                 "is a model path that does not exist (model=tiny is the embedded default)", name)
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.template", TEMPLATES)
    if cfg.model.lora is not None:
        unknown = sorted(set(cfg.model.lora) - LORA_KEYS)
        _require(not unknown, "model.lora", f"takes only {', '.join(sorted(LORA_KEYS))}", unknown)
        rank = cfg.model.lora.get("r", 8)
        _require(isinstance(rank, int) and rank > 0, "model.lora.r", "must be a positive integer", rank)


def _check_task(cfg: DictConfig) -> None:
    from fed_essam.tasks import SOURCE_NAMES

    _choice(cfg, "task.source", SOURCE_NAMES)
    if cfg.task.eval_source is not None:
        _choice(cfg, "task.eval_source", SOURCE_NAMES)
    _choice(cfg, "task.on_error", ON_ERROR)
    if cfg.task.train_size is not None:
        _positive(cfg, "task.train_size", "training problems")
    _positive(cfg, "task.eval_size", "held-out problems")
    if cfg.task.source == "jsonl":
        _require(bool(cfg.task.path), "task.path", "is required for task=jsonl", cfg.task.path)
    for key in ("task.path", "task.eval_path"):
        path = OmegaConf.select(cfg, key)
        if path:
            _require(os.path.isfile(path), key, "must be an existing file", path)
    if cfg.task.eval_path and cfg.task.eval_source not in (None, "jsonl"):
        raise ConfigError(f"task.eval_path is only read by a jsonl source, got task.eval_source={cfg.task.eval_source!r}")


def _check_method(cfg: DictConfig) -> None:
    m = cfg.method
    _choice(cfg, "method.name", METHODS)
    _positive(cfg, "method.lr", "learning rate")
    _choice(cfg, "method.fitness", FITNESSES)
    if m.name == "backprop":
        _require(cfg.mode == "central", "mode", "must be central for method=backprop (a first-order reference)", cfg.mode)
        _require(m.fitness == "loss", "method.fitness", "must be loss for backprop (rewards are not differentiable)", m.fitness)
        _at_least(cfg, "method.weight_decay", 0)
        return
    _positive(cfg, "method.sigma", "probe radius")
    _at_least(cfg, "method.rho", 0)
    _positive(cfg, "method.population", "descent probes")
    _at_least(cfg, "method.ascent_population", 0)
    _choice(cfg, "method.shaping", SHAPINGS)
    _choice(cfg, "method.noise", NOISE_KINDS)
    _choice(cfg, "method.noise_backend", NOISE_BACKENDS)
    _at_least(cfg, "method.format_bonus", 0)
    if m.seed_pool is not None:
        _positive(cfg, "method.seed_pool", "seed pool size")
    if m.shaping == "zscore":
        _require(m.population >= 2, "method.population", "must be >= 2 with shaping=zscore (use shaping=raw)", m.population)
    if m.name in ("es", "mezo"):
        _require(m.rho == 0, "method.rho", f"must be 0 for method={m.name} (use method=essam for a SAM radius)", m.rho)
    if m.name in ("essam", "essam_f"):
        _positive(cfg, "method.rho", f"SAM radius of {m.name}")
        _positive(cfg, "method.ascent_population", f"ascent probes of {m.name}")
        if m.shaping == "zscore":
            _require(m.ascent_population >= 2, "method.ascent_population", "must be >= 2 with shaping=zscore",
                     m.ascent_population)


def _check_eval(cfg: DictConfig) -> None:
    _at_least(cfg, "eval.every", 0)
    _positive(cfg, "eval.size", "held-out problems")
    _positive(cfg, "eval.batch_size", "evaluation batch size")
    _positive(cfg, "eval.max_new_tokens", "generated tokens")
    _at_least(cfg, "eval.sharpness_directions", 0)
    _positive(cfg, "eval.sharpness_radius", "relative perturbation radius")


def _check_federation(cfg: DictConfig) -> None:
    f = cfg.federation
    _positive(cfg, "federation.num_clients", "clients")
    value = f.fraction
    _require(0 < value <= 1, "federation.fraction", "must be in (0, 1]", value)
    _positive(cfg, "federation.min_clients", "clients")
    _require(f.min_clients <= f.num_clients, "federation.min_clients",
             f"must be <= federation.num_clients ({f.num_clients})", f.min_clients)
    from fed_essam.partition import SCHEMES

    _choice(cfg, "federation.partition", SCHEMES)
    _positive(cfg, "federation.dirichlet_alpha")
    _positive(cfg, "federation.reply_timeout", "seconds")
    _choice(cfg, "federation.aggregation", AGGREGATIONS)
    _require(0 <= f.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)", f.trim_fraction)
    _require(0 <= f.fault_rate < 1, "federation.fault_rate", "must be in [0, 1)", f.fault_rate)
    train = cfg.task.train_size
    if cfg.mode == "federated" and train is not None:
        _require(f.num_clients <= train, "federation.num_clients",
                 f"must be <= task.train_size ({train}): every client needs a problem", f.num_clients)


def _check_privacy(cfg: DictConfig) -> None:
    if not cfg.privacy.enabled:
        return
    _choice(cfg, "privacy.mode", DP_MODES)
    _positive(cfg, "privacy.clip", "clipping norm")
    _at_least(cfg, "privacy.noise_multiplier", 0)
    d = cfg.privacy.delta
    _require(0 < d < 1, "privacy.delta", "must be in (0, 1)", d)


CHECKS: tuple[Callable[[DictConfig], None], ...] = (
    _check_run, _check_eval, _check_model, _check_task, _check_method, _check_federation, _check_privacy,
)


def validate_config(cfg: DictConfig | dict) -> DictConfig:
    """Type-check and value-check a composed configuration.

    Parameters
    ----------
    cfg : DictConfig or dict
        The composed configuration (a ``hydra`` node, if any, is ignored).

    Returns
    -------
    DictConfig
        A resolved copy typed by :class:`RunConfig` (struct mode: unknown keys
        raise), with defaults filled in for keys the YAML files leave out.

    Raises
    ------
    ConfigError
        On the first invalid value; the message names its key.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    typed = _typed(cfg)
    for check in CHECKS:
        check(typed)
    return typed


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The validated configuration as a :class:`RunConfig` instance (open sections as dicts)."""
    return OmegaConf.to_object(validate_config(cfg))  # type: ignore[return-value]


__all__ = [
    "ConfigError",
    "EvalConfig",
    "FederationConfig",
    "METHODS",
    "MethodConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TaskConfig",
    "to_run_config",
    "validate_config",
]
