"""Real Mooncake processes on this machine: a ``mooncake_master`` and storage nodes, for the TQ bootstrap, the
demo, benchmarks and tests.

Every process binds ``127.0.0.1`` on free ports, is waited for by polling (never by sleeping a fixed
time), and is stopped by ``stop()`` (CONT and TERM to its process group, then KILL) or by leaving its ``with``
block. Children die with this process: each is started with ``PR_SET_PDEATHSIG`` = SIGKILL, so even a SIGKILLed
parent leaves none behind. ``begin_shutdown()`` (safe in a signal handler) refuses further starts and makes waits
for readiness give up; ``stop_children()`` then stops every child still running.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

LOOPBACK = "127.0.0.1"
_SEGMENT = re.compile(r'^segment_total_capacity_bytes\{segment="([^"]+)"\}', re.MULTILINE)
_T = TypeVar("_T")

# Run as `python -I -S -c _DIE_WITH_PARENT <parent pid> <command...>`: ask for SIGKILL when the parent dies, make
# sure it has not died already, restore the signals Python ignores and the signal mask, and become the command
# (same pid).
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class ShutdownStarted(RuntimeError):
    """Raised by ``start()`` once ``begin_shutdown()`` was called in this process (nothing new starts)."""


class _Children:
    """Every child started in this process, and the one thread that starts them all.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked a child ends, not the process, and children are
    often started from short-lived pool threads (``start_all``); so every ``Popen`` runs on a daemon thread that
    lives as long as the process. A start is refused once ``closing`` is set; ``stop_children`` takes ``lock``,
    so it sees every child whose start was under way when shutdown began."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[subprocess.Popen[bytes]] = []
        self.closing = False  # set without the lock: begin_shutdown() may run in a signal handler
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def spawn(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """``Popen(args)`` in a new session, dying with this process; ShutdownStarted once shutdown began."""
        command = [*args]
        if sys.platform.startswith("linux"):  # prctl is Linux's
            command = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]

        def launch() -> subprocess.Popen[bytes]:
            with self.lock:
                if self.closing:
                    raise ShutdownStarted(f"shutting down: not starting {args[0]}")
                proc = subprocess.Popen(command, start_new_session=True, **popen)
                self.running = [p for p in self.running if p.poll() is None] + [proc]
            return proc

        done = self._submit(launch)
        try:
            return done.result()
        except BaseException:  # interrupted while waiting (Ctrl-C): what was started anyway is stopped
            done.add_done_callback(lambda f: f.exception() is None and _stop_procs([f.result()], 0.0))
            raise

    def _submit(self, job: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tq-mooncake-spawner", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((job, done))
        return done

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:
                done.set_exception(exc)


_children = _Children()


def _reset_after_fork() -> None:
    global _children
    _children = _Children()  # a forked child owns none of its parent's children, nor its spawner thread


os.register_at_fork(after_in_child=_reset_after_fork)


def begin_shutdown() -> None:
    """From now on no child starts in this process (``start()`` raises ShutdownStarted) and waits for a child's
    readiness give up. Takes no lock: safe to call from a signal handler."""
    _children.closing = True


def shutting_down() -> bool:
    """Whether ``begin_shutdown()`` was called in this process."""
    return _children.closing


def stop_children(grace_s: float = 5.0) -> None:
    """``begin_shutdown()``, then stop every child this process started that still runs, side by side: SIGCONT and
    SIGTERM to each one's process group, SIGKILL to what is left after ``grace_s``."""
    begin_shutdown()
    with _children.lock:
        running = list(_children.running)
    _stop_procs(running, grace_s)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """``sig`` to the process group the child leads (its own session), unless it was already reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _stop_procs(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """CONT and TERM to every group at once (a stopped process cannot act on TERM), KILL after ``grace_s``."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        _signal_group(proc, signal.SIGCONT)
        _signal_group(proc, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for proc in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, end - time.monotonic()))
    for proc in alive:
        _signal_group(proc, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


_PICK_RANGE = (20000, 32000)
"""Where ``free_port`` picks: below Linux's ephemeral range (32768-60999), from which every outgoing connection
takes its local port (a port picked there can be taken before it is bound), and above the ports Mooncake's
clients and transfer engines pick for themselves (12300-17999)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: a random one in ``_PICK_RANGE`` (the kernel's pick
    if none of 50 tries binds)."""
    for _ in range(50):
        port = random.randrange(*_PICK_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _mooncake_master_binary() -> str:
    found = shutil.which("mooncake_master") or str(Path(sys.executable).with_name("mooncake_master"))
    if not Path(found).exists():
        raise FileNotFoundError("mooncake_master not found: install tq-mooncake[cpu]")
    return found


class ChildProcess:
    """A child process with its output in a log file, stopped on ``stop()`` (TERM, then KILL). It runs in its
    own session, so a Ctrl-C in the terminal reaches only the parent, which stops it in order, and it is killed
    if the parent dies first. Subclasses set ``log_path`` and start it with ``_launch`` then ``_wait_ready``."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: a crash; SIGSTOP/SIGCONT: a freeze)."""
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """CONT and TERM to the process's group; KILL if it still runs after ``timeout`` seconds."""
        if self.proc is not None:
            _stop_procs([self.proc], timeout)

    def start(self, timeout: float = 30.0) -> ChildProcess:
        """Start the process and wait (polling) until it is ready; stopped again if it is not."""
        raise NotImplementedError

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def _launch(self, args: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``args`` with stdout and stderr appended to ``log_path``; ShutdownStarted once shutdown began."""
        with open(self.log_path, "ab") as log:
            self.proc = _children.spawn(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def _wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until it holds; if the process exits first, ``timeout`` passes or shutdown begins
        (ShutdownStarted), stop it and raise."""
        seen = [False]

        def done() -> bool:
            seen[0] = not shutting_down() and ready()
            return seen[0] or not self.alive() or shutting_down()

        try:
            wait_until(done, timeout, what)
            if shutting_down():
                raise ShutdownStarted(f"shutting down: gave up waiting for {what}")
            if not seen[0]:
                assert self.proc is not None
                raise RuntimeError(f"gave up waiting for {what}: it exited with {self.proc.poll()}:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_all(processes: Sequence[ChildProcess], timeout: float = 60.0) -> None:
    """``start()`` every process side by side; if one fails, stop them all and raise its error."""
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(processes))) as pool:
            futures = [pool.submit(p.start, timeout) for p in processes]
            errors = [f.exception() for f in futures]
    except BaseException:  # Ctrl-C while waiting: nothing started here is left running
        stop_all(processes)
        raise
    failed = [e for e in errors if e is not None]
    if failed:
        stop_all(processes)
        raise failed[0]


def stop_all(processes: Sequence[ChildProcess], timeout: float = 10.0) -> None:
    """Stop every process side by side (each may take a while to close its store): TERM to all, KILL to those
    still running after ``timeout`` seconds."""
    _stop_procs([p.proc for p in processes if p.proc is not None], timeout)


class MasterProcess(ChildProcess):
    """A ``mooncake_master`` (on loopback unless ``host`` says otherwise) with the HTTP metadata server on (or
    off); ports not given are free ones picked now."""

    def __init__(
        self,
        log_dir: Path,
        client_ttl: int | None = None,
        http_metadata: bool = True,
        extra_args: list[str] | None = None,
        rpc_port: int | None = None,
        host: str = LOOPBACK,
        http_port: int | None = None,
    ) -> None:
        self.host = host
        self._given = (rpc_port, http_port)
        self._http_metadata = http_metadata
        self._extra_args = list(extra_args or [])
        self._started_once = False
        self.client_ttl = client_ttl
        self._pick_ports()
        self.log_path = Path(log_dir) / f"mooncake_master-{self.rpc_port}.log"

    def _pick_ports(self) -> None:
        """The ports not given to the constructor, picked (again) now, and the command line that uses them."""
        rpc_port, http_port = self._given
        self.rpc_port = rpc_port or free_port()
        self.metrics_port = free_port()
        self.http_port = (http_port or free_port()) if self._http_metadata else None
        self._args = [
            _mooncake_master_binary(),
            f"--rpc_address={self.host}",
            f"--rpc_port={self.rpc_port}",
            f"--metrics_host={LOOPBACK}",
            f"--metrics_port={self.metrics_port}",
            "--enable_metric_reporting=false",
        ]
        if self._http_metadata:
            self._args += [
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_host={self.host}",
                f"--http_metadata_server_port={self.http_port}",
            ]
        if self.client_ttl is not None:
            self._args.append(f"--client_ttl={self.client_ttl}")
        self._args += self._extra_args

    @property
    def address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://{self.host}:{self.http_port}/metadata" if self.http_port else "P2PHANDSHAKE"

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """A ``MooncakeBatchClient`` config dict pointing at this master."""
        config: dict[str, Any] = {
            "local_hostname": LOOPBACK,
            "metadata_server": self.metadata_server,
            "master_server_address": self.address,
            "protocol": "tcp",
            "global_segment_size": 64 << 20,
            "local_buffer_size": 0,
        }
        config.update(overrides)
        return config

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/health", timeout=1) as resp:
                return resp.status == 200 and json.loads(resp.read() or b"{}").get("service_ready", True)
        except (OSError, ValueError):
            return False

    @property
    def metrics_url(self) -> str:
        """Its Prometheus text endpoint (``--metrics_port``, on loopback)."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def metrics_text(self) -> str:
        """What the master serves on ``/metrics`` (Prometheus text; served even with metric reporting off)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def mounted_segments(self) -> set[str]:
        """The segments the master counts as mounted now (a storage process's name, ``host:port``); a process
        that died or froze drops out of it ``client_ttl`` seconds after its last heartbeat."""
        return set(_SEGMENT.findall(self.metrics_text()))

    def start(self, timeout: float = 30.0) -> MasterProcess:
        """Start it and wait until it serves. A free port picked here can be taken by another process before the
        master binds it (the master then aborts: "Failed to start HTTP metadata server"); on its first start,
        such a master is started again on newly picked ports (the ports given to the constructor are kept),
        up to three times."""
        for attempt in range(3):
            self._launch(self._args)
            try:
                self._wait_ready(self.healthy, timeout, f"mooncake_master on {self.address}")
                break
            except ShutdownStarted:
                raise
            except RuntimeError:
                exited = self.proc is not None and self.proc.poll() is not None
                if self._started_once or not exited or attempt == 2:
                    raise
                self._pick_ports()
        self._started_once = True
        return self

    def restart(self, timeout: float = 30.0) -> MasterProcess:
        """Stop and start again on the same ports (all object metadata is lost, as in a real restart)."""
        self.stop()
        return self.start(timeout)


class StorageNodeProcess(ChildProcess):
    """A ``tq_mooncake.cluster.storage_node`` process holding ``segment`` bytes of the cluster's memory."""

    def __init__(self, master: MasterProcess, log_dir: Path, segment: str | int = "64MB") -> None:
        self.master = master
        self.segment = str(segment)
        self.name: str | None = None
        self._ready = threading.Event()
        self.log_path = Path(log_dir) / f"storage-node-{free_port()}.log"

    def start(self, timeout: float = 30.0) -> StorageNodeProcess:
        args = [
            sys.executable,
            "-m",
            "tq_mooncake.cluster.storage_node",
            "--master",
            self.master.address,
            "--metadata",
            self.master.metadata_server,
            "--segment",
            self.segment,
        ]
        env = dict(os.environ, MC_TCP_BIND_ADDRESS=LOOPBACK)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        try:
            self.proc = _children.spawn(args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            log.close()
            raise
        threading.Thread(target=self._read_stdout, args=(self.proc.stdout, log), daemon=True).start()
        self._wait_ready(self._ready.is_set, timeout, "a storage node to mount")
        return self

    def _read_stdout(self, stream: IO[bytes] | None, log: IO[bytes]) -> None:
        assert stream is not None
        with log:
            for line in stream:
                log.write(line)
                log.flush()
                if line.startswith(b"READY "):
                    self.name = line.split()[1].decode()
                    self._ready.set()
