"""The dashboard's arithmetic, free of Streamlit and of I/O beyond reading files: OTLP JSON lines become
cumulative points, points become increments (differencing each series, resets handled), and increments
become windowed figures (rates, ratios, histogram quantiles).

Both sources end in the same ``Increment`` list, so every figure is computed the same way whether the
metrics came from files or from Prometheus.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tq_mooncake.telemetry import conventions as c

Labels = tuple[tuple[str, str], ...]

BUCKET = "#bucket"  # suffix of a histogram's per-``le`` cumulative counts (Prometheus' ``_bucket``)
COUNT = "#count"  # suffix of a histogram's observation count (Prometheus' ``_count``)
LE = "le"
GAUGES: frozenset[str] = frozenset({c.EJECTED_METRIC})
"""The gauges (of ``conventions.GAUGES``) the dashboard shows: their latest values, never differenced
(``Snapshot.gauges``)."""
WANTED: frozenset[str] = frozenset(
    {
        c.OPERATIONS_METRIC,
        c.ATTEMPTS_METRIC,
        c.KEYS_METRIC,
        c.KEYS_FAILED_METRIC,
        c.OPERATION_DURATION_METRIC + BUCKET,
        c.RETRY_DELAY_METRIC + COUNT,
        c.EJECTIONS_METRIC,
        c.NODE_FAILURES_METRIC,
        c.FALLBACKS_METRIC,
        *GAUGES,
    }
)
"""The series the dashboard uses; other metrics are not kept."""
LATENCY_BOUNDS = (*c.DURATION_BUCKETS_S, math.inf)


def labels(mapping: Mapping[str, Any]) -> Labels:
    """A hashable, sorted label set; empty values are dropped (Prometheus fills missing labels with "")."""
    return tuple(sorted((str(k), str(v)) for k, v in mapping.items() if v is not None and str(v) != ""))


def label(pairs: Labels, name: str, default: str = "") -> str:
    """The value of ``name`` in the label set ``pairs`` (``default`` without it)."""
    return next((v for k, v in pairs if k == name), default)


def format_le(bound: float) -> str:
    """A histogram bound as an ``le`` label: ``+Inf`` or the float's repr (``0.005``, ``1.0``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _Labelled:
    """Attribute and origin look-ups shared by points and increments (what a ``Filter`` reads)."""

    metric: str
    origin: Labels
    attrs: Labels

    def attr(self, name: str, default: str = "") -> str:
        return label(self.attrs, name, default)

    def who(self, name: str) -> str:
        return label(self.origin, name)


@dataclass(frozen=True)
class Point(_Labelled):
    """One exported value of one series.

    ``metric`` is the OpenTelemetry name (histograms: ``<name>#bucket`` with an ``le`` label, ``<name>#count``);
    ``origin`` says who reported it (``host``, ``process``, ``service``); ``time`` and ``start`` are seconds
    since the epoch (``start``: when a cumulative counter began, None if unknown); ``delta`` is true when the
    value already is an increment (delta temporality).
    """

    metric: str
    origin: Labels
    attrs: Labels
    time: float
    value: float
    start: float | None = None
    delta: bool = False

    @property
    def key(self) -> tuple[str, Labels, Labels]:
        return self.metric, self.origin, self.attrs


@dataclass(frozen=True)
class Increment(_Labelled):
    """What a series added up to ``time`` since its previous point."""

    metric: str
    origin: Labels
    attrs: Labels
    time: float
    value: float


# ------------------------------------------------------------------------------------------------ parsing


def _any_value(value: Mapping[str, Any]) -> str:
    for kind in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if kind in value:
            return str(value[kind])
    if "arrayValue" in value:
        return ",".join(_any_value(v) for v in value["arrayValue"].get("values", []))
    return ""


