"""The ``telemetry`` section of TQ's backend config: whether to report, and SDK set-up once per process."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

KEYS = frozenset(
    {
        "enabled",
        "service_name",
        "otlp_endpoint",
        "otlp_protocol",
        "telemetry_dir",
        "prometheus_port",
        "metric_export_interval_s",
    }
)
_EXPORT_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "TQ_MOONCAKE_TELEMETRY_DIR",
    "TQ_MOONCAKE_PROMETHEUS_PORT",
)


def _check(section: Mapping[str, Any]) -> None:
    unknown = sorted(set(section) - KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the telemetry section (known: {sorted(KEYS)})")


def telemetry_enabled(section: Mapping[str, Any]) -> bool:
    """``enabled`` (default true); ValueError for unknown keys."""
    _check(section)
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"telemetry.enabled must be true or false, got {enabled!r}")
    return enabled


def configure_telemetry(section: Mapping[str, Any]) -> Any:
    """Set up the OpenTelemetry SDK for this process from ``section`` and the environment, once.

    Returns the ``Telemetry`` of ``tq_mooncake.telemetry.configure``, or None when nothing would be exported
    (no OTLP endpoint, folder or Prometheus port in the section or the environment): then the client reports
    to whatever global providers the application installed, at API-only cost.
    """
    _check(section)
    kwargs = {k: section[k] for k in KEYS - {"enabled"} if section.get(k) is not None}
    exporters = {"otlp_endpoint", "telemetry_dir", "prometheus_port"}
    if not exporters & set(kwargs) and not any(os.environ.get(name, "").strip() for name in _EXPORT_ENV):
        logger.debug("tq-mooncake telemetry: no exporter configured; using the global providers")
        return None
    from tq_mooncake import telemetry

    return telemetry.configure(**kwargs)
