"""Tests of fed_essam.fitness: batch encoding, loss fitness and reward fitness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fed_essam.fitness import (
    IGNORE_INDEX,
    Batch,
    LossFitness,
    RewardFitness,
    encode_batch,
    tokenize_prompt,
)
from tests.tiny_llama import make_model, make_tokenizer
from fed_essam.tasks import Problem, format_prompt, format_target

PROBLEMS = [
    Problem("What is 2+3?", "2+3=5\n#### 5", "5"),
    Problem("Tom has 4 apples and eats 1. How many are left?", "4-1=3\n#### 3", "3"),
    Problem("6*7?", "6*7=42, so the answer is 42.\n#### 42", "42"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


def reference_loss(model: nn.Module, tokenizer, problem: Problem) -> tuple[float, int]:
    """Unpadded, hand-computed summed NLL of ``" " + solution + eos`` and its token count."""
    prompt = tokenize_prompt(tokenizer, format_prompt(problem.question, tokenizer=tokenizer))
    target = tokenizer(format_target(problem.solution), add_special_tokens=False)["input_ids"]
    target = [*target, tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])  # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    nll = -sum(logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(target))
    return nll, len(target)


# ----------------------------------------------------------------------------- encode_batch


def test_encode_batch_masks_prompt_and_padding(tokenizer):
    batch = encode_batch(tokenizer, PROBLEMS)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for b, problem in enumerate(PROBLEMS):
        prompt = tokenize_prompt(tokenizer, format_prompt(problem.question, tokenizer=tokenizer))
        target = tokenizer(format_target(problem.solution), add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(target) + 1
        assert batch.input_ids[b, :n].tolist() == prompt + target + [tokenizer.eos_token_id]
        assert (batch.labels[b, : len(prompt)] == IGNORE_INDEX).all()  # prompt masked
        assert batch.labels[b, len(prompt) : n].tolist() == target + [tokenizer.eos_token_id]
        assert (batch.labels[b, n:] == IGNORE_INDEX).all()  # padding masked
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert int((batch.labels[b] != IGNORE_INDEX).sum()) == len(target) + 1
        assert (batch.input_ids[b, n:] == tokenizer.pad_token_id).all()


def test_tokenize_prompt_adds_bos_only():
    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    plain = tok("Q:", add_special_tokens=False)["input_ids"]
    assert tok("Q:")["input_ids"] == [1, *plain, 2]
    assert tokenize_prompt(tok, "Q:") == [1, *plain]
    assert tokenize_prompt(tok, "<s>Q:") == [1, *plain]  # a template that writes BOS itself
    assert tokenize_prompt(make_tokenizer(), "Q:") == plain  # no BOS where the tokenizer adds none


def test_encode_batch_max_length_cuts_solution_end(tokenizer):
    full = encode_batch(tokenizer, PROBLEMS[:1])
    cut = encode_batch(tokenizer, PROBLEMS[:1], max_length=full.input_ids.shape[1] - 5)
    assert cut.input_ids.shape[1] == full.input_ids.shape[1] - 5
    assert torch.equal(cut.input_ids[0], full.input_ids[0, :-5])
    assert cut.num_target_tokens == full.num_target_tokens - 5


def test_encode_batch_chat_template():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>U: {{ m['content'] }}\n{% endfor %}A:"
    batch = encode_batch(tok, PROBLEMS[:1], template="chat")
    prompt = tokenize_prompt(tok, format_prompt(PROBLEMS[0].question, tokenizer=tok, template="chat"))
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    target = tok(PROBLEMS[0].solution, add_special_tokens=False)["input_ids"]  # no leading space
    assert batch.labels[0, len(prompt) :].tolist() == [*target, tok.eos_token_id]
    assert (batch.labels[0, : len(prompt)] == IGNORE_INDEX).all()


def test_encode_batch_rejects_empty(tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        encode_batch(tokenizer, [])


# ----------------------------------------------------------------------------- LossFitness


def test_loss_matches_hand_computed_reference(model, tokenizer):
    refs = [reference_loss(model, tokenizer, p) for p in PROBLEMS]
    expected = sum(nll for nll, _ in refs) / sum(n for _, n in refs)  # token mean over the batch
    got = LossFitness(model, encode_batch(tokenizer, PROBLEMS))()
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-5)


def test_per_example_loss_is_padding_invariant(model, tokenizer):
    per_example = LossFitness(model, encode_batch(tokenizer, PROBLEMS), reduction="per_example")()
    assert per_example.shape == (3,)
    for b, problem in enumerate(PROBLEMS):
        alone = LossFitness(model, encode_batch(tokenizer, [problem]))()
        nll, n = reference_loss(model, tokenizer, problem)
        assert per_example[b].item() == pytest.approx(alone, abs=1e-5)
        assert alone == pytest.approx(nll / n, abs=1e-5)


def test_prompt_tokens_do_not_count(model, tokenizer):
    """Changing the question changes the context, but the scored count is the target's."""
    a = encode_batch(tokenizer, [PROBLEMS[0]])
    b = encode_batch(tokenizer, [Problem("A much longer question text here?", PROBLEMS[0].solution, "5")])
    assert a.num_target_tokens == b.num_target_tokens == len(format_target(PROBLEMS[0].solution)) + 1
    assert a.labels[a.labels != IGNORE_INDEX].tolist() == b.labels[b.labels != IGNORE_INDEX].tolist()


