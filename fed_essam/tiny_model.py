r"""The embedded default model: a ~0.8M-parameter Llama with a character tokenizer.

The model is pretrained by backprop on single-operation arithmetic written in
the project's plain prompt format (``"Question: {question}\nAnswer: {solution}"``
with a solution ending in ``#### {answer}``). It is the starting point that a
forward-only optimiser has to improve on a *neighbouring* held-out task (for
instance reasoning-gym ``chain_sum``), so it is deliberately small and only
briefly trained.

The built files ship in ``fed_essam/assets/tiny/``; :func:`tiny_model_path`
rebuilds them into ``~/.cache/fed-essam/tiny`` only when they are missing.
Rebuild them by hand with ``fed-essam-make-base --out DIR``.

Shipped build (seed 0, 600 steps, see its ``build_info.json``), greedy
exact match on 200 held-out problems of each set: pretraining distribution
95 %; reasoning-gym ``chain_sum`` 2 terms 1 digit 13 % (same arithmetic,
longer phrasing); ``basic_arithmetic`` 2 terms 1 digit ``+ -`` without
parentheses or negation 36 %; ``chain_sum`` 3 terms 1 digit 8.5 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import string
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

LOGGER = logging.getLogger(__name__)
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: Every printable ASCII character plus newline and tab: one token each.
MATH_CHARS = "".join(ch for ch in string.printable if ch not in "\r\x0b\x0c")

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
CACHE_DIR = Path("~/.cache/fed-essam/tiny")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_STEPS = 600

#: Question phrasings of the pretraining data. The reasoning-gym phrasings
#: (``"Calculate {e}."``, ``"State the final answer ...: {e} ="``) are
#: deliberately absent: they are the held-out targets.
QUESTION_TEMPLATES = (
    "{e} = ?",
    "What is {e}?",
    "Compute {e}.",
    "Find {e}.",
    "How much is {e}?",
)
DATA_DESCRIPTION = (
    "single-operation additions/subtractions a+b, a-b of 1-digit operands "
    "(0-9; results -9..18), questions phrased as "
    + " | ".join(QUESTION_TEMPLATES)
    + "; text 'Question: {question}\\nAnswer: {a} {op} {b} = {r}\\n#### {r}' + eos; "
    "loss on the answer part only"
)


@dataclass(frozen=True)
class TinyArch:
    """Architecture of the embedded model.

    Attributes
    ----------
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size :
        Usual Llama sizes.
    max_position_embeddings : int
        Longest sequence the model is meant for (characters).
    """

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings of the pretraining run.

    Attributes
    ----------
    batch_size : int
        Sequences per step.
    lr : float
        Peak AdamW learning rate (linear warm-up, cosine decay to 10 %).
    weight_decay : float
        AdamW weight decay.
    warmup : float
        Fraction of the run spent in linear warm-up.
    """

    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05


# --------------------------------------------------------------------------- #
# Tokenizer and config
# --------------------------------------------------------------------------- #
def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer of the embedded model.

    Returns
    -------
    PreTrainedTokenizerFast
        One token per character of :data:`MATH_CHARS` (other characters map to
        ``<unk>``), special tokens ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; no
        special token is added automatically and decoding concatenates.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in MATH_CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.FixedLength(length=1)
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=TinyArch().max_position_embeddings,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, arch: TinyArch | None = None) -> LlamaConfig:
    """Return the ``LlamaConfig`` of the embedded model.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerFast
        The character tokenizer (gives vocabulary size and special ids).
    arch : TinyArch, optional
        Sizes; defaults to :class:`TinyArch`.

    Returns
    -------
    LlamaConfig
        Config with tied embeddings and no dropout.
    """
    arch = arch or TinyArch()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# --------------------------------------------------------------------------- #
# Pretraining data
# --------------------------------------------------------------------------- #
def random_operand(rng: random.Random) -> int:
    """Draw a 1-digit operand (0-9).

    Two-digit operands were tried: with the ~600 AdamW steps a 3-minute CPU
    budget allows, a 25 % share of them cut the in-distribution accuracy
    from ~90 % to ~30 %, so the pretraining stays on single digits.
    """
    return rng.randint(0, 9)


def arithmetic_example(rng: random.Random) -> tuple[str, str, str]:
    r"""Draw one pretraining problem.

    Parameters
    ----------
    rng : random.Random
        Source of randomness.

    Returns
    -------
    tuple of str
        ``(question, solution, answer)``; the solution is
        ``"{a} {op} {b} = {r}\n#### {r}"``, the worked-solution format of
        :mod:`fed_essam.tasks` for reasoning-gym arithmetic.
    """
    a, b = random_operand(rng), random_operand(rng)
    op = rng.choice("+-")
    result = a + b if op == "+" else a - b
    expression = f"{a} {op} {b}"
    question = rng.choice(QUESTION_TEMPLATES).format(e=expression)
    return question, f"{expression} = {result}\n#### {result}", str(result)


def format_prompt(question: str) -> str:
    r"""Return the plain prompt ``"Question: {question}\nAnswer:"``."""
    return PROMPT_TEMPLATE.format(question=question)


