"""The store's own health, as the ``mooncake_master`` reports it on ``--metrics_port`` (Prometheus text at
``/metrics``): capacity, keys, active clients, mounted segments, evictions and RPC failures. No Streamlit here.

Two ways in, one sample type out (``StoreSample``), so ``store_series`` / ``store_window`` compute every figure
the same way in both modes:

* ``MasterPoller``: a thread polling the master's endpoint (the dashboard's file mode, ``--master-metrics``);
* ``prometheus_store``: what a Prometheus server scraped from the master (the dashboard's Prometheus mode).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import http_get
from .metrics import bin_count, bin_of
from .sources import PrometheusError, PrometheusSource, query_step

OPTION = "--master-metrics"
MAX_BYTES = 4 << 20
"""The most a poll reads: a master's metrics are some 30 KB; more is not a master (or not one to read whole)."""
GAUGES: dict[str, str] = {
    "master_active_clients": "clients",
    "master_key_count": "keys",
    "master_allocated_bytes": "allocated_bytes",
    "master_total_capacity_bytes": "capacity_bytes",
}
"""The master's gauges -> ``StoreSample`` fields; text without all of them is not a master's metrics."""
SEGMENT_GAUGE = "segment_total_capacity_bytes"  # one series per mounted segment (label ``segment``)
EVICTED = "master_evicted_key_count"  # a counter without the _total suffix
_REQUESTS = re.compile(r"master_(.+)_requests")  # counter family names, as the parser gives them (no _total)
_FAILURES = re.compile(r"master_(.+)_failures")
OTHER_RPCS = "other RPCs"
"""The series of the RPC failures chart that sums the RPCs not drawn on their own."""


@dataclass(frozen=True)
class StoreSample:
    """What the master reported at ``time`` (seconds since the epoch). Gauges as reported; ``evicted_keys``,
    ``rpc_requests`` (every RPC's requests), ``rpc_failures`` (every RPC's failures) and ``failures_by_rpc``
    (RPC name such as ``put_start`` -> failures, only the nonzero ones) are cumulative since the master started."""

    time: float
    clients: float
    keys: float
    allocated_bytes: float
    capacity_bytes: float
    segments: float
    evicted_keys: float = 0.0
    rpc_requests: float = 0.0
    rpc_failures: float = 0.0
    failures_by_rpc: Mapping[str, float] = field(default_factory=dict)
    segment_names: frozenset[str] = frozenset()  # the mounted segments (a storage process's ``host:port``)

    @property
    def used_fraction(self) -> float | None:
        """Allocated bytes over capacity; None without capacity (no segment mounted)."""
        return self.allocated_bytes / self.capacity_bytes if self.capacity_bytes > 0 else None


# ------------------------------------------------------------------------------------------------ parsing


