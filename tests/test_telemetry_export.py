"""Export on the wire: OTLP over gRPC and HTTP to a real receiver started here, ``configure()`` from the
environment in a child process (once per process, flush at exit, OTLP JSON-lines files), and the Prometheus
scrape endpoint."""

from __future__ import annotations

import gzip
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.client.replica_routing import RoutingReport
from tq_mooncake.cluster import free_port, wait_until
from tq_mooncake.telemetry import OTelObserver, conventions, metric_views
from tq_mooncake.telemetry.pipeline import _otlp_exporters, build_resource

TraceRequest = trace_service_pb2.ExportTraceServiceRequest
MetricsRequest = metrics_service_pb2.ExportMetricsServiceRequest
ALL_METRICS = set(conventions.UNITS)
REPO = Path(__file__).resolve().parents[1]


class Receiver:
    """A real OTLP receiver on 127.0.0.1: gRPC ``TraceService``/``MetricsService`` and HTTP ``/v1/traces``,
    ``/v1/metrics`` (protobuf, optionally gzip). Keeps every request it is sent."""

    def __init__(self) -> None:
        self.requests: list[Message] = []
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: TraceRequest, context: Any) -> Any:  # noqa: N802 - the gRPC method name
                receiver._keep(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: MetricsRequest, context: Any) -> Any:  # noqa: N802
                receiver._keep(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Http(BaseHTTPRequestHandler):
            routes = {
                "/v1/traces": (TraceRequest, trace_service_pb2.ExportTraceServiceResponse),
                "/v1/metrics": (MetricsRequest, metrics_service_pb2.ExportMetricsServiceResponse),
            }

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path not in self.routes:
                    self.send_error(404)
                    return
                request_type, response_type = self.routes[self.path]
                request = request_type()
                request.ParseFromString(body)
                receiver._keep(request)
                payload = response_type().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
        self.http_port = self._http.server_address[1]

    def _keep(self, request: Message) -> None:
        with self._lock:
            self.requests.append(request)

    def start(self) -> Receiver:
        self._grpc.start()
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None).wait(10)

    def endpoint(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """``(resource attributes, span)`` for every span received."""
        with self._lock:
            reqs = [r for r in self.requests if isinstance(r, TraceRequest)]
        return [item for r in reqs for item in spans_of(r)]

    def metrics(self) -> list[tuple[dict[str, Any], Any]]:
        """``(resource attributes, metric)`` for every metric received."""
        with self._lock:
            reqs = [r for r in self.requests if isinstance(r, MetricsRequest)]
        return [item for r in reqs for item in metrics_of(r)]


def spans_of(request: Any) -> list[tuple[dict[str, Any], Any]]:
    return [
        (attributes(rs.resource.attributes), s)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]


def metrics_of(request: Any) -> list[tuple[dict[str, Any], Any]]:
    return [
        (attributes(rm.resource.attributes), m)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    ]


def attributes(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        value = getattr(kv.value, which) if which else None
        out[kv.key] = [v.string_value for v in value.values] if which == "array_value" else value
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    try:
        yield started
    finally:
        started.stop()


def drive(observer: OTelObserver) -> None:
    """One ``put`` of 10 keys whose first attempt fails 3 with TRANSFER_FAIL (on a storage endpoint found down and
    ejected) and whose steered retry succeeds; 2 keys got fewer replicas than asked."""
    scope = observer.operation(Operation.PUT, 10)
    down = RoutingReport(down={"127.0.0.1:9"}, fallbacks=Counter({"127.0.0.1:9": 1}))
    scope.attempt(0, 1, 10, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 3}), 700, down)
    observer.node_ejected("127.0.0.1:9")
    scope.attempt(0, 2, 3, 0.01).end(Counter(), 300, RoutingReport(steered=True))
    scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 2, 7, 3, 0, 0.01, 1000, keys_under_replicated=2))


