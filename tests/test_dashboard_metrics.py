"""The dashboard's arithmetic: parsing OTLP JSON lines (incrementally), differencing with resets, ratios and
histogram quantiles; then files written by the real SDK exporter from a real client run with injected
faults, whose figures must equal what the injector did."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
from opentelemetry.exporter.otlp.json.file import FileMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tq_mooncake.client.codes import ErrorCode
from tq_mooncake.client.observer import NOOP_OBSERVER
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.cluster import free_port
from tq_mooncake.dashboard import metrics as m
from tq_mooncake.dashboard.sample_run import Tally, fault_plan, make_client, run
from tq_mooncake.dashboard.settings import Thresholds
from tq_mooncake.dashboard.sources import FILE_PATTERNS, FileSource, PrometheusSource
from tq_mooncake.dashboard.tiles import percent, tiles
from tq_mooncake.telemetry import OTelObserver, conventions, metric_views
from tq_mooncake.telemetry.conventions import Operation, Outcome
from tq_mooncake.testing import RecordingObserver

OPS = conventions.OPERATIONS_METRIC


def point(value: float, t: float, start: float | None = 0.0, metric: str = OPS, **attrs: str) -> m.Point:
    return m.Point(metric, m.labels({"host": "h"}), m.labels(attrs), t, value, start)


# ------------------------------------------------------------------------------------------------ pure arithmetic


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 10.0, 0.5: 20.0, 1.0: 20.0, math.inf: 20.0}
    assert m.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert m.histogram_quantile(0.75, buckets) == pytest.approx(0.3)  # 0.1 + 0.4 * (15 - 10) / (20 - 10)
    assert m.histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert m.histogram_quantile(1.0, buckets) == pytest.approx(0.5)
    assert m.histogram_quantile(0.99, {1.0: 1.0, math.inf: 5.0}) == 1.0  # rank in +Inf: the largest finite bound
    assert m.histogram_quantile(0.5, {}) is None
    assert m.histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert m.histogram_quantile(0.5, {0.1: 4.0, 0.2: 3.0, math.inf: 4.0}) == pytest.approx(0.05)  # made monotonic


def test_ratio_of_nothing_is_none_not_zero():
    assert m.ratio(1, 4) == 0.25
    assert m.ratio(0, 4) == 0.0
    assert m.ratio(0, 0) is None


def test_differencing_counts_from_zero_and_treats_restarts_and_drops_as_resets():
    diff = m.Differencer()
    got = diff.add(
        [
            point(5, 10),  # first point: counts from zero
            point(8, 20),  # +3
            point(8, 30),  # +0: no increment
            point(2, 40),  # a drop: a reset, +2 (never -6)
            point(4, 50, start=45),  # a new start time: a restart, +4 even though 4 > 2
            point(6, 60, start=45),  # +2
            point(100, 55, start=45),  # older than the last point: ignored
        ]
    )
    assert [(i.time, i.value) for i in got] == [(10, 5), (20, 3), (40, 2), (50, 4), (60, 2)]
    assert diff.ignored == 1
    assert sum(i.value for i in got) >= 0 and all(i.value > 0 for i in got)
    delta = m.Differencer().add([m.Point(OPS, (), (), t, 3.0, None, True) for t in (1, 2)])
    assert [i.value for i in delta] == [3.0, 3.0]  # delta temporality: already increments


def test_series_are_differenced_separately():
    got = m.Differencer().add(
        [point(5, 10, outcome="a"), point(1, 11, outcome="b"), point(7, 20, outcome="a"), point(4, 21, outcome="b")]
    )
    assert [(i.attr("outcome"), i.value) for i in got] == [("a", 5), ("b", 1), ("a", 2), ("b", 3)]


def sum_metric(
    name: str,
    attrs: dict[str, Any],
    value: float,
    t: float,
    start: float,
    as_double: bool = False,
    temporality: int = 2,
):
    dp: dict[str, Any] = {
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()],
        "startTimeUnixNano": str(int(start * 1e9)),
        "timeUnixNano": str(int(t * 1e9)),
    }
    dp["asDouble" if as_double else "asInt"] = value if as_double else str(int(value))
    return {"name": name, "sum": {"dataPoints": [dp], "aggregationTemporality": temporality, "isMonotonic": True}}


def resource(host: str, pid: int, metrics: list[dict[str, Any]], service: str = "svc") -> dict[str, Any]:
    attrs = [
        {"key": "host.name", "value": {"stringValue": host}},
        {"key": "process.pid", "value": {"intValue": str(pid)}},
        {"key": "service.name", "value": {"stringValue": service}},
    ]
    return {"resource": {"attributes": attrs}, "scopeMetrics": [{"scope": {"name": "tq_mooncake"}, "metrics": metrics}]}


def test_parse_reads_collector_style_lines_with_several_resources():
    put_ok = {"mooncake.operation": "put", "mooncake.outcome": "success"}
    line = json.dumps(
        {
            "resourceMetrics": [
                resource("a", 1, [sum_metric(OPS, put_ok, 3, 20, 10)]),
                resource("b", 2, [sum_metric(OPS, put_ok, 2.5, 21, 10, as_double=True)]),
                resource("c", 3, [{"name": "something.else", "sum": {"dataPoints": []}}]),
            ]
        }
    )
    points = m.parse_metrics_line(line)
    assert [(dict(p.origin)["host"], dict(p.origin)["process"], p.value, p.time, p.start) for p in points] == [
        ("a", "1", 3.0, 20.0, 10.0),
        ("b", "2", 2.5, 21.0, 10.0),
    ]
    assert dict(points[0].attrs) == put_ok
    assert m.parse_metrics_line(json.dumps({"resourceSpans": []})) == []  # another signal: not malformed
    for bad in (
        "{not json",
        "[1, 2]",
        '{"something": 1}',
        '{"resourceMetrics": [{"scopeMetrics": [{"metrics": '
        '[{"name": "mooncake.client.operations", "sum": {"dataPoints": [{"asInt": "1"}]}}]}]}]}',
    ):
        with pytest.raises(ValueError):
            m.parse_metrics_line(bad)


def test_tail_reader_returns_complete_new_lines_only_and_rereads_a_truncated_or_rewritten_file(tmp_path):
    path = tmp_path / "metrics-x.jsonl"
    tail = m.TailReader()
    assert list(tail.lines(path)) == []  # not there yet
    path.write_text('{"a": 1}\n{"b":')
    assert list(tail.lines(path)) == ['{"a": 1}']
    assert list(tail.lines(path)) == []  # the half line waits
    with open(path, "a") as f:
        f.write(' 2}\n{"c": 3}\n')
    assert list(tail.lines(path)) == ['{"b": 2}', '{"c": 3}']
    assert tail.offsets[m.file_id(path.stat())].offset == path.stat().st_size
    path.write_text('{"d": 4}\n')  # truncated and rewritten: read from the start
    assert list(tail.lines(path)) == ['{"d": 4}']
    path.write_text('{"g": 7}\n{"h": 8}\n')  # rewritten past the offset, a line ending there too: from the start
    assert list(tail.lines(path)) == ['{"g": 7}', '{"h": 8}']
    assert tail.bytes_read == 14 + 5 + 18 + 9 + 18  # each call reads from its offset on: the half line until it ends


def test_window_figures_bins_and_hosts():
    t0 = 1000.0
    incs = m.Differencer().add(
        [
            m.Point(OPS, m.labels({"host": "a"}), m.labels({"mooncake.operation": "put", "mooncake.outcome": o}), t, v)
            for o, t, v in [("success", t0 + 10, 8), ("exhausted", t0 + 10, 2), ("success", t0 + 70, 18)]
        ]
        + [
            m.Point(OPS, m.labels({"host": "b"}), m.labels({"mooncake.operation": "get", "mooncake.outcome": o}), t, v)
            for o, t, v in [("success", t0 + 20, 5)]
        ]
    )
    whole = m.window_figures(incs, t0, t0 + 120)
    assert whole.operations == 25 and whole.exhaustion_rate == pytest.approx(2 / 25)
    assert whole.ops_per_s == pytest.approx(25 / 120)
    assert m.window_figures(incs, t0, t0 + 120, m.make_filter(["get"])).operations == 5
    assert m.window_figures(incs, t0, t0 + 120, m.make_filter(None, ["a"])).operations == 20
    assert m.window_figures(incs, t0 + 10, t0 + 120).operations == 15  # (start, end]: t0 + 10 is left out
    bins = m.time_series(incs, t0, t0 + 120, 60)
    assert [(t, f.operations) for t, f in bins] == [(t0 + 60, 15), (t0 + 120, 10)]
    worst = m.by_origin(incs, t0, t0 + 120)
    assert [dict(o)["host"] for o, _ in worst] == ["a", "b"]  # exhaustion first
    assert m.hosts_of(incs) == ["a", "b"]


def test_file_source_skips_and_counts_malformed_lines_and_reports_a_missing_folder(tmp_path):
    assert FileSource(tmp_path / "nowhere").load(0, 2e9).error is not None
    put_ok = {"mooncake.operation": "put", "mooncake.outcome": "success"}
    good = json.dumps({"resourceMetrics": [resource("a", 1, [sum_metric(OPS, put_ok, 3, 20, 10)])]})
    (tmp_path / "metrics-a-1.jsonl").write_text(f"{good}\nnot json\n{{}}\n\n")
    (tmp_path / "traces-a-1.jsonl").write_text("spans are not read\n")
    source = FileSource(tmp_path)
    snap = source.load(0, 100)
    assert snap.skipped_lines == 2 and "metrics-a-1.jsonl" in snap.last_problem
    assert snap.files == 1 and [i.value for i in snap.increments] == [3.0]
    assert source.refresh() == 0 and source.skipped_lines == 2  # nothing read twice


# ------------------------------------------------------------------------------------------------ rotated files

PUT_OK = {"mooncake.operation": "put", "mooncake.outcome": "success"}


def export(pid: int, t: float, n: int, delta: bool = True) -> str:
    """One export line of process ``pid`` on host ``h``: ``n`` put operations in the 10 s before ``t`` (delta) or
    since the process started (cumulative), and the ``nodes.ejected`` gauge."""
    ops = sum_metric(OPS, PUT_OK, n, t, t - 10 if delta else 1.0, temporality=1 if delta else 2)
    ejected = {
        "name": conventions.EJECTED_METRIC,
        "gauge": {"dataPoints": [{"asInt": "1", "timeUnixNano": str(int(t * 1e9))}]},
    }
    return json.dumps({"resourceMetrics": [resource("h", pid, [ops, ejected])]}) + "\n"


def append(path: Path, text: str) -> int:
    """Appends ``text`` to ``path`` as a writer does; returns the bytes written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    return len(text.encode())


