"""``tq-mooncake``: the project's command line, one subcommand per verb.

    tq-mooncake demo [--duration 60]                     # everything on this machine (what `make demo` runs)
    tq-mooncake workload --master HOST:PORT --metadata P2PHANDSHAKE   # the faulty workload against a cluster
    tq-mooncake dashboard --dir ./telemetry-data         # the Streamlit dashboard on http://127.0.0.1:8501
    tq-mooncake dashboard --prometheus http://127.0.0.1:9090
    tq-mooncake storage-node --master 127.0.0.1:50051 --segment 256MB

To add a verb: write ``def _my_verb(sub) -> None`` that adds its parser with ``sub.add_parser(...)`` and sets
``run=<function(args, rest) -> int>`` as its default, then list it in ``VERBS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _run_dashboard(args: argparse.Namespace, rest: list[str]) -> int:
    from tq_mooncake.dashboard.launch import exec_dashboard

    return exec_dashboard(args, rest)


def _dashboard(sub: Any) -> None:
    from tq_mooncake.dashboard.launch import DESCRIPTION, add_launch_arguments

    parser = sub.add_parser(
        "dashboard", help="the Streamlit dashboard of retry and exhaustion rates", description=DESCRIPTION
    )
    add_launch_arguments(parser)
    parser.set_defaults(run=_run_dashboard, passthrough=True)


def _run_storage_node(args: argparse.Namespace, rest: list[str]) -> int:
    from tq_mooncake.cluster.storage_node import main as storage_node_main

    return storage_node_main(rest)


def _storage_node(sub: Any) -> None:
    parser = sub.add_parser(
        "storage-node",
        help="a process lending a memory segment to the Mooncake cluster",
        description="Run tq_mooncake.cluster.storage_node with these options (`tq-mooncake storage-node --help` "
        "lists them): --master, --metadata, --host, --segment, --protocol, --device.",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show the storage node's options")
    parser.set_defaults(run=_run_storage_node, passthrough=True)


def _run_demo(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the demo, then leave at once with ``os._exit``: every process it started is stopped and its output and
    telemetry are flushed, while a normal interpreter exit would wait on the Mooncake client's own threads (for
    ever when the master is frozen)."""
    import os
    import traceback

    try:
        from tq_mooncake.cli.demo import run

        code = run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading, before the demo's handlers are in place: nothing started yet
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _demo(sub: Any) -> None:
    from tq_mooncake.cli.options import DEMO_DESCRIPTION, add_demo_arguments

    parser = sub.add_parser(
        "demo",
        help="the whole product on this machine: master, storage nodes, faulty workload, dashboard",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(parser)
    parser.set_defaults(run=_run_demo)


def _run_workload(args: argparse.Namespace, rest: list[str]) -> int:
    from tq_mooncake.cli.demo import run_workload
    from tq_mooncake.client import StoreSetupError

    try:
        return run_workload(args)
    except StoreSetupError as exc:  # an unreachable cluster is a message, not a traceback
        print(f"tq-mooncake workload: {exc}", file=sys.stderr)
        return 2


def _workload(sub: Any) -> None:
    from tq_mooncake.cli.options import add_workload_only_arguments

    parser = sub.add_parser(
        "workload",
        help="the demo's TransferQueue-shaped workload, with faults, against a running cluster",
        description="Write, read back, check and clear TQ-shaped batches through a MooncakeBatchClient with "
        "faults injected, until --duration or Ctrl-C/SIGTERM; telemetry is configured from the environment.",
    )
    add_workload_only_arguments(parser)
    parser.set_defaults(run=_run_workload)


VERBS: list[Callable[[Any], None]] = [_demo, _workload, _dashboard, _storage_node]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tq-mooncake", description="The tq-mooncake command line.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.verb == "storage-node" and args.help:
        rest = ["--help", *rest]
    elif rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "dashboard":
        from tq_mooncake.dashboard.launch import unknown_options

        unknown = unknown_options(rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
