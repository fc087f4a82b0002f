"""The store's health as the master reports it: a real master's text parsed (and text that is not a master's
refused), the ``--master-metrics`` URL, bins, resets and gaps; then real processes: the poller following a real
master while a storage process mounts and is SIGKILLed, the poller's error states (nothing listening, another
service, HTTP errors, an endless or silent answer), and Debian's real Prometheus scraping a real master."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from prometheus_server import running_prometheus  # tests/support

from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, free_port, wait_until
from tq_mooncake.dashboard import sources
from tq_mooncake.dashboard.sources import PrometheusError, PrometheusSource
from tq_mooncake.dashboard.store_health import (
    MAX_BYTES,
    OTHER_RPCS,
    MasterPoller,
    StoreFigures,
    StoreSample,
    failure_rows,
    normalize_url,
    parse_master_metrics,
    prometheus_query,
    prometheus_store,
    store_series,
    store_window,
)

pure = pytest.mark.pure

# An excerpt, verbatim, of what a real mooncake_master (0.3.13.post1) served on /metrics with two 16 MB storage
# processes mounted, after a client's 2 gets of missing keys and 60 puts of 1 MiB (23 refused for space, 9 keys
# evicted). The families left out are all 0.
REAL_MASTER_TEXT = """\
# HELP master_allocated_bytes Total memory bytes currently allocated across all segments
# TYPE master_allocated_bytes gauge
master_allocated_bytes 29360128
# HELP master_total_capacity_bytes Total memory capacity across all mounted segments
# TYPE master_total_capacity_bytes gauge
master_total_capacity_bytes 33554432
# HELP segment_allocated_bytes Total memory bytes currently allocated of the segment
# TYPE segment_allocated_bytes gauge
segment_allocated_bytes{segment="127.0.0.1:13739"} 14680064
segment_allocated_bytes{segment="127.0.0.1:12725"} 14680064
# HELP segment_total_capacity_bytes Total memory capacity of the mounted segment
# TYPE segment_total_capacity_bytes gauge
segment_total_capacity_bytes{segment="127.0.0.1:13739"} 16777216
segment_total_capacity_bytes{segment="127.0.0.1:12725"} 16777216
# HELP master_key_count Total number of keys managed by the master
# TYPE master_key_count gauge
master_key_count 28
# HELP master_active_clients Total number of active clients
# TYPE master_active_clients gauge
master_active_clients 2
# HELP master_value_size_bytes Distribution of object value sizes
# TYPE master_value_size_bytes histogram
master_value_size_bytes_bucket{le="4096.000000"} 1
master_value_size_bytes_bucket{le="65536.000000"} 1
master_value_size_bytes_bucket{le="262144.000000"} 1
master_value_size_bytes_bucket{le="1048576.000000"} 38
master_value_size_bytes_bucket{le="4194304.000000"} 38
master_value_size_bytes_bucket{le="16777216.000000"} 38
master_value_size_bytes_bucket{le="67108864.000000"} 38
master_value_size_bytes_bucket{le="+Inf"} 38
master_value_size_bytes_sum 38797312
master_value_size_bytes_count 38
# HELP master_put_start_requests_total Total number of PutStart requests received
# TYPE master_put_start_requests_total counter
master_put_start_requests_total 60
# HELP master_put_start_failures_total Total number of failed PutStart requests
# TYPE master_put_start_failures_total counter
master_put_start_failures_total 23
# HELP master_put_start_alloc_failures_total Total number of PutStart failures caused by replica allocation failure
# TYPE master_put_start_alloc_failures_total counter
master_put_start_alloc_failures_total 23
# HELP master_put_start_partial_allocations_total Total number of PutStart requests that succeeded with fewer replicas than requested (best-effort degradation)
# TYPE master_put_start_partial_allocations_total counter
master_put_start_partial_allocations_total 0
# HELP master_put_end_requests_total Total number of PutEnd requests received
# TYPE master_put_end_requests_total counter
master_put_end_requests_total 37
# HELP master_put_end_failures_total Total number of failed PutEnd requests
# TYPE master_put_end_failures_total counter
master_put_end_failures_total 0
# HELP master_get_replica_list_requests_total Total number of GetReplicaList requests received
# TYPE master_get_replica_list_requests_total counter
master_get_replica_list_requests_total 2
# HELP master_get_replica_list_failures_total Total number of failed GetReplicaList requests
# TYPE master_get_replica_list_failures_total counter
master_get_replica_list_failures_total 2
# HELP master_mount_segment_requests_total Total number of MountSegment requests received
# TYPE master_mount_segment_requests_total counter
master_mount_segment_requests_total 2
# HELP master_mount_segment_failures_total Total number of failed MountSegment requests
# TYPE master_mount_segment_failures_total counter
master_mount_segment_failures_total 0
# HELP master_ping_requests_total Total number of ping requests received
# TYPE master_ping_requests_total counter
master_ping_requests_total 4
# HELP master_ping_failures_total Total number of failed ping requests
# TYPE master_ping_failures_total counter
master_ping_failures_total 0
# HELP master_batch_put_start_requests_total Total number of BatchPutStart requests received
# TYPE master_batch_put_start_requests_total counter
master_batch_put_start_requests_total 0
# HELP master_batch_put_start_failures_total Total number of failed BatchPutStart requests
# TYPE master_batch_put_start_failures_total counter
master_batch_put_start_failures_total 0
# HELP master_batch_put_start_partial_successes_total Total number of partially successful BatchPutStart requests
# TYPE master_batch_put_start_partial_successes_total counter
master_batch_put_start_partial_successes_total 0
# HELP master_batch_put_start_items_total Total number of items processed in BatchPutStart requests
# TYPE master_batch_put_start_items_total counter
master_batch_put_start_items_total 0
# HELP master_batch_put_start_failed_items_total Total number of failed items in BatchPutStart requests
# TYPE master_batch_put_start_failed_items_total counter
master_batch_put_start_failed_items_total 0
# HELP mem_cache_hit_nums_ Total number of GetReplicaList results served from the memory pool
# TYPE mem_cache_hit_nums_ counter
mem_cache_hit_nums_ 0
# HELP master_evicted_key_count Total number of keys evicted
# TYPE master_evicted_key_count counter
master_evicted_key_count 9
# HELP master_evicted_size_bytes Total bytes of evicted objects
# TYPE master_evicted_size_bytes counter
master_evicted_size_bytes 9437184
# HELP master_evicted_key_count_mem Total number of keys evicted in mem
# TYPE master_evicted_key_count_mem counter
master_evicted_key_count_mem 9
"""  # noqa: E501
RECORDED = StoreSample(
    0.0,
    clients=2.0,
    keys=28.0,
    allocated_bytes=29360128.0,
    capacity_bytes=33554432.0,
    segments=2.0,
    evicted_keys=9.0,  # master_evicted_key_count, not also its _mem copy
    rpc_requests=60 + 37 + 2 + 2 + 4 + 0,  # put_start, put_end, get_replica_list, mount_segment, ping, batch_put_start
    rpc_failures=25.0,
    failures_by_rpc={"get_replica_list": 2.0, "put_start": 23.0},  # not put_start_alloc: a cause of put_start's
    segment_names=frozenset({"127.0.0.1:13739", "127.0.0.1:12725"}),
)
OTHER_SERVICE = """\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 0.42
# HELP up_requests_total Requests.
# TYPE up_requests_total counter
up_requests_total{path="/"} 3
# HELP master_key_count Keys of some other master.
# TYPE master_key_count gauge
master_key_count 5
"""


# ------------------------------------------------------------------------------------------------ parsing


@pure
def test_a_real_masters_text_gives_its_gauges_segments_and_rpc_failures() -> None:
    assert parse_master_metrics(REAL_MASTER_TEXT, 12.5) == StoreSample(**{**RECORDED.__dict__, "time": 12.5})
    assert parse_master_metrics(REAL_MASTER_TEXT, 0.0).used_fraction == pytest.approx(29360128 / 33554432)


@pure
def test_batch_items_partial_successes_and_causes_are_not_rpc_failures() -> None:
    edited = (
        REAL_MASTER_TEXT.replace("master_batch_put_start_requests_total 0", "master_batch_put_start_requests_total 4")
        .replace("master_batch_put_start_failures_total 0", "master_batch_put_start_failures_total 1")
        .replace("master_batch_put_start_failed_items_total 0", "master_batch_put_start_failed_items_total 7")
        .replace("master_batch_put_start_partial_successes_total 0", "master_batch_put_start_partial_successes_total 3")
        .replace("master_batch_put_start_items_total 0", "master_batch_put_start_items_total 50")
    )
    sample = parse_master_metrics(edited, 0.0)
    assert sample.failures_by_rpc == {**RECORDED.failures_by_rpc, "batch_put_start": 1.0}
    assert (sample.rpc_failures, sample.rpc_requests) == (RECORDED.rpc_failures + 1, RECORDED.rpc_requests + 4)


@pure
def test_a_master_with_no_segment_mounted_has_no_segment_series() -> None:
    bare = "\n".join(line for line in REAL_MASTER_TEXT.splitlines() if "segment_" not in line)
    bare = bare.replace("master_total_capacity_bytes 33554432", "master_total_capacity_bytes 0")
    sample = parse_master_metrics(bare, 0.0)
    assert sample.segments == 0 and sample.capacity_bytes == 0 and sample.used_fraction is None


@pure
@pytest.mark.parametrize(
    ("text", "missing"),
    [
        (OTHER_SERVICE, "master_active_clients, master_allocated_bytes, master_total_capacity_bytes"),
        ("", "master_active_clients, master_key_count"),
        ("\n".join(li for li in REAL_MASTER_TEXT.splitlines() if "master_active_clients" not in li), "active_clients"),
    ],
)
def test_text_of_another_service_is_not_a_master(text: str, missing: str) -> None:
    with pytest.raises(ValueError, match="not a Mooncake master's metrics") as caught:
        parse_master_metrics(text, 0.0)
    for name in missing.split(", "):
        assert name in str(caught.value)


@pure
@pytest.mark.parametrize(
    "garbage",
    [
        "<!doctype html><html><body><h1>It works!</h1></body></html>",
        '{"service_ready": true}',  # the master's /health, not its /metrics
        "hello world",
        "\x00\xff\xfe binary",
        'master_key_count{segment="unterminated} 1',
    ],
)
def test_garbage_is_not_prometheus_text(garbage: str) -> None:
    with pytest.raises(ValueError, match="not Prometheus text|not a Mooncake master"):
        parse_master_metrics(garbage, 0.0)


@pure
@settings(max_examples=300, deadline=None)
@given(cut=hs.integers(0, len(REAL_MASTER_TEXT)), noise=hs.text(max_size=40))
def test_any_text_gives_a_sample_or_a_value_error(cut: int, noise: str) -> None:
    """A master's text cut anywhere, with anything after it (a truncated or corrupted answer)."""
    try:
        sample = parse_master_metrics(REAL_MASTER_TEXT[:cut] + noise, 0.0)
    except ValueError:
        return
    assert all(math.isfinite(v) for v in (sample.clients, sample.keys, sample.segments, sample.rpc_requests))


