"""``tq-mooncake demo`` and ``tq-mooncake workload``: the faulty TransferQueue-shaped workload, with the whole
cluster on this machine (``run``) or against a running one (``run_workload``). Their options and the demo's
description are in ``options.py``, so that the command line is built without importing the client."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tq_mooncake.client import ErrorCode, FaultRule, MooncakeBatchClient
from tq_mooncake.client.faults import injecting
from tq_mooncake.client.observer import Observer
from tq_mooncake.cluster import LOOPBACK, MasterProcess, StorageNodeProcess, start_all, stop_all
from tq_mooncake.testing import RecordingObserver

from .workload import Workload

CLIENT_TTL_S = 2
# Retries cover a killed node: the master drops it after client_ttl, then reads go to the other replica.
RETRY = {"max_attempts": 15, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "deadline_s": 10}


def _say(message: str) -> None:
    print(message, flush=True)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def fault_rules(fault_rate: float, exhaust_rate: float) -> list[FaultRule]:
    """``TRANSFER_FAIL`` on ``fault_rate`` of first attempts (retries rescue them) and ``RPC_TIMEOUT`` on every
    attempt of a sticky ``exhaust_rate`` of keys (their retries run out)."""
    rules = []
    if fault_rate > 0:
        rules.append(FaultRule(ErrorCode.TRANSFER_FAIL, fraction=fault_rate, attempts=frozenset({1})))
    if exhaust_rate > 0:
        rules.append(FaultRule(ErrorCode.RPC_TIMEOUT, fraction=exhaust_rate, sticky=True))
    return rules


def _faulty_client(config: dict[str, Any], args: argparse.Namespace, observer: Observer) -> MooncakeBatchClient:
    """The workload's client: ``RETRY``, and the store failing keys as ``--fault-rate``/``--exhaust-rate`` say
    (no call log: the run may be long)."""
    rules = fault_rules(args.fault_rate, args.exhaust_rate)
    return MooncakeBatchClient(
        {**config, "retry": RETRY}, observer=observer, wrap_store=injecting(rules, seed=1, record_calls=False)
    )


def _progress(started: float, counter: RecordingObserver, workload: Workload) -> str:
    t = counter.totals()
    return (
        f"[{time.monotonic() - started:6.0f} s] batches {workload.stats.batches}  operations {t['operations']}  "
        f"retries {t['retries']}  exhausted {t['exhausted']}  wrong values {workload.stats.wrong}"
    )


def _report(summary: dict[str, Any], closing: str) -> None:
    _say("summary " + json.dumps(summary))
    _say(
        f"{summary['operations']} operations ({summary['success']} ok at once, {summary['success_after_retry']} "
        f"after retries, {summary['exhausted']} exhausted, {summary['budget_denied']} denied by the retry budget, "
        f"{summary['non_retryable']} non-retryable, {summary['deadline_exceeded']} past the deadline), "
        f"{summary['retries']} retries, {summary['values_checked']} values checked, {summary['wrong_values']} wrong. "
        + closing
    )


def _drive(workload: Workload, stop: threading.Event, args: argparse.Namespace, on_batch: Any) -> None:
    """Run ``workload`` until ``stop``, ``--duration``, ``--batches`` or Ctrl-C."""
    try:
        workload.run(stop, args.duration, on_batch, args.batches)
    except KeyboardInterrupt:
        _say("stopping (Ctrl-C)")


def _finish(
    telemetry: Any, counter: RecordingObserver, workload: Workload, kills: int, started: float, note: str
) -> int:
    """Flush telemetry, print the summary; exit status 1 if any value read back was wrong."""
    telemetry.force_flush()
    summary = _summary(counter, workload, kills, time.monotonic() - started)
    _report(summary, note)
    return 0 if summary["wrong_values"] == 0 else 1


def _summary(counter: RecordingObserver, workload: Workload, kills: int, elapsed: float) -> dict[str, Any]:
    stats = workload.stats
    return {
        "seconds": round(elapsed, 1),
        **counter.totals(),
        "batches": stats.batches,
        "keys_written": stats.keys_written,
        "values_checked": stats.values_checked,
        "wrong_values": stats.wrong,
        "calls_raised": dict(stats.raised),
        "keys_lost": stats.keys_lost,
        "storage_node_kills": kills,
    }


def run(args: argparse.Namespace) -> int:
    folder = Path(args.telemetry_dir or os.environ.get("TQ_MOONCAKE_TELEMETRY_DIR") or "telemetry-data").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not args.no_dashboard and not _port_free(args.dashboard_port):
        _say(f"port {args.dashboard_port} is in use: pass --dashboard-port")
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tq-mooncake-demo-"))
    stop = threading.Event()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from tq_mooncake.telemetry import OTelObserver, configure

    telemetry = configure(service_name="tq-mooncake-demo", telemetry_dir=folder, metric_export_interval_s=2.0)
    counter = RecordingObserver(OTelObserver(budget_tokens=None), keep=False)
    kills = 0
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(MasterProcess(log_dir, client_ttl=CLIENT_TTL_S))
        master.start()
        nodes = [StorageNodeProcess(master, log_dir, args.segment) for _ in range(2)]
        apps = []
        if not args.no_dashboard:
            from tq_mooncake.dashboard.launch import RunningApp

            app_args = ["--dir", str(folder), "--window", "5m", "--refresh", "5"]
            apps.append(RunningApp(app_args, log_dir / "dashboard.log", args.dashboard_port))
        stack.callback(lambda: stop_all([*nodes, *apps]))  # the nodes alive at the end, replacements included
        start_all([*nodes, *apps])
        _say(f"mooncake_master    pid {master.pid}  rpc {master.address}  metadata {master.metadata_server}")
        for i, node in enumerate(nodes):
            _say(f"storage node {i + 1}     pid {node.pid}  segment {args.segment}")
        for app in apps:
            _say(f"dashboard          pid {app.pid}  {app.url}")
        _say(f"telemetry          {folder} (traces-*.jsonl, metrics-*.jsonl)")
        _say(f"logs               {log_dir}")
        client = _faulty_client(master.client_config(global_segment_size=0, replica_num=2), args, counter)
        stack.callback(client.close)
        workload = Workload(client, args.batch_samples, args.seq_len)
        _say(
            f"workload           {args.batch_samples} samples x 7 fields per batch; faults: {args.fault_rate:.1%} of "
            f"keys on first attempts, {args.exhaust_rate:.2%} on every attempt; a storage node killed every "
            f"{args.kill_every:g} s"
            + ("" if args.duration is None else f"; running {args.duration:g} s")
            + ("" if args.batches is None else f"; {args.batches} batches")
            + " (Ctrl-C stops)"
        )
        last_kill = last_progress = time.monotonic()

        def on_batch(index: int) -> None:
            nonlocal last_kill, last_progress, kills
            now = time.monotonic()
            if args.kill_every and now - last_kill >= args.kill_every:
                victim = nodes.pop(0)
                victim.kill()
                victim.stop()
                fresh = StorageNodeProcess(master, log_dir, args.segment).start()
                nodes.append(fresh)
                kills += 1
                last_kill = now
                _say(f"killed storage node pid {victim.pid} (SIGKILL); started pid {fresh.pid}")
            if now - last_progress >= args.progress_every:
                last_progress = now
                _say(_progress(started, counter, workload))

        try:
            _drive(workload, stop, args, on_batch)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _finish(telemetry, counter, workload, kills, started, "Every process the demo started is stopped.")


def run_workload(args: argparse.Namespace) -> int:
    """The demo's workload against an existing cluster (the docker-compose ``workload`` service): telemetry
    from the environment (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``TQ_MOONCAKE_TELEMETRY_DIR``, ...)."""
    from tq_mooncake.telemetry import OTelObserver, configure

    default_name = None if os.environ.get("OTEL_SERVICE_NAME", "").strip() else "tq-mooncake-workload"
    telemetry = configure(service_name=args.service_name or default_name)
    counter = RecordingObserver(OTelObserver(), keep=False)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    config = {
        "local_hostname": args.host,
        "metadata_server": args.metadata,
        "master_server_address": args.master,
        "global_segment_size": 0,
        "local_buffer_size": 0,
        "replica_num": args.replica_num,
    }
    client = _faulty_client(config, args, counter)
    workload = Workload(client, args.batch_samples, args.seq_len)
    _say(f"workload on {args.master}: {args.batch_samples} samples x 7 fields per batch (Ctrl-C or SIGTERM stops)")
    last = time.monotonic()

    def on_batch(index: int) -> None:
        nonlocal last
        if time.monotonic() - last >= args.progress_every:
            last = time.monotonic()
            _say(_progress(started, counter, workload))

    try:
        _drive(workload, stop, args, on_batch)
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.close()
    return _finish(telemetry, counter, workload, 0, started, "")
