"""Bounded telemetry files: rotation, retention, external rotation (logrotate), and compact metrics lines, on real
files with the real SDK."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.dashboard.metrics import Differencer, parse_metrics_line
from tq_mooncake.telemetry import OTelObserver, metric_views, rotating_file
from tq_mooncake.telemetry import conventions as c
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter
from tq_mooncake.telemetry.metrics_file import JsonLinesMetricExporter, compact
from tq_mooncake.telemetry.pipeline import file_pipeline, telemetry_files
from tq_mooncake.telemetry.rotating_file import Backup, Retention, RotatingFile, backup_path, backups_of

pytestmark = pytest.mark.pure


def lines_in(folder: Path) -> list[str]:
    """Every line of every ``.jsonl`` file in ``folder``, rotated files first (oldest first), then active ones."""
    files = sorted(folder.glob("*.jsonl"), key=lambda p: (p.name.count(".") == 1, p.name))
    return [line for f in files for line in f.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ Retention


def test_retention_rejects_nonsense_and_too_little_room():
    for kwargs in ({"max_file_bytes": 0}, {"max_backups": -1}, {"max_total_bytes": 1.5}, {"max_file_bytes": True}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Retention(**kwargs)
    Retention(max_backups=0)  # keep no rotated file: allowed
    with pytest.raises(ValueError, match="must hold 2 active"):
        Retention(max_file_bytes=10, max_total_bytes=15).check_room(2)


def test_retention_expires_past_the_count_then_the_oldest_past_the_total():
    a, b = Path("traces.jsonl"), Path("metrics.jsonl")
    backups = [Backup(Path(f"t{i}"), a, i, 100, mtime_ns=i * 10) for i in range(1, 6)]
    backups += [Backup(Path(f"m{i}"), b, i, 10, mtime_ns=i * 10 + 5) for i in range(1, 3)]
    # count: 2 per family
    doomed = Retention(max_file_bytes=100, max_backups=2, max_total_bytes=10_000).expired(backups, 2)
    assert [d.path.name for d in doomed] == ["t1", "t2", "t3"]
    # total: t4 + t5 + m1 + m2 = 220, plus 2 active files of 100 = 420 > 350: the oldest written go (m1 at 15, m2 at
    # 25, t4 at 40) until 300 remain
    doomed = Retention(max_file_bytes=100, max_backups=2, max_total_bytes=350).expired(backups, 2)
    assert [d.path.name for d in doomed] == ["t1", "t2", "t3", "m1", "m2", "t4"]
    assert Retention(max_file_bytes=100, max_backups=9, max_total_bytes=10_000).expired(backups, 2) == []


# ------------------------------------------------------------------------------------------------ RotatingFile


def test_rotation_by_size_keeps_every_line_whole_and_in_order(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    f = RotatingFile(path, Retention(max_file_bytes=100, max_backups=100, max_total_bytes=1 << 20))
    inode = os.stat(path).st_ino
    written = [f"line {i:03d} " + "x" * 20 + "\n" for i in range(40)]  # 29 bytes: 3 lines per file
    for line in written:
        f.append(line)
    f.close()
    assert f.rotations == 13 and f.reopens == 0
    assert os.stat(backup_path(path, 1)).st_ino == inode  # a rotation renames: a reader following inodes loses nothing
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert max(sizes) <= 100
    assert lines_in(tmp_path) == [w.rstrip("\n") for w in written]
    assert sorted(b.seq for b in backups_of(path)) == list(range(1, 14))
    with pytest.raises(ValueError, match="closed"):
        f.append("late\n")


def test_a_line_larger_than_the_file_size_gets_a_file_of_its_own(tmp_path):
    path = tmp_path / "metrics-h-1.jsonl"
    f = RotatingFile(path, Retention(max_file_bytes=50, max_backups=10, max_total_bytes=1000))
    f.append("small\n")
    big = "y" * 200 + "\n"
    f.append(big)
    f.append("after\n")
    f.close()
    assert backup_path(path, 1).read_text() == "small\n"
    assert backup_path(path, 2).read_text() == big
    assert path.read_text() == "after\n"


def test_retention_caps_count_and_total_across_the_process_files(tmp_path):
    traces, metrics = tmp_path / "traces-h-1.jsonl", tmp_path / "metrics-h-1.jsonl"
    retention = Retention(max_file_bytes=1000, max_backups=3, max_total_bytes=4500)
    group = (traces, metrics)
    t, m = RotatingFile(traces, retention, group), RotatingFile(metrics, retention, group)
    other = tmp_path / "traces-h-2.jsonl"  # another process's files are never touched
    RotatingFile(other, retention).append("mine\n")
    logrotated = tmp_path / "traces-h-1.jsonl.1"  # nor are logrotate's
    logrotated.write_text("old\n")
    for i in range(200):
        t.append(f"{i:04d}" + "t" * 95 + "\n")  # 100 bytes: 10 lines per file
        if i % 10 == 0:
            m.append(f"{i:04d}" + "m" * 45 + "\n")
    t.close()
    m.close()
    on_disk = sum(
        p.stat().st_size for p in [traces, metrics, *(b.path for b in backups_of(traces) + backups_of(metrics))]
    )
    assert on_disk <= 4500
    assert len(backups_of(traces)) <= 3 and len(backups_of(metrics)) <= 3
    assert traces.read_text().splitlines()[-1].startswith("0199")  # the newest lines survive
    # 19 rotations of traces; the total leaves room for two of them beside the two active files counted full
    assert [b.seq for b in sorted(backups_of(traces), key=lambda b: b.seq)] == [18, 19]
    assert other.read_text() == "mine\n" and logrotated.read_text() == "old\n"


def test_logrotate_create_mode_is_followed_without_a_signal(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    f = RotatingFile(path)
    f.append("before\n")
    os.rename(path, tmp_path / "traces-h-1.jsonl.1")  # logrotate: rename, then create (or not) a new file
    f.append("after rename\n")
    assert f.reopens == 1
    os.rename(path, tmp_path / "traces-h-1.jsonl.2")
    path.write_text("")  # `create`: a new empty file at the path
    f.append("after create\n")
    f.close()
    assert (tmp_path / "traces-h-1.jsonl.1").read_text() == "before\n"
    assert (tmp_path / "traces-h-1.jsonl.2").read_text() == "after rename\n"
    assert path.read_text() == "after create\n"
    assert f.reopens == 2


def test_copytruncate_goes_on_at_the_new_end(tmp_path):
    path = tmp_path / "metrics-h-1.jsonl"
    f = RotatingFile(path, Retention(max_file_bytes=40, max_backups=5, max_total_bytes=1000))
    f.append("a" * 30 + "\n")
    (tmp_path / "copy").write_bytes(path.read_bytes())
    os.truncate(path, 0)  # logrotate copytruncate
    f.append("b" * 30 + "\n")  # fits: the size is the file's, not a count kept here
    f.close()
    assert path.read_text() == "b" * 30 + "\n" and f.rotations == 0 and f.reopens == 0


def test_concurrent_appends_never_interleave_or_lose_lines(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    f = RotatingFile(path, Retention(max_file_bytes=4000, max_backups=1000, max_total_bytes=1 << 30))
    barrier = threading.Barrier(4)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(300):
            f.append(json.dumps({"w": n, "i": i, "pad": "z" * (i % 50)}) + "\n")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    got = [json.loads(line) for line in lines_in(tmp_path)]
    assert len(got) == 1200 and f.rotations > 10
    for n in range(4):
        assert [g["i"] for g in got if g["w"] == n] == list(range(300))


def test_the_span_exporter_writes_through_a_rotating_file(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    provider = TracerProvider()
    target = RotatingFile(path, Retention(max_file_bytes=3000, max_backups=100, max_total_bytes=1 << 20))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(target)))
    observer = OTelObserver(provider)
    for _ in range(20):
        scope = observer.operation(Operation.GET, 4)
        scope.attempt(0, 1, 4, 0.0).end(Counter(), 256)
        scope.end(OperationSummary(Outcome.SUCCESS, 1, 4, 0, 0, 0.0, 256))
    provider.shutdown()
    names = [
        s["name"]
        for line in lines_in(tmp_path)
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    ]
    assert names == ["mooncake.get.attempt", "mooncake.get"] * 20
    assert target.rotations >= 5 and target.closed


# ------------------------------------------------------------------------------------------------ compact metrics


def failing_get(observer: OTelObserver, code: ErrorCode) -> None:
    scope = observer.operation(Operation.GET, 4)
    scope.attempt(0, 1, 4, 0.0).end(Counter({code: 1}), 192)
    scope.attempt(0, 2, 1, 0.01).end(Counter(), 64)
    scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 2, 3, 1, 0, 0.01, 256))


def metric_lines(tmp_path: Path, rounds: list[list[ErrorCode]]) -> list[dict]:
    """Run ``rounds`` (each: one failing get per code, then an export) into a metrics file; its lines."""
    path = tmp_path / "metrics-h-1.jsonl"
    exporter = JsonLinesMetricExporter(path)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], views=metric_views(), shutdown_on_exit=False)
    observer = OTelObserver(TracerProvider(), provider, budget_tokens=lambda: 3.0)
    for codes in rounds:
        for code in codes:
            failing_get(observer, code)
        provider.force_flush()
    provider.shutdown()
    return [json.loads(line) for line in path.read_text().splitlines()]


def series(line: dict) -> dict[str, int]:
    """metric name -> number of data points in one line."""
    out: dict[str, int] = {}
    for rm in line["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for m in sm["metrics"]:
                data = m.get("sum") or m.get("histogram") or m.get("gauge")
                out[m["name"]] = len(data["dataPoints"])
    return out


def test_metrics_lines_hold_only_what_changed_since_the_last(tmp_path):
    codes = [ErrorCode.TRANSFER_FAIL, ErrorCode.RPC_FAIL, ErrorCode.NO_AVAILABLE_HANDLE]
    lines = metric_lines(tmp_path, [codes, [], [ErrorCode.RPC_FAIL]])
    assert len(lines) == 4  # three exports and the shutdown's (only the gauge)
    first, idle, one, last = map(series, lines)
    assert first[c.KEYS_FAILED_METRIC] == 3
    assert idle == {c.RETRY_BUDGET_METRIC: 1}  # nothing happened: the gauge alone
    assert one[c.KEYS_FAILED_METRIC] == 1 and one[c.OPERATIONS_METRIC] == 1
    assert len(json.dumps(lines[1])) < len(json.dumps(lines[0])) / 5
    for line in lines[:3]:
        for rm in line["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                for m in sm["metrics"]:
                    if "sum" in m:
                        assert m["sum"]["aggregationTemporality"] == 1  # delta: each line is self-contained


def test_the_dashboard_reads_compact_lines_to_the_same_totals(tmp_path):
    codes = [ErrorCode.TRANSFER_FAIL, ErrorCode.RPC_FAIL]
    lines = metric_lines(tmp_path, [codes, [], codes, [ErrorCode.RPC_FAIL]])
    diff = Differencer()
    totals: Counter[tuple[str, str]] = Counter()
    for line in lines:
        for inc in diff.add(parse_metrics_line(json.dumps(line))):
            if inc.metric == c.KEYS_FAILED_METRIC:
                totals[(inc.metric, inc.attr(c.ERROR_TYPE))] += inc.value
            if inc.metric == c.OPERATIONS_METRIC:
                totals[(inc.metric, inc.attr(c.OUTCOME))] += inc.value
    assert totals == {
        (c.KEYS_FAILED_METRIC, "TRANSFER_FAIL"): 2,
        (c.KEYS_FAILED_METRIC, "RPC_FAIL"): 3,
        (c.OPERATIONS_METRIC, "success_after_retry"): 5,
    }


def test_compact_keeps_gauges_and_cumulative_points():
    reader = InMemoryMetricReader()  # cumulative, as Prometheus reads
    provider = MeterProvider(metric_readers=[reader], views=metric_views())
    observer = OTelObserver(TracerProvider(), provider, budget_tokens=lambda: 3.0)
    failing_get(observer, ErrorCode.TRANSFER_FAIL)
    reader.collect()
    data = reader.get_metrics_data()
    assert compact(data) == data  # nothing dropped from cumulative data
    provider.shutdown()


def test_a_vanished_folder_is_made_again_and_a_failing_write_is_logged_once(tmp_path, caplog):
    folder = tmp_path / "gone"
    path = folder / "metrics-h-1.jsonl"
    exporter = JsonLinesMetricExporter(RotatingFile(path))
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], views=metric_views(), shutdown_on_exit=False)
    observer = OTelObserver(TracerProvider(), provider, budget_tokens=lambda: 3.0)
    failing_get(observer, ErrorCode.RPC_FAIL)
    provider.force_flush()
    path.unlink()
    folder.rmdir()  # someone cleaned up the telemetry folder
    failing_get(observer, ErrorCode.RPC_FAIL)
    provider.force_flush()
    assert exporter.writer.file.reopens == 1 and series(json.loads(path.read_text()))[c.KEYS_FAILED_METRIC] == 1
    path.unlink()
    folder.rmdir()
    folder.write_text("now a file")  # the folder cannot come back: every write fails
    with caplog.at_level("WARNING", logger="tq_mooncake.telemetry.jsonl"):
        failing_get(observer, ErrorCode.RPC_FAIL)  # its delta is in the first export that fails
        for _ in range(3):
            provider.force_flush()
        assert exporter.writer.failures == 3
        assert sum("failed" in r.getMessage() for r in caplog.records) == 1  # once, not at every export
        folder.unlink()
        provider.force_flush()
        assert sum("works again" in r.getMessage() for r in caplog.records) == 1
    provider.shutdown()
    # the exports that failed were kept and written with the first that worked: the third get is not lost
    written = [series(json.loads(line)) for line in path.read_text().splitlines()]
    assert [w.get(c.KEYS_FAILED_METRIC, 0) for w in written] == [1, 0, 0, 0, 0]


def test_two_writers_of_one_path_never_overwrite_each_others_rotated_files(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"  # e.g. a forked child still writing its parent's file
    retention = Retention(max_file_bytes=2000, max_backups=10_000, max_total_bytes=1 << 30)
    writers = [RotatingFile(path, retention) for _ in range(3)]
    barrier = threading.Barrier(len(writers))

    def write(n: int) -> None:
        barrier.wait()
        for i in range(400):
            writers[n].append(f"{n} {i:04d} {'p' * 40}\n")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    got = Counter(line for line in lines_in(tmp_path))
    assert len(got) == 1200 and set(got.values()) == {1}  # every line once: none lost to a replaced file
    assert sum(w.rotations for w in writers) > 10


def test_only_regular_files_with_our_sequence_names_count_as_rotated(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    (tmp_path / "traces-h-1.000001.jsonl").mkdir()  # a directory
    (tmp_path / "traces-h-1.1.jsonl").write_text("logrotate's, with `extension .jsonl`\n")
    (tmp_path / "traces-h-1.000002.jsonl.gz").write_text("compressed\n")
    (tmp_path / "traces-h-1.000003.jsonl").write_text("ours\n")
    assert [b.seq for b in backups_of(path)] == [3]
    f = RotatingFile(path, Retention(max_file_bytes=10, max_backups=0, max_total_bytes=100))
    f.append("0123456789\n")
    f.append("next\n")  # rotates to .000004 and, keeping none, deletes .000003 and .000004 only
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "traces-h-1.000001.jsonl",
        "traces-h-1.000002.jsonl.gz",
        "traces-h-1.1.jsonl",
        "traces-h-1.jsonl",
    ]


def test_a_fifo_at_the_path_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "metrics-h-1.jsonl"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            RotatingFile(path)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(timeout=10)
    assert outcome and isinstance(outcome[0], OSError) and "not a regular file" in str(outcome[0])


def test_a_line_never_starts_after_a_half_written_one(tmp_path):
    path = tmp_path / "traces-h-1.jsonl"
    f = RotatingFile(path)
    f.append('{"a":1}\n')
    with open(path, "a") as other:
        other.write('{"half":')  # a write cut off by a full disk (ours, or another writer's)
    f.append('{"b":2}\n')
    f.close()
    assert path.read_text().splitlines() == ['{"a":1}', '{"half":', '{"b":2}']


def test_a_file_pipeline_that_cannot_open_its_metrics_file_leaves_nothing_running(tmp_path):
    _, metrics = telemetry_files(tmp_path)
    metrics.mkdir()  # the trace file opens, the metrics file cannot
    threads = threading.active_count()
    for _ in range(3):
        with pytest.raises(OSError):
            file_pipeline(tmp_path)
    assert threading.active_count() == threads


def test_rename_no_replace_refuses_an_existing_name_with_and_without_renameat2(tmp_path, monkeypatch):
    for renameat2 in (rotating_file._RENAMEAT2, None):
        monkeypatch.setattr(rotating_file, "_RENAMEAT2", renameat2)
        src, dst = tmp_path / "a", tmp_path / "b"
        src.write_text("new")
        dst.write_text("old")
        with pytest.raises(FileExistsError):
            rotating_file.rename_no_replace(src, dst)
        assert dst.read_text() == "old" and src.read_text() == "new"
        dst.unlink()
        rotating_file.rename_no_replace(src, dst)
        assert dst.read_text() == "new" and not src.exists()
        dst.unlink()


def test_a_forked_child_writes_nothing_to_its_parents_files(tmp_path):
    tracer_provider, meter_provider = file_pipeline(tmp_path, clean_trace_ratio=1.0, metric_export_interval_s=3600)
    observer = OTelObserver(tracer_provider, meter_provider)
    failing_get(observer, ErrorCode.RPC_FAIL)  # not exported yet when the child is forked
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: calls of its own, then its inherited pipeline flushes and shuts down
        try:
            failing_get(observer, ErrorCode.RPC_FAIL)
            tracer_provider.shutdown()
            meter_provider.shutdown()
            os.write(write, b"ok")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"ok"
    os.waitpid(pid, 0)
    os.close(read)
    tracer_provider.shutdown()
    meter_provider.shutdown()
    traces, metrics = telemetry_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([traces.name, metrics.name])
    ops = [line for line in traces.read_text().splitlines() if '"mooncake.get"' in line]
    assert len(ops) == 1  # the parent's call once; nothing of, or from, the child
    keys_failed = sum(
        series(json.loads(line)).get(c.KEYS_FAILED_METRIC, 0) for line in metrics.read_text().splitlines()
    )
    assert keys_failed == 1  # the parent's pending delta was not written a second time by the child
