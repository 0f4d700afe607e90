"""Tests of fed_essam.evaluation: generation, evaluate() and the sharpness probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fed_essam.evaluation import evaluate, generate_answers, sharpness, solution_loss
from fed_essam.fitness import LossFitness, encode_batch
from tests.tiny_llama import make_model, make_tokenizer
from fed_essam.tasks import Problem, format_prompt, grade

PROBLEMS = [
    Problem("What is 2+3?", "2+3=5\n#### 5", "5"),
    Problem("Tom has 4 apples and eats 1. How many are left?", "4-1=3\n#### 3", "3"),
    Problem("6*7?", "6*7=42\n#### 42", "42"),
    Problem("10/2?", "10/2=5\n#### 5", "5"),
    Problem("9-9?", "9-9=0\n#### 0", "0"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


class ScriptedGenerate(nn.Module):
    """Wraps a real LM (for the loss) but scripts ``generate``; records the mode it ran in."""

    def __init__(self, lm: nn.Module, tokenizer, script: dict[str, str]) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.script = script
        self.modes: list[bool] = []

    def forward(self, **kwargs):
        self.modes.append(self.training)
        return self.lm(**kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        self.modes.append(self.training)
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        new = [self.tokenizer(self.script[p], add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(n) for n in new)
        tail = torch.full((len(new), width), self.tokenizer.pad_token_id)  # (B, W)
        for b, n in enumerate(new):
            tail[b, : len(n)] = torch.tensor(n)
        return torch.cat([input_ids, tail], dim=1)  # (B, T + W)


COMPLETIONS = ["#### 5", "It is 3.\n#### 3", "#### 41", "#### 5", "#### 1"]


@pytest.fixture()
def scripted(model, tokenizer) -> ScriptedGenerate:
    script = {format_prompt(p.question, tokenizer=tokenizer): c for p, c in zip(PROBLEMS, COMPLETIONS)}
    return ScriptedGenerate(model, tokenizer, script)


# ----------------------------------------------------------------------------- generation / evaluate


def test_generate_answers_keeps_order_and_strips_prompt(scripted, tokenizer):
    assert generate_answers(scripted, tokenizer, PROBLEMS, batch_size=2) == COMPLETIONS


def test_evaluate_matches_per_problem_grading(scripted, tokenizer, model):
    scripted.train()
    result = evaluate(scripted, tokenizer, PROBLEMS, batch_size=2, num_samples=2, progress=False)
    expected = [grade(p, c) for p, c in zip(PROBLEMS, COMPLETIONS)]
    assert expected == [True, True, False, True, False]
    assert result.correct == expected
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.num_problems == 5
    assert result.loss == pytest.approx(LossFitness(model, encode_batch(tokenizer, PROBLEMS))(), abs=1e-5)
    assert result.samples == [
        {"question": p.question, "completion": c, "gold": p.answer, "correct": ok}
        for p, c, ok in list(zip(PROBLEMS, COMPLETIONS, expected))[:2]
    ]
    assert scripted.modes and not any(scripted.modes)  # evaluated in eval mode
    assert scripted.training  # mode restored


def test_evaluate_real_model_is_consistent(model, tokenizer):
    result = evaluate(model, tokenizer, PROBLEMS, batch_size=3, max_new_tokens=3, progress=False)
    completions = generate_answers(model, tokenizer, PROBLEMS, batch_size=5, max_new_tokens=3)
    assert all(len(c) <= 3 for c in completions)
    assert result.accuracy == pytest.approx(sum(grade(p, c) for p, c in zip(PROBLEMS, completions)) / 5)
    assert result.loss == pytest.approx(solution_loss(model, tokenizer, PROBLEMS, batch_size=1), abs=1e-5)
    assert len(result.samples) == 3


def test_evaluate_bfloat16_model(tokenizer):
    m16 = make_model(len(tokenizer), torch.bfloat16)
    result = evaluate(m16, tokenizer, PROBLEMS[:2], max_new_tokens=2, progress=False)
    assert torch.isfinite(torch.tensor(result.loss))


def test_evaluate_rejects_empty(model, tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        evaluate(model, tokenizer, [], progress=False)


# ----------------------------------------------------------------------------- sharpness


class Quadratic(nn.Module):
    """Loss ``a * ||w - c||^2`` with ``w`` initialised at its minimum ``c``."""

    def __init__(self, a: float, dim: int = 16) -> None:
        super().__init__()
        self.a = a
        self.c = torch.linspace(0.5, 2.0, dim)
        self.w = nn.Parameter(self.c.clone())

    def loss(self) -> float:
        return float(self.a * ((self.w.detach() - self.c) ** 2).sum())


def test_sharper_minimum_gives_larger_increase():
    sharp, flat = Quadratic(100.0), Quadratic(1.0)
    r_sharp = sharpness(sharp, sharp.loss, radius=1e-2, num_directions=4)
    r_flat = sharpness(flat, flat.loss, radius=1e-2, num_directions=4)
    assert r_sharp.base_loss == r_flat.base_loss == 0.0
    assert r_sharp.mean_increase > 10 * r_flat.mean_increase > 0
    # every step has norm r * ||w||, so the increase is a r^2 ||c||^2 in every direction
    expected = 100.0 * 1e-4 * float((sharp.c**2).sum())
    assert r_sharp.mean_increase == pytest.approx(expected, rel=1e-3)
    assert r_sharp.max_increase == pytest.approx(expected, rel=1e-3)
    assert len(r_sharp.increases) == 4


def test_sharpness_is_seeded():
    q = Quadratic(1.0)
    lin = lambda: float((q.w.detach() * torch.arange(16.0)).sum())  # noqa: E731  (direction-dependent)
    a, b = sharpness(q, lin, seed=3), sharpness(q, lin, seed=3)
    c = sharpness(q, lin, seed=4)
    assert a == b
    assert a.increases != c.increases
    assert a.max_increase == max(a.increases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharpness_restores_parameters_bit_exactly(tokenizer, dtype):
    m = make_model(len(tokenizer), dtype)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fitness = LossFitness(m, encode_batch(tokenizer, PROBLEMS[:2]))
    result = sharpness(m, fitness, radius=1e-2, num_directions=2)
    assert result.base_loss == pytest.approx(fitness())
    assert torch.isfinite(torch.tensor([result.mean_increase, result.max_increase])).all()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


def test_sharpness_restores_even_if_loss_fn_raises(tokenizer):
    m = make_model(len(tokenizer))
    before = [p.detach().clone() for p in m.parameters()]
    calls = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) == 2:  # raises while the model is perturbed
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        sharpness(m, flaky, radius=0.1)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_sharpness_perturbs_only_selected_params(tokenizer):
    m = make_model(len(tokenizer))
    head = m.lm_head.weight
    seen: list[bool] = []
    base = head.detach().clone()
    embed = m.model.embed_tokens.weight.detach().clone()

    def probe() -> float:
        seen.append(torch.equal(m.model.embed_tokens.weight, embed))
        return float((head.float() - base).norm())

    result = sharpness(m, probe, radius=1e-2, num_directions=3, params=[head])
    assert all(seen)  # the embedding was never touched
    expected = 1e-2 * float(base.norm())  # a step of relative size r on the selected tensor
    assert result.mean_increase == pytest.approx(expected, rel=1e-4)


def test_sharpness_needs_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        sharpness(nn.Linear(2, 2).requires_grad_(False), lambda: 0.0)
