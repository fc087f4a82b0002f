"""``Otel``: the real OpenTelemetry SDK with in-memory exporters, for tests that check exact spans and metric
points (tests/conftest.py's ``otel`` fixture builds one per test and shuts it down)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tq_mooncake.telemetry import OTelObserver, metric_views


@dataclass
class Otel:
    spans: InMemorySpanExporter
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader
    meter_provider: MeterProvider

    @classmethod
    def start(cls) -> Otel:
        """Providers with an in-memory span exporter (exported as each span ends) and metric reader, and our views."""
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryMetricReader()
        return cls(spans, tracer_provider, reader, MeterProvider(metric_readers=[reader], views=metric_views()))

    @property
    def providers(self) -> dict[str, Any]:
        """``tracer_provider`` and ``meter_provider``, as keyword arguments of ``MooncakeBatchClient``."""
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def observer(self, budget_tokens: Callable[[], float] | None = None, **kwargs: Any) -> OTelObserver:
        return OTelObserver(self.tracer_provider, self.meter_provider, budget_tokens, **kwargs)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, dict[frozenset, Any]]:
        """metric name -> {frozenset(attributes): value (sums, gauges) or (count, sum) (histograms)}."""
        return points(self.reader.get_metrics_data())

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def points(data: MetricsData | None) -> dict[str, dict[frozenset, Any]]:
    """What ``Otel.metrics`` returns, from any reader's ``MetricsData``."""
    out: dict[str, dict[frozenset, Any]] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for dp in metric.data.data_points:
                    value = (dp.count, dp.sum) if hasattr(dp, "bucket_counts") else dp.value
                    out.setdefault(metric.name, {})[frozenset(dp.attributes.items())] = value
    return out
