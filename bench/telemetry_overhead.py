"""What telemetry costs: put/get throughput with the observer off vs OpenTelemetry on, and the cost per attempt.

Starts its own ``mooncake_master`` on loopback, writes and reads ``--keys`` float32 tensors of ``--value-kib``
KiB through one ``MooncakeBatchClient`` whose observer is switched between rounds (interleaved, so drift
hits every mode alike), and reports median call times and the on/off throughput ratio. Modes:

* ``off``: the client's no-op observer;
* ``api``: ``OTelObserver`` on the API's global providers with no SDK installed (what a library user who
  never configures telemetry pays);
* ``sdk``: ``OTelObserver`` on real SDK providers: always-on sampler, ``BatchSpanProcessor`` and
  ``PeriodicExportingMetricReader`` writing OTLP JSON lines into a temporary folder (what ``configure`` sets up).

Then it times the observer alone (operation + attempt scopes, no store) to give the cost per attempt.

    .venv/bin/python bench/telemetry_overhead.py [--keys 400] [--value-kib 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler

from tq_mooncake.client import ErrorCode, MooncakeBatchClient, Operation, Outcome
from tq_mooncake.client.observer import NOOP_OBSERVER, Observer, OperationSummary
from tq_mooncake.cluster import MasterProcess
from tq_mooncake.telemetry import OTelObserver, metric_views
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter
from tq_mooncake.telemetry.metrics_file import JsonLinesMetricExporter
from tq_mooncake.telemetry.sampling import KeepFailuresSampler


class Switch:
    """The client's observer, forwarding to whichever mode is being measured, and doing nothing else (the
    testing package's RecordingObserver would add its own bookkeeping to every mode, "off" included)."""

    target: Observer = NOOP_OBSERVER

    def operation(self, operation: Operation, batch_size: int) -> Any:
        return self.target.operation(operation, batch_size)


def sdk_providers(
    folder: Path | None, queue: int = 2048, sampler: Sampler = ALWAYS_ON
) -> tuple[TracerProvider, MeterProvider]:
    """SDK providers (always-on sampling unless ``sampler``) exporting OTLP JSON lines into ``folder`` as
    ``configure`` does (None: recording only, no export)."""
    tracer_provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    readers = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        spans = BatchSpanProcessor(JsonLinesSpanExporter(folder / "traces.jsonl"), max_queue_size=queue)
        tracer_provider.add_span_processor(spans)
        metrics = JsonLinesMetricExporter(folder / "metrics.jsonl")
        readers.append(PeriodicExportingMetricReader(metrics, export_interval_millis=5000))
    meter_provider = MeterProvider(metric_readers=readers, views=metric_views(), shutdown_on_exit=False)
    return tracer_provider, meter_provider


