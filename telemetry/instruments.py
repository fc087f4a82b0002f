"""``OTelObserver``: the client's ``Observer`` hooks implemented with the OpenTelemetry API only.

Contract:

* ``operation()`` captures the caller's current context; when the call ends, ``end`` creates the span
  ``mooncake.<op>`` (INTERNAL) in it, with its real start time and every attribute (outcome included, for a
  sampler to see: ``sampling``), and then one ``mooncake.<op>.attempt`` (CLIENT) per ended attempt, as its
  children, if the operation span is recording. No span is ever made current: attempts run on worker threads
  that do not inherit the caller's contextvars, and nothing runs inside them.
* A failed attempt gets status ERROR and ``error.type`` = its most frequent code name; the operation span
  gets them only when the call finally failed (retried-then-ok is not an error), from the final per-code
  counts the client reports in ``OperationSummary.codes`` (the retry loop decides; nothing here
  re-classifies a code).
* Metrics are recorded with attributes from ``conventions.METRIC_ATTRIBUTES`` only; no key or value of
  the store is ever recorded.
* Instruments are created once per meter provider and shared by every observer on it; the retry-budget
  gauge reports the sum of ``budget_tokens()`` over the live observers that were given one.
* Safe to call from several threads; without an SDK (the API's no-op providers) it costs a few
  microseconds per attempt.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from . import conventions as c
from .conventions import Operation

if TYPE_CHECKING:  # the client imports this module: only its types are needed here
    from tq_mooncake.client.codes import ErrorCode
    from tq_mooncake.client.observer import OperationSummary
    from tq_mooncake.client.replica_routing import RoutingReport

try:
    _VERSION: str | None = metadata.version("tq-mooncake")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    _VERSION = None


def _dominant(codes: Counter[ErrorCode]) -> str:
    """The most frequent code's name (ties: the smallest name), or ``_OTHER`` for none."""
    if not codes:
        return c.ERROR_TYPE_OTHER
    return min(codes.items(), key=lambda kv: (-kv[1], kv[0].name))[0].name