@pure
@pytest.mark.parametrize(
    ("given_url", "url"),
    [
        ("mooncake-master:9003", "http://mooncake-master:9003/metrics"),
        (" 127.0.0.1:9003 ", "http://127.0.0.1:9003/metrics"),
        ("[::1]:9003", "http://[::1]:9003/metrics"),
        ("http://127.0.0.1:9003", "http://127.0.0.1:9003/metrics"),
        ("http://127.0.0.1:9003/", "http://127.0.0.1:9003/metrics"),
        ("https://store.example/mooncake/metrics?x=1", "https://store.example/mooncake/metrics?x=1"),
        ("127.0.0.1:9003/metrics", "http://127.0.0.1:9003/metrics"),
    ],
)
def test_a_host_and_port_become_the_metrics_url(given_url: str, url: str) -> None:
    assert normalize_url(given_url) == url


@pure
@pytest.mark.parametrize(
    "bad",
    [
        "",
        "mooncake-master",
        "ftp://host:9003",
        "file:///etc/passwd",
        "host:port",
        "http://:9003",
        "a b:1",
        "localhost:0",
        "http://admin:s3cret@127.0.0.1:9003",  # would be shown on the page
    ],
)
def test_other_urls_are_refused_naming_the_option(bad: str) -> None:
    with pytest.raises(ValueError, match="--master-metrics"):
        normalize_url(bad)