def encode_example(tokenizer: PreTrainedTokenizerFast, question: str, solution: str) -> tuple[list[int], int]:
    """Token ids of prompt + ``" " + solution`` + eos, and the prompt length."""
    prompt_ids = tokenizer.encode(format_prompt(question), add_special_tokens=False)
    answer_ids = tokenizer.encode(" " + solution, add_special_tokens=False)
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def make_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int
) -> dict[str, torch.Tensor]:
    """Build a right-padded training batch with loss on the answer part only.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt
        and padding).
    """
    encoded = [encode_example(tokenizer, *arithmetic_example(rng)[:2]) for _ in range(batch_size)]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- #
# Pretraining loop
# --------------------------------------------------------------------------- #
def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak.

    Parameters
    ----------
    progress : float
        Fraction of the run done, in ``[0, 1]``.
    warmup : float
        Fraction of the run spent warming up.
    """
    if progress < warmup:
        return max(progress / warmup, 0.02)
    rest = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * rest))


def train_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One AdamW step; returns the batch loss."""
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seconds: float,
    seed: int,
    max_steps: int | None = None,
    settings: TrainSettings | None = None,
) -> dict[str, float | int]:
    """Pretrain ``model`` on arithmetic text until a wall-time or step budget.

    The learning-rate schedule follows the run's progress, the larger of the
    elapsed fraction of ``seconds`` and of ``max_steps``: a run that reaches
    ``max_steps`` well inside ``seconds`` is a pure function of the seed
    (deterministic), one cut by the clock is not (its step count depends on
    the machine's load and is reported).

    Returns
    -------
    dict
        ``steps``, ``max_steps``, ``final_loss`` (mean of the last 20 steps),
        ``seconds`` (wall time used), ``stopped_by`` (``"steps"`` or
        ``"time"``).
    """
    settings = settings or TrainSettings()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    start, losses, step, progress = time.perf_counter(), [], 0, 0.0
    while progress < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(progress, settings.warmup)
        losses.append(train_step(model, optimizer, make_batch(tokenizer, rng, settings.batch_size)))
        step += 1
        elapsed = time.perf_counter() - start
        progress = max(elapsed / seconds, step / max_steps if max_steps else 0.0)
        if step % 50 == 0:
            LOGGER.info("step %d  loss %.4f  %.0fs  progress %.2f", step, losses[-1], elapsed, progress)
    model.eval()
    tail = losses[-20:]
    return {
        "steps": step,
        "max_steps": max_steps,
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(time.perf_counter() - start, 2),
        "stopped_by": "steps" if max_steps and step >= max_steps else "time",
    }


# --------------------------------------------------------------------------- #
# Build, save, locate
# --------------------------------------------------------------------------- #
def build_tiny_model(
    out_dir: str | os.PathLike, *, seconds: float = 170, seed: int = 0, max_steps: int | None = DEFAULT_STEPS
) -> Path:
    """Build, pretrain and save the embedded default model.

    Parameters
    ----------
    out_dir : path-like
        Folder receiving ``config.json``, ``model.safetensors``, the tokenizer
        files, ``generation_config.json`` and ``build_info.json``.
    seconds : float
        Wall-time budget of the pretraining (the step count it allows depends
        on the machine and is recorded in ``build_info.json``).
    seed : int
        Seed of the initialisation and of the data stream.
    max_steps : int, optional
        Step budget (``None``: wall time only). When it is reached inside
        ``seconds`` (600 steps take about 150 s on two idle cores) the build
        is deterministic given the seed, up to CPU kernel reductions (thread
        count); a build cut by the clock is not, its step count depends on
        the machine's load and is recorded in ``build_info.json``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out = Path(out_dir).expanduser()
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_config(tokenizer))
    stats = pretrain(model, tokenizer, seconds=seconds, seed=seed, max_steps=max_steps)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    info = {
        **stats,
        "seed": seed,
        "seconds_budget": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": asdict(TinyArch()),
        "train_settings": asdict(TrainSettings()),
        "data": DATA_DESCRIPTION,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save the tokenizer so that transformers 4.x and 5.x both load it.

    transformers 5 records its own ``TokenizersBackend`` class name, which
    4.x does not know; ``PreTrainedTokenizerFast`` is understood by both.
    """
    tokenizer.save_pretrained(out_dir)
    config_file = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def is_built(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved tiny model."""
    return all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


def tiny_model_path() -> Path:
    """Folder of the embedded default model.

    Returns the shipped ``fed_essam/assets/tiny`` when it is complete;
    otherwise the user cache ``~/.cache/fed-essam/tiny``, building it there
    first (about three minutes) if needed.
    """
    if is_built(ASSET_DIR):
        return ASSET_DIR
    cache = CACHE_DIR.expanduser()
    if not is_built(cache):
        build_tiny_model(cache)
    return cache


def make_base_main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``fed-essam-make-base``: build the tiny model.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns
    -------
    int
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="fed-essam-make-base",
        description="Pretrain the embedded tiny Llama on arithmetic text and save it.",
    )
    parser.add_argument("--out", required=True, help=f"output folder (the shipped model lives in {ASSET_DIR})")
    parser.add_argument("--seconds", type=float, default=170.0, help="wall-time budget of the pretraining")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_STEPS,
        help="step budget (0: none); the build is deterministic when it ends by steps",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = build_tiny_model(args.out, seconds=args.seconds, seed=args.seed, max_steps=args.max_steps or None)
    print(json.dumps(json.loads((out / "build_info.json").read_text()), indent=2))
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(make_base_main())
