"""The fast OTLP JSON-lines span encoder writes exactly what the upstream file exporter writes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as upstream_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, set_span_in_context

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry.jsonl import JsonLinesSpanExporter, encode_spans

pytestmark = pytest.mark.pure


def recorded_spans() -> list:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "jsonl-test", "host.name": "h"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = OTelObserver(provider)
    ok = observer.operation(Operation.PUT, 3)
    ok.attempt(0, 1, 3, 0.0).end(Counter(), 192)
    ok.end(OperationSummary(Outcome.SUCCESS, 1, 3, 0, 0, 0.0, 192))
    bad = observer.operation(Operation.GET, 4)
    bad.attempt(0, 1, 4, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 3, ErrorCode.RPC_TIMEOUT: 1}), 0)
    bad.attempt(0, 2, 4, 0.0123).end(Counter({ErrorCode.TRANSFER_FAIL: 4}), 0)
    bad.end(OperationSummary(Outcome.EXHAUSTED, 2, 0, 0, 4, 0.0123, 0))
    tracer = provider.get_tracer("other-scope", "9.9", schema_url="https://example.com/schema")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))
    with tracer.start_as_current_span("remote-child", context=set_span_in_context(NonRecordingSpan(remote))) as s:
        s.set_attribute("flag", True)
        s.set_attribute("numbers", [1, 2, 3])
    with tracer.start_as_current_span("with-event") as s:  # events: left to the upstream encoder
        s.add_event("e", {"x": 1})
    with tracer.start_as_current_span("with-bytes") as s:
        s.set_attribute("nan", float("nan"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_the_encoding_equals_the_upstream_file_exporters():
    spans = recorded_spans()
    assert len(spans) == 8
    for batch in (spans[:6], spans[6:7], spans):  # ours alone, a fallback batch, a mixed batch
        assert encode_spans(batch) == upstream_encode(batch).to_dict()
    assert encode_spans([]) is None


def test_the_exporter_appends_one_parseable_line_per_export(tmp_path):
    spans = recorded_spans()
    path = tmp_path / "traces.jsonl"
    exporter = JsonLinesSpanExporter(path)
    exporter.export(spans[:3])
    exporter.export(spans[3:6])
    exporter.shutdown()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [encode_spans(spans[:3]), encode_spans(spans[3:6])]
    assert exporter.export(spans[:1]).name == "FAILURE"  # after shutdown