# ------------------------------------------------------------------------------------------------ figures


def sample(t: float, evicted: float = 0, requests: float = 0, segments: float = 1, **failures: float) -> StoreSample:
    by_rpc = {rpc: float(n) for rpc, n in failures.items() if n}
    return StoreSample(t, 1, 10 * t, t, 1000, segments, evicted, requests, sum(by_rpc.values()), by_rpc)


@pure
def test_bins_take_the_last_gauge_and_count_increments_against_the_sample_before() -> None:
    samples = [
        sample(95, evicted=10, requests=100, put_start=1),  # before the window: only the baseline
        sample(100, evicted=10, requests=100, put_start=1),  # at start: not in (start, end] either
        sample(103, evicted=12, requests=110, put_start=1),
        sample(108, evicted=15, requests=130, segments=2, put_start=3, get_replica_list=1),
        sample(130, evicted=16, requests=131, put_start=3, get_replica_list=1),  # at end: in the last bin
    ]
    series = store_series(reversed(samples), 100, 130, 10)
    assert [t for t, _ in series] == [110, 120, 130]
    (_, first), (_, empty), (_, last) = series
    assert (first.segments, first.keys, first.used_fraction) == (2, 1080, pytest.approx(108 / 1000))
    assert first.evictions_per_s == pytest.approx(0.5) and first.rpc_requests_per_s == pytest.approx(3.0)
    assert first.failures_by_rpc_per_s == pytest.approx({"put_start": 0.2, "get_replica_list": 0.1})
    assert first.rpc_failures_per_s == pytest.approx(0.3)
    assert empty == StoreFigures()  # no sample: no gauge, and no counter (not a zero)
    assert (last.segments, last.evictions_per_s, last.rpc_requests_per_s) == (1, pytest.approx(0.1), 0.1)
    assert (last.rpc_failures_per_s, last.failures_by_rpc_per_s) == (0.0, {})  # measured: none failed
    window = store_window(samples, 100, 130)
    assert window.latest == samples[-1] and window.measured == 3
    assert (window.evictions, window.rpc_requests, window.rpc_failures) == (6, 31, 3)
    assert window.failures_by_rpc == {"put_start": 2, "get_replica_list": 1}