def flusher(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> Callable[[], object]:
    return lambda: (tracer_provider.force_flush(), meter_provider.force_flush())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_scope_us(
    observer: Observer, n: int, failing: bool, flush: Callable[[], object] = lambda: None, attempts: int = 1
) -> float:
    """Microseconds per attempt for operation scopes of ``attempts`` attempt scopes each (failing attempts if
    ``failing``), the operation's own cost shared among them, including ``flush()`` at the end (the export
    work a background thread would otherwise do)."""
    failed = Counter({ErrorCode.TRANSFER_FAIL: 3}) if failing else Counter()
    outcome = Outcome.SUCCESS_AFTER_RETRY if failing else Outcome.SUCCESS
    summary = OperationSummary(outcome, attempts, 397, 3 if failing else 0, 0, 0.0, 1 << 20)
    rounds = max(1, n // attempts)
    start = time.perf_counter()
    for _ in range(rounds):
        scope = observer.operation(Operation.PUT, 400 * attempts)
        for chunk in range(attempts):
            scope.attempt(chunk, 1, 400, 0.0).end(failed, 1 << 20)
        scope.end(summary)
    flush()
    return (time.perf_counter() - start) / (rounds * attempts) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--value-kib", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=400, help="keys per chunk (one attempt per chunk)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scopes", type=int, default=5000, help="iterations of the observer-alone timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tq-telemetry-bench-") as tmp:
        folder = Path(tmp)
        tracer_provider, meter_provider = sdk_providers(folder / "calls")
        modes: dict[str, Observer] = {
            "off": NOOP_OBSERVER,
            "api": OTelObserver(),
            "sdk": OTelObserver(tracer_provider, meter_provider),
        }
        keys = [f"bench-{i}" for i in range(args.keys)]
        values = [torch.randn(args.value_kib * 256) for _ in keys]  # float32: 4 bytes per element
        total_bytes = sum(v.numel() * 4 for v in values)
        chunks = -(-args.keys // args.batch_size)
        times: dict[tuple[str, str], list[float]] = {(m, op): [] for m in modes for op in ("put", "get")}
        switch = Switch()
        with MasterProcess(folder).start() as master:
            segment = max(64 << 20, 2 * total_bytes)
            client = MooncakeBatchClient(
                master.client_config(global_segment_size=segment, batch_size=args.batch_size), observer=switch
            )
            try:
                metas = client.put(keys, values)
                names = list(modes)
                for round_ in range(args.warmup + args.repeats):
                    for mode in names[round_ % 3 :] + names[: round_ % 3]:  # rotate the order every round
                        switch.target = modes[mode]
                        start = time.perf_counter()
                        metas = client.put(keys, values)  # each put writes new versions: read with its metadata
                        put_s = time.perf_counter() - start
                        get_s = timed(lambda metas=metas: client.get(keys, custom_backend_meta=metas))
                        if round_ >= args.warmup:
                            times[(mode, "put")].append(put_s)
                            times[(mode, "get")].append(get_s)
                switch.target = NOOP_OBSERVER
            finally:
                client.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
        lines = (folder / "calls" / "traces.jsonl").read_text().count("\n")
        alone: dict[tuple[str, bool], float] = {}
        for failing in (False, True):
            alone[("off", failing)] = per_scope_us(NOOP_OBSERVER, args.scopes, failing)
            alone[("api", failing)] = per_scope_us(OTelObserver(), args.scopes, failing)
            tp, mp = sdk_providers(None)
            alone[("sdk record", failing)] = per_scope_us(OTelObserver(tp, mp), args.scopes, failing)
            alone[("sdk record 10", failing)] = per_scope_us(OTelObserver(tp, mp), args.scopes, failing, attempts=10)
            for mode, sampler in (("sdk export", ALWAYS_ON), ("sdk export, default", KeepFailuresSampler())):
                tp, mp = sdk_providers(folder / f"alone-{mode}-{failing}", 4 * args.scopes, sampler)
                alone[(mode, failing)] = per_scope_us(OTelObserver(tp, mp), args.scopes, failing, flusher(tp, mp))
                tp.shutdown()
                mp.shutdown()

    mib = total_bytes / (1 << 20)
    print(f"{args.keys} keys x {args.value_kib} KiB = {mib:.1f} MiB per call, {chunks} attempt(s) per call, ")
    print(f"{args.repeats} measured rounds after {args.warmup} warm-up, modes interleaved\n")
    print(f"{'mode':<5} {'op':<4} {'median ms':>10} {'min ms':>8} {'GB/s':>6} {'on/off throughput':>18}")
    for op in ("put", "get"):
        off = statistics.median(times[("off", op)])
        for mode in modes:
            med = statistics.median(times[(mode, op)])
            ratio = off / med
            print(
                f"{mode:<5} {op:<4} {med * 1e3:>10.2f} {min(times[(mode, op)]) * 1e3:>8.2f} "
                f"{total_bytes / med / 1e9:>6.2f} {ratio:>18.3f}"
            )
    print("\nobserver alone (no store): microseconds per operation scope + one attempt scope")
    print("(sdk record: spans and metrics recorded, always-on sampling, no exporter; sdk export: + OTLP JSON-lines")
    print("files, flush included; sdk record 10: the same with 10 attempts per operation, per attempt;")
    print("sdk export, default: configure()'s sampler, KeepFailuresSampler: failed calls kept, 1% of clean ones)")
    print(f"{'mode':<20} {'clean attempt':>14} {'failed attempt':>15}")
    for mode in ("off", "api", "sdk record", "sdk record 10", "sdk export", "sdk export, default"):
        print(f"{mode:<20} {alone[(mode, False)]:>14.1f} {alone[(mode, True)]:>15.1f}")
    for op in ("put", "get"):
        delta = statistics.median(times[("sdk", op)]) - statistics.median(times[("off", op)])
        print(f"sdk - off, {op}: {delta / chunks * 1e6:+.1f} us per attempt (median difference; noisy at this scale)")
    print(f"\n{lines} OTLP JSON lines of spans written by the sdk mode")


if __name__ == "__main__":
    main()