def otlp_attributes(items: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    """OTLP/JSON ``attributes`` as ``{key: text}`` (arrays joined by commas)."""
    return {str(kv["key"]): _any_value(kv.get("value", {})) for kv in items or []}


def otlp_seconds(nanos: Any) -> float | None:
    """OTLP/JSON nanoseconds (a string or an int) as epoch seconds; None for none or 0."""
    return int(nanos) / 1e9 if nanos not in (None, "", "0", 0) else None


def otlp_origin(resource: Mapping[str, str]) -> Labels:
    """Who reported it (``host``, ``process``, ``service``), from a resource's attributes."""
    return labels(
        {
            "host": resource.get(c.RESOURCE_HOST_NAME, ""),
            "process": resource.get(c.RESOURCE_PROCESS_PID, ""),
            "service": resource.get(c.RESOURCE_SERVICE_NAME, ""),
        }
    )


def _sum_points(metric: Mapping[str, Any], origin: Labels, wanted: Container[str]) -> Iterable[Point]:
    name, data = metric["name"], metric["sum"]
    if name not in wanted:
        return
    delta = int(data.get("aggregationTemporality", 2)) == 1
    for dp in data.get("dataPoints", []):
        value = float(dp["asInt"]) if "asInt" in dp else float(dp.get("asDouble", 0.0))
        time = otlp_seconds(dp["timeUnixNano"])
        if time is None:
            raise ValueError("a data point without timeUnixNano")
        attrs = labels(otlp_attributes(dp.get("attributes")))
        yield Point(name, origin, attrs, time, value, otlp_seconds(dp.get("startTimeUnixNano")), delta)


def _gauge_points(metric: Mapping[str, Any], origin: Labels, wanted: Container[str]) -> Iterable[Point]:
    name, data = metric["name"], metric["gauge"]
    if name not in wanted:
        return
    for dp in data.get("dataPoints", []):
        value = float(dp["asInt"]) if "asInt" in dp else float(dp.get("asDouble", 0.0))
        time = otlp_seconds(dp["timeUnixNano"])
        if time is None:
            raise ValueError("a data point without timeUnixNano")
        yield Point(name, origin, labels(otlp_attributes(dp.get("attributes"))), time, value)


def _histogram_points(metric: Mapping[str, Any], origin: Labels, wanted: Container[str]) -> Iterable[Point]:
    name, data = metric["name"], metric["histogram"]
    want_buckets, want_count = name + BUCKET in wanted, name + COUNT in wanted
    if not (want_buckets or want_count):
        return
    delta = int(data.get("aggregationTemporality", 2)) == 1
    for dp in data.get("dataPoints", []):
        time = otlp_seconds(dp["timeUnixNano"])
        if time is None:
            raise ValueError("a data point without timeUnixNano")
        start = otlp_seconds(dp.get("startTimeUnixNano"))
        attrs = otlp_attributes(dp.get("attributes"))
        if want_count:
            yield Point(name + COUNT, origin, labels(attrs), time, float(dp.get("count", 0)), start, delta)
        counts = [float(n) for n in dp.get("bucketCounts", [])]
        bounds = [float(b) for b in dp.get("explicitBounds", [])] + [math.inf]
        if want_buckets and counts:
            if len(counts) != len(bounds):
                raise ValueError(f"{len(counts)} bucket counts for {len(bounds)} buckets")
            running = 0.0
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                le = labels({**attrs, LE: format_le(bound)})
                yield Point(name + BUCKET, origin, le, time, running, start, delta)


SIGNALS = ("resourceMetrics", "resourceSpans", "resourceLogs", "resourceProfiles")
"""The top-level keys of the OTLP/JSON export requests, one per signal."""


def otlp_request(line: str, signal: str) -> dict[str, Any] | None:
    """One OTLP/JSON line as the request object holding ``signal`` (one of ``SIGNALS``); None for a line of another
    signal. Raises ValueError for a line that is not such an object."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    if signal in request:
        return request
    if any(k in request for k in SIGNALS):
        return None
    raise ValueError(f"no {signal}")


def parse_metrics_line(line: str, wanted: Container[str] = WANTED) -> list[Point]:
    """The points of one OTLP/JSON line (an ``ExportMetricsServiceRequest``, as the SDK's and the Collector's
    file exporters write them). Sums, gauges and histograms only; lines of other signals (``resourceSpans``, ...)
    give ``[]``. Raises ValueError for a line that is not such an object."""
    request = otlp_request(line, "resourceMetrics")
    if request is None:
        return []
    points: list[Point] = []
    try:
        for rm in request["resourceMetrics"]:
            origin = otlp_origin(otlp_attributes(rm.get("resource", {}).get("attributes")))
            for sm in rm.get("scopeMetrics", []):
                for metric in sm.get("metrics", []):
                    if "sum" in metric:
                        points.extend(_sum_points(metric, origin, wanted))
                    elif "histogram" in metric:
                        points.extend(_histogram_points(metric, origin, wanted))
                    elif "gauge" in metric:
                        points.extend(_gauge_points(metric, origin, wanted))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed OTLP metrics: {type(exc).__name__} {exc}") from None
    return points


FileId = tuple[int, int]
"""A file's identity, ``(st_dev, st_ino)``: a rename keeps it, a copy gets a new one."""
CHUNK = 4 << 20
"""How much of a file is read at once (a large unread file is not held whole)."""
MARK = 1024
"""How many bytes before a file's offset are kept to recognise the file there (they hold the last line's times)."""


def file_id(st: os.stat_result) -> FileId:
    return st.st_dev, st.st_ino


class Position(NamedTuple):
    """How far a file was read: to ``offset`` (just past a newline), under ``name``, modified at ``mtime_ns``;
    ``mark``: the last bytes read (up to ``MARK``); ``size``: the file's size then (past ``offset`` when it ends in
    a line still without its newline)."""

    offset: int
    name: str
    mtime_ns: int
    mark: bytes
    size: int = -1


def _split(data: bytes) -> Iterator[str]:
    """The non-blank lines of ``data`` (complete lines), split at ``\\n`` only (a raw U+2028 or U+0085 inside a JSON
    string is no line break), a trailing ``\\r`` dropped."""
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").removesuffix("\r")
        if line.strip():
            yield line


@dataclass
class TailReader:
    """Reads the complete lines appended to files since the previous call, remembering a position per file
    identity (``file_id``), not per path: a renamed (rotated) file goes on from its offset. A line without its
    newline yet waits for the next call. A file whose bytes before the offset are no longer those read there
    (truncated or rewritten: ``copytruncate``; another file on a deleted one's inode) is read from the start."""

    offsets: dict[FileId, Position] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> why it could not be read
    bytes_read: int = 0  # bytes read past the offsets, in all (a partial line again with its rest; not the marks)

    def read(self, listing: list[tuple[Path, os.stat_result]]) -> Iterator[tuple[Path, str]]:
        """One pass over a folder's ``listing`` (``file_list``): each file's new ``lines`` as ``(path, line)``, in the
        listing's order; then the files not listed are forgotten. ``unreadable`` is what this pass could not read."""
        self.unreadable.clear()
        for path, listed in listing:
            for line in self.lines(path, listed):
                yield path, line
        self.forget_others(listed for _, listed in listing)

    def lines(self, path: Path, listed: os.stat_result | None = None) -> Iterator[str]:
        """The complete lines appended to ``path`` since the last call, read ``CHUNK`` bytes at a time (the position
        moves on as each chunk's lines are handed out: read them all); none when it is gone or cannot be read (then
        ``unreadable`` says why, by name, until it can). ``listed`` is its ``stat`` from the folder's listing: then
        none without opening it when its size, name and modification time are those of the last read, and none when
        the path now holds another file or less (rotated since: the next listing has it in order)."""
        if listed is not None:
            known = self.offsets.get(file_id(listed))
            if known is not None and (known.size, known.name, known.mtime_ns) == (
                listed.st_size,
                path.name,
                listed.st_mtime_ns,
            ):
                return
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self.unreadable.pop(path.name, None)
            return
        except OSError as exc:
            self.unreadable[path.name] = exc.strerror or str(exc)
            return
        with f:
            try:
                st = os.fstat(f.fileno())
                if listed is not None and (file_id(st) != file_id(listed) or st.st_size < listed.st_size):
                    return
                offset, _, _, mark, _ = self.offsets.get(file_id(st), Position(0, "", 0, b""))
                f.seek(max(0, offset - len(mark)))
                if f.read(len(mark)) != mark:
                    offset, mark = 0, b""
                f.seek(offset)
                rest = b""
                while data := f.read(CHUNK):
                    self.bytes_read += len(data)
                    data, rest = rest + data, b""
                    end = data.rfind(b"\n") + 1
                    rest = data[end:]
                    if not end:
                        continue
                    offset += end
                    mark = (mark + data[max(0, end - MARK) : end])[-MARK:]
                    self.offsets[file_id(st)] = Position(offset, path.name, st.st_mtime_ns, mark)
                    yield from _split(data[:end])
                # read to the end: the name (renamed?) and the size (a partial line is not read again unchanged)
                self.offsets[file_id(st)] = Position(offset, path.name, st.st_mtime_ns, mark, offset + len(rest))
            except OSError as exc:  # e.g. EIO, or a directory's EISDIR
                self.unreadable[path.name] = exc.strerror or str(exc)
                return
        self.unreadable.pop(path.name, None)

    def skip(self, path: Path, listed: os.stat_result, keep: int = 0) -> bool:
        """Count ``path`` (the file ``listed``) as read, without reading it, up to the start of the first line that
        begins in its last ``keep`` bytes (0: up to its last complete line): for data too old to matter. False
        (nothing changed) when there is no such line start (within 64 MiB past the cut; 0: within its last 64 KiB),
        or the file cannot be read."""
        window = 64 << 10
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if file_id(st) != file_id(listed) or keep >= st.st_size:
                    return False
                if keep <= 0:
                    f.seek(max(0, st.st_size - window))
                    tail = f.read(window)
                    if not (end := tail.rfind(b"\n") + 1):
                        return False
                    offset = st.st_size - len(tail) + end
                else:
                    f.seek(st.st_size - keep - 1)  # from the byte before: a line may begin right there
                    scanned = 0
                    while (newline := (chunk := f.read(window)).find(b"\n")) < 0:
                        scanned += len(chunk)
                        if not chunk or scanned >= CHUNK * 16:  # no line start in 64 MiB: read it all
                            return False
                    offset = st.st_size - keep + scanned + newline
                f.seek(max(0, offset - MARK))
                mark = f.read(offset - max(0, offset - MARK))
        except OSError:
            return False
        self.offsets[file_id(st)] = Position(offset, path.name, st.st_mtime_ns, mark)
        return True

    def forget_others(self, listed: Iterable[os.stat_result]) -> None:
        """Drops the offsets of the files not among ``listed`` (deleted, or renamed out of the listing)."""
        keep = {file_id(st) for st in listed}
        for gone in self.offsets.keys() - keep:
            del self.offsets[gone]


# ------------------------------------------------------------------------------------------------ increments


@dataclass
class Differencer:
    """Turns points into increments, series by series. The first point of a series counts from zero (a
    counter starts at 0); later ones count their difference to the previous point. A new start time or a
    lower value is a reset (a restarted process): the new value counts from zero, never negatively. Points
    not newer than the series' last point are ignored: a point read again (a ``copytruncate`` copy) counts
    once, but a new point that comes after a newer one of its series is lost, so give each read in time order."""

    last: dict[tuple[str, Labels, Labels], Point] = field(default_factory=dict)
    ignored: int = 0

    def add(self, points: Iterable[Point]) -> list[Increment]:
        out: list[Increment] = []
        for p in points:
            prev = self.last.get(p.key)
            if not self._take(p, prev):
                continue
            if p.delta or prev is None:
                value = p.value
            elif (p.start is not None and prev.start is not None and p.start != prev.start) or p.value < prev.value:
                value = p.value
            else:
                value = p.value - prev.value
            if value:
                out.append(Increment(p.metric, p.origin, p.attrs, p.time, value))
        return out

    def newer(self, points: Iterable[Point]) -> list[Point]:
        """The points newer than their series' last point, as they are (gauges: remembered, not differenced)."""
        return [p for p in points if self._take(p, self.last.get(p.key))]

    def _take(self, p: Point, prev: Point | None) -> bool:
        """Whether ``p`` is newer than ``prev``, its series' last point; then it becomes the last one, else it is
        counted as ignored."""
        if prev is not None and p.time <= prev.time:
            self.ignored += 1
            return False
        self.last[p.key] = p
        return True


def split_gauges(points: Iterable[Point]) -> tuple[list[Point], list[Point]]:
    """``(counter points, gauge points)``: the first go to a ``Differencer``, the second are kept as they are."""
    counters: list[Point] = []
    gauges: list[Point] = []
    for p in points:
        (gauges if p.metric in GAUGES else counters).append(p)
    return counters, gauges


# ------------------------------------------------------------------------------------------------ figures


def ratio(part: float, whole: float) -> float | None:
    """``part / whole``, None when ``whole`` is 0 (no data is not a 0% rate)."""
    return part / whole if whole else None


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``buckets`` maps upper bounds (``inf`` included) to cumulative
    counts; linear interpolation inside the bucket holding the rank, 0 as the first bucket's lower bound,
    the largest finite bound when the rank falls in the ``+Inf`` bucket. None without observations."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    counts, running = [], 0.0
    for b in bounds:  # cumulative counts must not decrease
        running = max(running, buckets[b])
        counts.append(running)
    total = counts[-1]
    if total <= 0:
        return None
    rank = min(max(q, 0.0), 1.0) * total
    for i, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
        if count >= rank:
            if math.isinf(bound):
                finite = [b for b in bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            lower = bounds[i - 1] if i > 0 else min(0.0, bound)
            below = counts[i - 1] if i > 0 else 0.0
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
    return None


@dataclass
class Figures:
    """Totals of one window (``seconds`` long) and what follows from them."""

    seconds: float
    operations: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    retried_operations: float = 0.0  # calls that retried at least once (mooncake.client.retry.delay count)
    attempts: Counter[int] = field(default_factory=Counter)  # by attempt number (10 = 10th and later)
    key_failures: Counter[str] = field(default_factory=Counter)  # per attempt, by error code
    keys: Counter[str] = field(default_factory=Counter)  # by final result: ok, retried_ok, failed
    latency: Counter[float] = field(default_factory=lambda: Counter(dict.fromkeys(LATENCY_BOUNDS, 0.0)))
    """operation.duration: upper bound -> cumulative count. Every bound of the conventions is present, so that
    buckets with no increment (differencing drops zeros) still bound the interpolation."""
    ejections: Counter[str] = field(default_factory=Counter)  # storage endpoint -> times a client ejected it
    node_failures: Counter[str] = field(default_factory=Counter)  # storage endpoint -> confirmed failures
    fallbacks: Counter[str] = field(default_factory=Counter)  # storage endpoint -> keys read from another replica

    def add(self, inc: Increment) -> None:
        metric, value = inc.metric, inc.value
        if metric == c.OPERATIONS_METRIC:
            self.operations += value
            self.outcomes[inc.attr(c.OUTCOME, "unknown")] += value
        elif metric == c.ATTEMPTS_METRIC:
            attempt = inc.attr(c.ATTEMPT, "1")
            self.attempts[int(attempt) if attempt.isdigit() else 0] += value
        elif metric == c.KEYS_FAILED_METRIC:
            self.key_failures[inc.attr(c.ERROR_TYPE, c.ERROR_TYPE_OTHER)] += value
        elif metric == c.KEYS_METRIC:
            self.keys[inc.attr(c.RESULT, "unknown")] += value
        elif metric == c.OPERATION_DURATION_METRIC + BUCKET:
            self.latency[float(inc.attr(LE, "+Inf"))] += value
        elif metric == c.RETRY_DELAY_METRIC + COUNT:
            self.retried_operations += value
        elif metric == c.NODE_FAILURES_METRIC:
            self.node_failures[endpoint_name(inc)] += value
        elif metric == c.FALLBACKS_METRIC:
            self.fallbacks[endpoint_name(inc)] += value
        elif metric == c.EJECTIONS_METRIC:
            self.ejections[endpoint_name(inc)] += value

    @property
    def ops_per_s(self) -> float | None:
        return self.operations / self.seconds if self.seconds > 0 else None

    @property
    def retry_rate(self) -> float | None:
        """Share of operations that retried at least once."""
        return ratio(self.retried_operations, self.operations)

    @property
    def retries(self) -> float:
        return sum(n for attempt, n in self.attempts.items() if attempt != 1)

    @property
    def retries_per_operation(self) -> float | None:
        return ratio(self.retries, self.operations)

    def outcome_rate(self, outcome: c.Outcome) -> float | None:
        return ratio(self.outcomes[outcome.value], self.operations)

    @property
    def exhaustion_rate(self) -> float | None:
        """Share of operations whose retries ran out (``exhausted``)."""
        return self.outcome_rate(c.Outcome.EXHAUSTED)

    @property
    def failure_rate(self) -> float | None:
        return ratio(sum(self.outcomes[o.value] for o in c.FAILED_OUTCOMES), self.operations)

    @property
    def key_failures_per_s(self) -> float | None:
        return sum(self.key_failures.values()) / self.seconds if self.seconds > 0 else None

    @property
    def failed_keys_per_s(self) -> float | None:
        """Keys that failed for good (final result ``failed``), per second."""
        return self.keys[c.RESULT_FAILED] / self.seconds if self.seconds > 0 else None

    def latency_quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.latency)


Filter = Callable[[_Labelled], bool]


def _per_operation(metric: str) -> bool:
    """Whether ``metric`` (``#bucket`` / ``#count`` suffix allowed) carries ``mooncake.operation``."""
    return c.OPERATION in c.METRIC_ATTRIBUTES.get(metric.partition("#")[0], frozenset({c.OPERATION}))


def make_filter(operations: Iterable[str] | None = None, hosts: Iterable[str] | None = None) -> Filter:
    """Keep increments (and gauge points) of these operations and hosts (None or empty: all). Metrics that are
    not per operation (``node.ejections``, ``nodes.ejected``) are kept whatever the operations."""
    ops, hs = set(operations or ()), set(hosts or ())

    def keep(inc: _Labelled) -> bool:
        if hs and inc.who("host") not in hs:
            return False
        return not ops or inc.attr(c.OPERATION) in ops or not _per_operation(inc.metric)

    return keep


def window_figures(increments: Iterable[Increment], start: float, end: float, keep: Filter | None = None) -> Figures:
    """Totals of the increments with ``start < time <= end``."""
    figures = Figures(end - start)
    for inc in increments:
        if start < inc.time <= end and (keep is None or keep(inc)):
            figures.add(inc)
    return figures


def time_series(
    increments: Iterable[Increment], start: float, end: float, step: float, keep: Filter | None = None
) -> list[tuple[float, Figures]]:
    """``(bin end, figures)`` for the bins ``(start + i*step, start + (i+1)*step]`` covering the window."""
    n = bin_count(start, end, step)
    bins = [Figures(step) for _ in range(n)]
    for inc in increments:
        if start < inc.time <= end and (keep is None or keep(inc)):
            bins[bin_of(inc.time, start, step, n)].add(inc)
    return [(start + (i + 1) * step, f) for i, f in enumerate(bins)]


def bin_count(start: float, end: float, step: float) -> int:
    """How many bins of ``step`` cover ``(start, end]`` (at least one): the bins of every chart over time."""
    return max(1, math.ceil((end - start) / step - 1e-9))


def bin_of(t: float, start: float, step: float, n: int) -> int:
    """The bin ``(start + i*step, start + (i+1)*step]`` of time ``t``, within ``0 .. n-1``."""
    return min(n - 1, max(0, math.ceil((t - start) / step) - 1))


def by_origin(
    increments: Iterable[Increment], start: float, end: float, keep: Filter | None = None
) -> list[tuple[Labels, Figures]]:
    """Figures per reporting process, the worst first: exhaustion rate, then failure rate, then retry rate,
    then operations (all descending)."""
    groups: dict[Labels, Figures] = {}
    for inc in increments:
        if start < inc.time <= end and (keep is None or keep(inc)):
            groups.setdefault(inc.origin, Figures(end - start)).add(inc)

    def badness(item: tuple[Labels, Figures]) -> tuple[float, ...]:
        f = item[1]
        return (-(f.exhaustion_rate or 0.0), -(f.failure_rate or 0.0), -(f.retry_rate or 0.0), -f.operations)

    return sorted(groups.items(), key=badness)


# ------------------------------------------------------------------------------------------------ storage nodes

OTHER_ENDPOINTS = "other endpoints"
"""The series of a node chart that sums the endpoints not drawn on their own."""
LOOKBACK_S = 300.0
"""A process's gauge value counts as current while it is at most this much older than the newest one (as
Prometheus' default lookback: a process that stopped reporting stops counting)."""


def endpoint_name(item: _Labelled) -> str:
    """A storage endpoint as ``address:port`` (``[v6]:port``); the address alone without a port (``_OTHER``, the
    endpoints past ``MAX_ENDPOINT_ATTRIBUTES``); ``unknown`` without an address."""
    return format_endpoint(item.attr(c.SERVER_ADDRESS), item.attr(c.SERVER_PORT)) or "unknown"


def format_endpoint(address: str, port: str) -> str:
    """``address:port`` (``[v6]:port``); the address alone without a port; ``""`` without an address."""
    if not address or not port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class NodeRow:
    """One storage endpoint's counts in a window."""

    endpoint: str
    ejections: float
    failures: float
    fallbacks: float


def storage_nodes(figures: Figures) -> list[NodeRow]:
    """Every endpoint with an ejection, a confirmed failure or a replica fallback in ``figures``; the worst first
    (failures, then ejections, then fallbacks, all descending; then by name)."""
    names = set(figures.ejections) | set(figures.node_failures) | set(figures.fallbacks)
    rows = [NodeRow(e, figures.ejections[e], figures.node_failures[e], figures.fallbacks[e]) for e in names]
    return sorted(rows, key=lambda r: (-r.failures, -r.ejections, -r.fallbacks, r.endpoint))


NODE_COUNTS: dict[str, str] = {"ejections": "ejections", "failures": "node_failures", "fallbacks": "fallbacks"}
"""``NodeRow`` field -> the ``Figures`` counter it sums."""


def node_series(
    series: Iterable[tuple[float, Figures]], count: str, endpoints: Iterable[str]
) -> list[tuple[float, dict[str, float]]]:
    """Per bin of ``series`` (``time_series``): the ``count`` (a ``NODE_COUNTS`` key) of each of ``endpoints``
    (0 where none), and under ``OTHER_ENDPOINTS`` the sum of every other endpoint, when any has one."""
    shown = list(endpoints)
    bins = [(t, getattr(f, NODE_COUNTS[count])) for t, f in series]
    rest = any(n for _, counter in bins for e, n in counter.items() if e not in shown)
    rows = []
    for t, counter in bins:
        row = {e: float(counter[e]) for e in shown}
        if rest:
            row[OTHER_ENDPOINTS] = float(sum(n for e, n in counter.items() if e not in shown))
        rows.append((t, row))
    return rows


def ejected_now(gauges: Iterable[Point], start: float, end: float, keep: Filter | None = None) -> tuple[float, int]:
    """``(endpoints ejected, processes reporting)``: the sum over reporting processes of each one's latest
    ``nodes.ejected`` value with ``start < time <= end``, of those no more than ``LOOKBACK_S`` older than the
    newest. ``(0.0, 0)`` when no process reported one."""
    latest: dict[tuple[Labels, Labels], Point] = {}
    for p in gauges:
        if p.metric == c.EJECTED_METRIC and start < p.time <= end and (keep is None or keep(p)):
            seen = latest.get((p.origin, p.attrs))
            if seen is None or p.time > seen.time:
                latest[p.origin, p.attrs] = p
    if not latest:
        return 0.0, 0
    newest = max(p.time for p in latest.values())
    current = [p.value for p in latest.values() if p.time >= newest - LOOKBACK_S]
    return float(sum(current)), len(current)


def hosts_of(increments: Iterable[Increment]) -> list[str]:
    return sorted({inc.who("host") for inc in increments} - {""})


COMPRESSED = (".gz", ".xz", ".zst", ".bz2")
"""Suffixes of compressed (rotated) files: never read."""
_FAMILY = re.compile(r"(.+?)(?:\.(\d+))?\.jsonl?(?:\.(\d+)|-(\d[\d-]*))?")


def rotation_order(name: str) -> tuple[str, int, int | str]:
    """A sort key that puts the files of one active file oldest first: logrotate's ``x.jsonl.2``, ``x.jsonl.1``,
    its dateext ``x.jsonl-20261201``, then ours ``x.000001.jsonl``, ``x.000002.jsonl``, then the active ``x.jsonl``."""
    match = _FAMILY.fullmatch(name)
    if match is None:
        return name, 3, 0
    stem, seq, shifted, date = match.groups()
    if shifted:
        return stem, 0, -int(shifted)
    if date:
        return stem, 1, date
    return stem, 2 if seq else 3, int(seq or 0)


OTHER_SIGNALS = ("traces", "logs")
"""Name prefixes of the span and log files (``traces-<host>-<pid>.jsonl``, the Collector's ``traces.jsonl``): not
metrics files."""


def file_list(
    folder: Path, patterns: Iterable[str], skip: tuple[str, ...] = OTHER_SIGNALS
) -> list[tuple[Path, os.stat_result]]:
    """The regular files in ``folder`` whose names match ``patterns``, with their ``stat``, oldest first (by
    modification time, then ``rotation_order``); names starting with ``skip`` and compressed files are left out."""
    patterns = tuple(patterns)
    found: list[tuple[Path, os.stat_result]] = []
    try:
        with os.scandir(folder) as entries:
            named = [e for e in entries if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    except OSError:
        return []
    for entry in named:
        if (skip and entry.name.startswith(skip)) or entry.name.endswith(COMPRESSED):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((Path(entry.path), st))
    return sorted(found, key=lambda f: (f[1].st_mtime_ns, rotation_order(f[0].name)))