def refresh(source: FileSource) -> tuple[Counter[str], int]:
    """What one refresh added: put operations by process, and the bytes it read."""
    n, read = len(source._increments), source._tail.bytes_read
    source.refresh()
    added: Counter[str] = Counter()
    for inc in source._increments[n:]:
        added[inc.who("process")] += inc.value
    return added, source._tail.bytes_read - read


def test_file_list_finds_active_and_rotated_files_oldest_first(tmp_path):
    order = [
        *("metrics-h-1.000001.jsonl", "metrics-h-1.000002.jsonl", "metrics-h-1.jsonl"),  # our rotation
        *("metrics-h-2.jsonl.2", "metrics-h-2.jsonl.1", "metrics-h-2.jsonl"),  # logrotate's, shifting
        *("metrics-h-3.jsonl-20261130", "metrics-h-3.jsonl-20261201", "metrics-h-3.jsonl"),  # logrotate's dateext
        "otel.json",
    ]
    left_out = [
        *("traces-h-1.jsonl", "traces-h-1.000001.jsonl", "logs-h-1.jsonl", "notes.txt", "metrics-h-1.jsonl.swp"),
        *("metrics-h-2.jsonl.3.gz", "metrics-h-3.jsonl-20261129.xz", "metrics-h-4.jsonl.1.zst", "m.json.1.bz2"),
    ]
    for name in order + left_out:
        (tmp_path / name).write_text("{}\n")
        os.utime(tmp_path / name, ns=(10**18, 10**18))  # one mtime: the names decide
    (tmp_path / "folder.jsonl").mkdir()
    assert [p.name for p, _ in m.file_list(tmp_path, FILE_PATTERNS)] == order
    os.utime(tmp_path / "metrics-h-3.jsonl", ns=(10**18 - 1, 10**18 - 1))  # older: first
    listing = m.file_list(tmp_path, FILE_PATTERNS)
    assert [p.name for p, _ in listing] == ["metrics-h-3.jsonl", *(n for n in order if n != "metrics-h-3.jsonl")]
    assert all(st == p.stat() for p, st in listing)


