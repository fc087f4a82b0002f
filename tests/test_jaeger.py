"""The recent-failures panel's Jaeger source. Jaeger cannot run here, so: spans from the real SDK and
``OTelObserver``, written as OTLP JSON by the real ``JsonLinesSpanExporter``, are turned into Jaeger's
``/api/traces`` JSON by a converter written here from Jaeger's model (OTLP -> Jaeger translation, then the query
API's JSON), and a stand-in query server answers ``JaegerSource`` with them, filtering as Jaeger's memory store
does. Both readings of the same spans must agree exactly."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator

from tq_mooncake.client.codes import ErrorCode
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.cluster import free_port, wait_until
from tq_mooncake.dashboard.failures import FAILED, SHOWN_OUTCOMES, FailureBook, parse_spans_line
from tq_mooncake.dashboard.jaeger import THREAD_PREFIX, JaegerSource, jaeger_spans, tag_text
from tq_mooncake.telemetry import OTelObserver, instruments
from tq_mooncake.telemetry.conventions import Operation, Outcome
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter

pytestmark = pytest.mark.pure

BASE_NS = 1_760_000_000 * 10**9  # whole seconds: every clock reading below is a whole microsecond
TICK_NS = 15_625_000  # 1/64 s: exact in binary, so the observer's perf_counter arithmetic is exact too
FIRST_TRACE = 0x0000_0000_0000_0000_00AB_CDEF_0000_0001  # high 64 bits zero: Jaeger writes it with 16 digits
UI = "http://jaeger.example:16686"


class Clock:
    """The observer's ``time`` module: ``time_ns`` and ``perf_counter`` move together, by ``advance``."""

    def __init__(self) -> None:
        self.ticks = 0

    def time_ns(self) -> int:
        return BASE_NS + self.ticks * TICK_NS

    def perf_counter(self) -> float:
        return self.ticks / 64

    def advance(self, ticks: int = 1) -> None:
        self.ticks += ticks


class SequentialIds(IdGenerator):
    """Known ids: the first trace id has zero high bits, span ids have leading zeros."""

    def __init__(self, first_trace: int, first_span: int) -> None:
        self.trace, self.span = first_trace, first_span

    def generate_trace_id(self) -> int:
        self.trace, out = self.trace + (0x1F << 120), self.trace
        return out

    def generate_span_id(self) -> int:
        self.span += 1
        return self.span


def provider(path: Path, service: str, host: str, pid: int, first_trace: int, first_span: int) -> TracerProvider:
    resource = Resource({"service.name": service, "host.name": host, "process.pid": pid, "deployment.zone": "z1"})
    tp = TracerProvider(resource=resource, id_generator=SequentialIds(first_trace, first_span))
    tp.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return tp


