"""Run outputs (metrics, summary, plot), checkpoints, and short central runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import fed_essam.checkpoint as checkpoint_module
from fed_essam.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from fed_essam.cli import compose_config
from fed_essam.metrics import MetricsWriter, plot_metrics, read_metrics, read_summary, write_summary
from fed_essam.optim import replay
from fed_essam.perturb import SeedUpdate, fingerprint
from fed_essam.training import SUMMARY_KEYS, train_central

#: A central run small enough for a unit test (a few seconds on 2 cores).
TINY_RUN = [
    "mode=central", "num_rounds=3", "batch_size=4", "eval.size=6", "eval.batch_size=6",
    "eval.max_new_tokens=12", "eval.every=2", "task.train_size=40", "checkpoint_every=2",
    "method.population=2", "method.ascent_population=2", "progress=false",
]


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def test_metrics_summary_and_plot_files(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.log(0, forward_passes=0, accuracy=0.1, eval_loss=2.0)
    writer.log(1, forward_passes=32, loss=2.5, extra_key="x", bad=float("nan"))
    writer.log(2, forward_passes=64, loss=2.4, accuracy=0.2, eval_loss=1.9, arr=torch.tensor(3.0))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["extra_key"] == "x" and records[1]["bad"] is None and records[2]["arr"] == 3.0
    assert all("wall_seconds" in r and "forward_passes" in r for r in records)
    assert records[1]["wall_seconds"] <= records[2]["wall_seconds"]

    write_summary(tmp_path, {"accuracy_after": 0.2, "loss": math.inf, "nested": {"a": (1, 2)}})
    assert read_summary(tmp_path) == {"accuracy_after": 0.2, "loss": None, "nested": {"a": [1, 2]}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    png = plot_metrics(tmp_path, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_summary(tmp_path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_summary(tmp_path, {"v": 2})
    monkeypatch.undo()
    assert read_summary(tmp_path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    model[1].bias.requires_grad_(False)  # frozen tensors are not saved
    return model


def test_checkpoint_roundtrip_is_bit_exact(tmp_path: Path) -> None:
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(1 + 1e-7).add_(1e-30)  # values with full mantissas and a denormal
    log = [SeedUpdate((1, 2), (0.5, -0.25)), SeedUpdate((3,), (1e-8,), "rademacher")]
    path = save_checkpoint(tmp_path, model, 7, log, extra={"forward_passes": 42})
    assert path == tmp_path / "checkpoints" / "step-000007"
    assert latest_checkpoint(tmp_path) == path

    fresh = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    fresh[1].bias.requires_grad_(False)
    loaded = load_checkpoint(tmp_path, into=fresh)
    assert loaded.step == 7 and loaded.update_log == log and loaded.extra == {"forward_passes": 42}
    for name in ("0.weight", "0.bias", "1.weight"):
        a, b = dict(model.named_parameters())[name], dict(fresh.named_parameters())[name]
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    assert "1.bias" not in loaded.tensors
    assert loaded.fingerprint == fingerprint([p for p in model.parameters() if p.requires_grad])


def test_checkpoint_from_tensor_list_and_update_log_replay(tmp_path: Path) -> None:
    base = [torch.zeros(4, 3), torch.ones(5)]
    params = [t.clone() for t in base]
    log = [SeedUpdate((11, 12), (0.1, -0.2)), SeedUpdate((13,), (0.3,))]
    replay(params, log)
    save_checkpoint(tmp_path, params, 2, log)
    loaded = load_checkpoint(tmp_path)
    replica = [t.clone() for t in base]
    replay(replica, loaded.update_log)  # a party with the base model catches up without weights
    assert fingerprint(replica) == fingerprint(list(loaded.tensors.values())) == loaded.fingerprint


def test_failed_checkpoint_write_leaves_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    first = save_checkpoint(tmp_path, model, 1, [])

    def crash(*args, **kwargs):
        raise OSError("crash while writing")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, 2, [])
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no partial folder
    save_checkpoint(tmp_path, model, 1, [SeedUpdate((5,), (1.0,))])  # overwriting a step replaces it
    assert load_checkpoint(first).update_log == [SeedUpdate((5,), (1.0,))]
    assert list_checkpoints(tmp_path) == [first]


def test_load_checkpoint_rejects_other_shapes(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _model(), 1, [])
    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 3))
    other[1].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="0.weight"):
        load_checkpoint(tmp_path, into=other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")


# --------------------------------------------------------------------------- #
# central runs
# --------------------------------------------------------------------------- #
def test_tiny_central_run_writes_its_files(tmp_path: Path) -> None:
    summary = train_central(compose_config(TINY_RUN), tmp_path)
    assert set(SUMMARY_KEYS) <= set(summary)
    on_disk = read_summary(tmp_path)
    assert set(SUMMARY_KEYS) <= set(on_disk)
    assert on_disk["num_rounds"] == 3 and on_disk["method"] == "essam" and on_disk["seed"] == 0
    assert on_disk["forward_passes"] == 3 * 2 * (2 + 2)
    assert on_disk["peak_memory_bytes"] > 0
    assert 0.0 <= on_disk["accuracy_after"] <= 1.0 and math.isfinite(on_disk["loss_after"])

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["forward_passes"] for r in records] == [0, 8, 16, 24]
    assert [("accuracy" in r) for r in records] == [True, False, True, True]
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert len(load_checkpoint(tmp_path).update_log) == 3


def test_resume_continues_bit_exactly(tmp_path: Path) -> None:
    quick = [*TINY_RUN, "eval.every=0", "eval.size=2", "eval.max_new_tokens=4"]
    straight = tmp_path / "straight"
    train_central(compose_config(quick), straight)
    first = tmp_path / "first"
    train_central(compose_config([*quick, "num_rounds=2"]), first)
    resumed = tmp_path / "resumed"
    summary = train_central(compose_config([*quick, f"resume={first}"]), resumed)
    assert summary["steps_run"] == 1 and summary["forward_passes"] == 24
    assert load_checkpoint(resumed).fingerprint == load_checkpoint(straight).fingerprint
    assert load_checkpoint(resumed).update_log == load_checkpoint(straight).update_log


@pytest.mark.parametrize("method", ["es", "mezo", "essam_f", "backprop"])
def test_other_methods_run(tmp_path: Path, method: str) -> None:
    overrides = [*TINY_RUN, f"method={method}", "num_rounds=2", "eval.every=0", "eval.size=4"]
    if method in ("mezo", "backprop"):
        overrides = [o for o in overrides if not o.startswith("method.")]
    if method == "es":
        overrides.append("eval.sharpness_directions=2")
    summary = train_central(compose_config(overrides), tmp_path)
    assert summary["method"] == method and summary["num_rounds"] == 2
    expected = {"es": 2 * 2 * 2, "mezo": 2 * 2, "essam_f": 2 * 2 * (2 + 2), "backprop": 2}[method]
    assert summary["forward_passes"] == expected
    assert summary["backward_passes"] == (2 if method == "backprop" else 0)
    if method == "es":
        assert math.isfinite(summary["sharpness_before"]) and math.isfinite(summary["sharpness_after"])
    else:
        assert summary["sharpness_before"] is None


@pytest.mark.slow  # two fresh processes and an in-process reference: ~40 s of CPU
def test_central_run_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from fed_essam.checkpoint import PARAMS_FILE

    rounds = 8
    overrides = [*TINY_RUN, f"num_rounds={rounds}", "checkpoint_every=1", "eval.every=0", "eval.size=2",
                 "eval.max_new_tokens=4"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "fed_essam", *overrides, f"hydra.run.dir={killed}"],
                               cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "step-000001").is_dir():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    done = load_checkpoint(killed).step
    assert 1 <= done < rounds, f"the run got to step {done} before the kill"
    result = subprocess.run([sys.executable, "-m", "fed_essam", *overrides, f"resume={killed}",
                             f"hydra.run.dir={killed}"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = tmp_path / "straight"
    train_central(compose_config(overrides), straight)
    a, b = latest_checkpoint(killed), latest_checkpoint(straight)
    assert a.name == b.name == f"step-{rounds:06d}"
    assert (a / PARAMS_FILE).read_bytes() == (b / PARAMS_FILE).read_bytes()
    assert load_checkpoint(a).update_log == load_checkpoint(b).update_log
