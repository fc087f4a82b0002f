"""The calls behind a failure, from spans: which operations ended exhausted, budget-denied, past the deadline or
non-retryable, and how their attempts went. No Streamlit and no I/O here: ``SpanRecord`` is one span from any
source (OTLP JSON lines, Jaeger's API), ``FailureBook`` joins operation spans to their attempt spans, whatever
order they arrive in, within fixed bounds.

Only what the conventions put on these spans is read: counts, code names, durations and storage endpoints (never
keys or values: the client never records them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tq_mooncake.telemetry import conventions as c

from .metrics import Labels, format_endpoint, label, otlp_attributes, otlp_origin, otlp_request, otlp_seconds

FAILED: tuple[str, ...] = tuple(o.value for o in c.FAILED_OUTCOMES)
"""The outcomes the panel lists by default: the call failed."""
SHOWN_OUTCOMES: tuple[str, ...] = (*FAILED, c.Outcome.SUCCESS_AFTER_RETRY.value)
"""The outcomes a book keeps: the failed ones, and the calls that needed retries (a filter option)."""
OPERATION_SPANS: frozenset[str] = frozenset(c.operation_span_name(o) for o in c.Operation)
ATTEMPT_SPANS: frozenset[str] = frozenset(c.attempt_span_name(o) for o in c.Operation)
MAX_CALLS = 500
"""Calls a book keeps of each kind, the newest (by end time): failed ones, and ones that succeeded after retries
(so that frequent retried calls never push the rarer failures out)."""
MAX_PENDING = 20_000
"""Attempt spans a book holds while their operation span has not been read (the oldest are dropped first)."""
MAX_DONE = 20_000
"""Operation spans not kept (clean calls) a book remembers, so that their late attempt spans are dropped at once."""
MAX_ATTEMPTS = 1_000
"""Attempt spans kept per call (the first read); the others are counted (``Call.dropped``)."""
LARGEST = float(2**53)
"""Counts above this are clamped (a span's attribute is not trusted to be sane)."""


@dataclass(frozen=True)
class SpanRecord:
    """One span as the sources give it: hex ids (``parent_id`` ``""`` for a root), times in epoch seconds,
    attributes as text (arrays joined by commas), ``error`` for status ERROR, ``origin`` who emitted it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start: float
    end: float
    attrs: Mapping[str, str]
    error: bool
    origin: Labels

    def number(self, key: str, default: float = 0.0) -> float:
        """The attribute as a finite number in ``[0, LARGEST]``; ``default`` when it is missing, not a number, NaN
        or infinite."""
        try:
            value = float(self.attrs[key])
        except (KeyError, ValueError):
            return default
        return min(max(value, 0.0), LARGEST) if math.isfinite(value) else default

    def integer(self, key: str, default: int = 0) -> int:
        """``number`` as an int."""
        return int(self.number(key, default))


@dataclass(frozen=True)
class Attempt:
    """One attempt of a call: a store call on one chunk."""

    span_id: str
    chunk: int
    number: int  # 1-based on its chunk
    keys: int
    failed: int
    codes: tuple[str, ...]  # distinct code names of its failed keys
    backoff_s: float  # slept before it
    start: float
    end: float
    endpoint: str  # the storage endpoint blamed ("" when node-loss routing did not act)
    nodes_down: int
    fallbacks: int
    unreachable: int

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    @classmethod
    def from_span(cls, span: SpanRecord) -> Attempt:
        endpoint = format_endpoint(span.attrs.get(c.SERVER_ADDRESS, ""), span.attrs.get(c.SERVER_PORT, ""))
        codes = tuple(x for x in span.attrs.get(c.ERROR_CODES, "").split(",") if x)
        return cls(
            span_id=span.span_id,
            chunk=span.integer(c.CHUNK),
            number=span.integer(c.ATTEMPT, 1),
            keys=span.integer(c.KEYS),
            failed=span.integer(c.KEYS_FAILED),
            codes=codes,
            backoff_s=span.number(c.BACKOFF_S),
            start=span.start,
            end=span.end,
            endpoint=endpoint,
            nodes_down=span.integer(c.NODES_DOWN),
            fallbacks=span.integer(c.KEYS_FALLBACK),
            unreachable=span.integer(c.KEYS_UNREACHABLE),
        )


@dataclass
class Call:
    """One client call whose outcome is in ``SHOWN_OUTCOMES``, with the attempts read so far (at most
    ``MAX_ATTEMPTS``, each span once; ``sort()`` puts them in order: by chunk, then attempt number, then start)."""

    trace_id: str
    span_id: str
    operation: str
    outcome: str
    error_type: str  # the call's most frequent final code ("" when it did not fail)
    keys: int
    attempt_count: int  # mooncake.attempts: how many attempt spans it has
    failed_keys: int
    start: float
    end: float
    origin: Labels
    attempts: list[Attempt] = field(default_factory=list)
    dropped: int = 0  # attempt spans read past MAX_ATTEMPTS
    _ids: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.trace_id}:{self.span_id}"

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def complete(self) -> bool:
        """Every attempt span of the call was read."""
        return len(self.attempts) + self.dropped >= self.attempt_count

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED

    def who(self, name: str) -> str:
        return label(self.origin, name)

    @property
    def codes(self) -> tuple[str, ...]:
        """Every code its attempts failed with, sorted."""
        return tuple(sorted({code for a in self.attempts for code in a.codes}))

    def add(self, attempt: Attempt) -> None:
        """Keep ``attempt`` unless its span was read before (or ``MAX_ATTEMPTS`` are kept: then counted)."""
        if attempt.span_id in self._ids:
            return
        if len(self.attempts) >= MAX_ATTEMPTS:
            self.dropped += 1
            return
        self._ids.add(attempt.span_id)
        self.attempts.append(attempt)

    def sort(self) -> None:
        self.attempts.sort(key=lambda a: (a.chunk, a.number, a.start, a.span_id))

    @classmethod
    def from_span(cls, span: SpanRecord) -> Call:
        return cls(
            trace_id=span.trace_id,
            span_id=span.span_id,
            operation=span.attrs.get(c.DB_OPERATION_NAME) or span.name.removeprefix("mooncake."),
            outcome=span.attrs.get(c.OUTCOME, ""),
            error_type=span.attrs.get(c.ERROR_TYPE, ""),
            keys=span.integer(c.DB_OPERATION_BATCH_SIZE),
            attempt_count=span.integer(c.ATTEMPTS),
            failed_keys=span.integer(c.KEYS_FAILED),
            start=span.start,
            end=span.end,
            origin=span.origin,
        )


@dataclass
class FailureBook:
    """The newest ``max_calls`` failed calls and the newest ``max_calls`` that succeeded after retries, with their
    attempts. Attempt spans may come before or after their operation span (an exporter's batch may split them): one
    whose operation has not been read waits, up to ``max_pending`` of them (``MAX_ATTEMPTS`` per call); those of
    calls that are not kept are dropped."""

    max_calls: int = MAX_CALLS
    max_pending: int = MAX_PENDING
    calls: dict[tuple[str, str], Call] = field(default_factory=dict)
    pending: OrderedDict[tuple[str, str], list[Attempt]] = field(default_factory=OrderedDict)
    _pending_count: int = 0
    _done: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)  # calls not kept, lately
    _kinds: dict[bool, dict[tuple[str, str], Call]] = field(default_factory=lambda: {True: {}, False: {}})

    def add(self, spans: Iterable[SpanRecord]) -> None:
        for span in spans:
            if span.name in OPERATION_SPANS:
                self._operation(span)
            elif span.name in ATTEMPT_SPANS and span.parent_id:
                self._attempt(span)

    def _forget(self, key: tuple[str, str]) -> None:
        self._done[key] = None
        self._done.move_to_end(key)
        while len(self._done) > MAX_DONE:
            self._done.popitem(last=False)

    def _operation(self, span: SpanRecord) -> None:
        key = (span.trace_id, span.span_id)
        waiting = self.pending.pop(key, [])
        self._pending_count -= len(waiting)
        if span.attrs.get(c.OUTCOME) not in SHOWN_OUTCOMES:
            self._forget(key)
            return
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = Call.from_span(span)
            kind = self._kinds[call.failed]
            kind[key] = call
            if len(kind) > self.max_calls:
                oldest = min(kind, key=lambda k: kind[k].end)
                del kind[oldest], self.calls[oldest]
                self._forget(oldest)
        for attempt in waiting:
            call.add(attempt)

    def _attempt(self, span: SpanRecord) -> None:
        key = (span.trace_id, span.parent_id)
        attempt = Attempt.from_span(span)
        call = self.calls.get(key)
        if call is not None:
            call.add(attempt)
            return
        if key in self._done:
            return
        waiting = self.pending.setdefault(key, [])
        if len(waiting) >= MAX_ATTEMPTS:
            return
        waiting.append(attempt)
        self.pending.move_to_end(key)
        self._pending_count += 1
        while self._pending_count > self.max_pending and len(self.pending) > 1:  # the oldest calls' attempts
            _, dropped = self.pending.popitem(last=False)
            self._pending_count -= len(dropped)

    def select(self, start: float, end: float, outcomes: Iterable[str] = FAILED, **filters: Any) -> list[Call]:
        """``select`` over the calls kept (``operations``, ``hosts``, ``limit`` as there)."""
        return select(self.calls.values(), start, end, outcomes, **filters)


def select(
    calls: Iterable[Call],
    start: float,
    end: float,
    outcomes: Iterable[str] = FAILED,
    operations: Iterable[str] | None = None,
    hosts: Iterable[str] | None = None,
    limit: int = 100,
) -> list[Call]:
    """The calls that ended in ``(start, end]`` with one of ``outcomes``, of these operations and hosts (None or
    empty: all), newest first, at most ``limit``."""
    wanted, ops, hs = set(outcomes), set(operations or ()), set(hosts or ())
    chosen = [
        call
        for call in calls
        if start < call.end <= end
        and call.outcome in wanted
        and (not ops or call.operation in ops)
        and (not hs or call.who("host") in hs)
    ]
    chosen = sorted(chosen, key=lambda call: (-call.end, call.id))[:limit]
    for call in chosen:
        call.sort()
    return chosen


@dataclass
class FailureSnapshot:
    """What a span source holds for a time range: its calls (``select`` them), whether the source could be read,
    and, for a source with a web UI, the link to a trace there (``{trace_id}`` in ``link`` replaced by its id)."""

    calls: list[Call]
    description: str
    error: str | None = None  # the source could not be read at all
    notice: str = ""  # something the page should say about what it read (lines skipped, services left out, ...)
    link: str | None = None  # e.g. ``http://127.0.0.1:16686/trace/{trace_id}`` (``{trace_id}`` is replaced)


class SpanSource(Protocol):
    """Where the calls come from (``trace_files.TraceFileSource``, ``jaeger.JaegerSource``)."""

    description: str

    def load(self, start: float, end: float, outcomes: Iterable[str] = FAILED) -> FailureSnapshot:
        """The calls that ended in ``(start, end]`` with one of ``outcomes``, newest first; never raises for an
        unreadable source (``FailureSnapshot.error``)."""
        ...


# ------------------------------------------------------------------------------------------------ OTLP JSON lines


def parse_spans_line(line: str, problems: list[str] | None = None) -> list[SpanRecord]:
    """The spans of one OTLP/JSON line (an ``ExportTraceServiceRequest``, as the SDK's and the Collector's file
    exporters write them); lines of other signals give ``[]``; ValueError for a line that is not such an object.
    Only ``mooncake.*`` spans are returned (others are skipped unread). A malformed span is skipped, and why is
    appended to ``problems`` (the other spans of the line are kept: one line holds a whole export batch)."""
    if "mooncake." not in line:
        return []
    request = otlp_request(line, "resourceSpans")
    if request is None:
        return []
    out: list[SpanRecord] = []
    try:
        for rs in request["resourceSpans"]:
            origin = otlp_origin(otlp_attributes(rs.get("resource", {}).get("attributes")))
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    name = span.get("name", "")
                    if name in OPERATION_SPANS or name in ATTEMPT_SPANS:
                        try:
                            out.append(_otlp_span(span, name, origin))
                        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
                            if problems is not None:
                                problems.append(f"malformed span: {type(exc).__name__} {exc}")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"malformed OTLP spans: {type(exc).__name__} {exc}") from None
    return out


def _otlp_span(span: Mapping[str, Any], name: str, origin: Labels) -> SpanRecord:
    start, end = otlp_seconds(span["startTimeUnixNano"]), otlp_seconds(span["endTimeUnixNano"])
    if start is None or end is None:
        raise ValueError("a span without its times")
    status = span.get("status") or {}
    return SpanRecord(
        trace_id=str(span["traceId"]).lower(),
        span_id=str(span["spanId"]).lower(),
        parent_id=str(span.get("parentSpanId") or "").lower(),
        name=name,
        start=start,
        end=end,
        attrs=otlp_attributes(span.get("attributes")),
        error=status.get("code") in (2, "2", "STATUS_CODE_ERROR"),
        origin=origin,
    )
