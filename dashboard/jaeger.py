"""The recent-failures panel's span source in the docker-compose recipe: Jaeger's HTTP query API (the one its UI
uses, ``/api/...`` on port 16686), over urllib.

* ``jaeger_spans``: one trace of ``/api/traces`` as ``SpanRecord``s equal to what ``failures.parse_spans_line``
  reads from the OTLP JSON of the same spans (Jaeger keeps microseconds: times are the OTLP ones truncated to
  whole microseconds).
* ``JaegerSource``: for each service that has ``mooncake.*`` operations, one trace search per wanted outcome
  (``tags={"mooncake.outcome": ...}``), the traces joined into a ``FailureBook``; links to Jaeger's UI.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from tq_mooncake.telemetry import conventions as c

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
_MOONCAKE_SPANS = OPERATION_SPANS | ATTEMPT_SPANS
_HEX = re.compile(r"[0-9a-f]+")


class JaegerError(RuntimeError):
    """Jaeger's query API could not be reached, refused a request or gave something else than its JSON."""


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
    """``value`` without a trailing slash if it is an http(s) URL with a host and no query; ValueError naming
    ``option`` else."""
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{option} must be an http:// or https:// URL (e.g. http://127.0.0.1:16686), got {value!r}")
    return value.strip().rstrip("/")


def _micros(seconds: float) -> int:
    return int(math.floor(max(0.0, seconds) * 1e6))


