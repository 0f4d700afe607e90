"""Flower's Deployment Engine for real: a SuperLink and two SuperNodes as separate processes on loopback.

Each SuperNode has its own private GSM8K-format file (``data-path`` in its node
config; generated sums, not GSM8K). The app runs 2 rounds through ``flwr run``;
the test then asks the SuperLink with ``flwr list --format json`` whether the run
finished as ``finished:completed`` (``flwr run`` only submits the run and exits 0
whatever happens to it), reads the run's ``summary.json`` (Flower reports
"completed" even when every round was skipped because all clients failed) and
finds in each SuperNode's log that it read its own file and not the other's.

Every process started here is stopped by its pid in the fixture's teardown,
with every descendant Flower spawned (SuperExec, ``flwr-serverapp``,
``flwr-clientapp``; some run in their own session), and the test checks none is
left. ``FLWR_HOME`` and ``HOME`` point into ``tmp_path``: nothing touches the
user's Flower configuration. The commands are those of ``docs/deployment.md``.

Slow (each message starts a fresh ``flwr-clientapp`` process that loads torch and
the model): 408 s measured on 2 cores shared with other jobs (load average 8);
``make test-slow`` runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_site_data import write_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flower-supernode, flwr, flower-superexec
FEDERATION = "loopback"
ROUNDS = 2
OVERRIDES = (f"num_rounds={ROUNDS} eval.every=0 eval.size=4 eval.max_new_tokens=8 task.train_size=16 batch_size=2 "
             "method.population=2 method.ascent_population=2 federation.num_clients=2 federation.min_clients=2 "
             "federation.partition=iid federation.reply_timeout=300 task.on_error=skip checkpoint_every=0 "
             "progress=false")
RUN_TIMEOUT = 1200.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """Long-running processes started by the test, each in its own session, stopped by pid."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.started: list[tuple[subprocess.Popen, Path]] = []
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.cwd / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                    start_new_session=True)
        self.started.append((proc, log))
        self.track()
        return proc, log

    def track(self) -> None:
        """Remember every live descendant (SuperExec and app processes may start their own sessions)."""
        for proc, _ in self.started:
            try:
                parent = psutil.Process(proc.pid)
                for p in [parent, *parent.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> list[str]:
        """SIGTERM each process group and every tracked descendant, SIGKILL what is left; the survivors."""
        self.track()
        for proc, _ in reversed(self.started):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.alive():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(self.alive(), timeout=15)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for proc, _ in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        psutil.wait_procs(self.alive(), timeout=10)
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in self.alive()]


def flwr(env: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One ``flwr`` CLI command (isolated FLWR_HOME in ``env``)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def json_out(result: subprocess.CompletedProcess) -> dict:
    """The JSON document a ``--format json`` command printed (after any banner lines)."""
    text = result.stdout
    start = text.find("{")
    assert start >= 0, f"no JSON in the output of {result.args}:\n{result.stdout}\n{result.stderr}"
    return json.loads(text[start:])


@pytest.fixture
def deployment(tmp_path):
    """Environment, a process registry, and teardown that leaves no process behind."""
    home, flwr_home = tmp_path / "home", tmp_path / "flwr-home"
    home.mkdir()
    flwr_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTEST_"))}
    env.update({
        "HOME": str(home), "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(BIN.parent), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    })
    procs = Processes(env, tmp_path)
    try:
        yield env, procs
    finally:
        survivors = procs.stop()
        assert not survivors, f"processes left running: {survivors}"


def test_superlink_and_two_supernodes_run_the_app_for_two_rounds(tmp_path, deployment):
    env, procs = deployment
    link_port, node_ports = free_port(), [free_port(), free_port()]
    sites = [write_site(tmp_path / f"site{k}.jsonl", 10, offset=100 * k) for k in range(2)]
    for site in sites:  # one bad line per file: the node's skip warning names the file it read
        site.write_text(site.read_text() + "this line is not JSON\n")

    # Coordinator: the SuperLink (Fleet, Control and Runtime APIs on one HTTP port).
    link, link_log = procs.start("superlink", [
        str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
        "--disable-runtime-dependency-installation"])
    wait_for(lambda: _connects(link_port) or _exited(link, link_log), 120, "the SuperLink to listen")
    # Sites: one SuperNode each, with its own data file.
    nodes = []
    for k, (port, site) in enumerate(zip(node_ports, sites)):
        node_config = f"partition-id={k} num-partitions=2 data-path='{site}'"
        nodes.append(procs.start(f"supernode{k}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
            "--port", str(port), "--node-config", node_config]))
    wait_for(lambda: _exited(link, link_log) or _exited(*nodes[0]) or _exited(*nodes[1])
             or link_log.read_text(errors="replace").count("Activated node_id") >= 2, 180,
             "both SuperNodes to connect")
    procs.track()

    # The federation entry for `flwr run` / `flwr list` (Flower configuration in $FLWR_HOME/config.toml).
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n', encoding="utf-8")

    run_dir = tmp_path / "run"
    started = time.monotonic()
    submitted = flwr(env, tmp_path, "run", str(REPO), FEDERATION,
                     "--run-config", f"overrides={json.dumps(OVERRIDES)}",
                     "--run-config", f"run-dir={json.dumps(str(run_dir))}", "--format", "json")
    assert submitted.returncode == 0, f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}"
    answer = json_out(submitted)
    assert answer["success"], answer
    run_id = answer["run-id"]
    procs.track()

    def finished():
        procs.track()
        for proc, log in [(link, link_log), *nodes]:
            _exited(proc, log)
        listed = flwr(env, tmp_path, "list", FEDERATION, "--run-id", run_id, "--format", "json", timeout=120)
        if listed.returncode != 0:
            return None
        runs = json_out(listed).get("runs", [])
        return runs[0] if runs and runs[0]["status"].startswith("finished") else None

    run = wait_for(finished, RUN_TIMEOUT, f"run {run_id} to finish", interval=15)  # each `flwr list` costs CPU
    elapsed = time.monotonic() - started
    logs = {name: log.read_text(errors="replace") for name, log in
            [("superlink", link_log), ("supernode0", nodes[0][1]), ("supernode1", nodes[1][1])]}
    context = "\n".join(f"--- {name} (last 3000 chars)\n{text[-3000:]}" for name, text in logs.items())
    assert run["status"] == "finished:completed", f"run {run_id}: {run}\n{context}"

    # Flower says completed even if every round was skipped: the run's own summary says what happened.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_rounds"] == ROUNDS, context
    assert summary["skipped_rounds"] == 0 and summary["failed_replies"] == 0, (summary, context)
    assert summary["fingerprint_mismatches"] == 0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [s["step"] for s in steps] == list(range(ROUNDS + 1))
    assert all(s["descent_replies"] == 2 for s in steps[1:]), steps
    # Each SuperNode read its own file, never the other site's.
    for k in range(2):
        own, other = str(sites[k]), str(sites[1 - k])
        assert f"{own}: skipped 1 invalid line" in logs[f"supernode{k}"], logs[f"supernode{k}"][-3000:]
        assert other not in logs[f"supernode{k}"]
    print(f"\nrun {run_id}: {run['status']} in {elapsed:.0f} s after submission "
          f"(Flower's elapsed {run['elapsed']:.0f} s)")


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _exited(proc: subprocess.Popen, log: Path) -> bool:
    """False while ``proc`` runs; fails the test with its log if it has exited."""
    if proc.poll() is None:
        return False
    raise AssertionError(f"{shlex.join(proc.args)} exited with {proc.returncode}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