def emit(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The OTLP JSON lines of four calls, through the real observer and exporter: an exhausted get (two chunks,
    five attempts, node loss on chunk 1) under a caller's span, a budget-denied put, a clean get (trainer), and a
    success_after_retry put with steered writes (loader, another process)."""
    clock = Clock()
    monkeypatch.setattr(instruments, "time", clock)
    trainer = provider(folder / "traces-a.jsonl", "trainer", "node-a", 4242, FIRST_TRACE, 0x0A00)
    loader = provider(folder / "traces-b.jsonl", "loader", "node-b", 77, 0x5A << 64 | 0x77, 0x0B00)
    try:
        obs_a, obs_b = OTelObserver(trainer), OTelObserver(loader)
        with trainer.get_tracer("train").start_as_current_span("train.step"):
            get = obs_a.operation(Operation.GET, 8)
        loss = RoutingReport(down={"127.0.0.1:12345"}, fallbacks=Counter({"10.1.0.1:7000": 3}), unreachable=1)
        script = [  # chunk, attempt, keys, backoff, failed codes, bytes, routing
            (0, 1, 4, 0.0, {ErrorCode.TRANSFER_FAIL: 2}, 256, None),
            (1, 1, 4, 0.0, {ErrorCode.TRANSFER_FAIL: 3, ErrorCode.REPLICA_UNREACHABLE: 1}, 0, loss),
            (0, 2, 2, 0.0005, {ErrorCode.TRANSFER_FAIL: 1, ErrorCode.RPC_TIMEOUT: 1}, 0, None),
            (1, 2, 4, 0.0005, {}, 512, None),
            (0, 3, 2, 1.0, {ErrorCode.TRANSFER_FAIL: 2}, 0, None),
        ]
        for chunk, attempt, keys, backoff, codes, nbytes, routing in script:
            clock.advance()
            scope = get.attempt(chunk, attempt, keys, backoff)
            clock.advance(2)
            scope.end(Counter(codes), nbytes, routing)
        clock.advance()
        get.end(OperationSummary(Outcome.EXHAUSTED, 5, 2, 4, 2, 1.001, 768, Counter({ErrorCode.TRANSFER_FAIL: 2})))

        clock.advance(3)
        put = obs_a.operation(Operation.PUT, 2)
        clock.advance()
        no_handle = Counter({ErrorCode.NO_AVAILABLE_HANDLE: 2})
        put.attempt(0, 1, 2, 0.0).end(no_handle, 0)
        put.end(OperationSummary(Outcome.BUDGET_DENIED, 1, 0, 0, 2, 0.0, 0, no_handle))

        clean = obs_a.operation(Operation.GET, 1)
        clock.advance()
        clean.attempt(0, 1, 1, 0.0).end(Counter(), 64)
        clean.end(OperationSummary(Outcome.SUCCESS, 1, 1, 0, 0, 0.0, 64))

        clock.advance(5)
        retried = obs_b.operation(Operation.PUT, 3)
        retried.attempt(0, 1, 3, 0.0).end(Counter({ErrorCode.SEGMENT_NOT_FOUND: 1}), 200)
        clock.advance()
        retried.attempt(0, 2, 1, 0.25).end(Counter(), 100, RoutingReport(steered=True))
        clock.advance(2)
        retried.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 2, 2, 1, 0, 0.25, 300))
    finally:
        trainer.shutdown()
        loader.shutdown()
    return [line for name in ("traces-a.jsonl", "traces-b.jsonl") for line in (folder / name).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ OTLP -> Jaeger
# Written from Jaeger's model, not copied: the Collector-contrib translator (pkg/translator/jaeger: resource
# service.name -> process serviceName, other resource attributes -> process tags, span kind -> span.kind, status
# ERROR -> otel.status_code + error=true, scope -> otel.scope.*, arrays -> their JSON as a string), Jaeger's
# collector (internal.span.format) and the query API's JSON (model/converter/json/from_domain.go: microseconds,
# TraceID.String() drops the zero high half, typed tag values as Go's encoding/json writes them).

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def raw(value: dict[str, Any]) -> Any:
    if "arrayValue" in value:
        return [raw(v) for v in value["arrayValue"].get("values", [])]
    for kind in ("stringValue", "boolValue", "doubleValue"):
        if kind in value:
            return value[kind]
    return int(value["intValue"])


def go_float(x: float) -> float | int:
    """What Go's encoding/json writes for a float64, as Python reads it back: ``1.0`` is written ``1``."""
    return int(x) if x.is_integer() and abs(x) < 1e21 else x


def jaeger_tag(key: str, value: dict[str, Any]) -> dict[str, Any]:
    if "stringValue" in value:
        return {"key": key, "type": "string", "value": value["stringValue"]}
    if "boolValue" in value:
        return {"key": key, "type": "bool", "value": value["boolValue"]}
    if "intValue" in value:
        n = int(value["intValue"])
        return {"key": key, "type": "int64", "value": n if abs(n) < 2**53 else str(n)}
    if "doubleValue" in value:
        return {"key": key, "type": "float64", "value": go_float(float(value["doubleValue"]))}
    return {"key": key, "type": "string", "value": json.dumps(raw(value), separators=(",", ":"))}


def jaeger_trace_id(hex32: str) -> str:
    return hex32[16:] if int(hex32[:16], 16) == 0 else hex32


def to_jaeger(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The traces of Jaeger's ``/api/traces`` answer for the spans of these OTLP ``ExportTraceServiceRequest``s."""
    traces: dict[str, dict[str, Any]] = {}
    for request in requests:
        for rs in request["resourceSpans"]:
            attrs = {kv["key"]: kv["value"] for kv in rs["resource"].get("attributes", [])}
            process = {
                "serviceName": attrs.get("service.name", {}).get("stringValue", ""),
                "tags": [jaeger_tag(k, v) for k, v in attrs.items() if k != "service.name"],
            }
            for ss in rs["scopeSpans"]:
                scope = [{"key": "otel.scope.name", "type": "string", "value": ss["scope"]["name"]}]
                if ss["scope"].get("version"):
                    scope.append({"key": "otel.scope.version", "type": "string", "value": ss["scope"]["version"]})
                for span in ss["spans"]:
                    trace_id = jaeger_trace_id(span["traceId"])
                    trace = traces.setdefault(trace_id, {"traceID": trace_id, "spans": [], "processes": {}})
                    pid = next((k for k, p in trace["processes"].items() if p == process), None)
                    if pid is None:  # Jaeger's processHashtable: p1, p2, ... per distinct process in the trace
                        pid = f"p{len(trace['processes']) + 1}"
                        trace["processes"][pid] = process
                    tags = scope + [jaeger_tag(kv["key"], kv["value"]) for kv in span.get("attributes", [])]
                    tags.append({"key": "span.kind", "type": "string", "value": KINDS[span["kind"]]})
                    if span.get("status", {}).get("code") == 2:
                        tags.append({"key": "otel.status_code", "type": "string", "value": "ERROR"})
                        tags.append({"key": "error", "type": "bool", "value": True})
                    message = span.get("status", {}).get("message")
                    if message:
                        tags.append({"key": "otel.status_description", "type": "string", "value": message})
                    tags.append({"key": "internal.span.format", "type": "string", "value": "otlp"})
                    start_ns, end_ns = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
                    parent = span.get("parentSpanId")
                    refs = [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent}] if parent else []
                    trace["spans"].append(
                        {
                            "traceID": trace_id,
                            "spanID": span["spanId"],
                            "operationName": span["name"],
                            "references": refs,
                            "startTime": start_ns // 1000,
                            "duration": (end_ns - start_ns) // 1000,
                            "tags": tags,
                            "logs": [],
                            "processID": pid,
                            "warnings": None,
                        }
                    )
    for trace in traces.values():
        trace["warnings"] = None
    return list(traces.values())


@pytest.fixture
def lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return emit(tmp_path, monkeypatch)


@pytest.fixture
def traces(lines: list[str]) -> list[dict[str, Any]]:
    """The Jaeger JSON of ``lines``, through a JSON round trip (what a client reads)."""
    return json.loads(json.dumps(to_jaeger([json.loads(line) for line in lines])))


def otlp_records(lines: list[str]) -> list:
    return sorted((r for line in lines for r in parse_spans_line(line)), key=lambda r: r.span_id)


def jaeger_records(traces: list[dict[str, Any]]) -> list:
    return sorted((r for t in traces for r in jaeger_spans(t)), key=lambda r: r.span_id)


def test_real_spans_read_from_jaeger_equal_the_otlp_reading(lines, traces):
    otlp, jaeger = otlp_records(lines), jaeger_records(traces)
    assert len(otlp) == 4 + 9  # operations and attempts; the caller's span is not read
    assert jaeger == otlp
    assert {len(t["traceID"]) for t in traces} == {16, 32}  # Jaeger dropped the first trace id's zero half
    first = [r for r in jaeger if r.trace_id == f"{FIRST_TRACE:032x}"]
    assert len(first) == 6 and all(r.span_id.startswith("0000000000000a") for r in first)
    op = next(r for r in first if r.name == "mooncake.get")
    assert op.parent_id == "0000000000000a01"  # the caller's span, though not read
    assert op.error and op.attrs["mooncake.outcome"] == "exhausted" and op.attrs["mooncake.keys.failed"] == "2"
    assert "span.kind" not in op.attrs and "otel.status_code" not in op.attrs and "error" not in op.attrs
    assert op.origin == (("host", "node-a"), ("process", "4242"), ("service", "trainer"))
    attempts = [r for r in first if r.parent_id == op.span_id]
    by_attempt = {(r.attrs["mooncake.chunk"], r.attrs["mooncake.attempt"]): r for r in attempts}
    assert by_attempt[("0", "2")].attrs["mooncake.error.codes"] == "RPC_TIMEOUT,TRANSFER_FAIL"
    assert [by_attempt[("0", n)].attrs["mooncake.backoff_s"] for n in "123"] == ["0.0", "0.0005", "1.0"]
    loss = by_attempt[("1", "1")].attrs
    assert (loss["server.address"], loss["server.port"], loss["mooncake.nodes.down"]) == ("127.0.0.1", "12345", "1")
    assert by_attempt[("1", "2")].error is False and "mooncake.error.codes" not in by_attempt[("1", "2")].attrs
    steered = next(r for r in jaeger if r.attrs.get("mooncake.steered"))
    assert steered.attrs["mooncake.steered"] == "True" and steered.origin[0] == ("host", "node-b")
    assert op.end - op.start == pytest.approx(16 / 64)  # the fake clock's ticks, exactly microseconds


def test_books_from_either_source_hold_the_same_calls(lines, traces):
    from_otlp, from_jaeger = FailureBook(), FailureBook()
    from_otlp.add(otlp_records(lines))
    for trace in reversed(traces):  # another order: attempts may come first
        from_jaeger.add(list(reversed(jaeger_spans(trace))))
    everything = (0, math.inf, SHOWN_OUTCOMES)
    calls = from_jaeger.select(*everything)
    assert calls == from_otlp.select(*everything)
    assert [c.outcome for c in calls] == ["success_after_retry", "budget_denied", "exhausted"]  # newest first
    exhausted = calls[2]
    assert exhausted.complete and exhausted.error_type == "TRANSFER_FAIL" and exhausted.keys == 8
    assert [(a.chunk, a.number) for a in exhausted.attempts] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    node_loss = exhausted.attempts[3]
    assert (node_loss.endpoint, node_loss.nodes_down, node_loss.fallbacks, node_loss.unreachable) == (
        "127.0.0.1:12345",
        1,
        3,
        1,
    )
    assert node_loss.codes == ("REPLICA_UNREACHABLE", "TRANSFER_FAIL") and node_loss.duration == 2 / 64
    assert exhausted.codes == ("REPLICA_UNREACHABLE", "RPC_TIMEOUT", "TRANSFER_FAIL")
    assert [c.outcome for c in from_jaeger.select(*everything[:2])] == ["budget_denied", "exhausted"]


def test_tag_values_read_as_the_otlp_reader_writes_them():
    cases = [
        ({"type": "int64", "value": 5}, "5"),
        ({"type": "int64", "value": "9007199254740993"}, "9007199254740993"),  # past 2**53 Jaeger sends a string
        ({"type": "float64", "value": 1}, "1.0"),
        ({"type": "float64", "value": 0.0005}, "0.0005"),
        ({"type": "bool", "value": False}, "False"),
        ({"type": "bool", "value": "true"}, "True"),  # the string-valued form (FromDomainEmbedProcess)
        ({"type": "string", "value": '["A","B"]'}, "A,B"),
        ({"type": "string", "value": "[1,true,2.5]"}, "1,True,2.5"),
        ({"type": "string", "value": "[not json]"}, "[not json]"),
        ({"type": "string", "value": '[{"a":1}]'}, '[{"a":1}]'),
        ({"value": "plain"}, "plain"),
    ]
    assert [tag_text({"key": "k", **tag}) for tag, _ in cases] == [text for _, text in cases]
    with pytest.raises(ValueError):
        tag_text({"key": "k", "type": "int64", "value": 1.5})


def test_a_malformed_trace_is_a_value_error(traces):
    span = next(s for s in traces[0]["spans"] if s["operationName"] == "mooncake.get")
    for broken in (
        "not a trace",
        {"spans": "nope"},
        {**traces[0], "processes": {}},  # processID points nowhere
        {**traces[0], "spans": [{**span, "spanID": "xyz"}]},
        {**traces[0], "spans": [{**span, "traceID": "1" * 33}]},
        {**traces[0], "spans": [{**span, "startTime": "soon"}]},
        {**traces[0], "spans": [{**span, "tags": [{"key": "k", "type": "int64", "value": "x"}]}]},
    ):
        with pytest.raises(ValueError):
            jaeger_spans(broken)
    other = {"traceID": "1", "spans": [{"operationName": "train.step"}]}  # not ours: not read at all
    assert jaeger_spans(other) == []
    embedded = {**span, "process": traces[0]["processes"][span["processID"]], "processID": None}
    legacy = {**embedded, "references": [], "parentSpanID": span["references"][0]["spanID"]}
    (a,), (b,) = jaeger_spans({"spans": [embedded]}), jaeger_spans({"spans": [legacy]})
    assert a == b == next(r for r in jaeger_spans(traces[0]) if r.name == "mooncake.get")


# ------------------------------------------------------------------------------------------------ stand-in Jaeger


def as_string(tag: dict[str, Any]) -> str:
    """model.KeyValue.AsString(), for the tag filter."""
    value = tag["value"]
    return ("true" if value else "false") if tag["type"] == "bool" else str(value)


class StandInServer(ThreadingHTTPServer):
    """A listen backlog for a source's parallel requests: at the default 5, connections past it wait for the
    client's SYN to be retried (1 s later)."""

    request_queue_size = 128


class StandInJaeger:
    """Jaeger's query API (1.65's routes and envelope) over ``traces``, searching them as its memory store does:
    a trace matches when one span of the service started in [start, end] (µs) with every tag (span and process
    tags); at most ``limit``, the newest by first span. ``mode``: ``ok``, ``500``, ``text``, ``hang``. ``before``
    is called with each request's path and parameters before it is answered: it may wait (on ``release``, set at
    the end) and may return the answer to send instead (status, body)."""

    def __init__(self, traces: list[dict[str, Any]]) -> None:
        self.traces = traces
        self.junk: list[Any] = []  # appended to every /api/traces answer
        self.extra_services = ["jaeger-all-in-one"]
        self.mode = "ok"
        self.before: Callable[[str, dict[str, str]], tuple[int, bytes] | None] = lambda path, params: None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.in_flight = self.most_in_flight = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                with stand_in._lock:
                    stand_in.requests.append((url.path, params))
                    stand_in.in_flight += 1
                    stand_in.most_in_flight = max(stand_in.most_in_flight, stand_in.in_flight)
                try:
                    status, body = stand_in.before(url.path, params) or stand_in.answer(url.path, params)
                finally:
                    with stand_in._lock:
                        stand_in.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (the hang mode)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = StandInServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close() joins the handler threads
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), name="stand-in-jaeger")

    def __enter__(self) -> StandInJaeger:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def asked(self, path: str) -> list[dict[str, str]]:
        with self._lock:
            return [params for p, params in self.requests if p == path]

    @staticmethod
    def envelope(data: Any, errors: Any = None) -> bytes:
        return json.dumps({"data": data, "total": len(data or []), "limit": 0, "offset": 0, "errors": errors}).encode()

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, bytes]:
        if self.mode == "500":
            return 500, self.envelope(None, [{"code": 500, "msg": "storage is on fire"}]) + b"\n"
        if self.mode == "text":
            return 200, b"<html>not the API</html>"
        if self.mode == "hang":
            self.release.wait(10)
            return 200, self.envelope([])
        if path == "/api/services":
            names = {p["serviceName"] for t in self.traces for p in t["processes"].values()}
            return 200, self.envelope(sorted(names) + self.extra_services)
        if path == "/api/operations":
            if not params.get("service"):
                return 400, self.envelope(None, [{"code": 400, "msg": "parameter 'service' is required"}])
            return 200, self.envelope(
                [{"name": n, "spanKind": ""} for n in sorted(self.operations(params["service"]))]
                or [{"name": "/api/services", "spanKind": "server"}]
            )
        if path == "/api/traces":
            try:
                tags = json.loads(params.get("tags", "{}"))
            except ValueError as exc:
                return 400, self.envelope(None, [{"code": 400, "msg": f"malformed 'tags' parameter: {exc}"}])
            start, end, limit = int(params["start"]), int(params["end"]), int(params.get("limit", 100))
            found = [t for t in self.traces if self.matches(t, params["service"], tags, start, end)]
            if limit > 0 and len(found) > limit:
                found = sorted(found, key=lambda t: t["spans"][0]["startTime"])[-limit:]
            return 200, self.envelope(found + self.junk)
        return 404, b"404 page not found\n"

    def operations(self, service: str) -> set[str]:
        return {
            s["operationName"]
            for t in self.traces
            for s in t["spans"]
            if t["processes"][s["processID"]]["serviceName"] == service
        }

    @staticmethod
    def matches(trace: dict[str, Any], service: str, tags: dict[str, str], start: int, end: int) -> bool:
        for span in trace["spans"]:
            process = trace["processes"][span["processID"]]
            if process["serviceName"] != service or not start <= span["startTime"] <= end:
                continue
            kvs = span["tags"] + process["tags"]
            if all(any(kv["key"] == k and as_string(kv) == v for kv in kvs) for k, v in tags.items()):
                return True
        return False