class JaegerSource:
    """Recent failed calls from Jaeger's query API at ``url`` (e.g. ``http://127.0.0.1:16686``); ``ui_url`` is where
    the browser reaches Jaeger's UI, for ``link`` (default ``url``).

    Each ``load`` searches, for each of the first ``max_services`` services (by name) that have a ``mooncake.*``
    operation span, the traces with an operation span of each wanted outcome that started in the range (less
    ``lookback_s``: a call is listed by its end, Jaeger searches by start), at most ``limit`` per search (Jaeger
    keeps the newest). The list of those services is kept ``services_ttl_s`` seconds. Every request has a
    ``timeout_s`` timeout and reads at most ``max_bytes``. Thread-safe."""

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
    ) -> None:
        self.url = http_url(url, "--jaeger")
        self.ui_url = http_url(ui_url, "--jaeger-ui") if ui_url else self.url
        if not timeout_s > 0 or limit < 1 or max_services < 1 or max_bytes < 1:
            raise ValueError("timeout_s, limit, max_services and max_bytes must be positive")
        self.timeout_s, self.limit, self.max_services = float(timeout_s), int(limit), int(max_services)
        self.services_ttl_s, self.lookback_s, self.max_bytes = float(services_ttl_s), float(lookback_s), max_bytes
        self.description = f"Jaeger at {self.url}"
        self.link = f"{self.ui_url}/trace/{{trace_id}}"
        self._lock = threading.Lock()
        self._services: tuple[float, list[str], str] | None = None  # (when, services, notice)

    # -------------------------------------------------------------------- HTTP

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[Any, str]:
        """The ``data`` of Jaeger's JSON answer to ``GET path?params`` (``None`` as ``[]``) and the text of its
        ``errors`` (``""`` for none); JaegerError on any failure, with Jaeger's own message where it gave one."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        target = f"{self.url}{path}{query}"
        request = urllib.request.Request(target, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read(self.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            raise JaegerError(f"{self.url}{path} answered HTTP {exc.code} {_error_text(exc)}".strip()) from None
        except TimeoutError:
            raise JaegerError(f"{self.url}{path} did not answer within {self.timeout_s:g} s") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise JaegerError(f"cannot reach Jaeger at {self.url}: {getattr(exc, 'reason', exc)}") from None
        if len(raw) > self.max_bytes:
            raise JaegerError(f"{self.url}{path} answered more than {self.max_bytes} bytes")
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

    def services(self) -> tuple[list[str], str]:
        """The services searched (those with a ``mooncake.*`` operation, the first ``max_services``) and a notice
        saying how many were left out; kept ``services_ttl_s`` seconds. JaegerError when Jaeger cannot say."""
        with self._lock:
            now = time.monotonic()
            if self._services is not None and now - self._services[0] < self.services_ttl_s:
                return list(self._services[1]), self._services[2]
            listed, _ = self.get("/api/services")
            if not isinstance(listed, list):
                raise JaegerError(f"{self.url}/api/services: not a list of services")
            names = sorted({str(s) for s in listed})
            found = [s for s in names[:MAX_CHECKED_SERVICES] if self._has_mooncake_spans(s)]
            notes = []
            if len(names) > MAX_CHECKED_SERVICES:
                notes.append(f"{len(names) - MAX_CHECKED_SERVICES} Jaeger service(s) not looked at")
            if len(found) > self.max_services:
                notes.append(f"{len(found) - self.max_services} service(s) with mooncake spans left out")
            chosen = found[: self.max_services]
            self._services = (now, chosen, " · ".join(notes))
            return list(chosen), self._services[2]

    def _has_mooncake_spans(self, service: str) -> bool:
        operations, _ = self.get("/api/operations", {"service": service})
        if not isinstance(operations, list):
            raise JaegerError(f"{self.url}/api/operations: not a list of operations")
        names = {str(op.get("name", "")) if isinstance(op, dict) else str(op) for op in operations}
        return not names.isdisjoint(OPERATION_SPANS)

    def forget_services(self) -> None:
        """Ask for the services again at the next ``load``."""
        with self._lock:
            self._services = None

    # -------------------------------------------------------------------- traces

    def traces(self, service: str, outcome: str, start: float, end: float) -> tuple[list[Any], str]:
        """Jaeger's traces of ``service`` with a span tagged ``mooncake.outcome=outcome`` that started in
        ``[start - lookback_s, end]``, at most ``limit``, and what Jaeger said about them (``errors``)."""
        params = {
            "service": service,
            "tags": json.dumps({c.OUTCOME: outcome}, separators=(",", ":")),
            "start": _micros(start - self.lookback_s),
            "end": math.ceil(max(0.0, end) * 1e6),
            "limit": self.limit,
        }
        data, errors = self.get("/api/traces", params)
        if not isinstance(data, list):
            raise JaegerError(f"{self.url}/api/traces: not a list of traces")
        return data, errors

    def load(self, start: float, end: float, outcomes: Iterable[str] = FAILED) -> FailureSnapshot:
        """The calls that ended in ``(start, end]`` with one of ``outcomes``, newest first, at most ``limit``, with
        their attempts. Never raises for Jaeger's failures: ``error`` says what went wrong (nothing is listed
        then); a malformed trace is skipped and counted in ``notice``."""
        if not (math.isfinite(start) and math.isfinite(end)):
            return FailureSnapshot([], self.description, error="not a finite time range", link=self.link)
        wanted = [o for o in dict.fromkeys(outcomes) if o in SHOWN_OUTCOMES]
        book = FailureBook()
        seen: set[str] = set()
        skipped, problem, full, jaeger_errors = 0, "", 0, ""
        try:
            services, notice = self.services()
            for service in services:
                for outcome in wanted:
                    found, errors = self.traces(service, outcome, start, end)
                    full += len(found) >= self.limit
                    jaeger_errors = errors or jaeger_errors
                    for trace in found:
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
        except JaegerError as exc:
            self.forget_services()
            return FailureSnapshot([], self.description, error=str(exc), link=self.link)
        notes = [f"{len(services)} Jaeger service(s) with mooncake spans"] + ([notice] if notice else [])
        if full:
            notes.append(f"{full} search(es) returned the most traces asked for ({self.limit}): older calls missed")
        if skipped:
            notes.append(f"{skipped} malformed trace(s) skipped, the last: {problem}")
        if jaeger_errors:
            notes.append(f"Jaeger said: {jaeger_errors}")
        calls = book.select(start, end, wanted, limit=self.limit)
        return FailureSnapshot(calls, self.description, notice=" · ".join(notes), link=self.link)


def _errors_text(errors: Any) -> str:
    if not isinstance(errors, list):
        return str(errors)
    return "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in errors[:3])


def _error_text(exc: urllib.error.HTTPError) -> str:
    """Jaeger's message in an error answer (``{"errors": [{"code", "msg"}]}``), else ``""``."""
    try:
        body = json.loads(exc.read(64 * 1024))
    except (ValueError, OSError):
        return ""
    return _errors_text(body.get("errors")) if isinstance(body, dict) and body.get("errors") else ""
