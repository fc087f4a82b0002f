"""Where the dashboard's metrics come from: one ``Source`` interface, two implementations.

* ``FileSource``: a folder of OTLP JSON-lines files (``metrics-<host>-<pid>.jsonl`` from ``configure()`` and its
  rotated files, or what the Collector's file exporter wrote), read incrementally.
* ``PrometheusSource``: the Prometheus HTTP API (``/api/v1/query_range``) over urllib, with the series
  names of the Prometheus translation (``telemetry/CONVENTIONS.md``).

Both return ``Increment``s (see ``metrics``) and the gauges' values as reported, so every figure is computed by
the same code.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tq_mooncake.telemetry import conventions as c

from . import http_get
from .metrics import (
    BUCKET,
    COUNT,
    WANTED,
    Differencer,
    Increment,
    Point,
    TailReader,
    file_list,
    labels,
    split_gauges,
)
from .metrics import parse_metrics_line as parse_line

FILE_PATTERNS = ("*.jsonl", "*.json", "*.jsonl[.-][0-9]*", "*.json[.-][0-9]*")
"""Active and rotated files: ``x.jsonl``, ours ``x.000001.jsonl``, logrotate's ``x.jsonl.1`` and ``x.jsonl-20261201``
(compressed ones are left out: ``metrics.COMPRESSED``)."""
MAX_POINTS = 1000  # per series and query; Prometheus refuses more than 11,000
MAX_ANSWER_BYTES = 256 << 20  # the largest Prometheus answer read
JSON = "application/json"


@dataclass
class Snapshot:
    """What a source holds for a time range: increments, plus what the page says about the source."""

    increments: list[Increment]
    newest: float | None = None  # time of the newest point seen, if any
    files: int = 0  # metrics files in the folder at the last read (file source)
    skipped_lines: int = 0  # malformed lines skipped so far (file source)
    last_problem: str = ""  # why the last skipped line was skipped
    error: str | None = None  # the source could not be read at all
    gauges: list[Point] = field(default_factory=list)  # values of the gauges in metrics.GAUGES, as reported
    unreadable: dict[str, str] = field(default_factory=dict)  # files that could not be read (name -> why)


class Source(Protocol):
    """Anything that can say what the counters added up over a time range."""

    description: str

    def load(self, start: float, end: float) -> Snapshot:
        """The increments with ``start < time <= end`` (seconds since the epoch). Never raises for an
        unreachable or empty source: ``Snapshot.error`` says what went wrong."""
        ...


class FileSource:
    """OTLP JSON-lines files in ``folder`` (``FILE_PATTERNS``; not ``traces*``/``logs*``, not compressed). Each
    ``load`` reads only the bytes appended since the previous one, following each file by identity through renames
    (``TailReader``): a rotated file is not read again; a truncated one (``copytruncate``) is read from the start,
    and its copy once. The points of a read are differenced in time order, whatever file they came from, and a
    point read twice counts once. What is deleted before it is read is lost. Thread-safe."""

    def __init__(self, folder: str | Path, retention_s: float = 7 * 86400) -> None:
        self.folder = Path(folder)
        self.description = f"files in {self.folder}"
        self.retention_s = retention_s
        self._tail = TailReader()
        self._diff = Differencer()
        self._increments: list[Increment] = []
        self._gauges: list[Point] = []
        self._newest: float | None = None
        self._files = 0
        self.skipped_lines = 0
        self.last_problem = ""
        self._lock = threading.Lock()

    def refresh(self) -> int:
        """Read what was appended since the last call; returns the number of points read."""
        listing = file_list(self.folder, FILE_PATTERNS)
        points: list[Point] = []
        for path, line in self._tail.read(listing):
            try:
                points.extend(parse_line(line))
            except ValueError as exc:
                self.skipped_lines += 1
                self.last_problem = f"{path.name}: {exc}"
        self._files = len(listing)
        points.sort(key=lambda p: p.time)  # in time order whatever the files' order (see Differencer)
        counters, gauges = split_gauges(points)
        self._increments.extend(self._diff.add(counters))
        self._gauges.extend(self._diff.newer(gauges))
        if points:
            self._newest = points[-1].time if self._newest is None else max(self._newest, points[-1].time)
        if self._newest is not None:
            horizon = self._newest - self.retention_s
            if self._increments and self._increments[0].time < horizon:
                self._increments = [i for i in self._increments if i.time >= horizon]
            if self._gauges and self._gauges[0].time < horizon:
                self._gauges = [g for g in self._gauges if g.time >= horizon]
        return len(points)

    def load(self, start: float, end: float) -> Snapshot:
        with self._lock:
            if not self.folder.is_dir():
                return Snapshot([], error=f"folder {self.folder} does not exist")
            self.refresh()
            return Snapshot(
                [i for i in self._increments if start < i.time <= end],
                newest=self._newest,
                gauges=[g for g in self._gauges if start < g.time <= end],
                files=self._files,
                skipped_lines=self.skipped_lines,
                last_problem=self.last_problem,
                unreadable=dict(self._tail.unreadable),
            )


# ------------------------------------------------------------------------------------------------ Prometheus

PROMETHEUS_SERIES: dict[str, str] = {
    "mooncake_client_operations_total": c.OPERATIONS_METRIC,
    "mooncake_client_attempts_total": c.ATTEMPTS_METRIC,
    "mooncake_client_keys_total": c.KEYS_METRIC,
    "mooncake_client_keys_failed_total": c.KEYS_FAILED_METRIC,
    "mooncake_client_operation_duration_seconds_bucket": c.OPERATION_DURATION_METRIC + BUCKET,
    "mooncake_client_retry_delay_seconds_count": c.RETRY_DELAY_METRIC + COUNT,
    "mooncake_client_node_ejections_total": c.EJECTIONS_METRIC,
    "mooncake_client_node_failures_total": c.NODE_FAILURES_METRIC,
    "mooncake_client_replica_fallbacks_total": c.FALLBACKS_METRIC,
    "mooncake_client_nodes_ejected": c.EJECTED_METRIC,
}
"""Prometheus series name -> the dashboard's metric name (the exporter's translation of CONVENTIONS.md)."""
assert set(PROMETHEUS_SERIES.values()) == WANTED

PROMETHEUS_LABELS: dict[str, str] = {
    "mooncake_operation": c.OPERATION,
    "mooncake_outcome": c.OUTCOME,
    "mooncake_attempt": c.ATTEMPT,
    "mooncake_result": c.RESULT,
    "error_type": c.ERROR_TYPE,
    "server_address": c.SERVER_ADDRESS,
    "server_port": c.SERVER_PORT,
    "le": "le",
}


class PrometheusError(RuntimeError):
    """The Prometheus API could not be reached or refused the query."""


def query_step(seconds: float) -> float:
    """A whole-second step giving at most ``MAX_POINTS`` points over ``seconds``."""
    return float(max(1, math.ceil(seconds / MAX_POINTS)))


@dataclass
class PrometheusSource:
    """Counters from a Prometheus server at ``url`` (e.g. ``http://127.0.0.1:9090``). Each ``load`` runs one
    ``query_range`` for the dashboard's series (plus ``target_info`` for host, pid and service names) and
    differences the values per series as the file source does: a series first seen inside the range counts
    from zero, a drop is a counter reset. Gauges (``metrics.GAUGES``) are kept as evaluated at each step."""

    url: str
    timeout_s: float = 10.0
    description: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.description = f"Prometheus at {self.url}"

    def query_range(self, query: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The ``result`` of ``/api/v1/query_range`` (a matrix); PrometheusError on any failure."""
        params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step})
        try:
            answer = http_get.get(f"{self.url}/api/v1/query_range?{params}", self.timeout_s, MAX_ANSWER_BYTES, JSON)
            body = json.loads(answer.body)
        except http_get.HttpError as exc:
            try:
                detail = json.loads(exc.body).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise PrometheusError(f"{self.url} answered HTTP {exc.status} {detail}".strip()) from None
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"cannot query {self.url}: {exc}") from None
        if not isinstance(body, dict):
            raise PrometheusError(f"{self.url}: not the Prometheus API's JSON")
        if body.get("status") != "success":
            raise PrometheusError(f"{self.url}: {body.get('error', 'query failed')}")
        return body.get("data", {}).get("result", [])

    def load(self, start: float, end: float) -> Snapshot:
        end = math.floor(end * 1000) / 1000  # Prometheus keeps milliseconds: its last timestamp must not pass `end`
        step = query_step(end - start)
        n = math.ceil((end - start) / step)
        first = end - (n + 1) * step  # one step before the range: series seen there are a baseline
        names = "|".join(sorted(PROMETHEUS_SERIES)) + "|target_info"
        try:
            result = self.query_range(f'{{__name__=~"{names}"}}', first, end, step)
        except PrometheusError as exc:
            return Snapshot([], error=str(exc))
        origins = _origins([s for s in result if s.get("metric", {}).get("__name__") == "target_info"])
        points: list[Point] = []
        for series in result:
            metric = dict(series.get("metric", {}))
            name = PROMETHEUS_SERIES.get(metric.pop("__name__", ""))
            if name is None:
                continue
            origin = origins.get((metric.get("job", ""), metric.get("instance", ""))) or labels(
                {"host": metric.get("instance", ""), "service": metric.get("job", "")}
            )
            attrs = labels({PROMETHEUS_LABELS[k]: v for k, v in metric.items() if k in PROMETHEUS_LABELS})
            for t, v in series.get("values", []):
                value = float(v)
                if math.isfinite(value):
                    points.append(Point(name, origin, attrs, float(t), value))
        points.sort(key=lambda p: p.time)
        counters, gauges = split_gauges(points)
        increments = [i for i in Differencer().add(counters) if start < i.time <= end]
        return Snapshot(
            increments,
            newest=max((p.time for p in points), default=None),
            gauges=[g for g in gauges if start < g.time <= end],
        )


def _origins(target_info: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[tuple[str, str], ...]]:
    """(job, instance) -> host, process and service from ``target_info`` (the resource of OTel exporters)."""
    out = {}
    for series in target_info:
        m = series.get("metric", {})
        out[(m.get("job", ""), m.get("instance", ""))] = labels(
            {
                "host": m.get("host_name") or m.get("instance", ""),
                "process": m.get("process_pid", ""),
                "service": m.get("service_name") or m.get("job", ""),
            }
        )
    return out