def test_tail_reader_follows_a_file_through_renames_by_identity_and_forgets_deleted_files(tmp_path):
    path, rotated = tmp_path / "metrics-x.jsonl", tmp_path / "metrics-x.000001.jsonl"
    tail = m.TailReader()
    path.write_text('{"a": 1}\n')
    assert list(tail.lines(path, path.stat())) == ['{"a": 1}']
    append(path, '{"b": 2}\n')
    listed = path.stat()  # listed, then rotated before it is read
    path.rename(rotated)
    path.write_text('{"c": 3}\n')
    assert list(tail.lines(path, listed)) == []  # another file at the path now: left for the next listing
    tail.forget_others([listed])
    assert list(tail.lines(rotated, rotated.stat())) == ['{"b": 2}']  # on from its offset
    assert list(tail.lines(path, path.stat())) == ['{"c": 3}']
    assert list(tail.lines(rotated, rotated.stat())) == [] and tail.bytes_read == 3 * 9  # each byte once

    append(path, '{"x": 0}\n')
    listed = path.stat()  # listed, then truncated before it is read (copytruncate: the copy holds the new line)
    path.write_text("")
    assert list(tail.lines(path, listed)) == [] and tail.offsets[m.file_id(listed)].offset == 9  # for the next listing
    append(path, '{"d":4}\n')
    assert list(tail.lines(path, path.stat())) == ['{"d":4}']  # shorter than its offset: from the start
    # as long but other lines, like a new file on a deleted one's inode: its new mtime, or else its new name, tell
    path.write_text('{"y":9}\n')
    os.utime(path, ns=(10**18, 10**18))
    assert list(tail.lines(path, path.stat())) == ['{"y":9}']
    path.write_text('{"z":0}\n')
    os.utime(path, ns=(10**18, 10**18))  # in the same tick of a coarse clock
    renamed = path.rename(tmp_path / "metrics-x.000002.jsonl")
    assert list(tail.lines(renamed, renamed.stat())) == ['{"z":0}']

    rotated.unlink()  # deleted: forgotten
    tail.forget_others([renamed.stat()])
    assert [(k, p.offset) for k, p in tail.offsets.items()] == [(m.file_id(renamed.stat()), 8)]