class _Tally:
    """A monotonic counter kept here and reported through an observable counter at collection time: one dict
    update per measurement instead of the SDK's per-measurement attribute checks (the same cumulative sums
    reach the exporters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple[tuple[str, str | int], ...], int] = {}

    def add(self, amount: int, attributes: tuple[tuple[str, str | int], ...]) -> None:
        with self._lock:
            self._sums[attributes] = self._sums.get(attributes, 0) + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._sums.items())
        return [Observation(value, dict(attributes)) for attributes, value in items]


class _Instruments:
    """Every metric instrument of one meter; shared by the observers of one meter provider."""

    def __init__(self, meter: Meter) -> None:
        def counter(name: str) -> _Tally:
            tally = _Tally()
            meter.create_observable_counter(
                name, callbacks=[tally.observe], unit=c.UNITS[name], description=c.DESCRIPTIONS[name]
            )
            return tally

        def histogram(name: str) -> metrics.Histogram:
            return meter.create_histogram(
                name,
                unit=c.UNITS[name],
                description=c.DESCRIPTIONS[name],
                explicit_bucket_boundaries_advisory=c.DURATION_BUCKETS_S,
            )

        self.operations = counter(c.OPERATIONS_METRIC)
        self.attempts = counter(c.ATTEMPTS_METRIC)
        self.keys = counter(c.KEYS_METRIC)
        self.keys_failed = counter(c.KEYS_FAILED_METRIC)
        self.bytes = counter(c.BYTES_METRIC)
        self.under_replicated = counter(c.UNDER_REPLICATED_METRIC)
        self.node_failures = counter(c.NODE_FAILURES_METRIC)
        self.fallbacks = counter(c.FALLBACKS_METRIC)
        self.ejections = counter(c.EJECTIONS_METRIC)
        self._endpoints: dict[str, tuple[tuple[str, str | int], ...]] = {}
        self.operation_duration = histogram(c.OPERATION_DURATION_METRIC)
        self.attempt_duration = histogram(c.ATTEMPT_DURATION_METRIC)
        self.retry_delay = histogram(c.RETRY_DELAY_METRIC)
        self._lock = threading.Lock()  # guards the gauge sources and the endpoint attributes
        self._gauge_sources: weakref.WeakSet[OTelObserver] = weakref.WeakSet()
        # gauge -> (the observers' reading function, its type): the sum over the process's observers
        gauges = ((c.RETRY_BUDGET_METRIC, "_budget_tokens", float), (c.EJECTED_METRIC, "_ejected_nodes", int))
        for name, source, kind in gauges:
            meter.create_observable_gauge(
                name,
                callbacks=[functools.partial(self._observe_sum, source, kind)],
                unit=c.UNITS[name],
                description=c.DESCRIPTIONS[name],
            )

    def endpoint(self, endpoint: str) -> tuple[tuple[str, str | int], ...]:
        """The metric attributes of storage endpoint ``endpoint``: its own for the first
        ``MAX_ENDPOINT_ATTRIBUTES`` endpoints, ``_OTHER`` after."""
        with self._lock:
            found = self._endpoints.get(endpoint)
            if found is None:
                if len(self._endpoints) >= c.MAX_ENDPOINT_ATTRIBUTES:
                    return ((c.SERVER_ADDRESS, c.ENDPOINT_OTHER),)
                found = self._endpoints[endpoint] = c.endpoint_attributes(endpoint)
            return found

    def add_gauge_source(self, observer: OTelObserver) -> None:
        with self._lock:
            self._gauge_sources.add(observer)

    def _observe_sum(self, source: str, kind: type, options: CallbackOptions) -> Iterable[Observation]:
        """The sum of ``source`` (an observer's reading function, or None) over the observers that have one."""
        with self._lock:
            reads = [read for o in self._gauge_sources if (read := getattr(o, source)) is not None]
        if not reads:
            return []
        return [Observation(kind(sum(read() for read in reads)))]


_INSTRUMENTS: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_GLOBAL: list[_Instruments] = []  # the instruments on the global provider (a proxy until an SDK is set)
_INSTRUMENTS_LOCK = threading.Lock()


def _instruments_for(meter_provider: MeterProvider | None) -> _Instruments:
    """The shared instruments of ``meter_provider``; None means the global provider, whichever it is now or
    later (instruments made on the API's proxy follow it to the SDK provider once one is installed)."""
    with _INSTRUMENTS_LOCK:
        if meter_provider is None:
            found = _GLOBAL[0] if _GLOBAL else None
        else:
            found = _INSTRUMENTS.get(meter_provider)
        if found is None:
            found = _Instruments(metrics.get_meter(c.INSTRUMENTATION_SCOPE, _VERSION, meter_provider))
            if meter_provider is None:
                _GLOBAL.append(found)
            else:
                _INSTRUMENTS[meter_provider] = found
        return found


class OTelObserver:
    """The client's ``Observer`` over OpenTelemetry.

    Args:
        tracer_provider: where spans go; None for the global provider (no-op until an SDK is set).
        meter_provider: where metrics go; None for the global provider.
        budget_tokens: reads the client's retry budget (``RetryBudget.available``) for the
            ``mooncake.client.retry.budget`` gauge, while this observer is alive (the gauge holds it weakly,
            so a dropped client stops being reported); None reports nothing for this client.
        ejected_nodes: reads how many storage endpoints the client has ejected now, for the
            ``mooncake.client.nodes.ejected`` gauge (held like ``budget_tokens``).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        budget_tokens: Callable[[], float] | None = None,
        ejected_nodes: Callable[[], int] | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(c.INSTRUMENTATION_SCOPE, _VERSION, tracer_provider)
        self._instruments = _instruments_for(meter_provider)
        self._budget_tokens = budget_tokens
        self._ejected_nodes = ejected_nodes
        if budget_tokens is not None or ejected_nodes is not None:
            self._instruments.add_gauge_source(self)

    def operation(self, operation: Operation, batch_size: int) -> _OperationScope:
        return _OperationScope(self, operation, batch_size)

    def node_ejected(self, endpoint: str) -> None:
        ins = self._instruments
        ins.ejections.add(1, ins.endpoint(endpoint))


class _OperationScope:
    """One client call: its span, its attempts' spans, and its metrics.

    Nothing runs inside the spans, so they are created when the call is over, with their real start times and
    every attribute at once: the operation span first (a sampler sees the outcome: ``sampling``), then its
    attempts as its children, only if it is recording. Metrics are recorded as things happen."""

    def __init__(self, observer: OTelObserver, operation: Operation, batch_size: int) -> None:
        self._tracer = observer._tracer
        self._instruments = observer._instruments
        self.operation = operation
        self._batch_size = batch_size
        self._parent = otel_context.get_current()  # the caller's context (this runs on the caller's thread)
        self._start_ns = time.time_ns()
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._retried = False
        self._attempts: list[_AttemptScope] = []  # ended attempts, while collecting
        self._collecting = True  # until end() has created the operation span: ended attempts wait for it
        self._context: otel_context.Context | None = None  # the operation span's, once created and recording
        self._ended = False

    def attempt(self, chunk: int, attempt: int, keys: int, backoff_s: float) -> _AttemptScope:
        if attempt > 1:
            self._retried = True
        return _AttemptScope(self, chunk, attempt, keys, backoff_s)

    def _attempt_ended(self, attempt: _AttemptScope) -> None:
        with self._lock:
            if self._collecting:
                self._attempts.append(attempt)  # the operation span is not there yet
                return
            context = self._context
        if context is None:
            return  # the call ended and its span is not recording: neither is this attempt's
        attempt.emit(context)  # after the call's end (it gave up waiting): a child of its span, as it stands

    def end(self, summary: OperationSummary) -> None:
        duration = time.perf_counter() - self._start
        with self._lock:
            if self._ended:
                return
            self._ended = True
            attempts, self._attempts = self._attempts, []
        op = self.operation.value
        outcome = summary.outcome.value
        attributes: dict[str, str | int] = {
            c.DB_SYSTEM_NAME: c.DB_SYSTEM,
            c.DB_OPERATION_NAME: op,
            c.DB_OPERATION_BATCH_SIZE: self._batch_size,
            c.ATTEMPTS: summary.attempts,
            c.OUTCOME: outcome,
            c.KEYS_FAILED: summary.keys_failed,
            c.BYTES: summary.nbytes,
        }
        if summary.keys_under_replicated:
            attributes[c.KEYS_UNDER_REPLICATED] = summary.keys_under_replicated
        attrs = {c.OPERATION: op, c.OUTCOME: outcome}
        if summary.outcome.failed:
            error_type = _dominant(summary.codes)
            attributes[c.ERROR_TYPE] = error_type
            duration_attrs = {**attrs, c.ERROR_TYPE: error_type}
        else:
            duration_attrs = attrs
        span = self._tracer.start_span(
            c.operation_span_name(self.operation),
            context=self._parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=self._start_ns,
        )
        context = trace.set_span_in_context(span) if span.is_recording() else None
        if context is not None:
            if summary.outcome.failed:
                span.set_status(Status(StatusCode.ERROR, f"{outcome}: {summary.keys_failed} key(s) failed"))
            for attempt in attempts:
                attempt.emit(context)
        with self._lock:
            late, self._attempts = self._attempts, []
            self._collecting = False
            self._context = context
        if context is not None:
            for attempt in late:
                attempt.emit(context)
        span.end(end_time=self._start_ns + int(duration * 1e9))
        ins = self._instruments
        ins.operations.add(1, ((c.OPERATION, op), (c.OUTCOME, outcome)))
        ins.operation_duration.record(duration, duration_attrs)
        for result, n in (
            (c.RESULT_OK, summary.keys_ok),
            (c.RESULT_RETRIED_OK, summary.keys_retried_ok),
            (c.RESULT_FAILED, summary.keys_failed),
        ):
            if n:
                ins.keys.add(n, ((c.OPERATION, op), (c.RESULT, result)))
        if self._retried:
            ins.retry_delay.record(summary.retry_delay_s, attrs)
        if summary.nbytes:
            ins.bytes.add(summary.nbytes, ((c.OPERATION, op),))
        if summary.keys_under_replicated:
            ins.under_replicated.add(summary.keys_under_replicated, ((c.OPERATION, op),))


class _AttemptScope:
    """One store call on one chunk: its metrics when it returns, its span when the operation's span exists
    (``emit``), with its real start and end times."""

    __slots__ = (
        "_op",
        "_chunk",
        "_attempt",
        "_keys",
        "_backoff_s",
        "_start_ns",
        "_start",
        "_end_ns",
        "_failed",
        "_n_failed",
        "_error_type",
        "_nbytes",
        "_routing",
    )

    def __init__(self, op: _OperationScope, chunk: int, attempt: int, keys: int, backoff_s: float) -> None:
        self._op = op
        self._chunk = chunk
        self._attempt = attempt
        self._keys = keys
        self._backoff_s = float(backoff_s)
        self._start_ns = time.time_ns()
        self._start = time.perf_counter()
        self._end_ns: int | None = None

    def end(self, failed: Counter[ErrorCode], nbytes: int, routing: RoutingReport | None = None) -> None:
        """Record the attempt's metrics and hand it to its operation for its span; once (a second call is
        ignored)."""
        if self._end_ns is not None:
            return
        duration = time.perf_counter() - self._start
        self._end_ns = self._start_ns + int(duration * 1e9)
        failed = +failed  # drops codes counted 0
        n_failed = sum(failed.values())
        error_type = _dominant(failed) if n_failed else None
        self._failed, self._n_failed, self._error_type = failed, n_failed, error_type
        self._nbytes = nbytes
        self._routing = routing
        op_scope = self._op
        op = op_scope.operation.value
        ins = op_scope._instruments
        if n_failed == 0:
            result = c.RESULT_OK
        else:
            result = c.RESULT_FAILED if n_failed >= self._keys else c.RESULT_PARTIAL
        attempt = min(self._attempt, c.MAX_ATTEMPT_ATTRIBUTE)
        if routing:
            for endpoint in routing.down:
                ins.node_failures.add(1, ((c.OPERATION, op), *ins.endpoint(endpoint)))
            for endpoint, n in routing.fallbacks.items():
                ins.fallbacks.add(n, ((c.OPERATION, op), *ins.endpoint(endpoint)))
        ins.attempts.add(1, ((c.OPERATION, op), (c.ATTEMPT, attempt), (c.RESULT, result)))
        duration_attrs = {c.OPERATION: op, c.ATTEMPT: attempt, c.RESULT: result}
        if error_type is not None:
            duration_attrs[c.ERROR_TYPE] = error_type
            for code, n in failed.items():
                ins.keys_failed.add(n, ((c.OPERATION, op), (c.ERROR_TYPE, code.name)))
        ins.attempt_duration.record(duration, duration_attrs)
        op_scope._attempt_ended(self)

    def emit(self, context: otel_context.Context) -> None:
        """Create and end this attempt's span as a child of the operation span in ``context``."""
        op_scope = self._op
        attributes: dict[str, str | int | float | list[str]] = {
            c.DB_SYSTEM_NAME: c.DB_SYSTEM,
            c.DB_OPERATION_NAME: op_scope.operation.value,
            c.ATTEMPT: self._attempt,
            c.CHUNK: self._chunk,
            c.KEYS: self._keys,
            c.BACKOFF_S: self._backoff_s,
            c.KEYS_FAILED: self._n_failed,
            c.BYTES: self._nbytes,
        }
        if self._error_type is not None:
            attributes[c.ERROR_CODES] = sorted(code.name for code in self._failed)
            attributes[c.ERROR_TYPE] = self._error_type
        if self._routing:
            _route_attributes(attributes, self._routing)
        span = op_scope._tracer.start_span(
            c.attempt_span_name(op_scope.operation),
            context=context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=self._start_ns,
        )
        if self._error_type is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=self._end_ns)


def _route_attributes(attributes: dict[str, str | int | float | list[str]], routing: RoutingReport) -> None:
    """The attempt span's node-loss attributes: the endpoint a failure is blamed on (the first of those confirmed
    down, else the one most keys were routed around), and the counts."""
    blamed = sorted(routing.down) or [e for e, _ in routing.fallbacks.most_common(1)]
    if blamed:
        attributes.update(dict(c.endpoint_attributes(blamed[0])))
    if routing.down:
        attributes[c.NODES_DOWN] = len(routing.down)
    if routing.fallbacks:
        attributes[c.KEYS_FALLBACK] = sum(routing.fallbacks.values())
    if routing.unreachable:
        attributes[c.KEYS_UNREACHABLE] = routing.unreachable
    if routing.steered:
        attributes[c.STEERED] = True
