"""The recent-failures panel's span source in the docker-compose recipe: Jaeger's HTTP query API (the one its UI
uses, ``/api/...`` on port 16686), over ``http_get`` (every request bounded in time and size).

* ``jaeger_spans``: one trace of ``/api/traces`` as ``SpanRecord``s equal to what ``failures.parse_spans_line``
  reads from the OTLP JSON of the same spans (Jaeger keeps microseconds: times are the OTLP ones truncated to
  whole microseconds).
* ``JaegerSource``: for each service that has ``mooncake.*`` operations, one trace search per wanted outcome
  (``tags={"mooncake.outcome": ...}``), the traces joined into a ``FailureBook``; links to Jaeger's UI.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from tq_mooncake.telemetry import conventions as c

from . import http_get
from .failures import ATTEMPT_SPANS, FAILED, OPERATION_SPANS, SHOWN_OUTCOMES, FailureBook, FailureSnapshot, SpanRecord
from .metrics import otlp_origin, otlp_seconds

MAX_ANSWER_BYTES = 32 * 1024 * 1024
"""The largest answer read from Jaeger (a larger one is an error)."""
MAX_CHECKED_SERVICES = 200
"""Services whose operations are asked for, at most (in name order)."""
NO_SERVICE_NAME = "OTLPResourceNoServiceName"
"""The service name Jaeger gives a resource without attributes (the OTLP side has no service then)."""
ADDED_TAGS = frozenset(
    {
        "span.kind",
        "error",
        "otel.status_code",
        "otel.status_description",
        "otel.scope.name",
        "otel.scope.version",
        "otel.library.name",
        "otel.library.version",
        "w3c.tracestate",
        "internal.span.format",
    }
)
"""Span tags that Jaeger's OTLP translation and collector add (kind, status, scope, format): not span attributes."""
THREAD_PREFIX = "tq-mooncake-jaeger"
"""The name prefix of the threads that ask Jaeger (a load's pool)."""
_MOONCAKE_SPANS = OPERATION_SPANS | ATTEMPT_SPANS
_HEX = re.compile(r"[0-9a-f]+")


class JaegerError(RuntimeError):
    """Jaeger's query API could not be reached, refused a request or gave something else than its JSON."""


class OutOfBudget(JaegerError):
    """A request not made, or given up, because the load's ``budget_s`` was spent (not Jaeger's failure alone)."""


# ------------------------------------------------------------------------------------------------ traces


def _hex_id(value: Any, width: int) -> str:
    """A lowercase hex id zero-padded to ``width`` chars (Jaeger writes a trace id whose high 64 bits are zero with
    16); ValueError for anything else."""
    text = str(value).lower()
    if not _HEX.fullmatch(text) or len(text) > width:
        raise ValueError(f"not a {width}-hex-digit id: {value!r}")
    return text.zfill(width)


def _scalar_text(value: Any) -> str:
    return str(value)  # bool: "True"/"False", like str() of an OTLP boolValue


def _string_text(text: str) -> str:
    """A string tag; an OTLP array attribute arrives as its JSON (``["A","B"]``) and becomes ``A,B`` as the OTLP
    reader joins arrays (a string attribute that is itself such JSON is read as an array too)."""
    if not (text.startswith("[") and text.endswith("]")):
        return text
    try:
        items = json.loads(text)
    except ValueError:
        return text
    if not isinstance(items, list) or any(isinstance(x, (list, dict)) or x is None for x in items):
        return text
    return ",".join(_scalar_text(x) for x in items)


def tag_text(tag: Mapping[str, Any]) -> str:
    """A Jaeger tag's value as ``metrics.otlp_attributes`` writes the OTLP attribute it came from: ints ``"5"``
    (also when Jaeger sent a string, past 2**53), doubles as ``str(float)`` (Jaeger writes ``1.0`` as ``1``), bools
    ``"True"``/``"False"``, arrays joined by commas. ValueError for a value that does not fit its type."""
    kind, value = tag.get("type") or "string", tag.get("value")
    if kind == "int64":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"int64 tag {tag.get('key')!r} holds {value!r}")
        return str(int(value))
    if kind == "float64":
        return str(float(value))
    if kind == "bool":
        return str(value if isinstance(value, bool) else str(value).lower() == "true")
    return _string_text("" if value is None else str(value))


