"""The ``fed-essam`` command as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fed_essam.cli import compose_config, one_line, run_reporting_errors
from fed_essam.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("fed-essam")
SMALL = [
    "mode=central", "num_rounds=2", "batch_size=4", "eval.size=4", "eval.batch_size=4",
    "eval.max_new_tokens=10", "eval.every=0", "task.train_size=20", "method.population=2",
    "method.ascent_population=2", "progress=false",
]


def fed_essam(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the console script (``python -m fed_essam`` when it is not installed)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fed_essam"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_central_run_exits_zero_and_writes_files(tmp_path: Path) -> None:
    result = fed_essam(*SMALL, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("metrics.jsonl", "summary.json", "metrics.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_rounds"] == 2 and summary["method"] == "essam"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = fed_essam("mode=central", "method.sigma=-1", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fed-essam: error: method.sigma")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "summary.json").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = fed_essam("mode=central", "method.lr=-1", "debug=true", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


BAD_FILE_LINES = ['{"question": "1 + 1?", "answer": "2 #### 2"}', "{not json"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [(["federation.fraction=2"], "federation.fraction"),
     (["model.name=/no/such/model"], "/no/such/model"),
     (["task=jsonl", "task.path={bad}"], "bad.jsonl:2"),
     (["resume={empty}"], "no checkpoint")],
)
def test_user_errors_are_reported_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              overrides: list[str], needle: str) -> None:
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD_FILE_LINES) + "\n")
    (tmp_path / "empty").mkdir()
    filled = [o.format(bad=tmp_path / "bad.jsonl", empty=tmp_path / "empty") for o in overrides]
    status = run_reporting_errors(compose_config([*SMALL, *filled]), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("fed-essam: error: ") and needle in err[-1], err


def test_one_line_joins_lines() -> None:
    assert one_line(ConfigError("a\n  b\n")) == "a b"
    assert one_line(ValueError()) == "ValueError"
