"""The SDK pipeline: ``configure()`` builds the OpenTelemetry providers and exporters for this process, once.

Needs the ``telemetry`` extra (SDK and exporters); the library itself only uses the API. Settings come from
the arguments, else from the standard environment, else from defaults:

* ``service_name`` / ``resource_attributes``: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; the
  resource always has ``host.name`` and ``process.pid``; ``service.name`` defaults to ``tq-mooncake``.
* ``otlp_endpoint``: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the ``_TRACES_``/``_METRICS_`` variants); no OTLP
  export without one. ``otlp_protocol``: ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``grpc`` or ``http/protobuf``
  (the default, as the OTLP specification says).
* ``metric_export_interval_s``: ``OTEL_METRIC_EXPORT_INTERVAL`` (ms), default 60 s.
* ``sampler`` / ``clean_trace_ratio``: default ``sampling.KeepFailuresSampler`` (every retried or failed
  operation's spans kept, clean ones at ``clean_trace_ratio``, default 0.01, or following their parent);
  ``OTEL_TRACES_SAMPLER`` names another (the SDK's own, e.g. ``parentbased_always_on``), or ``tq_mooncake`` with
  the ratio in ``OTEL_TRACES_SAMPLER_ARG``. An argument wins over the environment.
* span export delay: ``OTEL_BSP_SCHEDULE_DELAY`` (ms), default ``SPAN_EXPORT_DELAY_MS`` (0.5 s, not the SDK's 5 s):
  Ray ends its workers with SIGKILL (no atexit, no flush) at ``ray.shutdown()``, so what a worker's batch
  processor still holds then is lost; here that is at most the last half second of spans.
* ``telemetry_dir``: ``TQ_MOONCAKE_TELEMETRY_DIR``; no files without one. ``retention`` (or
  ``TQ_MOONCAKE_TELEMETRY_FILE_MB``, ``_KEEP_FILES``, ``_MAX_MB``): rotation size, rotated files kept per file, and
  the cap on all of the process's files (``rotating_file.Retention``; default 32 MiB, 20, 768 MiB).
* ``prometheus_port``: ``TQ_MOONCAKE_PROMETHEUS_PORT`` (0: any free port); no scrape endpoint without one.

With a telemetry folder, spans and metrics are also appended as OTLP JSON lines (the Collector file
exporter's format: one ``{"resourceSpans": ...}`` / ``{"resourceMetrics": ...}`` object per line) to
``traces-<host>-<pid>.jsonl`` and ``metrics-<host>-<pid>.jsonl``, rotated to ``<stem>.<seq>.jsonl`` and expired
by the retention (``rotating_file``); metrics lines are compact deltas (``metrics_file``). The Prometheus endpoint
binds 127.0.0.1 only. Everything is flushed and shut down at interpreter exit (or by ``Telemetry.shutdown()``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler

from . import conventions as c
from .instruments import OTelObserver
from .rotating_file import MIB, Retention, RotatingFile
from .sampling import SAMPLER_NAME, KeepFailuresSampler

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
LOOPBACK = "127.0.0.1"
SPAN_EXPORT_DELAY_MS = 500  # the batch span processor's schedule delay (the SDK's default is 5000)


def metric_views() -> list[View]:
    """Second-sized buckets for the three histograms.

    No ``attribute_keys`` filter: the allow-list is kept by construction (the instruments are only ever
    given the attributes in ``conventions.METRIC_ATTRIBUTES``; a test checks every exported point), and an
    SDK filter would cost about 10 us per measurement."""
    return [
        View(
            instrument_name=name,
            meter_name=c.INSTRUMENTATION_SCOPE,
            aggregation=ExplicitBucketHistogramAggregation(c.DURATION_BUCKETS_S),
        )
        for name in c.HISTOGRAMS
    ]


def build_resource(service_name: str | None = None, attributes: Mapping[str, Any] | None = None) -> Resource:
    """``host.name`` and ``process.pid``, overridden by ``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_SERVICE_NAME``,
    overridden by the arguments; ``service.name`` defaults to ``tq-mooncake``."""
    explicit = dict(attributes or {})
    if service_name:
        explicit[c.RESOURCE_SERVICE_NAME] = service_name
    base = Resource({c.RESOURCE_HOST_NAME: socket.gethostname(), c.RESOURCE_PROCESS_PID: os.getpid()})
    resource = base.merge(Resource.create(explicit))
    if str(resource.attributes.get(c.RESOURCE_SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({c.RESOURCE_SERVICE_NAME: c.DEFAULT_SERVICE_NAME}))
    return resource


def telemetry_files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(traces-<host>-<pid>.jsonl, metrics-<host>-<pid>.jsonl)`` in ``folder``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    stem = f"{host}-{os.getpid()}.jsonl"
    return Path(folder) / f"traces-{stem}", Path(folder) / f"metrics-{stem}"


@dataclass
class Telemetry:
    """The SDK pipeline ``configure`` built. ``shutdown()`` flushes and stops it; idempotent."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    resource: Resource
    otlp_endpoint: str | None = None
    otlp_protocol: str | None = None
    trace_file: Path | None = None
    metrics_file: Path | None = None
    retention: Retention | None = None
    prometheus_port: int | None = None
    _stoppers: list[Callable[[], object]] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def observer(
        self, budget_tokens: Callable[[], float] | None = None, ejected_nodes: Callable[[], int] | None = None
    ) -> OTelObserver:
        """An ``OTelObserver`` on these providers."""
        return OTelObserver(self.tracer_provider, self.meter_provider, budget_tokens, ejected_nodes)

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        """Export everything recorded so far (spans, then a metric collection)."""
        ok = self.tracer_provider.force_flush(timeout_millis)
        return self.meter_provider.force_flush(timeout_millis) and ok

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for stop in (self.tracer_provider.shutdown, self.meter_provider.shutdown, *self._stoppers):
            try:
                stop()
            except Exception:  # one failing exporter must not keep the others from flushing
                logger.exception("telemetry shutdown step failed")