def no_source_threads() -> bool:
    return not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


@pytest.fixture
def jaeger(traces: list[dict[str, Any]]) -> Iterator[StandInJaeger]:
    """A started stand-in; at the end, stopped, and the sources' threads that asked it ended too (bounded: each
    request ends by its load's deadline)."""
    with StandInJaeger(traces) as server:
        yield server
    wait_until(no_source_threads, 5, "the Jaeger sources' threads to end")


START, END = BASE_NS / 1e9 - 30, BASE_NS / 1e9 + 30


def test_the_source_lists_the_failed_calls_newest_first_with_their_attempts(jaeger, lines):
    source = JaegerSource(jaeger.url, ui_url=UI + "/", lookback_s=60)
    snap = source.load(START, END, FAILED)
    assert snap.error is None and snap.description == f"Jaeger at {jaeger.url}"
    expected = FailureBook()
    expected.add(otlp_records(lines))
    assert snap.calls == expected.select(START, END, FAILED)
    assert [(c.operation, c.outcome, len(c.attempts)) for c in snap.calls] == [
        ("put", "budget_denied", 1),
        ("get", "exhausted", 5),
    ]
    assert snap.link is not None
    assert snap.link.replace("{trace_id}", snap.calls[1].trace_id) == f"{UI}/trace/{FIRST_TRACE:032x}"
    assert "2 Jaeger service(s) with mooncake spans" in snap.notice

    assert sorted(p["service"] for p in jaeger.asked("/api/operations")) == ["jaeger-all-in-one", "loader", "trainer"]
    searched = jaeger.asked("/api/traces")
    assert {(p["service"], json.loads(p["tags"])["mooncake.outcome"]) for p in searched} == {
        (s, o) for s in ("loader", "trainer") for o in FAILED
    }
    assert len(searched) == 2 * len(FAILED)
    assert {(p["start"], p["end"], p["limit"]) for p in searched} == {
        (str(math.floor((START - 60) * 1e6)), str(math.ceil(END * 1e6)), "50")
    }
    assert all(set(json.loads(p["tags"])) == {"mooncake.outcome"} for p in searched)

    retried = source.load(START, END, ["success_after_retry"])
    assert [(c.outcome, c.who("service"), c.attempt_count) for c in retried.calls] == [
        ("success_after_retry", "loader", 2)
    ]
    assert source.load(START, BASE_NS / 1e9, FAILED).calls == []  # both ended after that
    assert source.load(START, END, ["success"]).calls == []  # never listed: not even searched
    assert len(jaeger.asked("/api/traces")) == 2 * (2 * len(FAILED)) + 2


