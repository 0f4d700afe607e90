"""What an ESSAM step costs beyond its forward passes, in time and memory, on this machine.

One process, one Llama-config model (random init), one batch. Four measurements:

(a) ``step / floor``: the wall time of one ``ESSAM.step`` (antithetic, ``N_a + N_b``
    seeds) over the time of the ``2 (N_a + N_b)`` plain forward passes it must do.
    Per noise backend (``numpy``: the CPU default; ``compiled``). The time the
    step spends inside the closure is recorded too, so the overhead splits into
    "forwards inside the step" and "everything else".
(b) noise share: generating ``eps(seed)`` for the whole model, over one forward,
    per backend (``numpy``, ``torch`` eager, ``compiled``), plus ``torch.randn``
    (the public patterns' generator, not bit-exact) for reference.
(c) memory (:func:`fed_essam.memory.measure_peak_memory`, total peaks with the
    weights): ESSAM step / plain forward, and backprop + AdamW step / plain forward.
(d) the public per-probe loops against the same floor, per forward pass:
    MeZO's (``torch.manual_seed(seed)``, ``torch.normal`` per parameter, in place
    ``+z``, evaluate, ``-2z``, evaluate, ``+z``) and ES-at-scale's (a
    ``torch.Generator`` reseeded per parameter, ``p.add_(sigma * noise)``,
    evaluate, regenerate and subtract).

Timings are interleaved: every repetition measures half of the floor, then each
contender (order reversed on odd repetitions), then the other half of the floor;
every ratio uses the floor of its own repetition. Reported: the median of the
per-repetition ratios, with min and max.

Two estimators of every time ratio: ``ratio_to_floor`` (the definition above:
the contender over separately timed plain forwards) and ``ratio_in_situ`` (the
contender over the time its own closure calls took, i.e. 1 + overhead / the
forwards it actually ran). On a shared machine the forward time itself swings by
tens of percent between calls; the in-situ ratio cancels those swings and only
carries the noise of the overhead, so it is the steadier of the two.

Run ``python bench/step_overhead.py`` (or ``make bench``); ``--quick`` runs a tiny
smoke version. Writes ``bench/results/step_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fed_essam import ESSAM, native_probe
from fed_essam.memory import PeakMemory, measure_peak_memory
from fed_essam.noise import noise
from fed_essam.perturb import trainable_parameters

RESULTS = Path(__file__).resolve().parent / "results" / "step_overhead.json"


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures.

    Attributes
    ----------
    reps : int
        Interleaved repetitions of every timing.
    population : int
        ``N_a = N_b`` (antithetic seeds per phase); the step does ``4 * population`` forwards.
    threads : int
        ``torch.set_num_threads``.
    batch, seq_len : int
        Token batch ``(batch, seq_len)``.
    hidden, layers, heads, intermediate, vocab : int
        Llama sizes.
    sigma, rho, lr : float
        ESSAM hyperparameters (`conf/method/essam.yaml`); sigma and rho set the size of the undo logs.
    backends : tuple of str
        Noise backends timed in the ESSAM step: ``numpy`` (float32 CPU tensors take the
        fused path: native C loops when they build), ``numpy-fallback`` (the same with
        ``FED_ESSAM_NATIVE=0``: NumPy blocks, same bits), ``compiled``, ``torch``.
    """

    reps: int = 5
    population: int = 2
    threads: int = 1
    batch: int = 16
    seq_len: int = 128
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    intermediate: int = 1024
    vocab: int = 128
    sigma: float = 2e-3
    rho: float = 4e-3
    lr: float = 2e-3
    backends: tuple[str, ...] = ("numpy", "numpy-fallback", "compiled")

    @property
    def floor_forwards(self) -> int:
        """``2 (N_a + N_b)``: the forward passes of one antithetic ESSAM step."""
        return 4 * self.population


def quick_config() -> BenchConfig:
    """A seconds-long smoke version (tiny model, 1 repetition)."""
    return BenchConfig(reps=1, population=2, batch=2, seq_len=16, hidden=64, layers=2, heads=2,
                       intermediate=128, backends=("numpy", "numpy-fallback"))


