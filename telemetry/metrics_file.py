"""``JsonLinesMetricExporter``: metrics as compact OTLP JSON lines, one ``{"resourceMetrics": [...]}`` per export.

Compact because each line holds only what happened since the previous one: counters and histograms are exported
with delta temporality, and a series with nothing new (a counter that did not move, a histogram with no
observation) is left out, as is a metric with no series left; gauges are written every time (the current value,
and a sign of life). So a line's size follows the activity of the interval, not every code and outcome ever seen,
and a reader loses nothing by starting at any line (each line is self-contained: no running totals to difference).
The encoding is the upstream OTLP/JSON encoder's; the Prometheus endpoint and OTLP exporters are other readers
with their own (cumulative) temporality and are unaffected.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

from opentelemetry.sdk.metrics import Counter, Histogram, ObservableCounter, ObservableUpDownCounter, UpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    Sum,
)

from .jsonl import LineWriter
from .rotating_file import RotatingFile

DELTA = {
    Counter: AggregationTemporality.DELTA,
    ObservableCounter: AggregationTemporality.DELTA,
    Histogram: AggregationTemporality.DELTA,
    UpDownCounter: AggregationTemporality.CUMULATIVE,
    ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
}
"""Delta for what only grows (counters, histograms); up-down counters stay cumulative (a level, not an event)."""


def _moved(point: Any, data: Any) -> bool:
    """Whether a data point says something new: a delta sum that changed, a delta histogram with observations;
    cumulative sums and gauges always."""
    delta = getattr(data, "aggregation_temporality", None) is AggregationTemporality.DELTA
    if isinstance(point, HistogramDataPoint):
        return not delta or point.count > 0
    if isinstance(point, NumberDataPoint) and isinstance(data, Sum):
        return not delta or point.value != 0
    return True


def compact(metrics_data: MetricsData) -> MetricsData | None:
    """``metrics_data`` without the series that have nothing new (see ``_moved``), the metrics left empty, and
    the scopes and resources left empty; None when nothing remains."""
    resources = []
    for rm in metrics_data.resource_metrics:
        scopes = []
        for sm in rm.scope_metrics:
            kept: list[Metric] = []
            for metric in sm.metrics:
                data = metric.data
                points = [p for p in data.data_points if _moved(p, data)]
                if not points:
                    continue
                if len(points) != len(data.data_points):
                    metric = dataclasses.replace(metric, data=dataclasses.replace(data, data_points=points))
                kept.append(metric)
            if kept:
                scopes.append(dataclasses.replace(sm, metrics=kept))
        if scopes:
            resources.append(dataclasses.replace(rm, scope_metrics=scopes))
    return MetricsData(resource_metrics=resources) if resources else None


MAX_UNSENT_LINES = 1440
"""Lines kept while writes fail (a day at the default 60 s interval), written with the next line that succeeds:
a delta lost would be lost for good. Past that the oldest go."""


class JsonLinesMetricExporter(MetricExporter):
    """Appends each collection, compacted (see the module docstring), as one OTLP JSON line to ``target`` (a path,
    or a ``RotatingFile`` with its own retention). A line that could not be written is written with the next one
    that can (at most ``MAX_UNSENT_LINES`` kept)."""

    def __init__(self, target: str | os.PathLike[str] | RotatingFile) -> None:
        super().__init__(preferred_temporality=DELTA)
        self.writer = LineWriter("metrics", target)
        self._unsent: collections.deque[str] = collections.deque(maxlen=MAX_UNSENT_LINES)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        if not self.writer.write(lambda: self._lines(metrics_data)):
            return MetricExportResult.FAILURE
        self._unsent.clear()
        return MetricExportResult.SUCCESS

    def _lines(self, metrics_data: MetricsData) -> str | None:
        """This collection's line, compacted, after the lines not written yet; None when there is none."""
        data = compact(metrics_data)
        if data is not None:
            from opentelemetry.exporter.otlp.json.common.metrics_encoder import encode_metrics

            self._unsent.append(json.dumps(encode_metrics(data).to_dict(), separators=(",", ":")) + "\n")
        return "".join(self._unsent) or None

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.writer.file.close()