def test_the_search_window_reaches_back_for_calls_that_started_before_it(jaeger):
    call_end = BASE_NS / 1e9 + 16 / 64  # the exhausted get: it started at BASE_NS
    narrow = JaegerSource(jaeger.url, lookback_s=0.0).load(call_end - 0.01, call_end, ["exhausted"])
    wide = JaegerSource(jaeger.url, lookback_s=1.0).load(call_end - 0.01, call_end, ["exhausted"])
    assert narrow.calls == [] and [c.outcome for c in wide.calls] == ["exhausted"]


def test_the_services_are_kept_for_a_while(jaeger):
    cached = JaegerSource(jaeger.url)
    for _ in range(3):
        assert len(cached.load(START, END).calls) == 2
    assert len(jaeger.asked("/api/services")) == 1 and len(jaeger.asked("/api/operations")) == 3
    fresh = JaegerSource(jaeger.url, services_ttl_s=0)
    fresh.load(START, END)
    fresh.load(START, END)
    assert len(jaeger.asked("/api/services")) == 3
    jaeger.mode = "500"
    assert cached.load(START, END).error is not None
    jaeger.mode = "ok"
    assert len(cached.load(START, END).calls) == 2
    assert len(jaeger.asked("/api/services")) == 4  # asked again after the failure (a search's)


