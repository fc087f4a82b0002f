"""Starting the dashboard: the ``streamlit run`` command line, the ``dashboard`` verb's options, and
``RunningApp`` (the app as a child process on a free loopback port, for the demo, the screenshot and tests).

    python -m tq_mooncake.dashboard --dir ./telemetry-data      # the same as `tq-mooncake dashboard ...`
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tq_mooncake.cluster import LOOPBACK, ChildProcess, free_port, http_ok

from .settings import Settings, add_arguments, dashboard_args, parse_settings, settings_from

DESCRIPTION = (
    "Start the Streamlit dashboard (retry rates, exhaustion, error codes, hosts, storage nodes) on loopback. "
    "Further --server.* / --theme.* options are passed to `streamlit run`."
)
STREAMLIT_PREFIXES = ("--server.", "--theme.", "--logger.")
"""Options passed through to ``streamlit run`` untouched."""


def dashboard_command(
    settings: Settings, address: str = LOOPBACK, port: int = 8501, extra_streamlit: Sequence[str] = ()
) -> list[str]:
    """The ``streamlit run`` command line of the dashboard for ``settings``: headless, bound to ``address``
    (loopback by default), no usage statistics, no file watcher."""
    app = Path(__file__).with_name("app.py")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
        *extra_streamlit,
        "--",
        *dashboard_args(settings),
    ]


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dashboard`` verb's options: where to listen, plus the dashboard's own settings."""
    parser.add_argument("--address", "--server.address", default=LOOPBACK, help="bind address (127.0.0.1)")
    parser.add_argument("--port", "--server.port", type=int, default=8501, help="port (8501)")
    add_arguments(parser)


def unknown_options(rest: Sequence[str]) -> list[str]:
    """The options in ``rest`` that are neither the dashboard's nor ``streamlit run``'s."""
    return [a for a in rest if a.startswith("--") and not a.startswith(STREAMLIT_PREFIXES)]


def exec_dashboard(args: argparse.Namespace, rest: list[str]) -> int:
    """Become Streamlit serving the dashboard (signals then reach it directly); does not return."""
    command = dashboard_command(settings_from(args), args.address, args.port, rest)
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_mooncake.dashboard", description=DESCRIPTION)
    add_launch_arguments(parser)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    unknown = unknown_options(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return exec_dashboard(args, rest)


class RunningApp(ChildProcess):
    """The dashboard as ``tq-mooncake dashboard`` starts it, on ``127.0.0.1:<free port>``; ``stop()`` ends it."""

    def __init__(self, app_args: Sequence[str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/"
        self.command = dashboard_command(parse_settings(app_args), LOOPBACK, self.port)
        self.log_path = log_path

    def healthy(self) -> bool:
        return http_ok(f"{self.url}_stcore/health")

    def start(self, timeout: float = 60.0) -> RunningApp:
        self._launch(self.command, env={k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")})
        self._wait_ready(self.healthy, timeout, f"the dashboard on {self.url}")
        return self

    def __enter__(self) -> RunningApp:
        return self.start() if self.proc is None else self