# -- model and timing helpers ---------------------------------------------------------------------
def build_model(cfg: BenchConfig) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A random-init ``LlamaForCausalLM`` (char-level vocabulary) and a token batch."""
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids


def forward_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``ids`` (no autograd): the closure of every contender."""
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_forwards(model: torch.nn.Module, ids: torch.Tensor, count: int) -> float:
    """Wall seconds of ``count`` plain forward passes."""
    return timed(lambda: [forward_loss(model, ids) for _ in range(count)])


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-repetition values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# -- (d) the public per-probe loops ------------------------------------------------------------------
@torch.no_grad()
def mezo_probe(params: Sequence[torch.Tensor], seed: int, eps: float, closure: Callable[[], float]) -> tuple[float, float]:
    """MeZO (arXiv 2305.17333, Algorithm 1): reseed the global RNG, regenerate ``z`` per parameter.

    ``+eps z``, evaluate, ``-2 eps z``, evaluate, ``+eps z`` (three regenerations, two forwards).
    """

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.size(), device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale * eps)

    perturb(1.0)
    plus = closure()
    perturb(-2.0)
    minus = closure()
    perturb(1.0)
    return plus, minus


@torch.no_grad()
def es_at_scale_probe(params: Sequence[torch.Tensor], seed: int, sigma: float, closure: Callable[[], float]) -> float:
    """ES at scale (arXiv 2509.24372): a ``torch.Generator`` reseeded per parameter, perturb in place.

    ``p.add_(sigma * noise)`` for every parameter, evaluate, regenerate and
    ``p.add_(-sigma * noise)`` (two regenerations, one forward).
    """

    def perturb(scale: float) -> None:
        for p in params:
            gen = torch.Generator(device=p.device).manual_seed(seed)
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.add_(scale * sigma * z)

    perturb(1.0)
    loss = closure()
    perturb(-1.0)
    return loss


# -- (a) + (d): interleaved step and probe timings ---------------------------------------------------
class TimedClosure:
    """The forward closure, timing its own calls (the forwards inside a step)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.seconds = 0.0
        self.calls = 0

    def __call__(self) -> float:
        start = time.perf_counter()
        loss = forward_loss(self.model, self.ids)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return loss


FALLBACK = "-fallback"


def make_optimizers(model: torch.nn.Module, cfg: BenchConfig) -> dict[str, ESSAM]:
    """One ESSAM optimizer per noise backend, all on ``model`` (``numpy-fallback``: noise backend ``numpy``)."""
    return {
        backend: ESSAM(model.parameters(), lr=cfg.lr, sigma=cfg.sigma, rho=cfg.rho, population=cfg.population,
                       ascent_population=cfg.population, seed=7, noise_backend=backend.removesuffix(FALLBACK))
        for backend in cfg.backends
    }


@contextlib.contextmanager
def native_mode(backend: str):
    """``FED_ESSAM_NATIVE=0`` inside, for the ``*-fallback`` backends (the NumPy blocks)."""
    if not backend.endswith(FALLBACK):
        yield
        return
    saved = os.environ.get("FED_ESSAM_NATIVE")
    os.environ["FED_ESSAM_NATIVE"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FED_ESSAM_NATIVE"]
        else:
            os.environ["FED_ESSAM_NATIVE"] = saved


def run_step(backend: str, opt: ESSAM, closure: Callable[[], float]) -> float:
    """``opt.step(closure)`` in the backend's native mode."""
    with native_mode(backend):
        return opt.step(closure)