def _tags(items: Any) -> dict[str, str]:
    return {str(tag["key"]): tag_text(tag) for tag in items or []}


def _parent(span: Mapping[str, Any]) -> str:
    for ref in span.get("references") or []:
        if ref.get("refType", "CHILD_OF") == "CHILD_OF" and ref.get("spanID"):
            return _hex_id(ref["spanID"], 16)
    legacy = span.get("parentSpanID")
    return _hex_id(legacy, 16) if legacy else ""


def jaeger_spans(trace: Mapping[str, Any]) -> list[SpanRecord]:
    """The ``mooncake.*`` operation and attempt spans of one trace of Jaeger's ``/api/traces`` answer, as the OTLP
    reader gives them (others are skipped unread): ids lowercase and full width, times in epoch seconds from
    Jaeger's microseconds, attributes as text without the tags Jaeger adds (``ADDED_TAGS``), ``error`` from the
    ``error`` or ``otel.status_code`` tag, ``origin`` from the span's process. ValueError for a malformed trace."""
    if not isinstance(trace, Mapping):
        raise ValueError("a trace that is not a JSON object")
    out: list[SpanRecord] = []
    try:
        processes = trace.get("processes") or {}
        origins: dict[str, Any] = {}
        for span in trace["spans"]:
            name = span.get("operationName", "")
            if name not in _MOONCAKE_SPANS:
                continue
            pid = span.get("processID")
            if pid not in origins:
                process = span.get("process") or processes[pid]
                service = str(process.get("serviceName", ""))
                resource = {**_tags(process.get("tags")), c.RESOURCE_SERVICE_NAME: service}
                if service == NO_SERVICE_NAME:
                    resource[c.RESOURCE_SERVICE_NAME] = ""
                origins[pid] = otlp_origin(resource)
            start_us, duration_us = int(span["startTime"]), int(span.get("duration") or 0)
            start, end = otlp_seconds(start_us * 1000), otlp_seconds((start_us + duration_us) * 1000)
            if start is None or end is None or duration_us < 0:
                raise ValueError("a span without its times")
            tags = _tags(span.get("tags"))
            out.append(
                SpanRecord(
                    trace_id=_hex_id(span["traceID"], 32),
                    span_id=_hex_id(span["spanID"], 16),
                    parent_id=_parent(span),
                    name=name,
                    start=start,
                    end=end,
                    attrs={k: v for k, v in tags.items() if k not in ADDED_TAGS},
                    error=tags.get("error") == "True" or tags.get("otel.status_code") == "ERROR",
                    origin=origins[pid],
                )
            )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"malformed Jaeger trace: {type(exc).__name__} {exc}") from None
    return out


# ------------------------------------------------------------------------------------------------ the source


def http_url(value: str, option: str) -> str:
    """``value`` without a trailing slash if it is a URL ``http_get`` takes (http(s), a host, no credentials, a port
    other than 0 or none), with no query or fragment; ValueError naming ``option`` else (credentials would be shown
    on the page and in its links, and are not in the message)."""
    text = value.strip()
    parts = urllib.parse.urlsplit(text)
    why = http_get.url_problem(parts)
    if why == http_get.CREDENTIALS:
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise ValueError(f"{option}: {why} (they would be shown on the page and in its links), got {shown!r}")
    if why or parts.query or parts.fragment:
        raise ValueError(f"{option} must be an http:// or https:// URL (e.g. http://127.0.0.1:16686), got {value!r}")
    return text.rstrip("/")


def _micros(seconds: float) -> int:
    return int(math.floor(max(0.0, seconds) * 1e6))


T = TypeVar("T")


@dataclass
class _Gathered(Generic[T]):
    """What jobs run on a pool until a deadline gave: results by job index, Jaeger's failures, how many were late
    (not finished, or OutOfBudget)."""

    results: dict[int, T] = field(default_factory=dict)
    failures: list[JaegerError] = field(default_factory=list)
    late: int = 0

    @property
    def last_failure(self) -> str:
        return str(self.failures[-1]) if self.failures else ""


