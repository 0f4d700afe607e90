"""Fitness functions: what one ES / ESSAM probe evaluates (lower is better).

Two kinds (ESSAM.md, sections 2-3):

* :class:`LossFitness` -- mean token cross-entropy of the reference solution
  given the question (teacher forcing):

  .. math:: F(\\theta) = \\frac{1}{\\sum_b |S_b|} \\sum_b \\sum_{t \\in S_b}
            -\\log p_\\theta(y_{b,t} \\mid y_{b,<t})

  where :math:`S_b` is the set of solution (+ eos) positions of example ``b``.
* :class:`RewardFitness` -- the negated mean reward of greedy completions,
  :math:`F(\\theta) = -\\frac{1}{B} \\sum_b r_b` with
  :math:`r_b = \\mathbb{1}[\\text{grade}(p_b, c_b)]
  + \\beta\\,\\mathbb{1}[c_b \\text{ has ``#### <answer>``}]`.

Both evaluate the model at its *current* parameters, under
``torch.inference_mode()``, and never build autograd graphs. A non-finite loss
is returned as is: the optimizer decides what to do with it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fed_essam.tasks import Problem, format_prompt, format_target, grade

IGNORE_INDEX = -100
"""Label value of positions that are not scored (prompt and padding)."""

_FORMAT_RE = re.compile(r"####\s*\S")

Reduction = Literal["mean", "per_example"]


@dataclass(frozen=True)
class Batch:
    """A right-padded teacher-forcing batch.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``(B, T)`` int64 token ids: prompt, target, eos, then padding.
    attention_mask : torch.Tensor
        ``(B, T)`` int64, 1 on real tokens, 0 on padding.
    labels : torch.Tensor
        ``(B, T)`` int64, equal to ``input_ids`` on target and eos positions and
        ``-100`` on prompt and padding positions. Label ``t`` is predicted from
        the logits at position ``t - 1``.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)

    @property
    def num_target_tokens(self) -> int:
        """Number of scored positions, :math:`\\sum_b |S_b|`."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy of the batch on ``device``."""
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's BOS (and only BOS) prepended.

    Tokenizers differ in what ``add_special_tokens=True`` adds (BOS, EOS, both,
    nothing). The prompt gets a BOS iff the tokenizer would add one and the text
    does not already start with it (chat templates write it themselves); an EOS
    is never added here.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    prompt : str
        The formatted prompt text.

    Returns
    -------
    list of int
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    with_special = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if with_special and with_special[0] == bos:
        return [bos, *ids]
    return list(ids)