def test_loss_builds_no_graph(model, tokenizer):
    assert any(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        out = LossFitness(model, encode_batch(tokenizer, PROBLEMS), reduction="per_example")()
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


def test_loss_restores_training_mode(tokenizer):
    m = make_model(len(tokenizer)).train()
    LossFitness(m, encode_batch(tokenizer, PROBLEMS[:1]))()
    assert m.training


def test_zero_target_tokens_raises(model, tokenizer):
    batch = encode_batch(tokenizer, PROBLEMS[:1])
    empty = Batch(batch.input_ids, batch.attention_mask, torch.full_like(batch.labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="zero target tokens"):
        LossFitness(model, empty)


def test_bad_reduction_raises(model, tokenizer):
    with pytest.raises(ValueError, match="reduction"):
        LossFitness(model, encode_batch(tokenizer, PROBLEMS[:1]), reduction="sum")  # type: ignore[arg-type]


def test_nan_loss_is_returned_as_is(tokenizer):
    m = make_model(len(tokenizer))
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    assert math.isnan(LossFitness(m, encode_batch(tokenizer, PROBLEMS[:1]))())


def test_bfloat16_model_scored_in_float32(model, tokenizer):
    m16 = make_model(len(tokenizer), torch.bfloat16)
    batch = encode_batch(tokenizer, PROBLEMS)
    per_example = LossFitness(m16, batch, reduction="per_example")()
    assert per_example.dtype == torch.float32
    ref = LossFitness(model, batch)()
    assert LossFitness(m16, batch)() == pytest.approx(ref, rel=0.02)


# ----------------------------------------------------------------------------- RewardFitness


class ScriptedLM(nn.Module):
    """A model whose ``generate`` appends a scripted completion to each prompt."""

    def __init__(self, tokenizer, script: dict[str, str]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[dict] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        new = [self.tokenizer(self.script[p], add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(n) for n in new) + 1
        tail = torch.full((len(new), width), self.tokenizer.pad_token_id)  # (B, W)
        for b, n in enumerate(new):
            tail[b, : len(n) + 1] = torch.tensor([*n, self.tokenizer.eos_token_id])
        return torch.cat([input_ids, tail], dim=1)  # (B, T + W)


def scripted(tokenizer, completions: list[str]) -> ScriptedLM:
    script = {format_prompt(p.question, tokenizer=tokenizer): c for p, c in zip(PROBLEMS, completions)}
    return ScriptedLM(tokenizer, script)


@pytest.mark.parametrize("bonus", [0.0, 0.5])
def test_reward_fitness_value_and_format_bonus(tokenizer, bonus):
    completions = ["2+3=5\n#### 5", "4-1=3\n#### 7", "I do not know."]
    lm = scripted(tokenizer, completions)
    side = tokenizer.padding_side
    fitness = RewardFitness(lm, tokenizer, PROBLEMS, max_new_tokens=17, format_bonus=bonus)
    assert fitness.completions() == completions
    # rewards: correct + formatted, wrong + formatted, wrong + unformatted
    assert fitness() == pytest.approx(-((1 + bonus) + bonus + 0.0) / 3)
    assert tokenizer.padding_side == side
    call = lm.calls[-1]
    assert call["do_sample"] is False and call["max_new_tokens"] == 17
    assert call["pad_token_id"] == tokenizer.pad_token_id
    assert call["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    assert not call["attention_mask"][:, 0].all()  # prompts of different lengths


def test_reward_fitness_batched_equals_single_batch(tokenizer):
    lm = scripted(tokenizer, ["#### 5", "#### 3", "#### 42"])
    assert RewardFitness(lm, tokenizer, PROBLEMS, batch_size=2)() == pytest.approx(-1.0)
    assert len(lm.calls) == 2


def test_reward_fitness_on_real_model(model, tokenizer):
    fitness = RewardFitness(model, tokenizer, PROBLEMS, max_new_tokens=4, format_bonus=0.1)
    value = fitness()
    assert -1.1 <= value <= 0.0
    assert all(len(c) <= 4 for c in fitness.completions())  # char tokenizer: one char per token