DRIVE_SOURCE = textwrap.dedent(
    """
    from collections import Counter
    from tq_mooncake.client import ErrorCode, Operation, Outcome
    from tq_mooncake.client.observer import OperationSummary
    from tq_mooncake.client.replica_routing import RoutingReport

    def drive(observer):
        scope = observer.operation(Operation.PUT, 10)
        down = RoutingReport(down={"127.0.0.1:9"}, fallbacks=Counter({"127.0.0.1:9": 1}))
        scope.attempt(0, 1, 10, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 3}), 700, down)
        observer.node_ejected("127.0.0.1:9")
        scope.attempt(0, 2, 3, 0.01).end(Counter(), 300, RoutingReport(steered=True))
        scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 2, 7, 3, 0, 0.01, 1000, keys_under_replicated=2))
    """
)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TQ_MOONCAKE_"))}
    env.update(extra)
    return env


def run_child(script: str, env: dict[str, str], timeout: float = 60, with_drive: bool = True) -> dict[str, Any]:
    """Run ``script`` (after DRIVE_SOURCE unless not ``with_drive``) in a fresh interpreter; its last stdout
    line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", (DRIVE_SOURCE if with_drive else "") + textwrap.dedent(script)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_put_spans(spans: list[Any]) -> None:
    """The driven put: one operation span and two attempt spans under it, the first an error."""
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (root,) = by_name["mooncake.put"]
    first, second = sorted(by_name["mooncake.put.attempt"], key=lambda s: attributes(s.attributes)["mooncake.attempt"])
    assert root.kind == root.SPAN_KIND_INTERNAL and first.kind == first.SPAN_KIND_CLIENT
    assert first.parent_span_id == second.parent_span_id == root.span_id
    assert first.trace_id == second.trace_id == root.trace_id
    assert attributes(root.attributes)["mooncake.outcome"] == "success_after_retry"
    assert root.status.code == root.status.STATUS_CODE_UNSET
    assert first.status.code == first.status.STATUS_CODE_ERROR
    assert attributes(first.attributes)["error.type"] == "TRANSFER_FAIL"
    assert attributes(first.attributes)["mooncake.error.codes"] == ["TRANSFER_FAIL"]


def counter_value(metrics: list[Any], name: str, **attrs: Any) -> float:
    for metric in metrics:
        if metric.name == name:
            for dp in metric.sum.data_points:
                if attributes(dp.attributes) == attrs:
                    return dp.as_int or dp.as_double
    raise AssertionError(f"no {name} point with {attrs}")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_exporters_deliver_spans_and_metrics_to_a_real_receiver(receiver, protocol):
    span_exporter, metric_exporter = _otlp_exporters(receiver.endpoint(protocol), protocol)
    resource = build_resource("wire-test")
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=600_000)
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource, views=metric_views())
    try:
        observer = OTelObserver(tracer_provider, meter_provider, budget_tokens=lambda: 4.0, ejected_nodes=lambda: 1)
        drive(observer)
        assert tracer_provider.force_flush(10_000) and meter_provider.force_flush(10_000)
        wait_until(lambda: len(receiver.spans()) >= 3 and receiver.metrics(), 10, "OTLP export")
        spans, metrics = receiver.spans(), [m for _, m in receiver.metrics()]  # before shutdown exports again
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()
    check_put_spans([s for _, s in spans])
    resource_attrs, _ = spans[0]
    assert resource_attrs["service.name"] == "wire-test"
    assert resource_attrs["host.name"] == socket.gethostname() and resource_attrs["process.pid"] == os.getpid()
    assert {m.name for m in metrics} == ALL_METRICS
    assert {m.name: m.unit for m in metrics} == conventions.UNITS
    op = {"mooncake.operation": "put"}
    assert counter_value(metrics, "mooncake.client.operations", **op, **{"mooncake.outcome": "success_after_retry"})
    assert counter_value(metrics, "mooncake.client.keys.failed", **op, **{"error.type": "TRANSFER_FAIL"}) == 3
    assert counter_value(metrics, "mooncake.client.bytes", **op) == 1000
    assert counter_value(metrics, "mooncake.client.keys.under_replicated", **op) == 2
    (budget,) = [m for m in metrics if m.name == "mooncake.client.retry.budget"]
    assert budget.gauge.data_points[0].as_double == 4.0
    (delay,) = [m for m in metrics if m.name == "mooncake.client.retry.delay"]
    assert list(delay.histogram.data_points[0].explicit_bounds) == list(conventions.DURATION_BUCKETS_S)


def parse_lines(path: Path, message: type[Message]) -> list[Message]:
    """Every line of an OTLP JSON-lines file, parsed as ``message`` (unknown field names are an error)."""
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        as_json = json.loads(line)
        assert set(as_json) == {"resourceSpans" if message is TraceRequest else "resourceMetrics"}
        out.append(json_format.Parse(line, message()))
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_configure_reads_the_environment_and_flushes_at_exit(receiver, tmp_path, protocol):
    env = child_env(
        OTEL_SERVICE_NAME="tq-env-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=ci",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_METRIC_EXPORT_INTERVAL="600000",  # nothing is exported before exit: the exit flush does it all
        OTEL_BSP_SCHEDULE_DELAY="600000",
        TQ_MOONCAKE_TELEMETRY_DIR=str(tmp_path / "telemetry"),
    )
    child = run_child(
        """
        import json, os
        from opentelemetry import metrics, trace
        from tq_mooncake.telemetry import OTelObserver, configure

        telemetry = configure()
        assert configure(otlp_endpoint="http://127.0.0.1:9", set_global=False) is telemetry  # once per process
        assert trace.get_tracer_provider() is telemetry.tracer_provider
        assert metrics.get_meter_provider() is telemetry.meter_provider
        observer = OTelObserver(budget_tokens=lambda: 4.0, ejected_nodes=lambda: 1)  # the global providers
        drive(observer)
        print(json.dumps({"pid": os.getpid(), "protocol": telemetry.otlp_protocol,
                          "files": [str(telemetry.trace_file), str(telemetry.metrics_file)],
                          "sampler": telemetry.tracer_provider.sampler.get_description(),
                          "retention": list(vars(telemetry.retention).values())}))
        """,
        env,
    )
    assert child["protocol"] == protocol
    assert child["sampler"] == "KeepFailuresSampler{clean_ratio=0.01}"  # the default: the driven put retried, kept
    assert child["retention"] == [32 << 20, 20, 768 << 20]
    # the child has exited: whatever the receiver and the files hold was flushed at exit
    spans = receiver.spans()
    assert len(spans) == 3, [s.name for _, s in spans]
    check_put_spans([s for _, s in spans])
    resource_attrs = spans[0][0]
    assert resource_attrs["service.name"] == "tq-env-test"
    assert resource_attrs["deployment.environment.name"] == "ci"
    assert resource_attrs["host.name"] == socket.gethostname() and resource_attrs["process.pid"] == child["pid"]
    assert {m.name for _, m in receiver.metrics()} == ALL_METRICS

    host = socket.gethostname()
    trace_file, metrics_file = map(Path, child["files"])
    assert trace_file == tmp_path / "telemetry" / f"traces-{host}-{child['pid']}.jsonl"
    assert metrics_file == tmp_path / "telemetry" / f"metrics-{host}-{child['pid']}.jsonl"
    from_file = [s for r in parse_lines(trace_file, TraceRequest) for _, s in spans_of(r)]
    assert sorted(s.name for s in from_file) == ["mooncake.put", "mooncake.put.attempt", "mooncake.put.attempt"]
    file_metrics = [m for r in parse_lines(metrics_file, MetricsRequest) for _, m in metrics_of(r)]
    assert {m.name for m in file_metrics} == ALL_METRICS
    first_line = json.loads(trace_file.read_text().splitlines()[0])
    span = first_line["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16  # OTLP JSON: hex ids, not base64


def test_configure_validates_its_settings_and_honours_the_sampler(tmp_path):
    env = child_env(OTEL_TRACES_SAMPLER="always_off")
    child = run_child(
        f"""
        import json
        from tq_mooncake.telemetry import configure

        import socket, threading
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        not_a_folder = {str(tmp_path / "file")!r}
        open(not_a_folder, "w").close()
        threads = threading.active_count()
        errors = []
        for kwargs in ({{"otlp_endpoint": "http://127.0.0.1:9", "otlp_protocol": "http/json"}},
                       {{"prometheus_port": 70000}}, {{"prometheus_port": "x"}},
                       {{"prometheus_port": busy.getsockname()[1]}},
                       {{"otlp_endpoint": "http://127.0.0.1:9", "telemetry_dir": not_a_folder}}):
            try:
                configure(**kwargs)
            except (ValueError, OSError) as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
        assert threading.active_count() == threads, "a failed configure() left threads running"
        telemetry = configure(telemetry_dir={str(tmp_path)!r}, service_name="argument-name")
        drive(telemetry.observer(ejected_nodes=lambda: 1))
        telemetry.shutdown()
        telemetry.shutdown()  # idempotent
        print(json.dumps({{"errors": errors, "files": [str(telemetry.trace_file), str(telemetry.metrics_file)],
                          "service": telemetry.resource.attributes["service.name"]}}))
        """,
        env,
    )
    assert [e.split(":")[0] for e in child["errors"]] == ["ValueError"] * 3 + ["OSError", "FileExistsError"]
    assert "http/json" in child["errors"][0] and "70000" in child["errors"][1]
    assert child["service"] == "argument-name"
    trace_file, metrics_file = map(Path, child["files"])
    assert not trace_file.exists() or trace_file.read_text() == ""  # always_off: no span recorded
    (request,) = parse_lines(metrics_file, MetricsRequest)
    assert {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics} >= {
        "mooncake.client.operations",
        "mooncake.client.attempts",
    }


def read_line(stream: Any, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no line from the child within {timeout}s") from None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_the_prometheus_endpoint_serves_translated_names_on_loopback():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVE_SOURCE
            + textwrap.dedent(
                """
                import sys
                from tq_mooncake.telemetry import configure
                telemetry = configure()
                # kept: the gauges hold it weakly
                observer = telemetry.observer(budget_tokens=lambda: 6.0, ejected_nodes=lambda: 1)
                drive(observer)
                print(telemetry.prometheus_port, flush=True)
                sys.stdin.readline()  # scraped; exit
                """
            ),
        ],
        env=child_env(TQ_MOONCAKE_PROMETHEUS_PORT=str(port), OTEL_SERVICE_NAME="prom-test"),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert int(read_line(proc.stdout, 30)) == port
        text = scrape(port)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    samples = {
        (
            sample.name,
            frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope_")),
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    put = {"mooncake_operation": "put"}
    assert value("mooncake_client_operations_total", **put, mooncake_outcome="success_after_retry") == 1
    assert value("mooncake_client_attempts_total", **put, mooncake_attempt="1", mooncake_result="partial") == 1
    assert value("mooncake_client_attempts_total", **put, mooncake_attempt="2", mooncake_result="ok") == 1
    assert value("mooncake_client_keys_total", **put, mooncake_result="retried_ok") == 3
    assert value("mooncake_client_keys_failed_total", **put, error_type="TRANSFER_FAIL") == 3
    assert value("mooncake_client_bytes_total", **put) == 1000
    assert value("mooncake_client_retry_budget") == 6
    assert value("mooncake_client_retry_delay_seconds_count", **put, mooncake_outcome="success_after_retry") == 1
    buckets = {
        dict(labels)["le"] for name, labels in samples if name == "mooncake_client_operation_duration_seconds_bucket"
    }
    assert buckets == {str(float(b)) for b in conventions.DURATION_BUCKETS_S} | {"+Inf"}
    assert any(name == "target_info" and ("service_name", "prom-test") in labels for name, labels in samples)


def test_importing_the_package_loads_neither_the_sdk_nor_the_client():
    """The client may import ``tq_mooncake.telemetry`` at module level (no cycle), and library use needs only
    the OpenTelemetry API."""
    child = run_child(
        """
        import json, sys
        import tq_mooncake.telemetry
        loaded = {"client": "tq_mooncake.client" in sys.modules}
        from tq_mooncake.client import MooncakeBatchClient
        from tq_mooncake.telemetry import OTelObserver
        OTelObserver()
        loaded["sdk"] = any(m.startswith("opentelemetry.sdk") for m in sys.modules)
        print(json.dumps(loaded))
        """,
        child_env(),
        with_drive=False,
    )
    assert child == {"client": False, "sdk": False}
