"""``tq-mooncake demo`` and ``tq-mooncake workload``: the faulty TransferQueue-shaped workload, with the whole
cluster on this machine (``run``) or against a running one (``run_workload``). Their options and the demo's
description are in ``options.py``, so that the command line is built without importing the client."""

from __future__ import annotations

import argparse
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
from tq_mooncake.cluster import (
    LOOPBACK,
    ChildProcess,
    MasterProcess,
    ShutdownStarted,
    StorageNodeProcess,
    begin_shutdown,
    start_all,
    stop_all,
    stop_children,
)
from tq_mooncake.testing import RecordingObserver

from .workload import StopFlag, Workload, WorkloadStats

CLIENT_TTL_S = 2
# The client's defaults (retries and node-loss routing) carry the workload through the kills: nothing tuned here.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Stopping, stage by stage (TERM, then KILL after the grace): storage nodes and dashboard (a node bounds its own
# close at 3 s), the master, then anything started meanwhile. Together well within WATCHDOG_S.
NODE_GRACE_S, MASTER_GRACE_S, REST_GRACE_S = 3.5, 2.0, 1.0
WATCHDOG_S = 9  # after a stop signal, SIGALRM ends the demo (and, by PR_SET_PDEATHSIG, its children) if stopping hangs
_KEPT: list[Any] = []  # demos whose client is never freed (see _run)


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
    """The workload's client: the default retry and node-loss settings, and the store failing keys as
    ``--fault-rate``/``--exhaust-rate`` say (no call log: the run may be long)."""
    rules = fault_rules(args.fault_rate, args.exhaust_rate)
    return MooncakeBatchClient(config, observer=observer, wrap_store=injecting(rules, seed=1, record_calls=False))


