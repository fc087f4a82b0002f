"""``make demo`` itself, for a short run: it starts, telemetry appears, the dashboard answers, the summary
counts operations, retries and exhausted operations, and no process it started is left afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil

from tq_mooncake.cluster import free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[1]


def dashboard_up(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/_stcore/health")


def test_make_demo_runs_the_product_and_leaves_nothing_behind(tmp_path):
    port = free_port()
    folder = tmp_path / "telemetry"
    args = f"--duration 15 --kill-every 6 --exhaust-rate 0.001 --dashboard-port {port} --telemetry-dir {folder}"
    proc = subprocess.Popen(
        ["make", "-s", "demo", f"DEMO_ARGS={args}"],
        cwd=ROOT,
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
        wait_until(
            lambda: list(folder.glob("metrics-*.jsonl")) and list(folder.glob("traces-*.jsonl")), 60, "telemetry files"
        )
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
    assert list(folder.glob("metrics-*.jsonl"))[0].stat().st_size > 0