def _gather(pool: Executor, jobs: list[Callable[[], T]], deadline: float) -> _Gathered[T]:
    """Run ``jobs`` on ``pool``, waiting until ``deadline``: the unfinished ones are cancelled or abandoned (their
    results ignored). A job's OutOfBudget makes it late, another JaegerError is a failure, and any other exception
    is raised here."""
    futures = [pool.submit(job) for job in jobs]
    wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    out: _Gathered[T] = _Gathered()
    for i, future in enumerate(futures):
        if not future.done() or isinstance(future.exception(), OutOfBudget):
            future.cancel()
            out.late += 1
        elif isinstance(future.exception(), JaegerError):
            out.failures.append(future.exception())  # type: ignore[arg-type]
        else:
            out.results[i] = future.result()
    return out


class JaegerSource:
    """Recent failed calls from Jaeger's query API at ``url`` (e.g. ``http://127.0.0.1:16686``); ``ui_url`` is where
    the browser reaches Jaeger's UI, for ``link`` (default ``url``; braces in it stay as they are: only
    ``{trace_id}`` is meant to be replaced, with ``str.replace``).

    Each ``load`` searches, for each of the first ``max_services`` services (by name) that have a ``mooncake.*``
    operation span, the traces with an operation span of each wanted outcome that started in the range (less
    ``lookback_s``: a call is listed by its end, Jaeger searches by start), at most ``limit`` per search (Jaeger
    keeps the newest). The list of those services is kept ``services_ttl_s`` seconds. The operations look-ups and
    the searches run on ``workers`` threads; a whole ``load`` takes at most about ``budget_s``: what has not
    answered by then is abandoned. Every request ends within ``timeout_s`` (whole, ``http_get``) and what remains
    of the budget, and reads at most ``max_bytes``. Thread-safe; no request is made holding the lock."""

    def __init__(
        self,
        url: str,
        ui_url: str | None = None,
        timeout_s: float = 5.0,
        limit: int = 50,
        *,
        max_services: int = 20,
        services_ttl_s: float = 30.0,
        lookback_s: float = 120.0,
        max_bytes: int = MAX_ANSWER_BYTES,
        budget_s: float = 10.0,
        workers: int = 8,
    ) -> None:
        self.url = http_url(url, "--jaeger")
        self.ui_url = http_url(ui_url, "--jaeger-ui") if ui_url else self.url
        if not (timeout_s > 0 and budget_s > 0) or min(limit, max_services, max_bytes, workers) < 1:
            raise ValueError("timeout_s, budget_s, limit, max_services, max_bytes and workers must be positive")
        self.timeout_s, self.limit, self.max_services = float(timeout_s), int(limit), int(max_services)
        self.services_ttl_s, self.lookback_s, self.max_bytes = float(services_ttl_s), float(lookback_s), max_bytes
        self.budget_s, self.workers = float(budget_s), int(workers)
        self.description = f"Jaeger at {self.url}"
        self.link = self.ui_url + "/trace/{trace_id}"  # not format(): braces in ui_url stay literal
        self._lock = threading.Lock()
        self._services: tuple[float, list[str], str] | None = None  # (when, services, notice)

    # -------------------------------------------------------------------- HTTP

    def get(self, path: str, params: Mapping[str, Any] | None = None, deadline: float | None = None) -> tuple[Any, str]:
        """The ``data`` of Jaeger's JSON answer to ``GET path?params`` (``None`` as ``[]``) and the text of its
        ``errors`` (``""`` for none), asked with ``timeout_s`` or until ``deadline`` (``time.monotonic()``) if
        sooner; JaegerError on any failure, with Jaeger's own message where it gave one (OutOfBudget when the
        deadline was the reason)."""
        timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
        if timeout <= 0:
            raise OutOfBudget(f"{self.url}{path} was not asked: the load's {self.budget_s:g} s were spent")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            raw = http_get.get(f"{self.url}{path}{query}", timeout, self.max_bytes, accept="application/json").body
        except http_get.HttpError as exc:
            said = _error_text(exc.body) or exc.excerpt
            raise JaegerError(f"{self.url}{path} answered HTTP {exc.status} {said}".strip()) from None
        except http_get.HttpTimeout:
            if timeout < self.timeout_s:  # cut short by the deadline
                raise OutOfBudget(f"{self.url}{path} did not answer within the load's {self.budget_s:g} s") from None
            raise JaegerError(f"{self.url}{path} did not answer within {timeout:.3g} s") from None
        except http_get.HttpTooLarge:
            raise JaegerError(f"{self.url}{path} answered more than {self.max_bytes} bytes") from None
        except (http_get.HttpGetError, ValueError) as exc:  # unreachable, not HTTP, or a URL it does not take
            raise JaegerError(f"cannot reach Jaeger at {self.url}: {exc}") from None
        try:
            body = json.loads(raw)
        except ValueError:
            raise JaegerError(f"{self.url}{path} did not answer JSON: is {self.url} Jaeger's query API?") from None
        if not isinstance(body, dict) or "data" not in body:
            raise JaegerError(f"{self.url}{path} did not answer Jaeger's JSON ({{'data': ...}})")
        errors = _errors_text(body.get("errors")) if body.get("errors") else ""
        if errors and not body["data"]:
            raise JaegerError(f"{self.url}{path}: {errors}")
        return (body["data"] if body["data"] is not None else []), errors

    # -------------------------------------------------------------------- services

    def services(self, deadline: float | None = None, pool: Executor | None = None) -> tuple[list[str], str]:
        """The services searched (those with a ``mooncake.*`` operation, the first ``max_services``) and a notice
        saying how many were left out, asked until ``deadline`` (default: ``budget_s`` from now), the operations on
        ``pool`` (default: one of ``workers`` threads). Kept ``services_ttl_s`` seconds when every service could be
        looked at; one that could not is left out, and the notice says so. JaegerError when Jaeger cannot say
        (``/api/services`` failed, or no operations look-up answered)."""
        with self._lock:
            cached = self._services
        asked_at = time.monotonic()
        if cached is not None and asked_at - cached[0] < self.services_ttl_s:
            return list(cached[1]), cached[2]
        if pool is None:
            with ThreadPoolExecutor(self.workers, thread_name_prefix=THREAD_PREFIX) as own:
                return self.services(deadline, own)
        deadline = asked_at + self.budget_s if deadline is None else deadline
        listed, _ = self.get("/api/services", deadline=deadline)
        if not isinstance(listed, list):
            raise JaegerError(f"{self.url}/api/services: not a list of services")
        names = sorted({str(s) for s in listed})
        checked = names[:MAX_CHECKED_SERVICES]
        looked = _gather(pool, [partial(self._has_mooncake_spans, s, deadline) for s in checked], deadline)
        if checked and not looked.results:
            raise JaegerError(looked.last_failure or f"no operations look-up answered within {self.budget_s:g} s")
        found = [s for i, s in enumerate(checked) if looked.results.get(i)]
        notes = []
        if len(names) > MAX_CHECKED_SERVICES:
            notes.append(f"{len(names) - MAX_CHECKED_SERVICES} Jaeger service(s) not looked at")
        if looked.failures or looked.late:
            missed = len(looked.failures) + looked.late
            why = f"the last: {looked.last_failure}" if looked.failures else f"not within {self.budget_s:g} s"
            notes.append(f"{missed} service(s) left out: their operations could not be looked up ({why})")
        if len(found) > self.max_services:
            notes.append(f"{len(found) - self.max_services} service(s) with mooncake spans left out")
        chosen, notice = found[: self.max_services], " · ".join(notes)
        if not (looked.failures or looked.late):
            with self._lock:
                self._services = (asked_at, chosen, notice)
        return list(chosen), notice

    def _has_mooncake_spans(self, service: str, deadline: float | None = None) -> bool:
        operations, _ = self.get("/api/operations", {"service": service}, deadline)
        if not isinstance(operations, list):
            raise JaegerError(f"{self.url}/api/operations: not a list of operations")
        names = {str(op.get("name", "")) if isinstance(op, dict) else str(op) for op in operations}
        return not names.isdisjoint(OPERATION_SPANS)

    def forget_services(self) -> None:
        """Ask for the services again at the next ``load``."""
        with self._lock:
            self._services = None

    # -------------------------------------------------------------------- traces

    def traces(
        self, service: str, outcome: str, start: float, end: float, deadline: float | None = None
    ) -> tuple[list[Any], str]:
        """Jaeger's traces of ``service`` with a span tagged ``mooncake.outcome=outcome`` that started in
        ``[start - lookback_s, end]``, at most ``limit``, and what Jaeger said about them (``errors``)."""
        params = {
            "service": service,
            "tags": json.dumps({c.OUTCOME: outcome}, separators=(",", ":")),
            "start": _micros(start - self.lookback_s),
            "end": math.ceil(max(0.0, end) * 1e6),
            "limit": self.limit,
        }
        data, errors = self.get("/api/traces", params, deadline)
        if not isinstance(data, list):
            raise JaegerError(f"{self.url}/api/traces: not a list of traces")
        return data, errors

    def load(self, start: float, end: float, outcomes: Iterable[str] = FAILED) -> FailureSnapshot:
        """Every call found that ended in ``(start, end]`` with one of ``outcomes``, newest first, with their
        attempts, within about ``budget_s``. Never raises for Jaeger's failures: ``error`` says what went wrong
        (nothing is listed then) when Jaeger could not list its services or no search answered; searches that
        failed or did not answer in time while others did are counted in ``notice``, as are malformed traces
        (skipped)."""
        if not (math.isfinite(start) and math.isfinite(end)):
            return FailureSnapshot([], self.description, error="not a finite time range", link=self.link)
        wanted = [o for o in dict.fromkeys(outcomes) if o in SHOWN_OUTCOMES]
        deadline = time.monotonic() + self.budget_s
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=THREAD_PREFIX)
        try:
            services, notice = self.services(deadline, pool)
            searches = [(s, o) for s in services for o in wanted]
            jobs = [partial(self.traces, s, o, start, end, deadline) for s, o in searches]
            found = _gather(pool, jobs, deadline)
            if searches and not found.results:
                raise JaegerError(found.last_failure or f"no trace search answered within {self.budget_s:g} s")
        except JaegerError as exc:
            self.forget_services()
            return FailureSnapshot([], self.description, error=str(exc), link=self.link)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # what runs still ends by the deadline (get's timeout)
        book = FailureBook()
        seen: set[str] = set()
        skipped, problem, full, jaeger_errors = 0, "", 0, ""
        for i in sorted(found.results):
            traces, errors = found.results[i]
            full += len(traces) >= self.limit
            jaeger_errors = errors or jaeger_errors
            for trace in traces:
                trace_id = str(trace.get("traceID")) if isinstance(trace, dict) else ""
                if trace_id and trace_id in seen:
                    continue
                try:
                    spans = jaeger_spans(trace)
                except ValueError as exc:
                    skipped, problem = skipped + 1, str(exc)
                    continue
                seen.add(trace_id)
                book.add(spans)
        notes = [f"{len(services)} Jaeger service(s) with mooncake spans"] + ([notice] if notice else [])
        if found.late:
            notes.append(f"{found.late} of {len(searches)} search(es) did not answer within {self.budget_s:g} s")
        if found.failures:
            notes.append(f"{len(found.failures)} of {len(searches)} search(es) failed, the last: {found.last_failure}")
        if full:
            notes.append(f"{full} search(es) returned the most traces asked for ({self.limit}): older calls missed")
        if skipped:
            notes.append(f"{skipped} malformed trace(s) skipped, the last: {problem}")
        if jaeger_errors:
            notes.append(f"Jaeger said: {jaeger_errors}")
        calls = book.select(start, end, wanted, limit=len(book.calls))  # each search is bounded by limit already
        return FailureSnapshot(calls, self.description, notice=" · ".join(notes), link=self.link)


def _errors_text(errors: Any) -> str:
    if not isinstance(errors, list):
        return str(errors)
    return "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in errors[:3])


def _error_text(body: bytes) -> str:
    """Jaeger's message in an error answer's body (``{"errors": [{"code", "msg"}]}``), else ``""``."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return _errors_text(data.get("errors")) if isinstance(data, dict) and data.get("errors") else ""