def test_file_source_follows_rotations_and_counts_every_point_once(tmp_path):
    """Two processes side by side: 1 writes deltas and is rotated by its writer, then by copytruncate; 2 writes
    cumulative counters and is rotated by logrotate's rename (in the middle of a line), then shifted."""
    a, b = tmp_path / "metrics-h-1.jsonl", tmp_path / "metrics-h-2.jsonl"
    b1, b2 = tmp_path / "metrics-h-2.jsonl.1", tmp_path / "metrics-h-2.jsonl.2"
    source = FileSource(tmp_path)
    wrote = append(a, export(1, 1010, 3) + export(1, 1020, 4)) + append(b, export(2, 1010, 5, delta=False))
    assert refresh(source) == (Counter({"1": 7, "2": 5}), wrote)
    assert refresh(source) == (Counter(), 0)  # nothing new: nothing read

    # our rotation: the active file renamed (same inode) with a line not read yet, then a new active file
    wrote = append(a, export(1, 1030, 2))
    a.rename(tmp_path / "metrics-h-1.000001.jsonl")
    wrote += append(a, export(1, 1040, 1) + export(1, 1045, 1)) + append(b, export(2, 1020, 8, delta=False))
    assert refresh(source) == (Counter({"1": 2 + 1 + 1, "2": 3}), wrote)

    # logrotate's rename in the middle of a line: the writer ends the line in the renamed file, then reopens
    line = export(2, 1030, 10, delta=False)
    half = append(b, line[:40])
    assert refresh(source) == (Counter(), half)  # the half line waits
    b.rename(b1)
    wrote = append(b1, line[40:]) + append(b, export(2, 1040, 11, delta=False))
    assert refresh(source) == (Counter({"2": 2 + 1}), half + wrote)  # the half line read again with its rest

    # shifted: .1 -> .2, the active file (with a line not read yet) -> .1, a new active file
    wrote = append(b, export(2, 1050, 15, delta=False))
    b1.rename(b2)
    b.rename(b1)
    wrote += append(b, export(2, 1060, 16, delta=False))
    assert refresh(source) == (Counter({"2": 4 + 1}), wrote)

    # copytruncate (dateext): a copy, a new inode holding 2 lines read already and 1 not; the active file emptied
    append(a, export(1, 1050, 6))
    copy = tmp_path / "metrics-h-1.jsonl-20261201"
    shutil.copyfile(a, copy)
    os.truncate(a, 0)
    wrote = append(a, export(1, 1060, 2))
    assert refresh(source) == (Counter({"1": 6 + 2}), copy.stat().st_size + wrote)  # the copy: read once, counted once

    # two more rotations before the next read, then the writer's retention deletes the two oldest rotated files
    append(a, export(1, 1070, 5))
    a.rename(tmp_path / "metrics-h-1.000002.jsonl")
    wrote = append(a, export(1, 1080, 7))
    a.rename(tmp_path / "metrics-h-1.000003.jsonl")
    wrote += append(a, export(1, 1090, 1))
    (tmp_path / "metrics-h-1.000001.jsonl").unlink()  # read
    (tmp_path / "metrics-h-1.000002.jsonl").unlink()  # its last line (5 operations) never read: lost
    assert refresh(source) == (Counter({"1": 7 + 1}), wrote)
    assert refresh(source) == (Counter(), 0)

    snap = source.load(0, 2e9)
    assert snap.files == len(source._tail.offsets) == len(list(tmp_path.iterdir())) == 6  # deleted files forgotten
    assert m.window_figures(snap.increments, 0, 2e9).operations == 7 + 4 + 8 + 8 + 16
    assert sorted((g.who("process"), g.time) for g in snap.gauges) == sorted(  # each gauge point once
        [("1", t) for t in (1010, 1020, 1030, 1040, 1045, 1050, 1060, 1080, 1090)]
        + [("2", t) for t in (1010, 1020, 1030, 1040, 1050, 1060)]
    )
    assert snap.skipped_lines == 0 and source._diff.ignored == 2 * 2  # the copy's 2 old lines: ops and gauge


