"""Evaluation: accuracy and loss on held-out problems, and a sharpness probe.

* :func:`generate_answers` / :func:`evaluate` -- batched greedy decoding, exact
  match via :func:`fed_essam.tasks.grade`, and the token-mean solution loss
  (the same quantity as :class:`fed_essam.fitness.LossFitness` on the whole set).
* :func:`sharpness` -- the mean and worst loss increase under random,
  filter-normalized perturbations of relative radius ``r``.

Everything runs without autograd and scores bf16 / fp16 models in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fed_essam.fitness import encode_batch, eval_mode, greedy_completions, model_device, token_loss_sums
from fed_essam.tasks import Problem, format_prompt, grade


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes
    ----------
    accuracy : float
        :math:`\\frac{1}{N}\\sum_i \\mathbb{1}[\\text{grade}(p_i, c_i)]`.
    loss : float
        Token-mean solution cross-entropy, :math:`\\sum_i s_i / \\sum_i n_i`.
    num_problems : int
        :math:`N`.
    samples : list of dict
        The first few problems: ``question``, ``completion``, ``gold`` (the
        reference answer) and ``correct``.
    correct : list of bool
        Per-problem grades, in input order.
    """

    accuracy: float
    loss: float
    num_problems: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class SharpnessResult:
    """Outcome of :func:`sharpness`.

    Attributes
    ----------
    mean_increase : float
        :math:`\\frac{1}{K}\\sum_k \\Delta_k`.
    max_increase : float
        :math:`\\max_k \\Delta_k`.
    base_loss : float
        :math:`L(\\theta)`.
    increases : tuple of float
        The :math:`\\Delta_k`, in draw order.
    """

    mean_increase: float
    max_increase: float
    base_loss: float
    increases: tuple[float, ...] = ()