def contenders(model: torch.nn.Module, ids: torch.Tensor, cfg: BenchConfig, rep: int) -> dict[str, tuple[Callable[[], float], int]]:
    """``name -> (call, forward passes it contains)``; a call returns the seconds spent inside its closure."""
    params = trainable_parameters(model)
    optimizers = make_optimizers(model, cfg)
    out: dict[str, tuple[Callable[[], float], int]] = {}
    for backend, opt in optimizers.items():
        def step(opt: ESSAM = opt, backend: str = backend) -> float:
            closure = TimedClosure(model, ids)
            run_step(backend, opt, closure)
            return closure.seconds
        out[f"essam_step_{backend}"] = (step, cfg.floor_forwards)
    seed = 1000 + rep

    def mezo() -> float:
        closure = TimedClosure(model, ids)
        mezo_probe(params, seed, cfg.sigma, closure)
        return closure.seconds

    def es() -> float:
        closure = TimedClosure(model, ids)
        es_at_scale_probe(params, seed, cfg.sigma, closure)
        return closure.seconds

    out["mezo_probe"] = (mezo, 2)
    out["es_at_scale_probe"] = (es, 1)
    return out


def time_interleaved(model: torch.nn.Module, ids: torch.Tensor, cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    """(a) and (d): per repetition, floor half, contenders, floor half; ratios to that floor."""
    ratios: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}
    forward_s: list[float] = []
    half = cfg.floor_forwards // 2
    for rep in range(cfg.reps):
        items = list(contenders(model, ids, cfg, rep).items())
        if rep % 2:
            items.reverse()
        floor = time_forwards(model, ids, half)
        seconds = {}
        for name, (call, _) in items:
            start = time.perf_counter()
            in_closure = call()
            seconds[name] = (time.perf_counter() - start, in_closure)
        floor += time_forwards(model, ids, cfg.floor_forwards - half)
        per_forward = floor / cfg.floor_forwards
        forward_s.append(per_forward)
        for name, (call, forwards) in items:
            total, in_closure = seconds[name]
            ratios.setdefault(name, []).append(total / (forwards * per_forward))
            if in_closure:
                inside.setdefault(name, []).append(total / in_closure)
        log(f"rep {rep}: forward {per_forward:.3f} s; " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ratios.items()))
    return {
        "ratio_to_floor": {name: summarize(v) for name, v in ratios.items()},
        "ratio_in_situ": {name: summarize(v) for name, v in inside.items()},
        "forward_seconds": summarize(forward_s),
    }


# -- (b) noise share ------------------------------------------------------------------------------------
def generate_model_noise(params: Sequence[torch.Tensor], backend: str, seed: int = 3) -> None:
    """``eps(seed)`` for every parameter with one backend (``"randn"``: ``torch.randn``, not bit-exact)."""
    for index, p in enumerate(params):
        if backend == "randn":
            torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + index))
        else:
            noise(seed, index, p.shape, backend=backend)


def time_noise(model: torch.nn.Module, ids: torch.Tensor, cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    """(b): whole-model noise generation over one forward, interleaved; compile time reported."""
    params = trainable_parameters(model)
    backends = ["numpy", "torch", "randn"]
    compile_s = None
    if "compiled" in cfg.backends:
        compile_s = timed(lambda: generate_model_noise(params, "compiled"))
        backends.insert(2, "compiled")
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    for rep in range(cfg.reps):
        order = backends if rep % 2 == 0 else backends[::-1]
        forward = time_forwards(model, ids, 1)
        seconds = {b: timed(lambda b=b: generate_model_noise(params, b)) for b in order}
        for b in backends:
            ratios[b].append(seconds[b] / forward)
        log(f"noise rep {rep}: forward {forward:.3f} s; " + ", ".join(f"{b} {ratios[b][-1]:.3f}" for b in backends))
    return {"noise_over_forward": {b: summarize(v) for b, v in ratios.items()},
            "compiled_first_call_seconds": compile_s}


# -- (c) memory -------------------------------------------------------------------------------------------------
def measure_memory(model: torch.nn.Module, ids: torch.Tensor, cfg: BenchConfig) -> dict:
    """(c): total peaks (weights included) of a forward, an ESSAM step and a backprop + AdamW step."""
    forward = measure_peak_memory(lambda: forward_loss(model, ids), resident=[model])
    peaks: dict[str, PeakMemory] = {"forward": forward}
    for backend, opt in make_optimizers(model, cfg).items():
        peaks[f"essam_step_{backend}"] = measure_peak_memory(
            lambda opt=opt, backend=backend: run_step(backend, opt, lambda: forward_loss(model, ids)), resident=[model])
    peaks["backprop_adamw_step"] = _backprop_peak(model, ids)
    return {
        "peak_over_forward": {name: peak.ratio_to(forward) for name, peak in peaks.items()},
        "peaks": {name: peak.to_dict() for name, peak in peaks.items()},
    }


def _backprop_peak(model: torch.nn.Module, ids: torch.Tensor) -> PeakMemory:
    """Peak of one steady-state backprop + AdamW step (optimizer state resident), on a copy."""
    trained = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)

    def step() -> float:
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # creates the AdamW state: resident from then on
    gc.collect()
    return measure_peak_memory(step, resident=[trained, opt])


