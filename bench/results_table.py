"""Reproduce the method comparison of ``docs/results.md`` with one command.

::

    python bench/results_table.py                 # 5 methods x 3 seeds, then writes docs/results.md
    python bench/results_table.py --jobs 2 --budget 768 --seeds 0 1 2 -- task.kwargs.min_terms=3

Every method gets the same budget of forward passes on the same task and the
same held-out set; ``num_rounds`` is the budget divided by the cost of one step:

* ESSAM / ESSAM-F: ``2 (N_a + N_b)`` forward passes (antithetic probes),
* ES: ``2 N_b``, MeZO: ``2``,
* backprop (AdamW, the first-order reference): one forward and one backward,
  counted as 3 forward passes of compute.

Each run is its own ``python -m fed_essam mode=central ...`` process (so its
peak memory is its own) writing ``<runs-dir>/<method>-seed<k>/summary.json``;
finished runs are reused unless ``--force``. The table reports the mean and the
standard deviation over seeds of the held-out exact-match accuracy before and
after, the held-out loss after, the sharpness after (mean loss increase under
filter-normalized random perturbations, :func:`fed_essam.evaluation.sharpness`)
and the peak memory of one training step (:mod:`fed_essam.memory`).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fed_essam.cli import compose_config  # noqa: E402
from fed_essam.config import validate_config  # noqa: E402

METHODS: tuple[str, ...] = ("essam", "essam_f", "es", "mezo", "backprop", "essam_lora")
LABELS = {"essam": "ESSAM", "essam_f": "ESSAM-F", "es": "ES", "mezo": "MeZO", "backprop": "backprop (AdamW)",
          "essam_lora": "ESSAM, LoRA r=8 (q, v)"}
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # LoRA adapters are ~2% of the weights: larger probes and steps (the full model's sigma 0.01 / lr 0.03 /
    # rho 0.02 reached held-out loss 0.835 in 768 forwards of batch 16, these 0.578; the full model 0.195)
    "essam_lora": ("essam", ("model.lora={r: 8}", "method.lr=0.1", "method.sigma=0.03", "method.rho=0.06")),
}
"""Table rows that are a method preset plus overrides: ``row -> (method, overrides)``."""


def method_and_overrides(row: str) -> tuple[str, tuple[str, ...]]:
    """The ``conf/method`` preset of a table row and the overrides that make the row."""
    return VARIANTS.get(row, (row, ()))
BACKPROP_COST = 3
"""Forward-pass equivalents of one backprop step (forward + backward ~ 2 forwards)."""

DEFAULT_BUDGET = 768
DEFAULT_OVERRIDES: tuple[str, ...] = ("checkpoint_every=0", "eval.every=0", "eval.sharpness_directions=8")


@dataclass(frozen=True)
class Run:
    """One central run of the table."""

    method: str
    seed: int
    num_rounds: int
    overrides: tuple[str, ...]
    folder: Path

    def command(self) -> list[str]:
        """The ``python -m fed_essam`` command line of the run."""
        method, extra = method_and_overrides(self.method)
        return [sys.executable, "-m", "fed_essam", "mode=central", f"method={method}", f"seed={self.seed}",
                f"num_rounds={self.num_rounds}", "progress=false", *extra, *self.overrides,
                f"hydra.run.dir={self.folder}"]


def step_cost(method: str, overrides: Sequence[str]) -> int:
    """Forward passes (or equivalents) of one step of ``method`` under ``overrides``."""
    method, extra = method_and_overrides(method)
    cfg = validate_config(compose_config(["mode=central", f"method={method}", *extra, *overrides]))
    m = cfg.method
    if m.name == "backprop":
        return BACKPROP_COST
    per_probe = 2 if m.antithetic else 1
    extra = 0 if m.antithetic else 1
    ascent = m.ascent_population if m.name in ("essam", "essam_f") and m.rho > 0 else 0
    phases = (1 if ascent else 0) + 1
    return per_probe * (ascent + m.population) + extra * phases


def plan(methods: Sequence[str], seeds: Sequence[int], budget: int, overrides: Sequence[str],
         runs_dir: Path) -> list[Run]:
    """The runs of the table: same budget, ``num_rounds = budget // step_cost``."""
    runs = []
    for method in methods:
        rounds = max(budget // step_cost(method, overrides), 1)
        for seed in seeds:
            runs.append(Run(method, seed, rounds, tuple(overrides), runs_dir / f"{method}-seed{seed}"))
    return runs


def execute(run: Run, force: bool) -> dict:
    """Run (or reuse) one central run; returns its summary with ``cpu_seconds`` added."""
    summary_path = run.folder / "summary.json"
    if summary_path.is_file() and not force:
        return json.loads(summary_path.read_text())
    run.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run.folder / "stdout.log").open("w") as out:
        proc = subprocess.run(["/usr/bin/time", "-f", "cpu_seconds %U %S", *run.command()] if Path("/usr/bin/time").exists()
                              else run.command(), cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(run.command())} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    summary["process_wall_seconds"] = time.perf_counter() - start
    cpu = [line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("cpu_seconds")]
    if cpu:
        summary["cpu_seconds"] = float(cpu[-1][0]) + float(cpu[-1][1])
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"{run.method:9s} seed {run.seed}: accuracy {summary['accuracy_before']:.3f} -> "
          f"{summary['accuracy_after']:.3f}, loss {summary['loss_after']:.4f}", flush=True)
    return summary


