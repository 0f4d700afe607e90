"""Centralized training: one process, one model, the same step as a federated round.

:func:`train_central` runs ``num_rounds`` steps of the configured method on
batches from :func:`fed_essam.data.step_batch` and writes the run folder::

    config.yaml      resolved configuration
    metrics.jsonl    one line per step (probe loss, forward passes, held-out accuracy/loss when evaluated)
    checkpoints/     every ``checkpoint_every`` steps and at the end (see :mod:`fed_essam.checkpoint`)
    summary.json     accuracy/loss before and after, forward passes, peak memory, wall time...
    metrics.png      held-out accuracy and loss against forward passes

A step is done by a *stepper* (:class:`ForwardOnlyStepper` for ``essam``,
``essam_f``, ``es``, ``mezo``; :class:`BackpropStepper` for the AdamW reference).
Forward-only steppers probe the fitness

.. math:: F(\\theta) = \\frac{\\sum_b \\sum_{t \\in S_b} -\\log p_\\theta(y_{b,t} \\mid y_{b,<t})}{\\sum_b |S_b|}

(``method.fitness=loss``) or :math:`F = -\\frac{1}{B}\\sum_b r_b` (``reward``)
on the step's batch; the backprop stepper descends the same loss with gradients.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fed_essam.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fed_essam.config import validate_config
from fed_essam.data import build_problem_sets, step_batch
from fed_essam.evaluation import EvalResult, evaluate, sharpness
from fed_essam.fitness import IGNORE_INDEX, Batch, LossFitness, RewardFitness, encode_batch, model_device
from fed_essam.metrics import MetricsWriter, atomic_write_text, plot_metrics, write_summary
from fed_essam.optim import ES, ESSAM, ESSAMF, MeZO
from fed_essam.perturb import SeedUpdate, trainable_parameters
from fed_essam.tasks import Problem

log = logging.getLogger(__name__)

SUMMARY_KEYS: tuple[str, ...] = (
    "accuracy_before", "accuracy_after", "loss_before", "loss_after", "num_rounds", "forward_passes",
    "peak_memory_bytes", "wall_seconds", "method", "seed",
)
"""Keys every ``summary.json`` of a central run holds (more may follow)."""


# --------------------------------------------------------------------------- #
# Steppers
# --------------------------------------------------------------------------- #
@dataclass
class StepOutcome:
    """What one training step reports.

    Attributes
    ----------
    loss : float
        Training loss at ``theta`` on the step's batch (forward-only: mean of the
        probe losses, an ``O(sigma^2)`` estimate; backprop: the batch loss).
    forward_passes, backward_passes : int
        Passes spent by this step.
    update : SeedUpdate or None
        The seed-defined update (forward-only methods), else ``None``.
    info : dict
        Extra per-step values for ``metrics.jsonl``.
    """

    loss: float
    forward_passes: int
    backward_passes: int = 0
    update: SeedUpdate | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Stepper(Protocol):
    """One optimizer step on a batch of problems."""

    optimizer: torch.optim.Optimizer
    forward_passes: int
    backward_passes: int
    update_log: list[SeedUpdate]

    def step(self, problems: Sequence[Problem]) -> StepOutcome:
        """Do one step on ``problems``."""

    def restore(self, step: int, update_log: Sequence[SeedUpdate], extra: dict[str, Any]) -> None:
        """Continue from a checkpoint written after ``step`` steps."""


def build_optimizer(params: Sequence[torch.Tensor], method: DictConfig, seed: int) -> torch.optim.Optimizer:
    """The forward-only optimizer named by ``method.name`` with the method's settings.

    Parameters
    ----------
    params : sequence of Tensor
        Trainable parameters (noise ``tensor_index`` order).
    method : DictConfig
        A validated ``method`` section.
    seed : int
        Run seed (probe seeds are ``draw_seeds(seed, step, phase, N)``).
    """
    common = dict(
        lr=method.lr, sigma=method.sigma, population=method.population, shaping=method.shaping,
        antithetic=method.antithetic, seed=seed, seed_pool=method.seed_pool, noise=method.noise,
        noise_backend=method.noise_backend,
    )
    name = method.name
    if name == "essam":
        return ESSAM(params, rho=method.rho, ascent_population=method.ascent_population,
                     normalize_ascent=method.normalize_ascent, **common)
    if name == "essam_f":
        return ESSAMF(params, rho=method.rho, ascent_population=method.ascent_population, **common)
    if name == "es":
        return ES(params, **common)
    if name == "mezo":
        return MeZO(params, **common)
    raise ValueError(f"method.name={name!r} has no forward-only optimizer")


class ForwardOnlyStepper:
    """ESSAM / ESSAM-F / ES / MeZO: ``optimizer.step(fitness)`` on each batch.

    Parameters
    ----------
    model, tokenizer :
        The model being trained (in eval mode) and its tokenizer.
    optimizer : ESSAM
        A forward-only optimizer over the model's trainable parameters.
    fitness : {"loss", "reward"}
    template : str
        Prompt template.
    max_new_tokens : int
        Generation length of the reward fitness.
    format_bonus : float
        Reward for the ``#### <answer>`` format (reward fitness).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, optimizer: ESSAM, *, fitness: str = "loss",
                 template: str = "plain", max_new_tokens: int = 40, format_bonus: float = 0.0) -> None:
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        self.fitness, self.template = fitness, template
        self.max_new_tokens, self.format_bonus = max_new_tokens, format_bonus
        self.forward_passes = 0
        self.backward_passes = 0
        self.update_log: list[SeedUpdate] = []

    def objective(self, problems: Sequence[Problem]) -> Callable[[], float | torch.Tensor]:
        """The fitness of ``problems`` at the model's current parameters (a callable object)."""
        if self.fitness == "reward":
            return RewardFitness(self.model, self.tokenizer, problems, max_new_tokens=self.max_new_tokens,
                                 format_bonus=self.format_bonus, template=self.template)
        batch = encode_batch(self.tokenizer, problems, template=self.template, device=model_device(self.model))
        return LossFitness(self.model, batch)

    def step(self, problems: Sequence[Problem]) -> StepOutcome:
        """One optimizer step; the update is appended to :attr:`update_log`."""
        loss = self.optimizer.step(self.objective(problems))
        record = self.optimizer.last_record
        self.forward_passes += record.forward_passes
        if record.update is not None:
            self.update_log.append(record.update)
        descent = [v for pair in record.descent_losses for v in pair]
        info: dict[str, Any] = {"probe_loss_std": float(np.std(descent)) if descent else None}
        if record.ascent is not None:
            info["adversarial_loss"] = float(np.mean(descent))
        if record.skipped:
            info["skipped"] = record.skipped
        return StepOutcome(loss=loss, forward_passes=record.forward_passes, update=record.update, info=info)

    def restore(self, step: int, update_log: Sequence[SeedUpdate], extra: dict[str, Any]) -> None:
        """Continue the probe-seed sequence and the update log of a checkpoint."""
        self.optimizer.state["step"] = step
        self.update_log = list(update_log)
        self.forward_passes = int(extra.get("forward_passes", 0))