def _chunks(items: Sequence[Problem], size: int) -> list[Sequence[Problem]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_answers(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    template: str = "plain",
    progress: bool = False,
) -> list[str]:
    """Greedy completions (prompt stripped) of ``problems``, in input order.

    Parameters
    ----------
    model : nn.Module
        Causal LM with ``generate``; put in eval mode for the call.
    tokenizer : PreTrainedTokenizerBase
    problems : sequence of Problem
    batch_size : int
    max_new_tokens : int
    template : str
        Prompt template (see :func:`fed_essam.tasks.format_prompt`).
    progress : bool
        Show a tqdm bar (only on a TTY).

    Returns
    -------
    list of str
    """
    out: list[str] = []
    for chunk in tqdm(_chunks(problems, batch_size), desc="generate", disable=None if progress else True):
        prompts = [format_prompt(p.question, tokenizer=tokenizer, template=template) for p in chunk]
        out += greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return out


def solution_loss(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    *,
    batch_size: int = 32,
    template: str = "plain",
    max_length: int | None = None,
    progress: bool = False,
) -> float:
    """Token-mean solution cross-entropy over all problems, batched.

    .. math:: L = \\frac{\\sum_i s_i}{\\sum_i n_i}

    with :math:`s_i, n_i` from :func:`fed_essam.fitness.token_loss_sums`; equal
    to :class:`~fed_essam.fitness.LossFitness` on one batch of all problems.

    Returns
    -------
    float
        NaN if no problem has a target token.
    """
    total, count = 0.0, 0
    device = model_device(model)
    with eval_mode(model):
        for chunk in tqdm(_chunks(problems, batch_size), desc="loss", disable=None if progress else True):
            batch = encode_batch(tokenizer, chunk, template=template, max_length=max_length, device=device)
            sums, counts = token_loss_sums(model, batch)  # (B,), (B,)
            total += float(sums.sum())
            count += int(counts.sum())
    return total / count if count else math.nan


def evaluate(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    num_samples: int = 3,
    progress: bool = True,
    template: str = "plain",
    max_length: int | None = None,
) -> EvalResult:
    """Accuracy (greedy decoding, exact match via ``grade``) and solution loss.

    .. math:: \\text{acc} = \\frac{1}{N}\\sum_i \\mathbb{1}[\\text{grade}(p_i, c_i)],
              \\qquad L = \\frac{\\sum_i s_i}{\\sum_i n_i}

    Parameters
    ----------
    model : nn.Module
        Put in eval mode for the call (its mode is restored afterwards).
    tokenizer : PreTrainedTokenizerBase
    problems : sequence of Problem
        At least one.
    batch_size : int
        For both generation and loss.
    max_new_tokens : int
    num_samples : int
        How many of the first problems to keep in ``samples``.
    progress : bool
        Show tqdm bars (only on a TTY).
    template : str
    max_length : int, optional
        Truncation of the teacher-forcing sequences (loss only).

    Returns
    -------
    EvalResult
    """
    if len(problems) == 0:
        raise ValueError("evaluate needs at least one problem")
    completions = generate_answers(
        model, tokenizer, problems, batch_size=batch_size, max_new_tokens=max_new_tokens,
        template=template, progress=progress,
    )
    correct = [bool(grade(p, c)) for p, c in zip(problems, completions, strict=True)]
    loss = solution_loss(
        model, tokenizer, problems, batch_size=batch_size, template=template,
        max_length=max_length, progress=progress,
    )
    samples = [
        {"question": p.question, "completion": c, "gold": p.answer, "correct": ok}
        for p, c, ok in list(zip(problems, completions, correct))[: max(num_samples, 0)]
    ]
    return EvalResult(sum(correct) / len(correct), loss, len(problems), samples, correct)


# ---------------------------------------------------------------------------
# Sharpness
# ---------------------------------------------------------------------------


def _select_params(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors to perturb: ``params`` if given, else trainable ones; de-duplicated."""
    chosen = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    unique = list({id(p): p for p in chosen}.values())
    if not unique:
        raise ValueError("sharpness: no parameters to perturb (none requires grad and params was not given)")
    return unique


def _perturb(
    params: list[torch.Tensor], saved: list[torch.Tensor], radius: float, gen: torch.Generator
) -> None:
    """Set every tensor to :math:`\\theta_t + r\\,\\|\\theta_t\\|\\,u_t/\\|u_t\\|`, ``u_t ~ N(0, I)``.

    Noise is drawn on the CPU from ``gen`` (device-independent) and the sum is
    formed in float32 before casting to the tensor's dtype.
    """
    for p, p0 in zip(params, saved, strict=True):
        base = p0.float()  # (*shape)
        u = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)  # (*shape)
        u_norm = torch.linalg.vector_norm(u)
        scale = radius * torch.linalg.vector_norm(base) / u_norm if u_norm > 0 else 0.0
        with torch.no_grad():
            p.copy_((base + scale * u).to(p.dtype))


def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Copy the saved values back, bit for bit."""
    with torch.no_grad():
        for p, p0 in zip(params, saved, strict=True):
            p.copy_(p0)


def _loss_value(loss_fn: Callable[[], float | torch.Tensor]) -> float:
    """``float(loss_fn())`` without building an autograd graph."""
    with torch.no_grad():
        return float(loss_fn())


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[], float | torch.Tensor],
    *,
    radius: float = 1e-3,
    num_directions: int = 8,
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> SharpnessResult:
    """Loss increase under random filter-normalized perturbations.

    For directions :math:`u^{(k)} \\sim N(0, I)`, :math:`k = 1..K`, each tensor
    :math:`t` is moved by a step of norm :math:`r\\,\\|\\theta_t\\|` (relative radius):

    .. math:: \\Delta_k = L\\Big(\\theta_t + r\\,\\|\\theta_t\\|\\,
              \\frac{u^{(k)}_t}{\\|u^{(k)}_t\\|}\\ \\forall t\\Big) - L(\\theta)

    and the result holds :math:`\\text{mean}_k \\Delta_k` and
    :math:`\\max_k \\Delta_k`. A tensor with zero norm is not moved. ``loss_fn``
    runs under ``torch.no_grad()``. The
    parameters are restored bit-exactly afterwards, even if ``loss_fn`` raises.

    Parameters
    ----------
    model : nn.Module
        Owner of the parameters (trainable ones are perturbed unless ``params``).
    loss_fn : callable
        ``loss_fn()`` evaluates the loss at the model's current parameters.
    radius : float
        Relative radius :math:`r`.
    num_directions : int
        :math:`K \\geq 1`.
    seed : int
        Seed of the CPU ``torch.Generator`` drawing :math:`u`.
    params : iterable of Tensor, optional
        The tensors to perturb instead of the trainable ones.

    Returns
    -------
    SharpnessResult
    """
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    targets = _select_params(model, params)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    saved = [p.detach().clone() for p in targets]
    try:
        base = _loss_value(loss_fn)
        increases = []
        for _ in range(num_directions):
            _perturb(targets, saved, radius, gen)
            increases.append(_loss_value(loss_fn) - base)
            _restore(targets, saved)
    finally:
        _restore(targets, saved)
    return SharpnessResult(sum(increases) / len(increases), max(increases), base, tuple(increases))
