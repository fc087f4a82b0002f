"""The dashboard's settings: one set of flags for ``tq-mooncake dashboard`` and the Streamlit script
(``streamlit run app.py -- --dir DIR``), with defaults from the environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tq_mooncake.telemetry import conventions as c

DEFAULT_DIR = "telemetry-data"
WINDOWS: dict[str, float | None] = {
    "1m": 60,
    "5m": 300,
    "15m": 900,
    "1h": 3600,
    "6h": 6 * 3600,
    "24h": 86400,
    "7d": 7 * 86400,
    "all": None,
}
"""Window choices: seconds before now (``all``: since the oldest point, or 7 days on Prometheus)."""


@dataclass(frozen=True)
class Thresholds:
    """Tiles turn red above these."""

    retry_rate: float = 0.05  # share of operations that retried
    exhaustion_rate: float = 0.001  # share of operations whose retries ran out
    key_failures_per_s: float = 10.0  # keys failing an attempt, per second
    p99_s: float = 1.0  # p99 operation latency, seconds


@dataclass(frozen=True)
class Settings:
    folder: str
    prometheus: str | None
    window: str
    refresh_s: float
    paused: bool
    thresholds: Thresholds
    master_metrics: str | None = None  # the master's metrics endpoint, polled in files mode
    jaeger: str | None = None  # Jaeger's query API: the span source instead of the trace files
    jaeger_ui: str | None = None  # where the browser reaches Jaeger's UI (default: ``jaeger``)


def master_metrics_url(text: str) -> str:
    """``--master-metrics`` as the URL polled (``host:port`` -> ``http://host:port/metrics``); a clear error else."""
    from .store_health import normalize_url

    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _url_of(option: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        from .jaeger import http_url

        try:
            return http_url(text, option)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dashboard's own flags (shared by the CLI and the Streamlit script)."""
    src = parser.add_argument_group("source (files by default)")
    src.add_argument(
        "--dir", help=f"folder of OTLP JSON-lines files (default: ${c.ENV_TELEMETRY_DIR}, else ./{DEFAULT_DIR})"
    )
    src.add_argument("--prometheus", metavar="URL", help="read from the Prometheus HTTP API at URL instead")
    src.add_argument(
        "--master-metrics",
        metavar="URL",
        type=master_metrics_url,
        help="files mode: poll the mooncake_master's metrics endpoint (host:port of its --metrics_port, or a URL) "
        "for the store health panel (Prometheus mode reads what Prometheus scraped from the master)",
    )
    src.add_argument(
        "--jaeger",
        metavar="URL",
        type=_url_of("--jaeger"),
        help="read recent failures from Jaeger's HTTP query API at URL (e.g. http://127.0.0.1:16686) instead of "
        "the trace files in --dir",
    )
    src.add_argument(
        "--jaeger-ui",
        metavar="URL",
        type=_url_of("--jaeger-ui"),
        help="Jaeger's UI as the browser reaches it, for links (default: --jaeger)",
    )
    view = parser.add_argument_group("view")
    view.add_argument("--window", choices=list(WINDOWS), default="15m", help="initial time window (default 15m)")
    view.add_argument("--refresh", type=float, default=10.0, help="auto-refresh period in seconds (default 10)")
    view.add_argument("--paused", action="store_true", help="start with auto-refresh off")
    alert = parser.add_argument_group("alert thresholds (tiles turn red above them)")
    t = Thresholds()
    alert.add_argument(
        "--alert-retry-rate", type=float, default=t.retry_rate, help="share of operations retried (%(default)s)"
    )
    alert.add_argument(
        "--alert-exhaustion-rate",
        type=float,
        default=t.exhaustion_rate,
        help="share of operations exhausted, budget-denied or past the deadline (%(default)s)",
    )
    alert.add_argument(
        "--alert-key-failures", type=float, default=t.key_failures_per_s, help="key failures per second (%(default)s)"
    )
    alert.add_argument("--alert-p99", type=float, default=t.p99_s, help="p99 operation latency, seconds (%(default)s)")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    folder = args.dir or environ.get(c.ENV_TELEMETRY_DIR, "").strip() or DEFAULT_DIR
    thresholds = Thresholds(args.alert_retry_rate, args.alert_exhaustion_rate, args.alert_key_failures, args.alert_p99)
    return Settings(
        folder,
        args.prometheus or None,
        args.window,
        args.refresh,
        args.paused,
        thresholds,
        args.master_metrics or None,
        args.jaeger or None,
        args.jaeger_ui or None,
    )


def dashboard_args(settings: Settings) -> list[str]:
    """``settings`` as flags again (what the CLI passes to the Streamlit script)."""
    t = settings.thresholds
    out = ["--dir", settings.folder, "--window", settings.window, "--refresh", str(settings.refresh_s)]
    out += ["--alert-retry-rate", str(t.retry_rate), "--alert-exhaustion-rate", str(t.exhaustion_rate)]
    out += ["--alert-key-failures", str(t.key_failures_per_s), "--alert-p99", str(t.p99_s)]
    if settings.prometheus:
        out += ["--prometheus", settings.prometheus]
    for flag, value in (
        ("--master-metrics", settings.master_metrics),
        ("--jaeger", settings.jaeger),
        ("--jaeger-ui", settings.jaeger_ui),
    ):
        if value:
            out += [flag, value]
    if settings.paused:
        out.append("--paused")
    return out


def parse_settings(argv: Sequence[str] = (), environ: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser(prog="tq_mooncake.dashboard", description="tq-mooncake retry dashboard")
    add_arguments(parser)
    return settings_from(parser.parse_args(list(argv)), environ)