def test_file_source_counts_a_read_in_time_order_whatever_the_order_of_the_files(tmp_path):
    """A copied folder (``scp -r``: new modification times in any order): the rotated file looks newer than the
    active one and is read after it, yet its earlier points count."""
    rotated, active = tmp_path / "metrics-h-1.000001.jsonl", tmp_path / "metrics-h-1.jsonl"
    rotated.write_text(export(1, 1010, 1) + export(1, 1020, 2))
    active.write_text(export(1, 1030, 4))
    os.utime(active, ns=(10**18, 10**18))
    os.utime(rotated, ns=(10**18 + 1, 10**18 + 1))
    assert [p for p, _ in m.file_list(tmp_path, FILE_PATTERNS)] == [active, rotated]
    snap = FileSource(tmp_path).load(0, 2e9)
    assert [(i.time, i.value) for i in snap.increments] == [(1010, 1), (1020, 2), (1030, 4)]


def test_prometheus_source_reports_errors_instead_of_raising():
    unreachable = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout_s=2).load(0, 100)
    assert unreachable.error and "cannot query" in unreachable.error and unreachable.increments == []

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            body = json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        refused = PrometheusSource(f"http://127.0.0.1:{server.server_address[1]}").load(0, 100)
    finally:
        server.shutdown()
        server.server_close()
    assert refused.error == f"http://127.0.0.1:{server.server_address[1]} answered HTTP 400 parse error"