@pure
def test_a_lower_counter_is_a_restarted_master_counting_from_zero() -> None:
    samples = [
        sample(101, evicted=50, requests=1000, put_start=9),  # the first sample: a baseline, not 50 evictions
        sample(105, evicted=55, requests=1100, put_start=9),
        sample(111, evicted=2, requests=20),  # restarted
        sample(115, evicted=3, requests=30, get_replica_list=1),
        sample(121, evicted=4, requests=40, get_replica_list=1, put_start=5),
        sample(125, evicted=5, requests=50, put_start=5),  # only get_replica_list's failures dropped: a restart too
    ]
    (_, a), (_, b), (_, c) = store_series(samples, 100, 130, 10)
    assert (a.evictions_per_s, a.rpc_requests_per_s, a.rpc_failures_per_s) == (0.5, 10.0, 0.0)
    assert (b.evictions_per_s, b.rpc_requests_per_s) == (pytest.approx(0.3), 3.0)
    assert b.failures_by_rpc_per_s == {"get_replica_list": 0.1}
    assert (c.evictions_per_s, c.rpc_requests_per_s) == (pytest.approx(0.6), 6.0)  # (1 + 5) / 10, (10 + 50) / 10
    assert c.failures_by_rpc_per_s == {"put_start": 1.0}  # (5 + 5) / 10
    for _, f in store_series(samples, 100, 130, 2):
        assert all(v is None or v >= 0 for v in (f.evictions_per_s, f.rpc_requests_per_s, f.rpc_failures_per_s))
    assert store_window(samples, 100, 130).failures_by_rpc == {"get_replica_list": 1, "put_start": 10}


@pure
def test_a_gap_leaves_bins_empty_and_the_increment_to_the_sample_after_it() -> None:
    samples = [sample(101, evicted=1), sample(103, evicted=2), sample(151, evicted=12, segments=0)]
    series = store_series(samples, 100, 160, 10)
    assert [f.segments for _, f in series] == [1, None, None, None, None, 0]
    assert [f.evictions_per_s for _, f in series] == [0.1, None, None, None, None, 1.0]