def test_at_most_max_services_are_searched(jaeger):
    snap = JaegerSource(jaeger.url, max_services=1).load(START, END, SHOWN_OUTCOMES)
    assert {p["service"] for p in jaeger.asked("/api/traces")} == {"loader"}
    assert [c.outcome for c in snap.calls] == ["success_after_retry"]
    assert "1 service(s) with mooncake spans left out" in snap.notice


def test_failures_of_jaeger_are_errors_never_exceptions(jaeger):
    port = free_port()
    down = JaegerSource(f"http://127.0.0.1:{port}", timeout_s=2).load(START, END)
    assert down.calls == [] and f"cannot reach Jaeger at http://127.0.0.1:{port}" in (down.error or "")
    assert down.link == f"http://127.0.0.1:{port}/trace/{{trace_id}}"
    source = JaegerSource(jaeger.url, services_ttl_s=0)
    jaeger.mode = "500"
    snap = source.load(START, END)
    assert snap.calls == [] and snap.error is not None
    assert "HTTP 500" in snap.error and "storage is on fire" in snap.error
    jaeger.mode = "text"
    assert "did not answer JSON" in (source.load(START, END).error or "")
    jaeger.mode = "ok"
    small = JaegerSource(jaeger.url, max_bytes=50).load(START, END)  # /api/services is larger
    assert "/api/services answered more than 50 bytes" in (small.error or "")
    jaeger.mode = "hang"
    hung = JaegerSource(jaeger.url, timeout_s=0.2).load(START, END)
    assert hung.calls == [] and "did not answer within 0.2 s" in (hung.error or "")
    began = time.monotonic()
    spent = JaegerSource(jaeger.url, timeout_s=5, budget_s=0.3).load(START, END)
    assert time.monotonic() - began < 0.3 + MARGIN_S
    assert spent.calls == [] and "/api/services did not answer within the load's 0.3 s" in (spent.error or "")


