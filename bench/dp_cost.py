"""The accuracy cost of differential privacy: federated runs without DP and with DP at two noise levels.

::

    python bench/dp_cost.py                      # = the table of docs/privacy.md, section 5
    python bench/dp_cost.py --mode central --noise 0.5 1.0 -- num_rounds=20

Every run is the embedded default federation (tiny model, ``conf/`` defaults) on the
in-process grid (``federation.backend=local``: deterministic, no Ray), the same seed,
data, partitions and probes; only ``privacy`` differs. Each client's vector of loss
differences is clipped to L2 norm ``privacy.clip`` and Gaussian noise of standard
deviation ``z C`` is added (``--mode local``: by the client; ``central``: by the
server, to the mean, ``z C / n``). Epsilon at ``privacy.delta`` comes from the run's
``summary.json`` (the dp-accounting RDP accountant, :mod:`fed_essam.privacy`).
Runs execute ``--jobs`` at a time and finished ones are reused (``--force`` reruns).
Writes ``bench/results/dp_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dp_cost.json"


def run(name: str, overrides: list[str], out: Path, force: bool) -> dict:
    """``python -m fed_essam`` with ``overrides`` in ``out/name`` (reused when it finished before)."""
    run_dir = out / name
    if force or not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "fed_essam", *overrides, "progress=false", f"hydra.run.dir={run_dir}"]
        print(f"[dp] {name}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[dp] {name}: accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}, "
          f"loss {summary['loss_before']:.4f} -> {summary['loss_after']:.4f}", flush=True)
    return {"overrides": overrides, "summary": summary}


def row(name: str, mode: str, clip: float | None, z: float | None, summary: dict) -> str:
    """One markdown row of the table."""
    eps = summary.get("dp_epsilon")
    cells = [mode, "" if clip is None else f"{clip:g}", "" if z is None else f"{z:g}",
             "" if eps is None else f"{eps:.1f}", f"{100 * summary['accuracy_before']:.1f}",
             f"{100 * summary['accuracy_after']:.1f}", f"{summary['loss_before']:.3f}",
             f"{summary['loss_after']:.3f}", str(summary["num_rounds"])]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("local", "central"), default="local")
    parser.add_argument("--noise", nargs="+", type=float, default=[0.3, 1.0], help="noise multipliers z")
    parser.add_argument("--clip", type=float, default=None, help="L2 clip C (default: conf/privacy/dp.yaml)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fed-essam-bench-dp"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("extra", nargs="*", help="further Hydra overrides for every run")
    args = parser.parse_args(argv)

    common = ["mode=federated", "federation.backend=local", *args.extra]
    clip = [] if args.clip is None else [f"privacy.clip={args.clip}"]
    plans = {"none": [*common, "privacy=none"]}
    for z in args.noise:
        plans[f"{args.mode}-z{z:g}"] = [*common, "privacy=dp", f"privacy.mode={args.mode}",
                                        f"privacy.noise_multiplier={z}", *clip]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = {name: pool.submit(run, name, overrides, args.out, args.force) for name, overrides in plans.items()}
        results = {name: future.result() for name, future in futures.items()}

    lines = ["| DP | clip C | z | epsilon (delta 1e-5) | accuracy before (%) | accuracy after (%) "
             "| loss before | loss after | rounds |", "|" + "---|" * 9]
    for name, result in results.items():
        s = result["summary"]
        lines.append(row(name, s.get("dp_mode", "none"), s.get("dp_clip"), s.get("dp_noise_multiplier"), s))
    table = "\n".join(lines)
    command = "python bench/dp_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": command.strip(), "table": table,
                                   "runs": {k: v["summary"] for k, v in results.items()}}, indent=2) + "\n")
    print(table)
    print(f"[dp] wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