@pure
def test_a_lone_first_sample_shows_its_gauges_and_no_counts() -> None:
    (_, only), *_ = store_series([sample(105, evicted=7, put_start=3)], 100, 130, 10)
    assert only.segments == 1 and only.evictions_per_s is None and only.rpc_failures_per_s is None
    window = store_window([sample(105, evicted=7, put_start=3)], 100, 130)
    assert window.latest is not None and window.measured == 0 and window.rpc_failures == 0
    assert store_window([], 100, 130).latest is None


@pure
def test_rpc_failure_rows_show_the_most_failing_rpcs_and_sum_the_others() -> None:
    rpcs = {f"rpc{i}": i for i in range(1, 8)}
    samples = [sample(101), sample(111), sample(121, **rpcs)]
    series = store_series(samples, 100, 130, 10)
    window = store_window(samples, 100, 130)
    assert window.top_rpcs(5) == ["rpc7", "rpc6", "rpc5", "rpc4", "rpc3"]
    rows = failure_rows(series, window.top_rpcs(5))
    assert rows[0] == (110, dict.fromkeys([*window.top_rpcs(5), OTHER_RPCS]))  # the baseline bin: not measured
    assert rows[1] == (120, dict.fromkeys([*window.top_rpcs(5), OTHER_RPCS], 0.0))
    assert rows[2][1] == pytest.approx(
        {"rpc7": 0.7, "rpc6": 0.6, "rpc5": 0.5, "rpc4": 0.4, "rpc3": 0.3, OTHER_RPCS: 0.3}
    )
    assert OTHER_RPCS not in failure_rows(series, list(rpcs))[2][1]


# ------------------------------------------------------------------------------------------------ Prometheus (pure)


def matrix(figure: str, points: list[tuple[float, float]], **labels: str) -> dict[str, Any]:
    return {"metric": {"figure": figure, **labels}, "values": [[t, str(v)] for t, v in points]}


@pure
def test_prometheus_store_makes_one_query_and_the_samples_of_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float, float, float]] = []
    gauges = {"clients": 2, "keys": 28, "allocated_bytes": 5, "capacity_bytes": 10, "segments": 2}
    result = [matrix(name, [(100.0, v), (110.0, v), (120.0, v)]) for name, v in gauges.items()]
    result[1]["values"].pop(0)  # no master_key_count at 100: no sample there
    result += [
        matrix("evicted_keys", [(100.0, 1), (110.0, 2), (120.0, 3)]),
        matrix("rpc_requests", [(100.0, 10), (110.0, 20), (120.0, 30)]),
        matrix("failures_by_rpc", [(120.0, 4)], rpc="put_start"),
        matrix("failures_by_rpc", [(110.0, 1), (120.0, 1)], rpc="get_replica_list"),
    ]

    def fake(self: PrometheusSource, query: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        calls.append((query, start, end, step))
        return result

    monkeypatch.setattr(PrometheusSource, "query_range", fake)
    snap = prometheus_store(PrometheusSource("http://prometheus:9090"), 0.0, 3000.0)
    ((query, start, end, step),) = calls
    assert query == prometheus_query() and step == sources.query_step(3000.0) == 3.0 and end == 3000.0
    assert start <= -step  # one step before the window: the baseline
    assert snap.error is None and snap.description == "master metrics from Prometheus at http://prometheus:9090"
    assert [s.time for s in snap.samples] == [110.0, 120.0]
    assert snap.samples[0] == StoreSample(110.0, 2, 28, 5, 10, 2, 2, 20, 1, {"get_replica_list": 1})
    assert snap.samples[1].failures_by_rpc == {"get_replica_list": 1, "put_start": 4}
    assert snap.samples[1].rpc_failures == 5


@pure
def test_prometheus_store_says_why_it_has_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PrometheusSource, "query_range", lambda *_: [])
    empty = prometheus_store(PrometheusSource("http://prometheus:9090"), 0.0, 60.0)
    assert empty.samples == [] and "no Mooncake master series" in (empty.error or "")

    def refuse(*_: Any) -> list[dict[str, Any]]:
        raise PrometheusError("cannot query http://prometheus:9090: Connection refused")

    monkeypatch.setattr(PrometheusSource, "query_range", refuse)
    down = prometheus_store(PrometheusSource("http://prometheus:9090"), 0.0, 60.0)
    assert down.samples == [] and down.error == "cannot query http://prometheus:9090: Connection refused"


