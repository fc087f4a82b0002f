"""How many bytes a process's telemetry files take per day: the previous defaults vs the current ones.

Drives the real ``OTelObserver`` on real SDK providers writing real files (no store: the calls are simulated,
their telemetry is not) at ``--rate`` calls per second, ``--retrying`` of them retrying once after a partial failure
with one of nine error codes, and reports the bytes written per simulated day:

* spans: always-on sampling (the SDK default, before) vs ``KeepFailuresSampler`` (the default now: every retried
  or failed call kept, ``--clean-ratio`` of the clean ones), with the share of retried calls whose spans were kept;
* metrics, at ``--interval`` seconds per export: the upstream file exporter (cumulative, every series every time,
  before) vs ``JsonLinesMetricExporter`` (deltas of what changed), both after all nine codes have been seen (in
  retried, exhausted, refused and late calls, on attempts 1 to 6), and with all nine codes recurring in every
  interval (the worst case for the compact form).

    .venv/bin/python bench/telemetry_volume.py [--rate 50] [--retrying 0.01] [--minutes 10] [--chunks 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

from opentelemetry.exporter.otlp.json.file import FileMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.telemetry import OTelObserver, metric_views
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter
from tq_mooncake.telemetry.metrics_file import JsonLinesMetricExporter
from tq_mooncake.telemetry.sampling import DEFAULT_CLEAN_RATIO, KeepFailuresSampler

CODES = [
    ErrorCode.TRANSFER_FAIL,
    ErrorCode.RPC_FAIL,
    ErrorCode.NO_AVAILABLE_HANDLE,
    ErrorCode.REPLICA_IS_NOT_READY,
    ErrorCode.OBJECT_HAS_LEASE,
    ErrorCode.LEASE_EXPIRED,
    ErrorCode.BUFFER_OVERFLOW,
    ErrorCode.SEGMENT_NOT_FOUND,
    ErrorCode.ETCD_OPERATION_ERROR,
]
DAY = 86_400


def call(observer: OTelObserver, rng: random.Random, chunks: int, code: ErrorCode | None) -> None:
    """One put or get of ``chunks`` chunks of 400 keys; with ``code``, chunk 0 loses 3 keys to it and retries."""
    op = Operation.PUT if rng.random() < 0.5 else Operation.GET
    scope = observer.operation(op, 400 * chunks)
    for chunk in range(chunks):
        failed = Counter({code: 3}) if code is not None and chunk == 0 else Counter()
        scope.attempt(chunk, 1, 400, 0.0).end(failed, (400 - sum(failed.values())) << 16)
    if code is not None:
        scope.attempt(0, 2, 3, 0.01).end(Counter(), 3 << 16)
        summary = OperationSummary(Outcome.SUCCESS_AFTER_RETRY, chunks + 1, 400 * chunks - 3, 3, 0, 0.01, 0)
    else:
        summary = OperationSummary(Outcome.SUCCESS, chunks, 400 * chunks, 0, 0, 0.0, 0)
    scope.end(summary)


def gave_up(observer: OTelObserver, op: Operation, code: ErrorCode, attempts: int, outcome: Outcome) -> None:
    """One call of 400 keys whose 3 failing keys never recover: ``attempts`` attempts, then ``outcome``."""
    scope = observer.operation(op, 400)
    scope.attempt(0, 1, 400, 0.0).end(Counter({code: 3}), 397 << 16)
    for attempt in range(2, attempts + 1):
        scope.attempt(0, attempt, 3, 0.01 * attempt).end(Counter({code: 3}), 0)
    scope.end(OperationSummary(outcome, attempts, 397, 0, 3, 0.01 * attempts, 397 << 16, Counter({code: 3})))


def spans_per_day(folder: Path, sampler: Sampler, args: argparse.Namespace) -> tuple[float, int, int]:
    """(bytes per day, retried calls, retried calls whose operation span was written)."""
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    path = folder / "traces.jsonl"
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path), max_queue_size=1 << 20))
    observer = OTelObserver(provider, MeterProvider(shutdown_on_exit=False))
    rng = random.Random(7)
    calls = int(args.rate * args.minutes * 60)
    retried = 0
    for _ in range(calls):
        code = rng.choice(CODES) if rng.random() < args.retrying else None
        retried += code is not None
        call(observer, rng, args.chunks, code)
    provider.shutdown()
    kept = sum(
        1
        for line in path.read_text().splitlines()
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
        if not s["name"].endswith(".attempt")
        and any(a["key"] == "mooncake.outcome" and a["value"]["stringValue"] != "success" for a in s["attributes"])
    )
    return path.stat().st_size / (args.minutes * 60) * DAY, retried, kept


def metrics_per_day(folder: Path, compact: bool, every_code: bool, args: argparse.Namespace) -> float:
    """Bytes per day of the metrics file at one export per ``--interval`` s, measured after a first interval in
    which all nine codes occurred (on attempts 1 to 6, in calls that retried, ran out of attempts, were refused or
    passed their deadline); afterwards ``--retrying`` of the calls retry on one code (or all nine recur)."""
    path = folder / "metrics.jsonl"
    exporter = JsonLinesMetricExporter(path) if compact else FileMetricExporter(path)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=1 << 30)
    provider = MeterProvider(metric_readers=[reader], views=metric_views(), shutdown_on_exit=False)
    observer = OTelObserver(TracerProvider(sampler=ALWAYS_ON), provider, budget_tokens=lambda: 10.0)
    rng = random.Random(11)
    per_interval = int(args.rate * args.interval)
    intervals = max(2, int(args.minutes * 60 / args.interval))
    for code in CODES:  # the first interval: every code seen, in calls that retried, ran out or were refused
        call(observer, rng, args.chunks, code)
        for op in (Operation.PUT, Operation.GET):
            gave_up(observer, op, code, 6, Outcome.EXHAUSTED)
            gave_up(observer, op, code, 1, Outcome.NON_RETRYABLE)
            gave_up(observer, op, code, 3, Outcome.DEADLINE_EXCEEDED)
    provider.force_flush()
    start = path.stat().st_size
    for _ in range(intervals):
        if every_code:
            for code in CODES:
                call(observer, rng, args.chunks, code)
        for _ in range(per_interval):
            code = CODES[0] if rng.random() < args.retrying else None
            call(observer, rng, args.chunks, code)
        provider.force_flush()
    provider.shutdown()
    lines = path.read_text().splitlines()[1 : 1 + intervals]
    return (sum(len(line) + 1 for line in lines) or path.stat().st_size - start) / (intervals * args.interval) * DAY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="calls per second")
    parser.add_argument("--retrying", type=float, default=0.01, help="share of calls that retry")
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes")
    parser.add_argument("--chunks", type=int, default=1, help="chunks (attempt spans) per call")
    parser.add_argument("--interval", type=float, default=60.0, help="metric export interval, seconds")
    parser.add_argument("--clean-ratio", type=float, default=DEFAULT_CLEAN_RATIO)
    args = parser.parse_args()

    mb = 1e6
    print(
        f"{args.rate:g} calls/s, {args.retrying:.1%} retrying (one of 9 codes), {args.chunks} chunk(s) per call, "
        f"{args.minutes:g} simulated minutes; metrics every {args.interval:g} s\n"
    )
    with tempfile.TemporaryDirectory(prefix="tq-volume-") as tmp:
        rows = []
        for name, sampler in (
            ("always on (before)", ALWAYS_ON),
            (f"KeepFailuresSampler({args.clean_ratio:g}) (now)", KeepFailuresSampler(args.clean_ratio)),
        ):
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            per_day, retried, kept = spans_per_day(folder, sampler, args)
            rows.append((name, per_day, retried, kept))
        print(f"{'spans':<36} {'MB/day':>9} {'retried calls kept':>20}")
        for name, per_day, retried, kept in rows:
            print(f"{name:<36} {per_day / mb:>9.1f} {f'{kept} of {retried}':>20}")
        print(f"\n{'metrics':<36} {'MB/day':>9}")
        metric_rows = {}
        for label, compact, every in (
            ("cumulative, 9 codes seen (before)", False, False),
            ("compact deltas, 9 codes seen (now)", True, False),
            ("cumulative, 9 codes every interval", False, True),
            ("compact, 9 codes every interval", True, True),
        ):
            folder = Path(tmp) / f"m-{compact}-{every}"
            folder.mkdir()
            metric_rows[label] = metrics_per_day(folder, compact, every, args)
            print(f"{label:<36} {metric_rows[label] / mb:>9.2f}")
        total_now = rows[1][1] + metric_rows["compact deltas, 9 codes seen (now)"]
        total_before = rows[0][1] + metric_rows["cumulative, 9 codes seen (before)"]
        print(f"\ntotal per process per day: before {total_before / mb:.0f} MB, now {total_now / mb:.0f} MB")


if __name__ == "__main__":
    main()
