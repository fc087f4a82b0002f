"""A storage process: mounts a segment of memory in the Mooncake cluster and stays up until signalled.

    python -m tq_mooncake.cluster.storage_node --master 127.0.0.1:50051 --metadata P2PHANDSHAKE --segment 256MB

Prints ``READY <segment-name>`` on stdout once the segment is mounted; on SIGTERM, SIGINT or SIGHUP it closes the
store (unmounting the segment: data with no other replica is dropped) and exits 0. A close that does not finish
within ``CLOSE_TIMEOUT_S`` (the master is gone or frozen: Mooncake then waits on it with no end) ends it with exit
status 1 and the threads' tracebacks in its stderr; a second signal while closing, or a signal before READY,
ends it at once (killed by that signal). Killing it with SIGKILL leaves the master to notice after
``--client_ttl`` seconds, like a crashed node.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CLOSE_TIMEOUT_S = 3.0


def _connect_with_signals_blocked(config: Any, signals: set[int]) -> Any:
    """``connect_store(config)`` on a thread that blocks ``signals`` (Mooncake's threads, started from it, inherit
    that); the calling thread only joins it, so a signal meanwhile takes its default action: the process ends."""
    from tq_mooncake.client.store import connect_store

    outcome: list[Any] = []

    def connect() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            outcome.append(connect_store(config))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, name="connect", daemon=True)
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _exit(code: int) -> None:
    """Leave now, without interpreter shutdown (which would run the store's destructor again)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", default="127.0.0.1:50051", help="master RPC address host:port")
    parser.add_argument("--metadata", default="P2PHANDSHAKE", help="metadata server (URL or P2PHANDSHAKE)")
    parser.add_argument("--host", default="127.0.0.1", help="the address this node advertises")
    parser.add_argument("--segment", default="256MB", help="memory contributed to the cluster")
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)

    # Imported once the arguments are known: --help answers without loading the client (and torch).
    from tq_mooncake.client.config import ClientConfig, normalize_metadata_server, parse_size

    config = ClientConfig(
        local_hostname=args.host,
        metadata_server=normalize_metadata_server(args.metadata),
        master_server_address=args.master,
        protocol=args.protocol,
        device_name=args.device,
        global_segment_size=parse_size("--segment", args.segment),
        local_buffer_size=0,
    )
    # Mooncake's blocking calls (setup, and close waiting on a gone or frozen master with no end) hold the GIL, so
    # no Python code can answer a signal meanwhile: until READY a signal takes its default action (the process
    # ends); after READY the main thread takes it with sigwait, and faulthandler's watchdog (a C thread) bounds
    # the close. A signal the parent set to ignore (nohup) stays ignored.
    signals = {s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    if signal.SIGINT in signals:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    store = _connect_with_signals_blocked(config, signals)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # now every thread blocks them: none is lost before sigwait
    print(f"READY {store.get_hostname()}", flush=True)
    signal.sigwait(signals)
    faulthandler.dump_traceback_later(CLOSE_TIMEOUT_S, exit=True)  # a hung close: tracebacks to the log, exit 1
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # a second signal ends the process at once
    store.close()
    _exit(0)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
