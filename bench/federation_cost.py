"""What the federation itself costs: wall time against a central run with the same forward passes, and bytes.

::

    python bench/federation_cost.py                       # = make bench-federation
    python bench/federation_cost.py --clients 4 --rounds 3 --batch 16

Three runs of the embedded default (tiny model, ``conf/`` defaults otherwise), one
after the other, each its own ``python -m fed_essam`` process:

* ``central``: ``mode=central`` with ``num_rounds = clients x rounds``: one process,
  one thread, the same number of forward passes of the same batch size as the
  federation (each federated round makes ``clients x 2 (N_a + N_b)`` forwards);
* ``federated-serial``: Flower's ``run_simulation`` (Ray) with ``clients`` clients and
  Ray limited to one CPU, so clients take turns: the same compute as ``central``
  serialized, and the ratio is the federation's own cost (messages, Ray, replicas
  applying updates, the server's replica);
* ``federated``: the same with Ray's default CPUs (clients probe in parallel).

The training wall time of a run is read from its ``metrics.jsonl``: the
``wall_seconds`` of the last step minus that of step 0 (so model loading and the
evaluation before training are excluded; the first federated round includes the
clients' start-up, which is part of the federation's cost). The process wall time
is reported too. Bytes are the federated run's own measurements
(``summary.json``). Writes ``bench/results/federation_cost.json``.
Timings on a shared machine drift: run it on a quiet one and read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "federation_cost.json"


def run(name: str, overrides: list[str], out: Path) -> dict:
    """Run ``python -m fed_essam`` with ``overrides`` in ``out/name``; return timings and its summary."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "fed_essam", *overrides, "progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "wall_seconds" in line]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "overrides": overrides,
        "process_seconds": round(process_seconds, 2),
        "train_seconds": round(steps[-1]["wall_seconds"] - steps[0]["wall_seconds"], 2),
        "forward_passes": summary["forward_passes"],
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="problems per probe batch (per client)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fed-essam-bench-federation"))
    parser.add_argument("extra", nargs="*", help="further Hydra overrides for every run")
    args = parser.parse_args(argv)

    common = [f"batch_size={args.batch}", "eval.every=0", "eval.size=20", "checkpoint_every=0", *args.extra]
    federated = ["mode=federated", f"num_rounds={args.rounds}", f"federation.num_clients={args.clients}",
                 "federation.partition=iid", "federation.backend=ray", *common]
    runs = {
        "central": run("central", ["mode=central", f"num_rounds={args.clients * args.rounds}", *common], args.out),
        "federated-serial": run("federated-serial", [*federated, "+federation.ray_init_args.num_cpus=1"], args.out),
        "federated": run("federated", federated, args.out),
    }
    if len({r["forward_passes"] for r in runs.values()}) != 1:
        raise SystemExit(f"forward passes differ: { {k: r['forward_passes'] for k, r in runs.items()} }")
    central = runs["central"]
    fed = runs["federated"]["summary"]
    result = {
        "command": "python bench/federation_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "clients": args.clients, "rounds": args.rounds, "batch": args.batch,
        "forward_passes": central["forward_passes"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "runs": {k: {key: v for key, v in r.items() if key != "summary"} for k, r in runs.items()},
        "ratios": {
            f"{name}_over_central_train": round(runs[name]["train_seconds"] / central["train_seconds"], 3)
            for name in ("federated-serial", "federated")
        } | {
            f"{name}_over_central_process": round(runs[name]["process_seconds"] / central["process_seconds"], 3)
            for name in ("federated-serial", "federated")
        },
        "bytes": {key: fed[key] for key in sorted(fed) if "bytes" in key},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    print(json.dumps(result["bytes"], indent=2))
    print(f"[bench] wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