# ------------------------------------------------------------------------------------------------ real processes


def latest(poller: MasterPoller) -> StoreSample | None:
    samples = poller.snapshot(0.0, math.inf).samples
    return samples[-1] if samples else None


def test_the_poller_follows_a_real_master_as_a_storage_process_mounts_and_dies(start_master, start_storage_node):
    master = start_master(client_ttl=2)
    began = time.time()
    url = f"http://127.0.0.1:{master.metrics_port}/metrics"
    with MasterPoller(f"127.0.0.1:{master.metrics_port}", interval_s=0.1) as poller:
        assert poller.running and poller.url == url
        first = latest(poller)  # start() returned after the first poll
        assert first is not None and (first.segments, first.capacity_bytes, first.keys) == (0, 0, 0)
        node = start_storage_node(master)
        # the master counts the process as a client at its first ping, a moment after it mounted
        wait_until(
            lambda: latest(poller).segments == 1 and latest(poller).clients >= 1, 10, "the poller to see the segment"
        )
        mounted = latest(poller)
        assert mounted.capacity_bytes == 64 << 20
        assert parse_master_metrics(master.metrics_text(), 0.0).segments == len(master.mounted_segments()) == 1
        node.kill()
        killed = time.time()
        wait_until(
            lambda: latest(poller).segments == 0 and latest(poller).clients < mounted.clients,
            15,
            "the master to drop the SIGKILLed storage process",
        )
        end = time.time()
        snap = poller.snapshot(began, end)
    assert not poller.running
    assert snap.error is None and snap.failing_since is None and snap.description.endswith(url)
    after_kill = [s for s in snap.samples if s.time > killed]
    assert after_kill[0].segments == 1  # the master lists the dead process until its client_ttl runs out
    assert after_kill[-1].capacity_bytes == 0
    assert after_kill[-1].rpc_failures == mounted.rpc_failures  # its death is no RPC failure at the master
    segments = [f.segments for _, f in store_series(snap.samples, began, end, 0.25) if f.segments is not None]
    assert segments[0] == 0 and 1 in segments and segments[-1] == 0
    (name,) = mounted.segment_names  # the storage process's segment, by name: joined, then lost
    window = store_window(snap.samples, began, end)
    assert (window.segments_joined, window.segments_lost) == (1, 1) and name not in after_kill[-1].segment_names


@pure
def test_segments_lost_and_joined_count_names_not_the_total() -> None:
    """A storage process replaced: its successor mounts before the master drops the dead one, so the count goes
    2, 3, 2 and never below 2; the names say one segment was lost and one joined."""
    names = [{"a", "b"}, {"a", "b", "c"}, {"b", "c"}, {"b", "c"}]
    samples = [dataclasses.replace(RECORDED, time=float(t), segment_names=frozenset(n)) for t, n in enumerate(names)]
    series = store_series(samples, 0.0, 4.0, 1.0)
    assert [(f.segments_joined, f.segments_lost) for _, f in series] == [(1, 0), (0, 1), (0, 0), (None, None)]
    window = store_window(samples, 0.0, 4.0)
    assert (window.segments_joined, window.segments_lost) == (1, 1)


