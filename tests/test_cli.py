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


# --------------------------------------------------------------------------- bad input, through main()
def _problems(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"question": f"{i} + 1 = ?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
                   for i in range(start, start + n))


BAD_INPUT = [
    (["method.sigma=-0.5"], "method.sigma"),
    (["method.lr=-1e-3"], "method.lr"),
    (["method.population=0"], "method.population"),
    (["method=nope"], "method/nope"),
    (["task=nope"], "task/nope"),
    (["federation.fraction=0"], "federation.fraction"),
    (["federation.fraction=1.5"], "federation.fraction"),
    (["federation.num_clients=5", "task.train_size=4"], "federation.num_clients"),
    (["model.name=/no/such/model"], "model.name"),
    (["task=jsonl", "task.path={tmp}/a-folder.jsonl"], "task.path"),  # exists but cannot be read as a file
    (["task=jsonl", "task.path={tmp}/latin1.jsonl"], "latin1.jsonl:1"),  # not UTF-8
    (["task=jsonl", "task.path={tmp}/bad.jsonl"], "bad.jsonl:2"),
    (["task=jsonl", "task.path={tmp}/three.jsonl", "task.eval_path={tmp}/eval.jsonl",
      "eval.size=2", "federation.num_clients=4", "federation.min_clients=1"], "federation.num_clients=4"),  # an empty client
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_exits_nonzero_with_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture, overrides: list[str],
                                                          needle: str) -> None:
    from fed_essam import cli

    (tmp_path / "a-folder.jsonl").mkdir()
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\u00e9?", "answer": "#### 1"}\n'.encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD_FILE_LINES) + "\n")
    (tmp_path / "three.jsonl").write_text(_problems(3))
    (tmp_path / "eval.jsonl").write_text(_problems(2, start=10))
    args = [o.format(tmp=tmp_path) for o in overrides]
    # hydra/*_logging=none: in-process, Hydra's logging.config.dictConfig would close the stream pytest's
    # capture manager holds (the session then dies with "I/O operation on closed file"); a real process is unaffected
    monkeypatch.setattr(sys, "argv", ["fed-essam", *args, "federation.backend=local", "progress=false",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capfd.readouterr()
    assert info.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fed-essam: error: ") and needle in lines[0], err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_bad_input_through_the_real_command() -> None:
    for args, needle in ((["method=nope"], "method/nope"), (["model.name=./no/such/model"], "model.name")):
        result = fed_essam(*args, "hydra.run.dir=/tmp/fed-essam-bad-input", timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
        assert "Traceback" not in result.stderr + result.stdout
