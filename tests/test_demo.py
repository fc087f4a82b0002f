"""The demo (``tq-mooncake demo``, what ``make demo`` runs after set-up) for two batches: it starts, the dashboard
answers, telemetry appears, the summary counts operations, retries, exhausted operations and a storage-node
kill, and no process it started is left afterwards. A stop signal (SIGTERM, SIGINT, SIGHUP) ends the demo and
every process it started within 10 s whatever state the master is in, also while processes are being started or
replaced, and ``make demo`` under ``timeout`` leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tq_mooncake.cluster import free_port, http_ok, wait_until
from tq_mooncake.dashboard.store_health import StoreSample, parse_master_metrics

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("tq-mooncake")
STOP_BOUND_S = 10.0
# Small and quick: no kills unless asked, tiny batches and segments.
QUICK = ["--batch-samples", "4", "--seq-len", "8", "--segment", "32MB", "--kill-every", "0", "--progress-every", "60"]


def dashboard_up(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/_stcore/health")


def test_the_demo_runs_the_product_and_leaves_nothing_behind(tmp_path):
    port = free_port()
    folder = tmp_path / "telemetry"
    # Two batches: the keys are fixed and the failing ones picked by a seeded hash, so both batches hold a key
    # whose retries run out (the default 4 attempts), and a storage node is killed after the first.
    args = ["--batches", "2", "--kill-every", "0.1", "--exhaust-rate", "0.001"]
    args += ["--dashboard-port", str(port), "--telemetry-dir", str(folder)]
    proc = subprocess.Popen(
        [str(CLI), "demo", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(
            lambda: any(line.startswith("dashboard ") for line in lines) or proc.poll() is not None,
            120,
            "the demo to start its dashboard",
        )
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert dashboard_up(port)
        polled = master_metrics_of_dashboard(proc.pid)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]
    started = [int(pid) for pid in re.findall(r"\bpid (\d+)", output)]
    assert len(started) >= 4  # master, two storage processes, dashboard (and the replacements)
    (summary_line,) = [line for line in lines if line.startswith("summary ")]
    summary = json.loads(summary_line.removeprefix("summary "))
    assert summary["operations"] > 0 and summary["operations"] == summary["batches"] * 3
    assert summary["retries"] > 0 and summary["success_after_retry"] > 0
    assert summary["exhausted"] >= 1 and summary["calls_raised"].get("RetriesExhaustedError") == summary["exhausted"]
    assert summary["storage_node_kills"] >= 1
    assert summary["wrong_values"] == 0 and summary["values_checked"] > 0
    left = [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"processes the demo started are still running: {left}"
    assert not dashboard_up(port)
    assert list(folder.glob("traces-*.jsonl"))[0].stat().st_size > 0
    assert list(folder.glob("metrics-*.jsonl"))[0].stat().st_size > 0
    assert polled.segments >= 1 and polled.clients >= 1  # the dashboard's store health polls the demo's master


def master_metrics_of_dashboard(demo_pid: int) -> StoreSample:
    """What the demo's dashboard polls for store health: its ``--master-metrics`` must be the endpoint of the demo's
    master (``--metrics_port``), and serve a master's metrics."""
    commands = []
    for child in psutil.Process(demo_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a storage process the demo is replacing
            commands.append(child.cmdline())
    (dashboard,) = [cmd for cmd in commands if "streamlit" in cmd]
    (master,) = [cmd for cmd in commands if cmd and cmd[0].endswith("mooncake_master")]
    url = dashboard[dashboard.index("--master-metrics") + 1]
    (port,) = [a.split("=", 1)[1] for a in master if a.startswith("--metrics_port=")]
    assert url == f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return parse_master_metrics(resp.read().decode(), time.time())


class DemoRun:
    """A demo command started in its own session. A thread records every process descended from it (pid and
    create time, whatever session it is in) until it exits, so that processes orphaned later are still known."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, command line)
        self._lock = threading.Lock()
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]
        threading.Thread(target=self._record, daemon=True).start()

    def _record(self) -> None:
        while True:
            self.collect()
            if self.proc.poll() is not None:
                return
            time.sleep(0.02)

    def collect(self) -> None:
        """Add the processes now descended from the command; a known one's command line is read again (a child
        is first seen as the launcher it execs from)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    found = (proc.create_time(), " ".join(proc.cmdline()))
                    with self._lock:
                        if self.seen.get(proc.pid, found)[0] == found[0]:
                            self.seen[proc.pid] = found

    def running(self, pattern: str = "") -> list[int]:
        """The recorded processes still running (a zombie is dead; a reused pid is another process)."""
        with self._lock:
            seen = dict(self.seen)
        left = []
        for pid, (created, cmdline) in seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE and pattern in cmdline:
                    left.append(pid)
        return left

    def recorded(self, pattern: str) -> list[int]:
        with self._lock:
            return [pid for pid, (_, cmdline) in self.seen.items() if pattern in cmdline]

    def describe(self, pids: list[int]) -> str:
        return "; ".join(f"{pid}: {self.seen[pid][1][:100]}" for pid in pids)

    def wait_for_line(self, prefix: str, timeout: float = 120) -> str:
        wait_until(
            lambda: any(line.startswith(prefix) for line in self.lines) or self.proc.poll() is not None,
            timeout,
            f"the demo to print {prefix!r}",
        )
        found = [line for line in self.lines if line.startswith(prefix)]
        assert found, f"exited with {self.proc.returncode} before {prefix!r}:\n" + "".join(self.lines)[-4000:]
        return found[0]

    def pid_of(self, prefix: str) -> int:
        return int(re.search(r"\bpid (\d+)", self.wait_for_line(prefix)).group(1))  # type: ignore[union-attr]

    def assert_all_gone_within(self, bound: float, since: float) -> None:
        """The command and every process it started end within ``bound`` seconds of ``since``."""
        try:
            wait_until(
                lambda: self.proc.poll() is not None and not self.running(),
                bound - (time.monotonic() - since),
                "the demo and every process it started to end",
            )
        except TimeoutError:
            left = self.running()
            raise AssertionError(
                f"still running {time.monotonic() - since:.1f} s after the signal: "
                f"{self.describe(left)}\n" + "".join(self.lines)[-3000:]
            ) from None

    def kill_everything(self) -> None:
        """SIGKILL every recorded process still running (the test's own clean-up, whatever happened)."""
        self.collect()
        for pid in self.running():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def demo_run(command: list[str], cwd: Path) -> Iterator[DemoRun]:
    run = DemoRun(command, cwd)
    try:
        yield run
    finally:
        run.kill_everything()