def _stat(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale`` (std over seeds; just the mean for one value)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: Sequence[Run], summaries: Sequence[dict]) -> str:
    """The markdown table, one row per method."""
    header = ("| method | trainable parameters | steps | forward passes | accuracy before (%) | accuracy after (%) | gain (points) "
              "| held-out loss after | sharpness after | peak memory of a step (MiB) | wall / run (s) |")
    lines = [header, "|" + "|".join(["---"] * 11) + "|"]
    by_method: dict[str, list[tuple[Run, dict]]] = {}
    for run, summary in zip(runs, summaries, strict=True):
        by_method.setdefault(run.method, []).append((run, summary))
    for method, pairs in by_method.items():
        s = [p[1] for p in pairs]
        passes_text = str(s[0]["forward_passes"])
        if method == "backprop":
            passes_text += f" + {s[0]['backward_passes']} backward"
        lines.append(
            f"| {LABELS.get(method, method)} | {s[0].get('trainable_parameters', 'n/a'):,} "
            f"| {pairs[0][0].num_rounds} | {passes_text} "
            f"| {_stat([x['accuracy_before'] for x in s], 100)} | {_stat([x['accuracy_after'] for x in s], 100)} "
            f"| {_stat([x['accuracy_after'] - x['accuracy_before'] for x in s], 100)} "
            f"| {_stat([x['loss_after'] for x in s], digits=3)} "
            f"| {_stat([x.get('sharpness_after') for x in s], digits=4)} "
            f"| {_stat([x['peak_memory_bytes'] for x in s], 1 / 2**20, digits=2)} "
            f"| {_stat([x['wall_seconds'] for x in s], digits=0)} |"
        )
    return "\n".join(lines)


def per_seed(runs: Sequence[Run], summaries: Sequence[dict]) -> str:
    """A compact per-seed listing (accuracy before -> after, loss after)."""
    lines = ["| method | seed | accuracy before -> after (%) | held-out loss before -> after |", "|---|---|---|---|"]
    for run, s in zip(runs, summaries, strict=True):
        lines.append(f"| {LABELS.get(run.method, run.method)} | {run.seed} | {100 * s['accuracy_before']:.1f} -> "
                     f"{100 * s['accuracy_after']:.1f} | {s['loss_before']:.3f} -> {s['loss_after']:.3f} |")
    return "\n".join(lines)


