"""The ``telemetry`` section of TQ's backend config: whether to report, and SDK set-up once per process."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from tq_mooncake.client.numbers import is_int, is_number

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
        "clean_trace_ratio",
        "telemetry_file_mb",
        "telemetry_keep_files",
        "telemetry_max_mb",
    }
)
RETENTION_KEYS = {
    "telemetry_file_mb": "max_file_bytes",  # MiB
    "telemetry_keep_files": "max_backups",
    "telemetry_max_mb": "max_total_bytes",  # MiB
}
"""The section's retention keys -> ``Retention`` fields (the rest keep the environment's or default values)."""
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


def configure_kwargs(section: Mapping[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of ``tq_mooncake.telemetry.configure`` for ``section``, or None when nothing would be
    exported (no OTLP endpoint, folder or Prometheus port in the section or the environment). The retention keys
    (MiB, count) become one ``Retention`` over the environment's; ValueError for unknown keys or bad values."""
    _check(section)
    kwargs = {k: section[k] for k in KEYS - {"enabled"} - set(RETENTION_KEYS) if section.get(k) is not None}
    exporters = {"otlp_endpoint", "telemetry_dir", "prometheus_port"}
    if not exporters & set(kwargs) and not any(os.environ.get(name, "").strip() for name in _EXPORT_ENV):
        return None
    from tq_mooncake.telemetry.pipeline import mib_to_bytes, retention_from_env

    changes = {}
    for key, field in RETENTION_KEYS.items():
        value = section.get(key)
        if value is None:
            continue
        if field == "max_backups":
            if not (is_int(value) and value >= 0):
                raise ValueError(f"telemetry.{key} must be a whole number >= 0, got {value!r}")
            changes[field] = value
        elif not is_number(value):
            raise ValueError(f"telemetry.{key} must be a size in MiB, got {value!r}")
        else:
            changes[field] = mib_to_bytes(f"telemetry.{key}", value)
    if changes:
        kwargs["retention"] = dataclasses.replace(retention_from_env(), **changes)  # Retention checks the values
    return kwargs


def configure_telemetry(section: Mapping[str, Any]) -> Any:
    """Set up the OpenTelemetry SDK for this process from ``section`` and the environment, once.

    Returns the ``Telemetry`` of ``tq_mooncake.telemetry.configure``, or None when nothing would be exported:
    then the client reports to whatever global providers the application installed, at API-only cost.
    """
    kwargs = configure_kwargs(section)
    if kwargs is None:
        logger.debug("tq-mooncake telemetry: no exporter configured; using the global providers")
        return None
    from tq_mooncake import telemetry

    return telemetry.configure(**kwargs)
