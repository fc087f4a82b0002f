"""The options of ``tq-mooncake demo`` and ``tq-mooncake workload``, apart from the code that runs them, so that
``tq-mooncake --help`` loads neither the client nor torch."""

from __future__ import annotations

import argparse

DEMO_DESCRIPTION = """The whole product on one machine, with nothing to install by hand.

Starts a ``mooncake_master`` on loopback (``--client_ttl=2``), two storage processes, the dashboard on
http://127.0.0.1:8501, and runs a TransferQueue-shaped workload (``cli.workload``) through one client
with ``replica_num: 2`` and telemetry written to the telemetry folder. Faults: error codes injected into the
store at ``--fault-rate`` of keys on first attempts (retried away) and ``--exhaust-rate`` on every attempt
(retries run out), and every ``--kill-every`` seconds one storage process is killed (SIGKILL) and a new one
started. Prints what it started, progress, and a summary at the end; Ctrl-C, SIGTERM or SIGHUP (or
``--duration``, or ``--batches``) stops every process it started within 10 s, and nothing else.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``demo`` and ``workload``."""
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--batches", type=_positive_int, default=None, help="stop after this many batches")
    parser.add_argument("--fault-rate", type=float, default=0.002, help="share of keys failing a first attempt")
    parser.add_argument("--exhaust-rate", type=float, default=0.0001, help="share of keys failing every attempt")
    parser.add_argument("--batch-samples", type=int, default=32, help="samples per batch (7 fields each)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample")
    parser.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    add_workload_arguments(parser)
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds between storage-node kills (0: never)")
    parser.add_argument("--segment", default="512MB", help="memory of each storage process")
    parser.add_argument("--dashboard-port", type=int, default=8501, help="dashboard port on 127.0.0.1 (8501)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    parser.add_argument(
        "--telemetry-dir", help="where telemetry goes (default $TQ_MOONCAKE_TELEMETRY_DIR, else ./telemetry-data)"
    )


def add_workload_only_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``workload`` verb's options."""
    add_workload_arguments(parser)
    parser.add_argument("--master", default="127.0.0.1:50051", help="mooncake_master RPC address")
    parser.add_argument("--metadata", default="P2PHANDSHAKE", help="metadata server (host:port, URL, P2PHANDSHAKE)")
    parser.add_argument("--host", default="127.0.0.1", help="the address this client advertises")
    parser.add_argument("--replica-num", type=int, default=2, help="replicas per key")
    parser.add_argument(
        "--service-name", help="telemetry service.name (default: $OTEL_SERVICE_NAME, else tq-mooncake-workload)"
    )
