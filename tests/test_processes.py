"""``tq_mooncake.cluster`` processes stop when asked, whatever state their master is in, and never outlive the
process that started them: a storage node exits on SIGTERM when its master is SIGKILLed or SIGSTOPped, children
die with a SIGKILLed parent, and after ``begin_shutdown`` nothing new starts. Real processes, no mocks."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, start_all, stop_all, wait_until
from tq_mooncake.cluster.storage_node import CLOSE_TIMEOUT_S


def _running(pid: int, created: float) -> bool:
    """Whether the process ``pid`` created at ``created`` still runs (a zombie is dead; a reused pid is another)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pid: int, created: float) -> None:
    if _running(pid, created):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def test_a_storage_node_exits_on_sigterm_when_its_master_is_killed_or_frozen(tmp_path: Path) -> None:
    # Before the fix both hung for ever in store.close(): Mooncake's ~Client waits on the master with no end
    # (UnmountSegment to a dead one, the heartbeat's Ping to a frozen one), holding the GIL, with TERM blocked.
    killed, frozen = MasterProcess(tmp_path, client_ttl=2), MasterProcess(tmp_path, client_ttl=2)
    nodes = [StorageNodeProcess(killed, tmp_path, "32MB"), StorageNodeProcess(frozen, tmp_path, "32MB")]
    try:
        start_all([killed, frozen])
        start_all(nodes)
        killed.kill()
        frozen.kill(signal.SIGSTOP)
        # The hang needs the node to have noticed: its heartbeat failed (Mooncake logs it).
        wait_until(lambda: "ping master" in nodes[0].log_tail(200), 30, "the node to notice its master is gone")
        for node in nodes:
            node.proc.terminate()  # type: ignore[union-attr]
        sent = time.monotonic()
        bound = CLOSE_TIMEOUT_S + 3
        for node in nodes:
            node.proc.wait(timeout=max(0.1, sent + bound - time.monotonic()))  # type: ignore[union-attr]
        assert time.monotonic() - sent < bound
        assert [node.proc.returncode for node in nodes] == [1, 1]  # type: ignore[union-attr]  # close timed out
        assert all("(most recent call first)" in node.log_tail(400) for node in nodes)  # faulthandler: where it hung
    finally:
        stop_all([*nodes, killed, frozen], timeout=0)  # SIGKILL: nothing left to check


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    # start_all starts the master from a pool thread that ends at once: PR_SET_PDEATHSIG follows the thread that
    # forked, so the child must be forked by a thread that lives as long as the process.
    parent = _python(
        """
        import sys
        from pathlib import Path
        from tq_mooncake.cluster import MasterProcess, start_all
        master = MasterProcess(Path(sys.argv[1]))
        start_all([master])
        print(master.pid, flush=True)
        sys.stdin.read()
        """,
        str(tmp_path),
    )
    master: tuple[int, float] | None = None
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        master = (pid, psutil.Process(pid).create_time())
        assert _running(*master), "the master died with the thread that started it"
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: not _running(*master), 5, "the master to die with its parent")
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if master is not None:
            _kill(*master)


def test_after_begin_shutdown_nothing_starts_and_stop_children_stops_the_rest(tmp_path: Path) -> None:
    child = _python(
        """
        import sys
        from pathlib import Path
        from tq_mooncake.cluster import MasterProcess, ShutdownStarted, begin_shutdown, stop_children
        running = MasterProcess(Path(sys.argv[1])).start()
        print(running.pid, flush=True)
        begin_shutdown()
        try:
            MasterProcess(Path(sys.argv[1])).start()
            print("started after begin_shutdown", flush=True)
        except ShutdownStarted:
            print("refused", flush=True)
        stop_children(grace_s=5)
        print("stopped" if not running.alive() else "still running", flush=True)
        """,
        str(tmp_path),
    )
    master: tuple[int, float] | None = None
    try:
        pid = int(child.stdout.readline())  # type: ignore[union-attr]
        with contextlib.suppress(psutil.NoSuchProcess):
            master = (pid, psutil.Process(pid).create_time())
        out, _ = child.communicate(timeout=30)
        assert out.split() == ["refused", "stopped"]
        assert child.returncode == 0
    finally:
        child.kill()
        child.wait(timeout=10)
        if master is not None:
            _kill(*master)


def test_a_master_whose_picked_port_was_taken_starts_again_on_new_ports(tmp_path):
    """free_port() releases the port it picked; another process can bind it first. The master then aborts, and
    start() picks new ports for what the caller did not give."""
    import socket

    from tq_mooncake.cluster import MasterProcess

    master = MasterProcess(tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", master.http_port))
    taken.listen()
    first_http_port = master.http_port
    try:
        master.start()
        assert master.http_port != first_http_port and master.healthy()
    finally:
        master.stop()
        taken.close()