class FakePrometheus(BaseHTTPRequestHandler):
    """``/api/v1/query_range`` evaluated the way Prometheus does (timestamps ``start + k*step`` in ms, up to
    ``end``), over canned series: ``series`` maps a label set to a function of the evaluation index."""

    series: list[tuple[dict[str, str], Any]] = []
    queries: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(self.path).query)
        FakePrometheus.queries.append(query)
        start, end, step = (float(query[k][0]) for k in ("start", "end", "step"))
        times = [round(start + k * step, 3) for k in range(int((end - start) / step + 1e-9) + 1)]
        result = []
        for metric, value in self.series:
            values = [[t, str(value(k))] for k, t in enumerate(times) if value(k) is not None]
            result.append({"metric": metric, "values": values})
        body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_prometheus_source_differences_the_translated_series(monkeypatch):
    job = {"job": "tq", "instance": "127.0.0.1:9464"}
    ops = {"__name__": "mooncake_client_operations_total", **job, "otel_scope_name": "tq_mooncake"}
    FakePrometheus.series = [
        (
            {"__name__": "target_info", **job, "host_name": "node-1", "process_pid": "42", "service_name": "trainer"},
            lambda k: 1,
        ),
        # existed before the range: its first value is a baseline, then +3
        ({**ops, "mooncake_operation": "put", "mooncake_outcome": "success"}, lambda k: 100 if k < 5 else 103),
        # 10 (baseline), 10, 12, then 2: a reset, +2 (not -10)
        ({**ops, "mooncake_operation": "get", "mooncake_outcome": "exhausted"}, lambda k: [10, 10, 12, 2][min(k, 3)]),
        # first seen at the very last evaluation: counts from zero
        ({**ops, "mooncake_operation": "clear", "mooncake_outcome": "success"}, lambda k: 7 if k == 10 else None),
        (
            {
                "__name__": "mooncake_client_operation_duration_seconds_bucket",
                **job,
                "mooncake_operation": "put",
                "mooncake_outcome": "success",
                "error_type": "",
                "le": "0.005",
            },
            lambda k: 0 if k < 5 else 4,
        ),
        (
            {
                "__name__": "mooncake_client_operation_duration_seconds_bucket",
                **job,
                "mooncake_operation": "put",
                "mooncake_outcome": "success",
                "error_type": "",
                "le": "+Inf",
            },
            lambda k: 0 if k < 5 else 4,
        ),
    ]
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        snap = PrometheusSource(f"http://127.0.0.1:{server.server_address[1]}/").load(1000.0, 1009.0006)
    finally:
        server.shutdown()
        server.server_close()
    (query,) = FakePrometheus.queries
    assert query["step"] == ["1.0"] and query["end"] == ["1009.000"] and query["start"] == ["999.000"]
    assert "mooncake_client_operations_total" in query["query"][0] and "target_info" in query["query"][0]
    assert snap.error is None
    f = m.window_figures(snap.increments, 1000.0, 1009.0006)
    assert f.outcomes == Counter({"success": 3 + 7, "exhausted": 2 + 2})
    assert f.latency[0.005] == 4 and f.latency[math.inf] == 4
    assert {dict(i.origin)["host"] for i in snap.increments} == {"node-1"}
    assert dict(snap.increments[0].origin) == {"host": "node-1", "process": "42", "service": "trainer"}
    clear = [i for i in snap.increments if i.attr("mooncake.operation") == "clear"]
    assert [(i.time, i.value) for i in clear] == [(1009.0, 7.0)]
    assert all("otel_scope_name" not in dict(i.attrs) and "error.type" not in dict(i.attrs) for i in snap.increments)


# ------------------------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def faulty_client(shared_master) -> Iterator[tuple[Any, Any, RecordingObserver]]:
    """One client (closing takes ~2 s) for every phase; its observer forwards to the current phase's."""
    switch = RecordingObserver(keep=False)
    client, store = make_client(shared_master.address, shared_master.metadata_server, observer=switch)
    try:
        yield client, store, switch
    finally:
        client.close()


def recorder(path: Path) -> MeterProvider:
    """The real SDK pipeline ``configure()`` builds for files: views, a periodic reader, the JSON-lines exporter."""
    reader = PeriodicExportingMetricReader(FileMetricExporter(path), export_interval_millis=3_600_000)
    res = Resource({"host.name": socket.gethostname(), "process.pid": os.getpid(), "service.name": "metrics-test"})
    return MeterProvider(metric_readers=[reader], resource=res, views=metric_views())


