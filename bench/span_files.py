"""How long the dashboard's recent-failures panel takes to read span files, and with how much memory.

    .venv/bin/python bench/span_files.py --mb 200

Writes ``--mb`` MB of span lines as a client writes them (the real observer, SDK and ``JsonLinesSpanExporter``
with its default rotation at 32 MiB, every call retried or failed so that all are kept, 3 attempts each) into
``traces-*.jsonl`` files in a temp folder, then times ``TraceFileSource``'s first load (which reads only the newest
``FIRST_READ_BYTES``) and a refresh, and prints the reading process's peak RSS (the file is written by a child
process). ``--all`` reads everything (the first read's budget set past the file's size), for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.dashboard.failures import SHOWN_OUTCOMES
from tq_mooncake.dashboard.trace_files import TraceFileSource
from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter

OUTCOMES = (Outcome.EXHAUSTED, Outcome.SUCCESS_AFTER_RETRY, Outcome.BUDGET_DENIED, Outcome.NON_RETRYABLE)


def write(path: Path, megabytes: float) -> int:
    """Calls written until the file holds ``megabytes`` MB."""
    provider = TracerProvider(resource=Resource.create({"service.name": "bench", "host.name": "bench-host"}))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path), max_export_batch_size=256))
    obs = OTelObserver(provider)
    rng = random.Random(1)
    calls = 0
    while sum(f.stat().st_size for f in path.parent.glob("traces-*")) < megabytes * 1e6:  # rotated at 32 MiB
        for _ in range(1000):
            outcome = rng.choice(OUTCOMES)
            scope = obs.operation(rng.choice((Operation.GET, Operation.PUT)), 64)
            for attempt in (1, 2, 3):
                scope.attempt(0, attempt, 64 if attempt == 1 else 1, 0.001 * (attempt - 1)).end(
                    Counter({ErrorCode.TRANSFER_FAIL: 1}), 4096
                )
            scope.end(OperationSummary(outcome, 3, 63, 0, 1, 0.003, 4096, Counter({ErrorCode.TRANSFER_FAIL: 1})))
            calls += 1
        provider.force_flush()
    provider.shutdown()
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="MB of span lines to read")
    parser.add_argument("--all", action="store_true", help="read the whole file at the first load")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the child that writes the file
    args = parser.parse_args(argv)
    if args.write:
        print(write(args.write, args.mb))
        return 0
    with tempfile.TemporaryDirectory(prefix="tq-span-bench-") as tmp:
        folder = Path(tmp)
        began = time.perf_counter()
        child = [sys.executable, __file__, "--mb", str(args.mb), "--write", str(folder / "traces-bench-1.jsonl")]
        calls = int(subprocess.run(child, check=True, capture_output=True, text=True).stdout)  # own process: own RSS
        written_s = time.perf_counter() - began
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        source = TraceFileSource(folder)
        if args.all:
            source.first_read_bytes = 1 << 62
        began = time.perf_counter()
        first = source.load(0, time.time() + 60, SHOWN_OUTCOMES)
        first_s = time.perf_counter() - began
        began = time.perf_counter()
        source.load(0, time.time() + 60, SHOWN_OUTCOMES)
        refresh_s = time.perf_counter() - began
        size = sum(f.stat().st_size for f in folder.glob("traces-*"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "files_mb": round(size / 1e6, 1),
                "calls_in_file": calls,
                "written_s": round(written_s, 1),
                "read_mb": round(source._tail.bytes_read / 1e6, 1),
                "spans_read": source.spans,
                "calls_listed": len(first.calls),
                "first_load_s": round(first_s, 2),
                "refresh_s": round(refresh_s, 4),
                "peak_rss_mb_before_reading": round(rss_before / 1024),
                "peak_rss_mb": round(peak / 1024),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