class Endpoint(http.server.ThreadingHTTPServer):
    """A loopback HTTP server answering every GET as ``mode`` says: ``text`` (200 with ``body``), ``404``,
    ``endless`` (more than ``MAX_BYTES``) or ``silent`` (no answer until ``release`` is set)."""

    daemon_threads = True

    def __init__(self, body: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.body, self.release = "text", body, threading.Event()
        self.silent_requests = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stopped reading (the poller past MAX_BYTES)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Endpoint

    def do_GET(self) -> None:
        mode = self.server.mode
        if mode == "silent":
            self.server.silent_requests += 1
            self.server.release.wait(10)
            return
        if mode == "404":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        if mode == "endless":
            for _ in range(MAX_BYTES // (1 << 20) + 2):
                self.wfile.write(b"# padding\n" * (1 << 17))
        else:
            self.wfile.write(self.server.body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(body: str) -> Iterator[Endpoint]:
    server = Endpoint(body)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_poller_reports_a_dead_port_and_what_is_not_a_master_without_raising():
    with MasterPoller(f"127.0.0.1:{free_port()}", interval_s=0.05, timeout_s=0.5) as poller:
        snap = poller.snapshot(0.0, math.inf)
        assert snap.samples == [] and "cannot reach" in (snap.error or "") and snap.failing_since is not None
    assert not poller.running

    with serving(OTHER_SERVICE) as server, MasterPoller(server.address, interval_s=0.05, timeout_s=1.0) as poller:
        snap = poller.snapshot(0.0, math.inf)
        assert "not a Mooncake master" in (snap.error or "") and snap.samples == []
        since = snap.failing_since
        assert since is not None

        def failing_with(text: str) -> bool:
            snap = poller.snapshot(0.0, math.inf)
            return text in (snap.error or "") and snap.failing_since == since  # still failing since the first

        for mode, error in (("404", "HTTP 404"), ("endless", "more than 4 MiB"), ("silent", "timed out")):
            server.mode = mode
            wait_until(lambda error=error: failing_with(error), 10, f"the poller to report {error}")
        server.release.set()
        server.mode, server.body = "text", REAL_MASTER_TEXT
        wait_until(lambda: poller.snapshot(0.0, math.inf).error is None, 10, "the poller to recover")
        snap = poller.snapshot(0.0, math.inf)
        assert snap.failing_since is None and snap.samples[-1].segments == RECORDED.segments
        server.release = threading.Event()
        server.mode = "silent"
        asked = server.silent_requests
        wait_until(lambda: server.silent_requests > asked, 10, "a poll to hang on the silent server")
        stopping = time.monotonic()
        poller.stop()
        assert time.monotonic() - stopping < poller.timeout_s + 1.5  # bounded, though a poll was waiting
        assert not poller.running
        starting = time.monotonic()
        with MasterPoller(server.address, timeout_s=0.3) as silent:  # start() on a silent master: by its timeout
            assert time.monotonic() - starting < 0.3 + 1.0 and silent.running


class MasterScrape:
    """``BACKGROUND_JOBS`` (tests/conftest.py): a real master, a server replaying another master's recorded text, and
    Debian's Prometheus scraping both, started with the session: Prometheus' first scrape of a new target comes some
    5 s after it starts, over by the time the test runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        self.started = time.time()
        self.master = self._stack.enter_context(MasterProcess(self.folder).start())
        self.recording = self._stack.enter_context(serving(REAL_MASTER_TEXT))
        targets = [f"127.0.0.1:{self.master.metrics_port}", self.recording.address]
        self.url = self._stack.enter_context(running_prometheus(self.folder, targets, "mooncake-master"))

    def kill(self) -> None:
        self._stack.close()


BACKGROUND_JOBS = MasterScrape


def test_prometheus_store_sums_what_prometheus_scraped_from_the_masters(jobs, tmp_path):
    """Prometheus scrapes a real master (one storage process mounted) and a recording of another (two segments,
    failures): ``prometheus_store`` gives the sums of what the two endpoints serve."""
    master, url, source = jobs.master, jobs.url, PrometheusSource(jobs.url)
    with StorageNodeProcess(master, tmp_path).start():

        def newest() -> StoreSample | None:
            samples = prometheus_store(source, time.time() - 60, time.time()).samples
            return samples[-1] if samples else None

        wait_until(lambda: getattr(newest(), "segments", 0) == 3, 30, "prometheus to scrape both masters", 0.2)
        snap = prometheus_store(source, time.time() - 60, time.time())
        live = parse_master_metrics(master.metrics_text(), 0.0)
        before = prometheus_store(source, jobs.started - 600, jobs.started - 300)  # before Prometheus ran
    got = snap.samples[-1]
    assert snap.error is None and snap.description == f"master metrics from Prometheus at {url}"
    assert live.segments == 1 and live.capacity_bytes == 64 << 20
    for name in ("segments", "capacity_bytes", "allocated_bytes", "keys", "clients", "evicted_keys"):
        assert getattr(got, name) == getattr(live, name) + getattr(RECORDED, name), name
    assert live.failures_by_rpc == {} and got.failures_by_rpc == RECORDED.failures_by_rpc
    assert got.segment_names == live.segment_names | RECORDED.segment_names  # by name, from the segment label
    assert RECORDED.rpc_requests < got.rpc_requests <= RECORDED.rpc_requests + live.rpc_requests
    assert before.samples == [] and "no Mooncake master series" in (before.error or "")