def test_malformed_traces_are_skipped_and_counted(jaeger, traces):
    bad = json.loads(json.dumps(traces[0]))
    bad["traceID"] = "bad"
    bad["spans"][1]["spanID"] = "not-hex"
    jaeger.junk = ["not a trace", bad, {"traceID": ["unhashable"], "spans": []}]  # the last one has no spans: fine
    snap = JaegerSource(jaeger.url).load(START, END)
    assert snap.error is None and [c.outcome for c in snap.calls] == ["budget_denied", "exhausted"]
    assert f"{2 * 2 * len(FAILED)} malformed trace(s) skipped" in snap.notice and "not-hex" in snap.notice


def test_the_url_is_checked():
    for bad in ("ftp://jaeger:21", "jaeger:16686", "", "http://", "file:///etc/passwd", "http://j:16686/?x=1"):
        with pytest.raises(ValueError, match="--jaeger must be an http"):
            JaegerSource(bad)
    for bad in ("http://jaeger:0", "http://jaeger:99999", "http://jaeger:port/"):
        with pytest.raises(ValueError, match="--jaeger must be an http"):
            JaegerSource(bad)
    for bad in ("http://user:secret@jaeger:16686", "https://secret@jaeger/", "http://:secret@jaeger"):
        with pytest.raises(ValueError, match="--jaeger: credentials in the URL are not supported") as caught:
            JaegerSource(bad)
        assert "secret" not in str(caught.value) and "***@jaeger" in str(caught.value)
    with pytest.raises(ValueError, match="--jaeger-ui: credentials in the URL"):
        JaegerSource("http://jaeger:16686", ui_url="http://admin:secret@ui.example")
    with pytest.raises(ValueError, match="--jaeger-ui must be an http"):
        JaegerSource("http://jaeger:16686", ui_url="javascript:alert(1)")
    source = JaegerSource("https://jaeger.example/base/", timeout_s=1)
    assert source.link == "https://jaeger.example/base/trace/{trace_id}" and source.url == "https://jaeger.example/base"
    with pytest.raises(ValueError):
        JaegerSource("http://jaeger:16686", limit=0)
    with pytest.raises(ValueError):
        JaegerSource("http://jaeger:16686", budget_s=0)