def _demo_command(tmp_path: Path, *extra: str) -> list[str]:
    return [str(CLI), "demo", "--no-dashboard", "--telemetry-dir", str(tmp_path / "telemetry"), *QUICK, *extra]


def _starting(run: DemoRun) -> None:
    """Stop it while its storage nodes are still starting."""
    wait_until(lambda: run.running("storage_node"), 120, "the demo to start its storage nodes")


def _master_killed(run: DemoRun) -> None:
    run.wait_for_line("workload ")
    master = run.pid_of("mooncake_master ")
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: master not in run.running(), 10, "the master to die")


def _master_frozen_while_a_node_is_replaced(run: DemoRun) -> None:
    """SIGSTOP the master as soon as a replacement storage node starts: that node hangs in its set-up."""
    run.wait_for_line("workload ")
    master = run.pid_of("mooncake_master ")
    first = {run.pid_of("storage node 1 "), run.pid_of("storage node 2 ")}
    wait_until(lambda: set(run.running("storage_node")) - first, 60, "a replacement storage node to start")
    os.kill(master, signal.SIGSTOP)


@pytest.mark.parametrize(
    ("prepare", "extra", "sig"),
    [
        (_starting, [], signal.SIGHUP),
        (_master_killed, [], signal.SIGINT),
        (_master_frozen_while_a_node_is_replaced, ["--kill-every", "1"], signal.SIGTERM),
    ],
    ids=["sighup-while-starting", "sigint-master-killed", "sigterm-master-frozen-node-being-replaced"],
)
def test_a_stop_signal_ends_the_demo_and_all_it_started_within_10s(tmp_path, prepare, extra, sig):
    with demo_run(_demo_command(tmp_path, *extra), tmp_path) as run:
        prepare(run)
        run.collect()
        assert run.recorded("mooncake_master") and run.recorded("storage_node"), "the tree should be recorded"
        os.kill(run.proc.pid, sig)
        sent = time.monotonic()
        run.assert_all_gone_within(STOP_BOUND_S, sent)
    output = "".join(run.lines)
    assert f"stopping ({signal.Signals(sig).name})" in output, output[-3000:]
    assert run.proc.returncode == 0, output[-3000:]


def test_make_demo_under_timeout_leaves_nothing_behind(tmp_path):
    # `timeout` expiring (SIGALRM to it is exactly that path) sends SIGTERM to make and to its process group; make
    # forwards SIGTERM to its child and waits for it. `-o setup`: the demo target without the set-up step.
    demo_args = f"--telemetry-dir {tmp_path / 'telemetry'} --dashboard-port {free_port()} {' '.join(QUICK)}"
    command = ["timeout", "600", "make", "-C", str(ROOT), "-o", "setup", "demo", f"DEMO_ARGS={demo_args}"]
    with demo_run(command, tmp_path) as run:
        run.wait_for_line("workload ")
        run.collect()
        assert run.running("mooncake_master") and run.running("streamlit") and len(run.running("storage_node")) == 2
        os.kill(run.proc.pid, signal.SIGALRM)
        sent = time.monotonic()
        run.proc.wait(timeout=STOP_BOUND_S + 5)
        took = time.monotonic() - sent
        left = run.running()
        assert run.proc.returncode == 124  # what `timeout` says when it timed out
        assert left == [], f"left behind when timeout returned: {run.describe(left)}"
        assert took < STOP_BOUND_S, "".join(run.lines)[-3000:]
    assert "stopping (SIGTERM)" in "".join(run.lines)
