"""Span files as the real SDK and the real observer write them (``JsonLinesSpanExporter``, one line per span), for
the recent-failures tests: an exhausted get with node loss, a retried put and a clean get."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.dashboard.failures import SpanRecord, parse_spans_line
from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter
from tq_mooncake.telemetry.sampling import KeepFailuresSampler

RESOURCE = {"service.name": "failures-test", "host.name": "host-a", "process.pid": 4242}


def observer(path: Path, host: str = "host-a") -> tuple[OTelObserver, TracerProvider]:
    """The real observer on the real SDK, exporting each span as it ends to a JSON-lines file (one line per span),
    clean calls dropped by the default sampler."""
    provider = TracerProvider(
        sampler=KeepFailuresSampler(clean_ratio=0.0), resource=Resource.create({**RESOURCE, "host.name": host})
    )
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return OTelObserver(provider), provider


def summary(outcome: Outcome, attempts: int, failed: int = 0, codes: Counter | None = None) -> OperationSummary:
    return OperationSummary(outcome, attempts, 10 - failed, 0, failed, 0.001, 100, codes or Counter())


def exhausted_get(obs: OTelObserver) -> None:
    """Two chunks: chunk 0 ok at once; chunk 1 fails one key three times (TRANSFER_FAIL, then RPC_TIMEOUT twice),
    the last attempt blamed on a storage endpoint confirmed down."""
    scope = obs.operation(Operation.GET, 10)
    scope.attempt(0, 1, 5, 0.0).end(Counter(), 50)
    scope.attempt(1, 1, 5, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 30)
    scope.attempt(1, 2, 2, 0.002).end(Counter({ErrorCode.RPC_TIMEOUT: 1}), 10)
    routing = RoutingReport(down={"10.0.0.7:7001"}, fallbacks=Counter({"10.0.0.7:7001": 1}))
    scope.attempt(1, 3, 1, 0.004).end(Counter({ErrorCode.RPC_TIMEOUT: 1}), 0, routing)
    scope.end(summary(Outcome.EXHAUSTED, 4, 1, Counter({ErrorCode.RPC_TIMEOUT: 1})))


def retried_put(obs: OTelObserver) -> None:
    scope = obs.operation(Operation.PUT, 10)
    scope.attempt(0, 1, 10, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 1}), 90)
    scope.attempt(0, 2, 1, 0.001).end(Counter(), 10)
    scope.end(summary(Outcome.SUCCESS_AFTER_RETRY, 2))


def clean_get(obs: OTelObserver) -> None:
    scope = obs.operation(Operation.GET, 10)
    scope.attempt(0, 1, 10, 0.0).end(Counter(), 100)
    scope.end(summary(Outcome.SUCCESS, 1))


def exported(
    folder: Path, *calls: Callable[[OTelObserver], None], host: str = "host-a", name: str | None = None
) -> list[str]:
    """The lines the calls' spans were exported as, to ``folder/<name>`` (default ``traces-<host>.jsonl``)."""
    path = folder / (name or f"traces-{host}.jsonl")
    obs, provider = observer(path, host)
    for call in calls:
        call(obs)
    provider.shutdown()
    return path.read_text().splitlines()


def spans_of(lines: list[str]) -> list[SpanRecord]:
    return [span for line in lines for span in parse_spans_line(line)]