def assert_figures_equal(figures: m.Figures, tally: Tally) -> None:
    assert figures.operations == tally.total
    outcomes: Counter[str] = Counter()
    for key, n in tally.operations.items():
        outcomes[key.split("/")[1]] += n
    assert figures.outcomes == outcomes
    assert figures.retried_operations == tally.retried
    assert figures.attempts == tally.attempts
    assert figures.key_failures == tally.key_failures
    assert figures.keys["failed"] == tally.failed_keys
    assert sum(v for b, v in figures.latency.items() if math.isinf(b)) == tally.total


def test_figures_from_real_exported_files_equal_what_the_injector_did(faulty_client, tmp_path):
    client, store, switch = faulty_client
    path = tmp_path / f"metrics-{socket.gethostname()}-{os.getpid()}.jsonl"
    provider = recorder(path)
    switch.forward = OTelObserver(None, provider)
    source = FileSource(tmp_path)
    began = time.time()
    try:
        first = run(client, store, fault_plan(20))
        assert provider.force_flush(10_000)
        assert first.retried == 7 and first.outcome(Outcome.EXHAUSTED) == 3  # 0, 5, 10, 15 retry; 3, 8, 13 exhaust
        assert_figures_equal(m.window_figures(source.load(began - 1, time.time() + 1).increments, 0, 2e9), first)

        second = run(client, store, fault_plan(20))  # appended to the same file, read incrementally
        assert provider.force_flush(10_000)
        size_before = source._tail.offsets[m.file_id(path.stat())].offset
        snap = source.load(began - 1, time.time() + 1)
        assert 0 < size_before < source._tail.offsets[m.file_id(path.stat())].offset == path.stat().st_size
        both = Tally(
            first.operations + second.operations,
            first.retried + second.retried,
            first.attempts + second.attempts,
            first.key_failures + second.key_failures,
            first.failed_keys + second.failed_keys,
        )
        figures = m.window_figures(snap.increments, began - 1, time.time() + 1)
        assert_figures_equal(figures, both)
        assert figures.retry_rate == pytest.approx(both.retried / both.total)
        assert figures.exhaustion_rate == pytest.approx(both.outcome(Outcome.EXHAUSTED) / both.total)
        assert figures.retries == sum(n for a, n in both.attempts.items() if a > 1)
        (origin, _), *_ = m.by_origin(snap.increments, began - 1, time.time() + 1)
        assert dict(origin) == {"host": socket.gethostname(), "process": str(os.getpid()), "service": "metrics-test"}
        puts = m.window_figures(snap.increments, began - 1, time.time() + 1, m.make_filter(["put"]))
        assert puts.operations == sum(n for k, n in both.operations.items() if k.startswith("put/"))
        shown = {t.label: t.value for t in tiles(figures, m.Figures(60), Thresholds())}
        assert shown["Retry rate"] == percent(both.retried / both.total) == "35.0%"
        assert shown["Exhaustion rate"] == percent(both.outcome(Outcome.EXHAUSTED) / both.total) == "15.0%"
    finally:
        switch.forward = NOOP_OBSERVER
        provider.shutdown()

    # A restarted process: a new provider (new start time) appends lower cumulative values to the same file.
    restarted = recorder(path)
    switch.forward = OTelObserver(None, restarted)
    try:
        third = run(client, store, fault_plan(10))
        assert restarted.force_flush(10_000)
    finally:
        switch.forward = NOOP_OBSERVER
        restarted.shutdown()
    figures = m.window_figures(source.load(began - 1, time.time() + 1).increments, began - 1, time.time() + 1)
    assert figures.operations == both.total + third.total  # a reset, not a negative rate
    assert figures.key_failures == both.key_failures + third.key_failures
    assert source.skipped_lines == 0


# ------------------------------------------------------------------------------------------------ storage nodes

A, B, V6 = "127.0.0.1:12345", "10.0.0.2:23456", "[::1]:7001"


def attempt(obs: OTelObserver, operation: Operation, routing: RoutingReport) -> None:
    """One attempt of a new call that lost keys to TRANSFER_FAIL, with what routing did in it."""
    scope = obs.operation(operation, 4)
    scope.attempt(0, 1, 4, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 0, routing)