# -- main ---------------------------------------------------------------------------------------------------
def environment(cfg: BenchConfig, model: torch.nn.Module) -> dict:
    """Machine and model facts stored next to the numbers."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_at_start": load,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_tensors": len(list(model.parameters())),
        "model": {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """All four measurements; returns the JSON-able result."""
    torch.set_num_threads(cfg.threads)
    model, ids = build_model(cfg)
    result = {"config": asdict(cfg), "environment": environment(cfg, model)}
    start = time.perf_counter()
    forward_loss(model, ids)  # warm-up
    result["noise"] = time_noise(model, ids, cfg, log)  # compiles the compiled backend first
    log(f"noise done ({time.perf_counter() - start:.0f} s)")
    for backend, opt in make_optimizers(model, cfg).items():  # warm every backend once (builds the native loops)
        run_step(backend, opt, lambda: forward_loss(model, ids))
    result["environment"]["native_probe"] = native_probe.unavailable_reason() or "used (C loops)"
    result["timing"] = time_interleaved(model, ids, cfg, log)
    log(f"timing done ({time.perf_counter() - start:.0f} s)")
    result["memory"] = measure_memory(model, ids, cfg)
    result["environment"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["environment"]["total_seconds"] = time.perf_counter() - start
    return result


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path]:
    """Command line -> config and output path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=BenchConfig.reps)
    parser.add_argument("--population", type=int, default=BenchConfig.population, help="N_a = N_b")
    parser.add_argument("--threads", type=int, default=BenchConfig.threads)
    parser.add_argument("--backends", default=",".join(BenchConfig.backends))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {RESULTS}; --quick: none)")
    args = parser.parse_args(argv)
    base = quick_config() if args.quick else BenchConfig()
    cfg = BenchConfig(**{**asdict(base), "reps": args.reps if not args.quick else base.reps,
                         "population": args.population, "threads": args.threads,
                         "backends": tuple(args.backends.split(",")) if not args.quick else base.backends})
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    return cfg, out


def _row(name: str, stats: dict[str, float], what: str) -> str:
    return f"| {name} | {stats['median']:.3f} | {stats['min']:.3f}-{stats['max']:.3f} | {what} |"


def table(result: dict) -> str:
    """The Markdown table of ``docs/performance.md`` (medians of per-repetition ratios)."""
    timing, noise_ = result["timing"], result["noise"]["noise_over_forward"]
    lines = ["| measurement | median | range | over |", "| --- | --- | --- | --- |"]
    for name, stats in timing["ratio_to_floor"].items():
        what = "floor: its 2(N_a+N_b) plain forwards" if name.startswith("essam") else "plain forwards it contains"
        lines.append(_row(name, stats, what))
    for name, stats in timing["ratio_in_situ"].items():
        lines.append(_row(f"{name} (in situ)", stats, "the forwards timed inside it"))
    for name, stats in noise_.items():
        lines.append(_row(f"noise {name}, whole model", stats, "one forward"))
    for name, ratio in result["memory"]["peak_over_forward"].items():
        if name != "forward":
            lines.append(f"| peak memory {name} | {ratio:.3f} | - | peak of one plain forward |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    result = run(cfg, log=lambda msg: print(msg, flush=True))
    print(table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