def test_braces_in_the_ui_url_stay_literal_in_the_link():
    source = JaegerSource("http://jaeger:16686", ui_url="http://ui.example/{x}/jaeger/")
    assert source.link.replace("{trace_id}", "ab12") == "http://ui.example/{x}/jaeger/trace/ab12"


# ------------------------------------------------------------------------------------------------ slow or failing

MARGIN_S = 0.4  # past a budget, for a loaded machine


def test_a_search_slower_than_the_budget_is_abandoned(jaeger):
    def before(path: str, params: dict[str, str]) -> None:
        if path == "/api/traces" and params["service"] == "trainer" and "budget_denied" in params["tags"]:
            jaeger.release.wait(10)

    jaeger.before = before
    began = time.monotonic()
    snap = JaegerSource(jaeger.url, timeout_s=5, budget_s=0.5).load(START, END)
    assert time.monotonic() - began < 0.5 + MARGIN_S
    assert snap.error is None and [c.outcome for c in snap.calls] == ["exhausted"]
    assert f"1 of {2 * len(FAILED)} search(es) did not answer within 0.5 s" in snap.notice
    wait_until(no_source_threads, 0.5 + MARGIN_S, "the abandoned search to end (its request has the load's deadline)")


def test_the_searches_run_in_parallel(jaeger):
    def before(path: str, params: dict[str, str]) -> None:
        if path == "/api/traces":
            jaeger.release.wait(0.2)

    jaeger.before = before
    began = time.monotonic()
    snap = JaegerSource(jaeger.url, workers=8).load(START, END)
    elapsed = time.monotonic() - began
    assert snap.error is None and len(snap.calls) == 2 and snap.notice == "2 Jaeger service(s) with mooncake spans"
    assert elapsed < 2 * len(FAILED) * 0.2 / 2  # one after another: 8 x 0.2 s
    assert jaeger.most_in_flight >= 4


