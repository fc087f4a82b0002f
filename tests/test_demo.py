"""The demo (``tq-mooncake demo``, what ``make demo`` runs after set-up) for two batches: it starts, the dashboard
answers, telemetry appears, the summary counts operations, retries, exhausted operations and a storage-node
kill, and no process it started is left afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from tq_mooncake.cluster import free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("tq-mooncake")


def dashboard_up(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/_stcore/health")


def test_the_demo_runs_the_product_and_leaves_nothing_behind(tmp_path):
    port = free_port()
    folder = tmp_path / "telemetry"
    # Two batches: the keys are fixed and the failing ones picked by a seeded hash, so both batches hold a key
    # whose retries run out (about 3 s of back-off each), and a storage node is killed after the first.
    args = ["--batches", "2", "--kill-every", "1", "--exhaust-rate", "0.001"]
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