def _progress(started: float, counter: RecordingObserver, stats: WorkloadStats) -> str:
    t = counter.totals()
    return (
        f"[{time.monotonic() - started:6.0f} s] batches {stats.batches}  operations {t['operations']}  "
        f"retries {t['retries']}  exhausted {t['exhausted']}  wrong values {stats.wrong}"
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


def _drive(workload: Workload, stop: StopFlag, args: argparse.Namespace, on_batch: Any) -> None:
    """Run ``workload`` until ``stop``, ``--duration``, ``--batches`` or Ctrl-C."""
    try:
        workload.run(stop, args.duration, on_batch, args.batches)
    except KeyboardInterrupt:
        _say("stopping (Ctrl-C)")


def _finish(
    telemetry: Any, counter: RecordingObserver, stats: WorkloadStats, kills: int, started: float, note: str
) -> int:
    """Flush telemetry, print the summary; exit status 1 if any value read back was wrong."""
    telemetry.force_flush()
    summary = _summary(counter, stats, kills, time.monotonic() - started)
    _report(summary, note)
    return 0 if summary["wrong_values"] == 0 else 1


def _summary(counter: RecordingObserver, stats: WorkloadStats, kills: int, elapsed: float) -> dict[str, Any]:
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


class _Flag:
    """``set``/``is_set`` like ``threading.Event`` but lock-free, so a signal handler may set it while the thread
    it interrupted is setting it too (``Event.set`` there would deadlock on the event's own lock)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _Stopper:
    """The demo's stop signals (SIGTERM, SIGINT, SIGHUP). The first sets ``event``, refuses new child processes
    (``begin_shutdown``: waits for one to be ready give up at once) and arms the watchdog; later ones change
    nothing. The handler takes no lock and prints nothing."""

    def __init__(self) -> None:
        self.event = _Flag()
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        signal.alarm(0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name
            begin_shutdown()
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(WATCHDOG_S)  # SIGALRM's default action ends the demo, and its children with it
            self.event.set()


class _Demo:
    """The demo's processes, client and workload. The workload (and every Mooncake call) runs on a worker thread,
    so that the main thread only starts processes and waits, and answers a stop signal whatever the store does."""

    def __init__(self, args: argparse.Namespace, folder: Path, log_dir: Path, stop: _Flag) -> None:
        from tq_mooncake.telemetry import OTelObserver

        self.args, self.log_dir, self.stop = args, log_dir, stop
        self.counter = RecordingObserver(OTelObserver(budget_tokens=None), keep=False)
        self.master = MasterProcess(log_dir, client_ttl=CLIENT_TTL_S)
        self.nodes = [StorageNodeProcess(self.master, log_dir, args.segment) for _ in range(2)]
        self.folder = folder
        self.apps: list[ChildProcess] = []
        self.stats = WorkloadStats()
        self.kills = 0
        self.error: BaseException | None = None
        self._client: MooncakeBatchClient | None = None
        self._closing = False
        self._lock = threading.Lock()  # _client, _closing, nodes

    def start_processes(self) -> None:
        """The master, then the storage nodes and the dashboard side by side; prints what it started. The dashboard
        polls the master's metrics endpoint (its ports are known once it started)."""
        self.master.start()
        if not self.args.no_dashboard:
            from tq_mooncake.dashboard.launch import RunningApp

            app_args = ["--dir", str(self.folder), "--window", "5m", "--refresh", "5"]
            app_args += ["--master-metrics", self.master.metrics_url]
            with self._lock:
                self.apps.append(RunningApp(app_args, self.log_dir / "dashboard.log", self.args.dashboard_port))
        start_all([*self.nodes, *self.apps])
        master = self.master
        _say(f"mooncake_master    pid {master.pid}  rpc {master.address}  metadata {master.metadata_server}")
        for i, node in enumerate(self.nodes):
            _say(f"storage node {i + 1}     pid {node.pid}  segment {self.args.segment}")
        for app in self.apps:
            _say(f"dashboard          pid {app.pid}  {app.url}")  # type: ignore[attr-defined]

    def drive(self, started: float) -> None:
        """The worker thread: build the client, run the workload, replace storage nodes; an error is kept in
        ``error`` unless the demo is stopping (then errors are what stopping does to calls in flight)."""
        args = self.args
        try:
            client = _faulty_client(self.master.client_config(global_segment_size=0, replica_num=2), args, self.counter)
            with self._lock:
                self._client, closing = client, self._closing  # kept referenced: its destructor closes it
            if closing:
                return
            workload = Workload(client, args.batch_samples, args.seq_len)
            self.stats = workload.stats
            _say(
                f"workload           {args.batch_samples} samples x 7 fields per batch; faults: "
                f"{args.fault_rate:.1%} of keys on first attempts, {args.exhaust_rate:.2%} on every attempt; a "
                f"storage node killed every {args.kill_every:g} s"
                + ("" if args.duration is None else f"; running {args.duration:g} s")
                + ("" if args.batches is None else f"; {args.batches} batches")
                + " (Ctrl-C stops)"
            )
            last_kill = last_progress = time.monotonic()

            def on_batch(index: int) -> None:
                nonlocal last_kill, last_progress
                now = time.monotonic()
                if args.kill_every and now - last_kill >= args.kill_every and not self.stop.is_set():
                    self._replace_node()
                    last_kill = now
                if now - last_progress >= args.progress_every:
                    last_progress = now
                    _say(_progress(started, self.counter, self.stats))

            workload.run(self.stop, args.duration, on_batch, args.batches)
        except BaseException as exc:
            if not self.stop.is_set():
                self.error = exc

    def _replace_node(self) -> None:
        """SIGKILL the oldest storage node and start a new one; a new one that cannot start (the master is gone)
        is reported, and the next replacement tries again."""
        victim = self.nodes[0]
        victim.kill()
        victim.stop()
        fresh = StorageNodeProcess(self.master, self.log_dir, self.args.segment)
        with self._lock:
            self.nodes = [*self.nodes[1:], fresh]
        self.kills += 1
        try:
            fresh.start()  # if the demo is stopping: ShutdownStarted, or stopped with the rest if started meanwhile
        except ShutdownStarted:
            return
        except Exception as exc:
            if not self.stop.is_set():
                _say(f"killed storage node pid {victim.pid} (SIGKILL); no replacement: {str(exc).splitlines()[0]}")
            return
        _say(f"killed storage node pid {victim.pid} (SIGKILL); started pid {fresh.pid}")

    def stop_everything(self, close_client: bool) -> None:
        """Stop every process the demo started, in order and each stage bounded: storage nodes and dashboard get
        TERM then KILL, then the master, then anything started meanwhile (a replacement node). The client is closed
        first (on its own thread) only if ``close_client``: Mooncake's close holds the GIL while it waits on a
        frozen master (seconds per request), so after a stop signal it is left to ``os._exit``."""
        begin_shutdown()
        self.stop.set()
        with self._lock:
            self._closing, client, others = True, self._client, [*self.nodes, *self.apps]
        closer = None
        if client is not None and close_client:
            closer = threading.Thread(target=client.close, name="close-client", daemon=True)
            closer.start()
        stop_all(others, NODE_GRACE_S)
        self.master.stop(MASTER_GRACE_S)
        stop_children(REST_GRACE_S)
        if closer is not None:
            closer.join(timeout=1.0)


def run(args: argparse.Namespace) -> int:
    """The demo (``tq-mooncake demo``); a stop signal (SIGTERM, SIGINT, SIGHUP) stops it and every process it
    started within ``WATCHDOG_S`` seconds, whatever state the master is in. The caller should leave with
    ``os._exit`` (as ``tq-mooncake demo`` does): the client's own threads may still wait on a frozen master."""
    folder = Path(args.telemetry_dir or os.environ.get("TQ_MOONCAKE_TELEMETRY_DIR") or "telemetry-data").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not args.no_dashboard and not _port_free(args.dashboard_port):
        _say(f"port {args.dashboard_port} is in use: pass --dashboard-port")
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tq-mooncake-demo-"))
    stopper = _Stopper()
    stopper.install()  # before any child starts
    try:
        return _run(args, folder, log_dir, stopper)
    finally:
        stopper.restore()


def _run(args: argparse.Namespace, folder: Path, log_dir: Path, stopper: _Stopper) -> int:
    from tq_mooncake.telemetry import configure

    started = time.monotonic()
    telemetry = configure(service_name="tq-mooncake-demo", telemetry_dir=folder, metric_export_interval_s=2.0)
    demo = _Demo(args, folder, log_dir, stopper.event)
    # Never freed: freeing an unclosed client runs Mooncake's destructor, which (like close) holds the GIL while
    # it waits on a frozen master. The process leaves with os._exit.
    _KEPT.append(demo)
    try:
        demo.start_processes()
        _say(f"telemetry          {folder} (traces-*.jsonl, metrics-*.jsonl)")
        _say(f"logs               {log_dir}")
        worker = threading.Thread(target=demo.drive, args=(started,), name="workload", daemon=True)
        worker.start()
        while worker.is_alive() and not stopper.event.is_set():
            time.sleep(0.1)  # a signal's handler runs here at once
    except Exception:
        if not stopper.event.is_set():
            raise  # a real start-up failure; when stopping, it is what stopping did to a start under way
    finally:
        if stopper.name is not None:
            _say(f"stopping ({stopper.name})")
        demo.stop_everything(close_client=stopper.name is None)
    if demo.error is not None:
        raise demo.error
    return _finish(
        telemetry, demo.counter, demo.stats, demo.kills, started, "Every process the demo started is stopped."
    )


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
            _say(_progress(started, counter, workload.stats))

    try:
        _drive(workload, stop, args, on_batch)
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.close()
    return _finish(telemetry, counter, workload.stats, 0, started, "")