def _fit_to_length(
    prompt: list[int], target: list[int], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Cut ``prompt + target`` to at most ``max_length`` tokens.

    The end of the target is dropped first; if the prompt alone fills
    ``max_length``, its beginning is dropped so that one target token remains.
    """
    if max_length is None or len(prompt) + len(target) <= max_length:
        return prompt, target
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 to hold a prompt and a target token, got {max_length}"
        )
    if len(prompt) >= max_length:
        prompt = prompt[len(prompt) - (max_length - 1) :]
    return prompt, target[: max_length - len(prompt)]


def _pad_id(tokenizer) -> int:
    """Padding id: the pad token, else the eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
    return int(pad)


def encode_batch(
    tokenizer,
    problems: Sequence[Problem],
    *,
    template: str = "plain",
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> Batch:
    """Tokenize problems for teacher forcing: ``prompt | " " + solution | eos``.

    Prompt and target are tokenized separately and concatenated, so the prompt
    mask is exact: ``labels[b, t] = input_ids[b, t]`` for target and eos
    positions, ``-100`` elsewhere. Sequences are right-padded with the pad token
    (eos if there is none).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        Must have an eos token.
    problems : sequence of Problem
        At least one.
    template : str
        Prompt template passed to :func:`fed_essam.tasks.format_prompt`.
    max_length : int, optional
        Longest sequence kept (see :func:`_fit_to_length`: the end of the
        solution is cut first).
    device : torch.device or str
        Where the tensors are placed.

    Returns
    -------
    Batch
    """
    if len(problems) == 0:
        raise ValueError("encode_batch needs at least one problem")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; the target must end with one")
    rows: list[tuple[list[int], list[int]]] = []
    for problem in problems:
        prompt_text = format_prompt(problem.question, tokenizer=tokenizer, template=template)
        prompt = tokenize_prompt(tokenizer, prompt_text)
        target_text = format_target(problem.solution, template=template, tokenizer=tokenizer)
        target = tokenizer(target_text, add_special_tokens=False)["input_ids"]
        rows.append(_fit_to_length(prompt, [*target, eos], max_length))
    return _right_pad(rows, _pad_id(tokenizer), device)


def _right_pad(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str) -> Batch:
    """Stack ``(prompt, target)`` id lists into a right-padded :class:`Batch`."""
    width = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (prompt, target) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(target)
        input_ids[b, :n] = torch.tensor(prompt + target, dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, n_p:n] = torch.tensor(target, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels).to(device)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next(iter(model.parameters()), torch.empty(0)).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def token_loss_sums(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of solution-token cross-entropy, in float32.

    .. math:: s_b = \\sum_{t \\in S_b} -\\log \\operatorname{softmax}(z_{b,t-1})[y_{b,t}],
              \\qquad n_b = |S_b|

    Logits are cast to float32 one example at a time, so bf16 / fp16 models are
    scored in float32 without a float32 copy of the whole ``(B, T, V)`` logits.

    Parameters
    ----------
    model : nn.Module
        A causal LM returning ``.logits`` of shape ``(B, T, V)``.
    batch : Batch
        Must be on the model's device.

    Returns
    -------
    sums : torch.Tensor
        ``(B,)`` float32, :math:`s_b`.
    counts : torch.Tensor
        ``(B,)`` int64, :math:`n_b`.
    """
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        targets = batch.labels[:, 1:]  # (B, T-1)
        sums = torch.stack(
            [
                F.cross_entropy(
                    logits[b, :-1].float(),  # (T-1, V)
                    targets[b],  # (T-1,)
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                for b in range(logits.shape[0])
            ]
        )  # (B,)
        counts = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
    return sums, counts


class LossFitness:
    """Mean solution-token cross-entropy of a fixed batch at the current parameters.

    With ``reduction="mean"`` (the fitness), a token mean over the whole batch:

    .. math:: F(\\theta) = \\frac{\\sum_b s_b}{\\sum_b n_b}

    with :math:`s_b, n_b` as in :func:`token_loss_sums` (prompt and padding
    masked). With ``reduction="per_example"``, the ``(B,)`` tensor
    :math:`s_b / n_b` (used by evaluation; an example with no target token
    gives NaN).

    Parameters
    ----------
    model : nn.Module
        Causal LM; evaluated in eval mode, its mode is restored afterwards.
    batch : Batch
        From :func:`encode_batch`, on the model's device.
    reduction : {"mean", "per_example"}

    Raises
    ------
    ValueError
        If the batch has no target token, or ``reduction`` is unknown.
    """

    def __init__(self, model: nn.Module, batch: Batch, *, reduction: Reduction = "mean") -> None:
        if reduction not in ("mean", "per_example"):
            raise ValueError(f"reduction must be 'mean' or 'per_example', got {reduction!r}")
        if batch.num_target_tokens == 0:
            raise ValueError(
                "batch has zero target tokens (every label is -100): nothing to score; "
                "check max_length and that the solutions are non-empty"
            )
        self.model = model
        self.batch = batch
        self.reduction = reduction

    def __call__(self) -> float | torch.Tensor:
        """Evaluate the loss; a float for ``"mean"``, a ``(B,)`` tensor for ``"per_example"``."""
        with eval_mode(self.model):
            sums, counts = token_loss_sums(self.model, self.batch)  # (B,), (B,)
        if self.reduction == "per_example":
            return sums / counts  # (B,)
        return float(sums.sum() / counts.sum())


# ---------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[object]:
    """Set ``tokenizer.padding_side = "left"`` (and a pad token if missing) for the block.

    Both are restored afterwards, whatever happens inside.
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def greedy_completions(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy-decode one batch of prompts and return the completions only.

    Prompts are tokenized as in :func:`encode_batch` (:func:`tokenize_prompt`),
    left-padded, and passed to ``model.generate(do_sample=False)``; the first
    ``T`` generated columns (the padded prompt) are dropped before decoding.

    Parameters
    ----------
    model : nn.Module
        Anything with a Hugging Face style ``generate``.
    tokenizer : PreTrainedTokenizerBase
    prompts : sequence of str
        Formatted prompts.
    max_new_tokens : int

    Returns
    -------
    list of str
        One completion per prompt, special tokens removed.
    """
    device = model_device(model)
    ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    with left_padding(tokenizer):
        enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        pad_id = tokenizer.pad_token_id
    input_ids = enc["input_ids"].to(device)  # (B, T)
    attention_mask = enc["attention_mask"].to(device)  # (B, T)
    with torch.inference_mode(), eval_mode(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, T + new)
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def has_answer_format(completion: str) -> bool:
    """Whether ``completion`` contains the GSM8K final-answer marker ``#### <answer>``."""
    return _FORMAT_RE.search(completion) is not None


def reward(problem: Problem, completion: str, *, format_bonus: float = 0.0) -> float:
    """Reward of one completion.

    .. math:: r = \\mathbb{1}[\\text{grade}(p, c)] + \\beta\\,\\mathbb{1}[\\text{``#### <answer>''} \\in c]

    Parameters
    ----------
    problem : Problem
    completion : str
    format_bonus : float
        :math:`\\beta`.

    Returns
    -------
    float
    """
    bonus = format_bonus if has_answer_format(completion) else 0.0
    return float(bool(grade(problem, completion))) + bonus


class RewardFitness:
    """Negated mean reward of greedy completions: :math:`F = -\\frac{1}{B}\\sum_b r_b`.

    See :func:`reward` for :math:`r_b`. All problems are decoded in one batch
    unless ``batch_size`` is given.

    Parameters
    ----------
    model : nn.Module
    tokenizer : PreTrainedTokenizerBase
    problems : sequence of Problem
        At least one.
    max_new_tokens : int
    format_bonus : float
    template : str
        Prompt template (see :func:`fed_essam.tasks.format_prompt`).
    batch_size : int, optional
        Generation batch size (default: all problems at once).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        problems: Sequence[Problem],
        *,
        max_new_tokens: int = 64,
        format_bonus: float = 0.0,
        template: str = "plain",
        batch_size: int | None = None,
    ) -> None:
        if len(problems) == 0:
            raise ValueError("RewardFitness needs at least one problem")
        self.model = model
        self.tokenizer = tokenizer
        self.problems = list(problems)
        self.max_new_tokens = max_new_tokens
        self.format_bonus = format_bonus
        self.prompts = [format_prompt(p.question, tokenizer=tokenizer, template=template) for p in problems]
        self.batch_size = batch_size or len(self.problems)

    def completions(self) -> list[str]:
        """Greedy completions of all problems at the current parameters."""
        out: list[str] = []
        for i in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[i : i + self.batch_size]
            out += greedy_completions(self.model, self.tokenizer, chunk, max_new_tokens=self.max_new_tokens)
        return out

    def __call__(self) -> float:
        """Evaluate :math:`-\\text{mean}_b\\, r_b`."""
        rewards = [
            reward(p, c, format_bonus=self.format_bonus)
            for p, c in zip(self.problems, self.completions(), strict=True)
        ]
        return -sum(rewards) / len(rewards)