def write_page(path: Path, command: str, runs: Sequence[Run], summaries: Sequence[dict], budget: int,
               overrides: Sequence[str], total_seconds: float) -> None:
    """Write the results page (the text around the tables is in :data:`PAGE`)."""
    cfg = validate_config(compose_config(["mode=central", *overrides]))
    s0 = summaries[0]
    text = PAGE.format(
        command=command, budget=budget, task=cfg.task.source, kwargs=dict(cfg.task.kwargs),
        train=s0["train_problems"], held=s0["held_out_problems"], batch=cfg.batch_size,
        model=cfg.model.name, params=s0["trainable_parameters"], radius=cfg.eval.sharpness_radius,
        directions=cfg.eval.sharpness_directions, seeds=len({r.seed for r in runs}),
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads={cfg.threads}",
        minutes=sum(x['wall_seconds'] for x in summaries) / 60, table=table(runs, summaries), per_seed=per_seed(runs, summaries),
        methods="\n".join(f"- {LABELS[m]}: `{json.dumps(next(s['method_config'] for r, s in zip(runs, summaries) if r.method == m))}`"
                          + (f" with `{' '.join(method_and_overrides(m)[1])}`" if m in VARIANTS else "")
                          for m in dict.fromkeys(r.method for r in runs)),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


PAGE = """# Results: forward-only fine-tuning of the embedded tiny model

Produced by one command (from the repository root):

```
{command}
```

## Setting
- Model: `{model}` ({params:,} parameters; full fine-tuning except the LoRA row, whose adapters are the only
  trainable, and perturbed, parameters), float32, CPU.
- Task: reasoning-gym `{task}` {kwargs}; {train} training problems, {held} held-out problems
  (a different split, no problem in common with the training pool). Batch: {batch} problems per step.
- Budget: {budget} forward passes per run for every method (backprop: one forward + one backward per
  step, counted as 3 forward passes). {seeds} seeds per method (the seed draws the probes and orders the batches;
  the problems and the held-out set are the same for every seed).
- Accuracy: greedy exact match on the held-out set. Loss: token-mean cross-entropy of the reference solution.
- Sharpness: mean increase of the held-out loss under {directions} random filter-normalized perturbations of
  relative radius {radius} (`fed_essam.evaluation.sharpness`); lower is flatter.
- Peak memory: one training step measured with `fed_essam.memory.measure_peak_memory` (the model's tensors plus
  the step's peak allocations; on CPU through the allocator's counter, not the process RSS).
- Machine: {machine}. The runs took {minutes:.0f} minutes in all (sum of their wall times; `--jobs` runs them side by side). Each run is small enough to finish
  in a few minutes on this 2-core machine; wall times vary with the load of the machine.

Method settings (`conf/method/*.yaml` plus the overrides of the command):
{methods}

## Mean ± standard deviation over seeds

{table}

## Per seed

{per_seed}

## How to read it
- Every row spends the same number of forward passes; the gain is in points of exact match on the same
  100 held-out problems (one problem = one point), so differences of a few points between rows are within
  the seeds' spread. The held-out loss is the steadier signal.
- The LoRA row answers "does perturbing only the adapters learn faster per forward pass?": compare its loss
  and gain with the ESSAM row (same budget). Its forward passes cost about as much as the full model's (the
  adapters add two small matrices per attention projection); what it saves is noise generation and memory.
- Sharpness is measured at the end point of each run; it is comparable between rows only at similar loss.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="forward passes per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses `threads` CPU threads)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "bench" / "results" / "table")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    runs = plan(args.methods, args.seeds, args.budget, overrides, args.runs_dir)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        summaries = list(pool.map(functools.partial(execute, force=args.force), runs))
    command = "python bench/results_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_page(args.out, command.strip(), runs, summaries, args.budget, overrides, time.perf_counter() - start)
    (args.runs_dir / "results.json").write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    print(table(runs, summaries))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