@pytest.mark.pure
def test_storage_node_figures_from_real_exported_files_equal_what_was_emitted(tmp_path):
    path = tmp_path / f"metrics-{socket.gethostname()}-{os.getpid()}.jsonl"
    provider = recorder(path)
    ejected = [2]
    obs = OTelObserver(None, provider, ejected_nodes=lambda: ejected[0])
    source = FileSource(tmp_path)
    began = time.time()
    try:
        for endpoint in (A, A, V6):
            obs.node_ejected(endpoint)
        attempt(obs, Operation.GET, RoutingReport(down={A}, fallbacks=Counter({A: 2, B: 1})))
        attempt(obs, Operation.PUT, RoutingReport(down={A, B}))
        assert provider.force_flush(10_000)
        first_end = time.time()
        ejected[0] = 1
        obs.node_ejected(B)
        attempt(obs, Operation.GET, RoutingReport(fallbacks=Counter({A: 3})))
        many = [f"10.1.{i // 200}.{i % 200}:7000" for i in range(255)]  # 3 endpoints known: 253 more, then _OTHER
        for endpoint in many:
            obs.node_ejected(endpoint)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    end = time.time()
    snap = source.load(began - 1, end)
    whole = m.window_figures(snap.increments, began - 1, end)

    rows = m.storage_nodes(whole)
    assert rows[:3] == [m.NodeRow(A, 2, 2, 5), m.NodeRow(B, 1, 1, 1), m.NodeRow("_OTHER", 2, 0, 0)]
    assert {r.endpoint: (r.ejections, r.failures, r.fallbacks) for r in rows[3:]} == {
        V6: (1, 0, 0),
        **{e: (1, 0, 0) for e in many[:253]},
    }
    assert sum(whole.ejections.values()) == 3 + 1 + 255 and sum(whole.node_failures.values()) == 3
    assert m.ejected_now(snap.gauges, began - 1, end) == (1.0, 1)  # the latest value
    assert m.ejected_now(snap.gauges, began - 1, first_end) == (2.0, 1)

    # over time, in the bins of the retry-rate chart: the first bin ends at the first export
    series = m.time_series(snap.increments, began - 1, end, first_end - (began - 1))
    assert len(series) >= 2
    fallbacks = m.node_series(series, "fallbacks", [A])
    assert fallbacks[0] == (first_end, {A: 2.0, m.OTHER_ENDPOINTS: 1.0})
    assert [sum(row[k] for _, row in fallbacks[1:]) for k in (A, m.OTHER_ENDPOINTS)] == [3.0, 0.0]
    failures = m.node_series(series, "failures", [A, B])
    assert failures[0][1] == {A: 2.0, B: 1.0} and all(row == {A: 0.0, B: 0.0} for _, row in failures[1:])

    # the operation filter applies to failures and fallbacks, not to ejections nor the gauge (not per operation)
    puts = m.make_filter(["put"])
    put_figures = m.window_figures(snap.increments, began - 1, end, puts)
    assert put_figures.node_failures == Counter({A: 1, B: 1}) and not put_figures.fallbacks
    assert put_figures.ejections == whole.ejections
    assert m.ejected_now(snap.gauges, began - 1, end, puts) == (1.0, 1)
    elsewhere = m.make_filter(None, ["another-host"])
    assert not m.storage_nodes(m.window_figures(snap.increments, began - 1, end, elsewhere))
    assert m.ejected_now(snap.gauges, began - 1, end, elsewhere) == (0.0, 0)


@pytest.mark.pure
def test_ejected_now_sums_each_process_latest_value_and_drops_processes_that_stopped_reporting():
    def gauge(host: str, t: float, value: float) -> m.Point:
        return m.Point(conventions.EJECTED_METRIC, m.labels({"host": host, "process": "1"}), (), t, value)

    points = [gauge("a", 100, 3), gauge("a", 400, 1), gauge("b", 390, 2), gauge("c", 50, 5)]
    assert m.ejected_now(points, 0, 1000) == (3.0, 2)  # a: 1 (its latest), b: 2; c reported 350 s before a
    assert m.ejected_now(points, 0, 200) == (8.0, 2)  # at 200 s: a's 3 and c's 5
    assert m.ejected_now(points, 0, 40) == (0.0, 0)
    assert m.endpoint_name(m.Increment("x", (), m.labels({"server.address": "_OTHER"}), 0, 1)) == "_OTHER"
    assert m.endpoint_name(m.Increment("x", (), (), 0, 1)) == "unknown"