def differentiable_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Token-mean solution cross-entropy with autograd (the loss fitness, differentiable).

    .. math:: L = \\frac{\\sum_b \\sum_{t \\in S_b} \\ell_{b,t}}{\\sum_b |S_b|}
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),  # (B*(T-1), V)
        batch.labels[:, 1:].flatten(),  # (B*(T-1),)
        ignore_index=IGNORE_INDEX,
    )


class BackpropStepper:
    """First-order reference: AdamW on :func:`differentiable_loss` (one forward + one backward)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, lr: float, weight_decay: float = 0.0,
                 template: str = "plain") -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.params = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.forward_passes = 0
        self.backward_passes = 0
        self.update_log: list[SeedUpdate] = []

    def step(self, problems: Sequence[Problem]) -> StepOutcome:
        """One AdamW step on the batch loss."""
        batch = encode_batch(self.tokenizer, problems, template=self.template, device=model_device(self.model))
        with torch.enable_grad():
            loss = differentiable_loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_passes += 1
        self.backward_passes += 1
        return StepOutcome(loss=float(loss.detach()), forward_passes=1, backward_passes=1)

    def restore(self, step: int, update_log: Sequence[SeedUpdate], extra: dict[str, Any]) -> None:
        """Continue the pass counters (AdamW moments are not checkpointed: they restart at zero)."""
        self.forward_passes = int(extra.get("forward_passes", 0))
        self.backward_passes = int(extra.get("backward_passes", 0))


def make_stepper(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> ForwardOnlyStepper | BackpropStepper:
    """The stepper of ``cfg.method`` for ``model``."""
    method, template = cfg.method, cfg.model.template
    if method.name == "backprop":
        return BackpropStepper(model, tokenizer, lr=method.lr, weight_decay=method.weight_decay, template=template)
    optimizer = build_optimizer(trainable_parameters(model), method, cfg.seed)
    return ForwardOnlyStepper(model, tokenizer, optimizer, fitness=method.fitness, template=template,
                              max_new_tokens=cfg.eval.max_new_tokens, format_bonus=method.format_bonus)


# --------------------------------------------------------------------------- #
# Pieces of the run
# --------------------------------------------------------------------------- #
def load_run_model(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """Load ``cfg.model`` on ``cfg.device`` (LoRA adapters when ``model.lora`` is set)."""
    from fed_essam.models import load_model, resolve_device

    lora = OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.lora is not None else None
    return load_model(cfg.model.name, dtype=cfg.model.dtype, device=resolve_device(cfg.device),
                      gguf_file=cfg.model.gguf_file, lora=lora)


def evaluate_held_out(model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem], cfg: DictConfig) -> EvalResult:
    """Greedy exact-match accuracy and solution loss on the held-out set."""
    return evaluate(model, tokenizer, problems, batch_size=cfg.eval.batch_size,
                    max_new_tokens=cfg.eval.max_new_tokens, template=cfg.model.template, progress=False)


def held_out_sharpness(model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem],
                       cfg: DictConfig) -> float | None:
    """Mean loss increase under ``eval.sharpness_directions`` filter-normalized perturbations.

    ``None`` when ``eval.sharpness_directions`` is 0 (the default). See
    :func:`fed_essam.evaluation.sharpness`.
    """
    directions = int(cfg.eval.get("sharpness_directions", 0) or 0)
    if directions < 1:
        return None
    batch = encode_batch(tokenizer, problems, template=cfg.model.template, device=model_device(model))
    result = sharpness(model, LossFitness(model, batch), radius=float(cfg.eval.sharpness_radius),
                       num_directions=directions, seed=cfg.seed)
    return result.mean_increase


def measure_step_memory(step: Callable[[], StepOutcome], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[StepOutcome, dict[str, Any]]:
    """Run one step and measure its peak memory.

    Uses :func:`fed_essam.memory.measure_peak_memory` (model and optimizer state
    as the resident baseline). Without that module: CUDA ``max_memory_allocated``,
    or on CPU the process's resident set size after the step (psutil), which
    includes the interpreter and libraries.
    """
    try:
        from fed_essam.memory import measure_peak_memory
    except ImportError:
        return _fallback_step_memory(step, model)
    measured = measure_peak_memory(step, resident=[model, optimizer], device=model_device(model))
    return measured.result, {"peak_memory_bytes": measured.peak_bytes, "peak_memory_method": measured.method,
                             "peak_memory_increment_bytes": measured.increment_bytes}


def _fallback_step_memory(step: Callable[[], StepOutcome], model: torch.nn.Module) -> tuple[StepOutcome, dict[str, Any]]:
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        outcome = step()
        return outcome, {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                         "peak_memory_method": "cuda-max-allocated"}
    import psutil

    outcome = step()
    return outcome, {"peak_memory_bytes": psutil.Process().memory_info().rss, "peak_memory_method": "process-rss"}


def eval_due(step: int, every: int, last: int) -> bool:
    """Whether held-out evaluation runs after ``step`` steps (``every`` 0: only at the end)."""
    return step == last or (every > 0 and step % every == 0)


def checkpoint_due(step: int, every: int, last: int) -> bool:
    """Whether a checkpoint is written after ``step`` steps (``every`` 0: only at the end)."""
    return step == last or (every > 0 and step % every == 0)


def resume(cfg: DictConfig, model: torch.nn.Module, stepper: ForwardOnlyStepper | BackpropStepper) -> int:
    """Load the latest checkpoint of ``cfg.resume`` into the model; return its step (0 without one)."""
    if cfg.resume is None:
        return 0
    path = latest_checkpoint(cfg.resume)
    if path is None:
        raise FileNotFoundError(f"resume={cfg.resume}: the folder holds no checkpoint")
    checkpoint = load_checkpoint(path, into=model)
    stepper.restore(checkpoint.step, checkpoint.update_log, checkpoint.extra)
    log.info("resumed from %s at step %d", path, checkpoint.step)
    return checkpoint.step


def _pass_counts(stepper: ForwardOnlyStepper | BackpropStepper) -> dict[str, int]:
    return {"forward_passes": stepper.forward_passes, "backward_passes": stepper.backward_passes}


def _eval_fields(result: EvalResult) -> dict[str, float]:
    return {"accuracy": result.accuracy, "eval_loss": result.loss}


def _finite(value: float) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #
def train_central(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Centralized training run; writes the run folder and returns the summary.

    Parameters
    ----------
    cfg : DictConfig
        Composed configuration (validated here; see :func:`fed_essam.config.validate_config`).
    run_dir : path-like
        Output folder (created).

    Returns
    -------
    dict
        The content of ``summary.json``: at least :data:`SUMMARY_KEYS`.
    """
    start = time.perf_counter()
    cfg = validate_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_run_model(cfg)
    train, held_out = build_problem_sets(cfg)
    stepper = make_stepper(cfg, model, tokenizer)
    first = resume(cfg, model, stepper)
    last = cfg.num_rounds
    log.info("%s on %s: %d training / %d held-out problems, %d trainable parameters, steps %d..%d",
             cfg.method.name, cfg.task.source, len(train), len(held_out),
             sum(p.numel() for p in trainable_parameters(model)), first, last)

    writer = MetricsWriter(run_dir, forward_passes=stepper.forward_passes)
    before = evaluate_held_out(model, tokenizer, held_out, cfg)
    sharp_before = held_out_sharpness(model, tokenizer, held_out, cfg)
    writer.log(first, **_pass_counts(stepper), **_eval_fields(before), sharpness=sharp_before)
    log.info("before: held-out accuracy %.3f, loss %.4f", before.accuracy, before.loss)

    after, memory = before, {}
    train_start = time.perf_counter()
    bar = tqdm(range(first, last), desc=cfg.method.name, disable=not cfg.progress, dynamic_ncols=True)
    for t in bar:
        batch = step_batch(train, t, cfg.batch_size, cfg.seed, cfg.fixed_batch)
        step = functools.partial(stepper.step, batch)
        if not memory:
            outcome, memory = measure_step_memory(step, model, stepper.optimizer)
        else:
            outcome = step()
        fields: dict[str, Any] = {"loss": outcome.loss, **outcome.info}
        if eval_due(t + 1, cfg.eval.every, last):
            after = evaluate_held_out(model, tokenizer, held_out, cfg)
            fields.update(_eval_fields(after))
        writer.log(t + 1, **_pass_counts(stepper), **fields)
        if checkpoint_due(t + 1, cfg.checkpoint_every, last):
            save_checkpoint(run_dir, model, t + 1, stepper.update_log,
                            extra={**_pass_counts(stepper), "method": cfg.method.name, "seed": cfg.seed})
        bar.set_postfix(loss=_finite(outcome.loss), acc=_finite(after.accuracy), refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - train_start
    sharp_after = held_out_sharpness(model, tokenizer, held_out, cfg)

    summary = {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "lora": cfg.model.lora is not None,
        "task": cfg.task.source,
        "num_rounds": last,
        "steps_run": last - first,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "loss_before": before.loss,
        "loss_after": after.loss,
        "sharpness_before": sharp_before,
        "sharpness_after": sharp_after,
        **_pass_counts(stepper),
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "train_problems": len(train),
        "held_out_problems": len(held_out),
        "batch_size": cfg.batch_size,
        **memory,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "samples_after": after.samples,
        "method_config": OmegaConf.to_container(cfg.method),
    }
    write_summary(run_dir, summary)
    plot_metrics(run_dir, title=f"{cfg.method.name} on {cfg.task.source} (seed {cfg.seed})")
    log.info("after: held-out accuracy %.3f (%+.3f), loss %.4f; %d forward passes, %.0f s",
             after.accuracy, after.accuracy - before.accuracy, after.loss, stepper.forward_passes,
             summary["wall_seconds"])
    return summary


__all__ = [
    "SUMMARY_KEYS",
    "BackpropStepper",
    "ForwardOnlyStepper",
    "StepOutcome",
    "build_optimizer",
    "differentiable_loss",
    "make_stepper",
    "train_central",
]