_lock = threading.Lock()
_configured: Telemetry | None = None


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _port(value: int | str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{c.ENV_PROMETHEUS_PORT} / prometheus_port must be a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{c.ENV_PROMETHEUS_PORT} / prometheus_port must be in 0..65535, got {port}")
    return port


def mib_to_bytes(name: str, value: Any) -> int:
    """A size in MiB (a number, or its text; decimals allowed) as bytes; ValueError naming ``name`` unless it is a
    finite number that comes to at least one byte."""
    try:
        if isinstance(value, bool):
            raise TypeError
        size = float(value) * MIB
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a size in MiB, got {value!r}") from None
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(f"{name} must be a size in MiB of at least one byte, got {value!r}")
    return int(size)


def retention_from_env(retention: Retention | None = None) -> Retention:
    """``retention``, else one from ``TQ_MOONCAKE_TELEMETRY_FILE_MB`` / ``_KEEP_FILES`` / ``_MAX_MB`` (MiB, decimals
    allowed) over the defaults; ValueError for a bad value."""
    if retention is not None:
        return retention
    default = Retention()
    file_mb, keep, max_mb = (_env(name) for name in (c.ENV_FILE_MB, c.ENV_KEEP_FILES, c.ENV_MAX_MB))
    if keep is not None and not (keep.isdigit() and keep.isascii()):
        raise ValueError(f"{c.ENV_KEEP_FILES} must be a whole number >= 0, got {keep!r}")
    return Retention(
        max_file_bytes=mib_to_bytes(c.ENV_FILE_MB, file_mb) if file_mb else default.max_file_bytes,
        max_backups=int(keep) if keep else default.max_backups,
        max_total_bytes=mib_to_bytes(c.ENV_MAX_MB, max_mb) if max_mb else default.max_total_bytes,
    )


def choose_sampler(sampler: Sampler | None, clean_trace_ratio: float | None) -> Sampler | None:
    """The tracer provider's sampler: ``sampler``; else ``KeepFailuresSampler`` at ``clean_trace_ratio``; else what
    ``OTEL_TRACES_SAMPLER`` names (None: the SDK reads it; ``tq_mooncake``: ours, ratio from
    ``OTEL_TRACES_SAMPLER_ARG``); else ours at the default ratio."""
    if sampler is not None:
        if clean_trace_ratio is not None:
            raise ValueError("give either a sampler or a clean_trace_ratio (for the default sampler), not both")
        return sampler
    if clean_trace_ratio is not None:
        return KeepFailuresSampler(clean_trace_ratio)
    named = (_env("OTEL_TRACES_SAMPLER") or SAMPLER_NAME).lower()
    if named != SAMPLER_NAME:
        return None
    arg = _env("OTEL_TRACES_SAMPLER_ARG") if _env("OTEL_TRACES_SAMPLER") else None
    return KeepFailuresSampler(arg) if arg else KeepFailuresSampler()


def _otlp_exporters(endpoint: str | None, protocol: str) -> tuple[Any, Any]:
    """Span and metric OTLP exporters; ``endpoint`` None lets them read ``OTEL_EXPORTER_OTLP_*`` themselves."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint), OTLPMetricExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HTTPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter

    base = endpoint.rstrip("/") if endpoint else None
    return (
        HTTPSpanExporter(endpoint=f"{base}/v1/traces" if base else None),
        HTTPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None),
    )


def _batch_processor(exporter: Any) -> BatchSpanProcessor:
    """A batch span processor exporting every ``SPAN_EXPORT_DELAY_MS`` unless ``OTEL_BSP_SCHEDULE_DELAY`` says."""
    delay = None if _env("OTEL_BSP_SCHEDULE_DELAY") else SPAN_EXPORT_DELAY_MS
    return BatchSpanProcessor(exporter, schedule_delay_millis=delay)


def _add_exporters(
    tracer_provider: TracerProvider,
    readers: list[MetricReader],
    use_otlp: bool,
    otlp_endpoint: str | None,
    protocol: str,
    folder: str | os.PathLike[str] | None,
    interval_s: float | None,
    retention: Retention | None = None,
) -> dict[str, Any]:
    """Add the OTLP and JSON-lines exporters to ``tracer_provider`` and ``readers``; returns what was set up."""
    interval_ms = interval_s * 1000 if interval_s is not None else None
    added: dict[str, Any] = {}
    if use_otlp:
        span_exporter, metric_exporter = _otlp_exporters(otlp_endpoint, protocol)
        tracer_provider.add_span_processor(_batch_processor(span_exporter))
        readers.append(PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval_ms))
        added.update(otlp_endpoint=otlp_endpoint or _env("OTEL_EXPORTER_OTLP_ENDPOINT"), otlp_protocol=protocol)
    if folder is not None:
        from .jsonl import JsonLinesSpanExporter
        from .metrics_file import JsonLinesMetricExporter

        retention = retention_from_env(retention)
        Path(folder).mkdir(parents=True, exist_ok=True)
        trace_file, metrics_file = telemetry_files(folder)
        group = (trace_file, metrics_file)
        span_exporter = JsonLinesSpanExporter(RotatingFile(trace_file, retention, group))
        tracer_provider.add_span_processor(_batch_processor(span_exporter))
        file_exporter = JsonLinesMetricExporter(RotatingFile(metrics_file, retention, group))
        readers.append(PeriodicExportingMetricReader(file_exporter, export_interval_millis=interval_ms))
        added.update(trace_file=trace_file, metrics_file=metrics_file, retention=retention)
    return added


def file_pipeline(
    folder: str | os.PathLike[str],
    resource: Resource | None = None,
    sampler: Sampler | None = None,
    metric_export_interval_s: float | None = None,
    retention: Retention | None = None,
    clean_trace_ratio: float | None = None,
) -> tuple[TracerProvider, MeterProvider]:
    """SDK providers that export only to OTLP JSON-lines files in ``folder`` (as ``configure`` would: same
    sampler choice, rotation and compaction), not installed globally (for benchmarks and tools that need their
    own pipeline); the caller shuts them down."""
    tracer_provider = TracerProvider(
        resource=resource or build_resource(),
        sampler=choose_sampler(sampler, clean_trace_ratio),
        shutdown_on_exit=False,
    )
    readers: list[MetricReader] = []
    try:
        _add_exporters(tracer_provider, readers, False, None, PROTOCOLS[1], folder, metric_export_interval_s, retention)
        meter_provider = MeterProvider(
            metric_readers=readers, resource=tracer_provider.resource, views=metric_views(), shutdown_on_exit=False
        )
    except BaseException:
        _stop_quietly(tracer_provider, readers)
        raise
    return tracer_provider, meter_provider


def _stop_quietly(
    tracer_provider: TracerProvider, readers: list[MetricReader], stoppers: Sequence[Callable[[], object]] = ()
) -> None:
    """Stop what a failed set-up had started (threads, files, servers), ignoring their errors."""
    for stop in (tracer_provider.shutdown, *(r.shutdown for r in readers), *stoppers):
        with contextlib.suppress(Exception):
            stop()


def configure(
    *,
    service_name: str | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    otlp_endpoint: str | None = None,
    otlp_protocol: str | None = None,
    telemetry_dir: str | os.PathLike[str] | None = None,
    prometheus_port: int | None = None,
    metric_export_interval_s: float | None = None,
    sampler: Sampler | None = None,
    clean_trace_ratio: float | None = None,
    retention: Retention | None = None,
    set_global: bool = True,
) -> Telemetry:
    """Build the SDK tracer and meter providers for this process (see the module docstring), register an
    exit-time flush, and install them as the global providers unless ``set_global`` is false.

    Once per process: a later call returns the first call's ``Telemetry`` and ignores its arguments.
    Raises ValueError for an unknown OTLP protocol, a bad Prometheus port, ratio or retention setting, OSError
    for a busy port or an unwritable folder; nothing is left running then.
    """
    global _configured
    with _lock:
        if _configured is not None:
            logger.debug("telemetry already configured in this process; returning the existing providers")
            return _configured
        endpoint = otlp_endpoint or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
        protocol = (otlp_protocol or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
        use_otlp = bool(
            endpoint or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
        if use_otlp and protocol not in PROTOCOLS:
            raise ValueError(f"OTLP protocol must be one of {PROTOCOLS}, got {protocol!r}")
        folder = telemetry_dir if telemetry_dir is not None else _env(c.ENV_TELEMETRY_DIR)
        port_setting = prometheus_port if prometheus_port is not None else _env(c.ENV_PROMETHEUS_PORT)
        port = _port(port_setting) if port_setting is not None else None
        chosen_sampler = choose_sampler(sampler, clean_trace_ratio)
        if folder is not None:
            retention = retention_from_env(retention)
            retention.check_room(len(telemetry_files(folder)))

        stoppers: list[Callable[[], object]] = []
        telemetry_kw: dict[str, Any] = {}
        if port is not None:  # first: a busy port fails before any exporter thread is started
            from prometheus_client import start_http_server

            server, _ = start_http_server(port, addr=LOOPBACK)
            telemetry_kw["prometheus_port"] = server.server_port
            stoppers += [server.shutdown, server.server_close]
        resource = build_resource(service_name, resource_attributes)
        tracer_provider = TracerProvider(resource=resource, sampler=chosen_sampler, shutdown_on_exit=False)
        readers: list[MetricReader] = []
        try:
            telemetry_kw.update(
                _add_exporters(
                    tracer_provider,
                    readers,
                    use_otlp,
                    otlp_endpoint,
                    protocol,
                    folder,
                    metric_export_interval_s,
                    retention,
                )
            )
            if port is not None:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader

                readers.append(PrometheusMetricReader())
            meter_provider = MeterProvider(
                metric_readers=readers, resource=resource, views=metric_views(), shutdown_on_exit=False
            )
        except BaseException:
            _stop_quietly(tracer_provider, readers, stoppers)
            raise
        telemetry = Telemetry(tracer_provider, meter_provider, resource, _stoppers=stoppers, **telemetry_kw)
        if set_global:
            trace.set_tracer_provider(tracer_provider)
            metrics.set_meter_provider(meter_provider)
        atexit.register(telemetry.shutdown)
        _configured = telemetry
        return telemetry