def parse_master_metrics(text: str, time: float) -> StoreSample:
    """The sample a master's ``/metrics`` text gives at ``time``. RPC failures are the ``master_<rpc>_failures``
    counters that have a ``master_<rpc>_requests`` counter beside them (not ``put_start_alloc_failures``, a cause
    already counted in ``put_start_failures``). Raises ValueError for text that is not Prometheus text, or that
    lacks the master's gauges (another service on that port)."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on text that is not Prometheus'
        raise ValueError(f"not Prometheus text ({type(exc).__name__}: {exc})"[:300]) from None
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    segments: set[tuple[tuple[str, str], ...]] = set()
    for family in families:
        values = [s for s in family.samples if math.isfinite(s.value)]
        if family.type == "counter":
            counters[family.name] = float(sum(s.value for s in values if s.name == family.name + "_total"))
        elif family.name == SEGMENT_GAUGE:
            segments |= {tuple(sorted(s.labels.items())) for s in values if s.name == SEGMENT_GAUGE}
        elif family.name in GAUGES:
            gauges[family.name] = float(sum(s.value for s in values if s.name == family.name))
    missing = [name for name in GAUGES if name not in gauges]
    if missing:
        raise ValueError(
            f"no {', '.join(missing)}: not a Mooncake master's metrics (a live port is not proof of a master)"
        )
    rpcs = {m[1] for name in counters if (m := _REQUESTS.fullmatch(name))}
    failures = {m[1]: counters[name] for name in counters if (m := _FAILURES.fullmatch(name)) and m[1] in rpcs}
    return StoreSample(
        time,
        **{field_name: gauges[name] for name, field_name in GAUGES.items()},
        segments=float(len(segments)),
        evicted_keys=counters.get(EVICTED, 0.0),
        rpc_requests=sum(counters[f"master_{rpc}_requests"] for rpc in rpcs),
        rpc_failures=float(sum(failures.values())),
        failures_by_rpc={rpc: n for rpc, n in sorted(failures.items()) if n},
        segment_names=frozenset(dict(labels).get("segment", "") for labels in segments) - {""},
    )


def normalize_url(text: str) -> str:
    """The master's metrics URL from ``--master-metrics``: ``host:port`` -> ``http://host:port/metrics``; an http
    or https URL without a path gets ``/metrics``. ValueError naming the option for anything else."""
    raw = text.strip()
    hint = f"{OPTION} {text!r}: give HOST:PORT (the master's --metrics_port) or an http(s) URL"
    if not raw or any(ch.isspace() for ch in raw):
        raise ValueError(hint)
    schemeless = "://" not in raw
    parts = urllib.parse.urlsplit(f"http://{raw}" if schemeless else raw)
    why = http_get.url_problem(parts)
    if why == http_get.CREDENTIALS:
        raise ValueError(f"{OPTION}: {why} (they would be shown on the page)")
    if why:
        raise ValueError(f"{hint} ({why})")
    if schemeless and parts.port is None:
        raise ValueError(hint + (" ([::1]:PORT for an IPv6 address)" if raw.count(":") > 1 else ""))
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# ------------------------------------------------------------------------------------------------ polling


@dataclass
class StoreSnapshot:
    """What a store source holds for a time range: ``samples`` in time order; ``error``: the current problem
    (None when the latest poll or query worked); ``failing_since``: when the current run of failed polls began."""

    samples: list[StoreSample]
    error: str | None = None
    failing_since: float | None = None
    description: str = ""


def fetch_text(url: str, timeout_s: float, max_bytes: int = MAX_BYTES) -> str:
    """The body ``url`` answers (UTF-8, bad bytes replaced): the whole exchange within ``timeout_s``, at most
    ``max_bytes``. ``http_get.HttpGetError`` (an OSError) if not; ValueError for a URL it does not take."""
    return http_get.get(url, timeout_s, max_bytes, accept="text/plain").text()


class MasterPoller:
    """Polls a master's metrics ``url`` (``normalize_url`` applied) every ``interval_s`` on a daemon thread, each
    poll bounded by ``timeout_s`` and ``MAX_BYTES``; keeps the samples of the last ``keep_s`` seconds and, while
    polls fail (unreachable, HTTP error, not a master), the last error and since when. Thread-safe; the thread
    never raises."""

    def __init__(self, url: str, interval_s: float = 5.0, timeout_s: float = 2.0, keep_s: float = 86400.0) -> None:
        self.url = normalize_url(url)
        self.description = f"master metrics at {self.url}"
        self.interval_s, self.timeout_s, self.keep_s = interval_s, timeout_s, keep_s
        self._samples: deque[StoreSample] = deque(maxlen=int(keep_s / interval_s) + 2)
        self._error: str | None = None
        self._failing_since: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MasterPoller:
        """Start polling; returns after the first poll, or after ``timeout_s`` if it takes longer."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tq-mooncake-master-poller", daemon=True)
                self._thread.start()
        self._first.wait(self.timeout_s + 0.5)
        return self

    def stop(self) -> None:
        """Stop polling: at once between polls; a poll under way ends first (bounded: ``fetch_text``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> StoreSample | None:
        """One poll now (what the thread does every interval): the sample, or None with the error kept."""
        try:
            text = fetch_text(self.url, self.timeout_s)
            sample = parse_master_metrics(text, time.time())
        except http_get.HttpError as exc:
            self._failed(f"{self.url} answered HTTP {exc.status} {exc.reason}")
        except http_get.HttpUnreachable as exc:
            self._failed(f"cannot reach {self.url}: {exc}")
        except http_get.HttpTooLarge:
            self._failed(f"{self.url} is not a Mooncake master's metrics endpoint: more than {MAX_BYTES >> 20} MiB")
        except http_get.HttpTimeout as exc:
            self._failed(f"cannot read {self.url}: timed out: {exc}")
        except ValueError as exc:
            self._failed(f"{self.url} is not a Mooncake master's metrics endpoint: {exc}")
        except Exception as exc:  # a timeout mid-read, a reset connection, a malformed answer, ...
            self._failed(f"cannot read {self.url}: {type(exc).__name__}: {exc}")
        else:
            with self._lock:
                while self._samples and self._samples[-1].time >= sample.time:  # the clock stepped back
                    self._samples.pop()
                self._samples.append(sample)
                while self._samples[0].time < sample.time - self.keep_s:
                    self._samples.popleft()
                self._error = self._failing_since = None
            return sample
        return None

    def snapshot(self, start: float, end: float) -> StoreSnapshot:
        """The samples with ``start < time <= end``, and before them the last earlier one (the baseline that the
        first one's counters are measured against), with the current error."""
        with self._lock:
            samples = list(self._samples)
            error, since = self._error, self._failing_since
        times = [s.time for s in samples]
        lo, hi = bisect.bisect_right(times, start), bisect.bisect_right(times, end)
        return StoreSnapshot(samples[max(0, lo - 1) : hi], error, since, self.description)

    def _failed(self, error: str) -> None:
        with self._lock:
            self._error = error[:2000]
            if self._failing_since is None:
                self._failing_since = time.time()

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as exc:  # never let the thread die: poll() should already catch everything
                self._failed(f"poller error: {type(exc).__name__}: {exc}")
            self._first.set()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> MasterPoller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class _Added:
    """What a sample's counters added since the sample before it."""

    sample: StoreSample
    evicted: float
    requests: float
    failures: Mapping[str, float]
    lost: int = 0  # segments mounted at the sample before, not at this one (a storage process dropped out)
    joined: int = 0  # segments mounted now, not at the sample before


def _is_reset(prev: StoreSample, cur: StoreSample) -> bool:
    return (
        cur.evicted_keys < prev.evicted_keys
        or cur.rpc_requests < prev.rpc_requests
        or any(cur.failures_by_rpc.get(rpc, 0.0) < n for rpc, n in prev.failures_by_rpc.items())
    )


def _added(samples: Iterable[StoreSample]) -> Iterator[_Added]:
    """Each sample after the first (in time order) with what its counters added since the previous one. A sample
    with any counter lower than before follows a reset (the master restarted): all its counters count from zero.
    The first sample is only a baseline: a master's counters run from its start, long before the dashboard's."""
    prev: StoreSample | None = None
    for cur in sorted(samples, key=lambda s: s.time):
        if prev is not None:
            base = StoreSample(prev.time, 0, 0, 0, 0, 0) if _is_reset(prev, cur) else prev  # counters at zero
            failures = {r: n - base.failures_by_rpc.get(r, 0.0) for r, n in cur.failures_by_rpc.items()}
            yield _Added(
                cur,
                cur.evicted_keys - base.evicted_keys,
                cur.rpc_requests - base.rpc_requests,
                {r: n for r, n in failures.items() if n},
                len(prev.segment_names - cur.segment_names),
                len(cur.segment_names - prev.segment_names),
            )
        prev = cur


@dataclass(frozen=True)
class _Total:
    """What some samples' counters added together (``_added`` of a bin or a window)."""

    measured: int
    evicted: float
    requests: float
    failures: Counter[str]
    lost: int
    joined: int

    @classmethod
    def of(cls, adds: list[_Added]) -> _Total:
        failures: Counter[str] = Counter()
        for a in adds:
            failures.update(a.failures)
        return cls(
            len(adds),
            sum(a.evicted for a in adds),
            sum(a.requests for a in adds),
            failures,
            sum(a.lost for a in adds),
            sum(a.joined for a in adds),
        )


@dataclass(frozen=True)
class StoreFigures:
    """One bin. Gauges: the last sample's value in the bin (None without a sample). Counters: what they added in
    the bin, per second of it (None when no sample in the bin could be measured against an earlier one)."""

    clients: float | None = None
    keys: float | None = None
    allocated_bytes: float | None = None
    capacity_bytes: float | None = None
    segments: float | None = None
    evictions_per_s: float | None = None
    rpc_requests_per_s: float | None = None
    rpc_failures_per_s: float | None = None
    failures_by_rpc_per_s: Mapping[str, float] = field(default_factory=dict)
    segments_lost: int | None = None  # segments that dropped out in the bin (None: not measured)
    segments_joined: int | None = None  # segments newly mounted in the bin

    @property
    def used_fraction(self) -> float | None:
        if self.allocated_bytes is None or not self.capacity_bytes:
            return None
        return self.allocated_bytes / self.capacity_bytes


def store_series(
    samples: Iterable[StoreSample], start: float, end: float, step: float
) -> list[tuple[float, StoreFigures]]:
    """``(bin end, figures)`` for the bins ``(start + i*step, start + (i+1)*step]`` covering the window (the bins
    of ``metrics.time_series``). Samples before ``start`` only serve as the baseline of later ones."""
    ordered = sorted(samples, key=lambda s: s.time)
    n = bin_count(start, end, step)
    last: list[StoreSample | None] = [None] * n
    added: list[list[_Added]] = [[] for _ in range(n)]
    for s in ordered:
        if start < s.time <= end:
            last[bin_of(s.time, start, step, n)] = s
    for a in _added(ordered):
        if start < a.sample.time <= end:
            added[bin_of(a.sample.time, start, step, n)].append(a)
    out = []
    for i in range(n):
        s, total = last[i], _Total.of(added[i])
        gauges = () if s is None else (s.clients, s.keys, s.allocated_bytes, s.capacity_bytes, s.segments)
        figures = StoreFigures(*gauges)
        if total.measured:
            figures = dataclasses.replace(
                figures,
                evictions_per_s=total.evicted / step,
                rpc_requests_per_s=total.requests / step,
                rpc_failures_per_s=sum(total.failures.values()) / step,
                failures_by_rpc_per_s={r: v / step for r, v in sorted(total.failures.items())},
                segments_lost=total.lost,
                segments_joined=total.joined,
            )
        out.append((start + (i + 1) * step, figures))
    return out


@dataclass(frozen=True)
class StoreWindow:
    """A window's totals: the latest sample in it (None without one), and what the counters added in it
    (``measured``: how many samples in it had an earlier one to be measured against; 0: no totals known)."""

    latest: StoreSample | None
    evictions: float = 0.0
    rpc_requests: float = 0.0
    rpc_failures: float = 0.0
    failures_by_rpc: Mapping[str, float] = field(default_factory=dict)
    measured: int = 0
    segments_lost: int = 0
    segments_joined: int = 0

    def top_rpcs(self, n: int) -> list[str]:
        """The ``n`` RPCs with the most failures in the window, the most first (then by name)."""
        return [r for r, _ in sorted(self.failures_by_rpc.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def store_window(samples: Iterable[StoreSample], start: float, end: float) -> StoreWindow:
    """Totals of the samples with ``start < time <= end`` (earlier ones only as a baseline)."""
    ordered = sorted(samples, key=lambda s: s.time)
    inside = [s for s in ordered if start < s.time <= end]
    total = _Total.of([a for a in _added(ordered) if start < a.sample.time <= end])
    return StoreWindow(
        inside[-1] if inside else None,
        evictions=total.evicted,
        rpc_requests=total.requests,
        rpc_failures=float(sum(total.failures.values())),
        failures_by_rpc=dict(total.failures),
        measured=total.measured,
        segments_lost=total.lost,
        segments_joined=total.joined,
    )


def failure_rows(
    series: Iterable[tuple[float, StoreFigures]], rpcs: Iterable[str]
) -> list[tuple[float, dict[str, float | None]]]:
    """Per bin of ``store_series``: the failures per second of each of ``rpcs`` (0 in a measured bin without
    any, None in a bin not measured), and under ``OTHER_RPCS`` the sum of the others when any has one."""
    shown = list(rpcs)
    bins = list(series)
    rest = any(r not in shown for _, f in bins for r in f.failures_by_rpc_per_s)
    rows: list[tuple[float, dict[str, float | None]]] = []
    for t, f in bins:
        measured = f.rpc_failures_per_s is not None
        row: dict[str, float | None] = {r: f.failures_by_rpc_per_s.get(r, 0.0) if measured else None for r in shown}
        if rest:
            other = sum(v for r, v in f.failures_by_rpc_per_s.items() if r not in shown)
            row[OTHER_RPCS] = other if measured else None
        rows.append((t, row))
    return rows


# ------------------------------------------------------------------------------------------------ Prometheus

PROMETHEUS_FIGURES: dict[str, str] = {
    **{field_name: f"sum({name})" for name, field_name in GAUGES.items()},
    "segments": f"count({SEGMENT_GAUGE})",
    "evicted_keys": f"sum({EVICTED})",
    "rpc_requests": 'sum({__name__=~"master_.+_requests_total"})',
}
"""``StoreSample`` field -> PromQL summing it over every master Prometheus scrapes."""
PROMETHEUS_FAILURES = (
    'sum by (rpc) (label_replace({__name__=~"master_.+_failures_total"}, "rpc", "$1", "__name__", '
    '"master_(.+)_failures_total") and on (rpc, job, instance) label_replace({__name__=~"master_.+_requests_total"}, '
    '"rpc", "$1", "__name__", "master_(.+)_requests_total")) > 0'
)
"""Failures by RPC (label ``rpc``), the nonzero ones, of the RPCs with a requests counter (as the parser's)."""


def prometheus_query() -> str:
    """One PromQL query for every figure of a ``StoreSample``, each series labelled ``figure`` (its field)."""
    parts = [f'label_replace({expr}, "figure", "{name}", "", "")' for name, expr in PROMETHEUS_FIGURES.items()]
    parts.append(f'label_replace(({PROMETHEUS_FAILURES}), "figure", "failures_by_rpc", "", "")')
    parts.append(f'label_replace(max by (segment) ({SEGMENT_GAUGE}), "figure", "segment", "", "")')
    return " or ".join(parts)


def prometheus_store(source: PrometheusSource, start: float, end: float) -> StoreSnapshot:
    """The master's samples that ``source`` scraped, summed over masters, at the steps of ``sources.query_step``
    over the range (one step before ``start`` too: the baseline), in one ``query_range``. Never raises: an
    unreachable Prometheus, or one that scrapes no master, is a snapshot with no samples and ``error`` saying so."""
    description = f"master metrics from {source.description}"
    end = math.floor(end * 1000) / 1000  # Prometheus keeps milliseconds (as PrometheusSource.load)
    step = query_step(end - start)
    first = end - (math.ceil((end - start) / step) + 1) * step
    try:
        result = source.query_range(prometheus_query(), first, end, step)
    except PrometheusError as exc:
        return StoreSnapshot([], error=str(exc), description=description)
    samples = _samples_from(result)
    if not samples:
        error = (
            f"{source.description} has no Mooncake master series ({', '.join(GAUGES)}) in this window: "
            "does it scrape the master's --metrics_port?"
        )
        return StoreSnapshot([], error=error, description=description)
    return StoreSnapshot(samples, description=description)


def _samples_from(result: list[dict[str, Any]]) -> list[StoreSample]:
    """``StoreSample``s at the steps where every master gauge has a value (the others default to 0)."""
    at: dict[float, dict[str, float]] = {}
    failures: dict[float, dict[str, float]] = {}
    names: dict[float, set[str]] = {}
    for series in result:
        metric = series.get("metric", {})
        figure = metric.get("figure", "")
        for t, v in series.get("values", []):
            value = float(v)
            if not math.isfinite(value):
                continue
            if figure == "failures_by_rpc":
                failures.setdefault(float(t), {})[metric.get("rpc", "")] = value
            elif figure == "segment":
                names.setdefault(float(t), set()).add(metric.get("segment", ""))
            elif figure in PROMETHEUS_FIGURES:
                at.setdefault(float(t), {})[figure] = value
    samples = []
    for t in sorted(at):
        values = at[t]
        if not all(name in values for name in GAUGES.values()):
            continue
        by_rpc = dict(sorted(failures.get(t, {}).items()))
        samples.append(
            StoreSample(
                t,
                **{name: values.get(name, 0.0) for name in PROMETHEUS_FIGURES},
                rpc_failures=float(sum(by_rpc.values())),
                failures_by_rpc=by_rpc,
                segment_names=frozenset(names.get(t, set()) - {""}),
            )
        )
    return samples