def test_a_failing_search_among_others_is_a_notice_not_an_error(jaeger):
    down = StandInJaeger.envelope(None, [{"code": 500, "msg": "shard 3 is down"}])
    jaeger.before = lambda path, params: (
        (500, down) if params.get("service") == "loader" and path == "/api/traces" else None
    )
    snap = JaegerSource(jaeger.url).load(START, END)
    assert snap.error is None and [c.outcome for c in snap.calls] == ["budget_denied", "exhausted"]
    assert f"{len(FAILED)} of {2 * len(FAILED)} search(es) failed, the last: " in snap.notice
    assert "/api/traces answered HTTP 500 shard 3 is down" in snap.notice


def test_a_service_whose_operations_fail_is_left_out_and_asked_again(jaeger):
    down = StandInJaeger.envelope(None, [{"code": 503, "msg": "busy"}])
    jaeger.before = lambda path, params: (503, down) if params.get("service") == "loader" else None
    source = JaegerSource(jaeger.url)
    snap = source.load(START, END, SHOWN_OUTCOMES)
    assert snap.error is None and [c.outcome for c in snap.calls] == ["budget_denied", "exhausted"]
    assert "1 service(s) left out: their operations could not be looked up (the last: " in snap.notice
    assert "answered HTTP 503 busy" in snap.notice
    jaeger.before = lambda path, params: None
    again = source.load(START, END, SHOWN_OUTCOMES)  # not kept: asked again, and now complete
    assert [c.outcome for c in again.calls] == ["success_after_retry", "budget_denied", "exhausted"]
    assert len(jaeger.asked("/api/services")) == 2


def test_a_slow_jaeger_does_not_hold_other_loads_on_the_lock(jaeger):
    slowed = [True]  # the first /api/services only

    def before(path: str, params: dict[str, str]) -> None:
        if path == "/api/services" and slowed:
            slowed.clear()
            jaeger.release.wait(10)

    jaeger.before = before
    source = JaegerSource(jaeger.url, timeout_s=5)
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(source.load(START, END)), name="first-load")
    thread.start()
    try:
        wait_until(lambda: len(jaeger.asked("/api/services")) == 1, 5, "the first load's /api/services")
        began = time.monotonic()
        second = source.load(START, END)
        assert time.monotonic() - began < 1.0 and thread.is_alive()  # the first still waits on its request
        assert second.error is None and len(second.calls) == 2
    finally:
        jaeger.release.set()
        thread.join(10)
    assert not thread.is_alive() and first[0].error is None and len(first[0].calls) == 2


def test_every_call_found_is_listed_not_only_limit(jaeger):
    snap = JaegerSource(jaeger.url, limit=1).load(START, END)  # one trace per search, two searches found one
    assert [c.outcome for c in snap.calls] == ["budget_denied", "exhausted"]
    assert "search(es) returned the most traces asked for (1)" in snap.notice


def to_jaeger_minimal() -> dict[str, Any]:
    return {
        "traceID": "abc",
        "spans": [
            {
                "traceID": "abc",
                "spanID": "1",
                "operationName": "mooncake.clear",
                "references": [],
                "startTime": 1_000_000,
                "duration": 5,
                "tags": [{"key": "mooncake.outcome", "type": "string", "value": "non_retryable"}],
                "processID": "p1",
            }
        ],
        "processes": {"p1": {"serviceName": NO_SERVICE, "tags": []}},
    }


NO_SERVICE = "OTLPResourceNoServiceName"


def test_ids_are_full_width_and_a_nameless_resource_has_no_service():
    (record,) = jaeger_spans(to_jaeger_minimal())
    assert (record.trace_id, record.span_id, record.parent_id) == ("0" * 29 + "abc", "0" * 15 + "1", "")
    assert record.origin == () and (record.start, record.end) == (1.0, 1.000005) and not record.error
    flagged = to_jaeger_minimal()
    flagged["spans"][0]["tags"].append({"key": "error", "type": "bool", "value": True})  # no otel.status_code
    assert jaeger_spans(flagged)[0].error
