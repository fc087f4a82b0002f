"""Spans and metrics of the OpenTelemetry observer: exact span trees and metric values, on a real store with
faults injected, read back through the SDK's in-memory exporter and reader."""

from __future__ import annotations

import gc
import io
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from opentelemetry.exporter.otlp.json.file import FileMetricExporter, FileSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tq_mooncake.client import (
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    MooncakeBatchClient,
    NonRetryableError,
    Operation,
    Outcome,
    RetriesExhaustedError,
)
from tq_mooncake.client.observer import NOOP_OBSERVER, OperationSummary
from tq_mooncake.telemetry import OTelObserver, conventions
from tq_mooncake.testing import RecordingObserver

BACKOFF = 0.005  # initial_backoff_s 0.01 with the jitter pinned at 0.5
RETRY = {"initial_backoff_s": 0.01, "max_backoff_s": 0.02}
TRANSFER_FAIL = int(ErrorCode.TRANSFER_FAIL)


def attrs(**kw: Any) -> frozenset:
    """Metric attributes from short names: op, outcome, attempt, result, error_type."""
    names = {
        "op": conventions.OPERATION,
        "outcome": conventions.OUTCOME,
        "attempt": conventions.ATTEMPT,
        "result": conventions.RESULT,
        "error_type": conventions.ERROR_TYPE,
    }
    return frozenset((names[k], v) for k, v in kw.items())


CONFIGS: dict[str, dict[str, Any]] = {
    "one_chunk": {"retry": {**RETRY, "max_attempts": 2}},
    "chunks_of_4": {"retry": {**RETRY, "max_attempts": 2}, "batch_size": 4},
    "no_budget": {"retry": {**RETRY, "budget_ratio": 0.0, "budget_min_per_s": 0.0}},
    "no_time": {"retry": {**RETRY, "deadline_s": 0.0}},
}


@dataclass
class Pooled:
    client: MooncakeBatchClient
    store: FaultInjectingStore
    switch: RecordingObserver  # forwards to the current test's observer: a few clients serve every test


@pytest.fixture(scope="module")
def client_pool(shared_master) -> Iterator[Callable[[str], Pooled]]:
    """One client per entry of CONFIGS, made on first use, over a fault-injecting store; closed together."""
    made: dict[str, Pooled] = {}

    def get(name: str) -> Pooled:
        if name not in made:
            holder: list[FaultInjectingStore] = []
            switch = RecordingObserver(keep=False)
            client = MooncakeBatchClient(
                shared_master.client_config(**CONFIGS[name]),
                observer=switch,
                wrap_store=lambda s: holder.append(FaultInjectingStore(s, seed=3)) or holder[0],
                jitter=lambda: 0.5,
            )
            made[name] = Pooled(client, holder[0], switch)
        return made[name]

    try:
        yield get
    finally:
        for pooled in made.values():  # one after another: Mooncake's close holds the GIL
            pooled.client.close()


@pytest.fixture
def traced_client(client_pool, otel) -> Iterator[Callable[..., tuple[MooncakeBatchClient, FaultInjectingStore]]]:
    """``traced_client(*rules, config="one_chunk")``: a pooled client observed by this test's ``otel``, whose
    store fails keys as ``rules`` say (its ``injected`` and ``calls`` count from this test on)."""
    used: list[Pooled] = []

    def make(*rules: FaultRule, config: str = "one_chunk") -> tuple[MooncakeBatchClient, FaultInjectingStore]:
        pooled = client_pool(config)
        pooled.store.clear_rules()
        for rule in rules:
            pooled.store.add_rule(rule)
        pooled.store.injected.clear()
        pooled.store.calls.clear()
        pooled.switch.forward = otel.observer()
        used.append(pooled)
        return pooled.client, pooled.store

    yield make
    for pooled in used:
        pooled.switch.forward = NOOP_OBSERVER
        pooled.store.clear_rules()


def tensors(n: int) -> list[torch.Tensor]:
    return [torch.full((16,), float(i)) for i in range(n)]  # 64 bytes each


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one operation span and its attempt spans (by chunk, then attempt), checking the parent links."""
    roots = [s for s in spans if s.kind is SpanKind.INTERNAL]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    children = [s for s in spans if s is not root]
    for child in children:
        assert child.kind is SpanKind.CLIENT
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    order = sorted(children, key=lambda s: (s.attributes[conventions.CHUNK], s.attributes[conventions.ATTEMPT]))
    return root, order


def op_attrs(op: str, batch: int, attempts: int, outcome: str, failed: int, nbytes: int, **extra: Any) -> dict:
    return {
        "db.system.name": "mooncake",
        "db.operation.name": op,
        "db.operation.batch.size": batch,
        "mooncake.attempts": attempts,
        "mooncake.outcome": outcome,
        "mooncake.keys.failed": failed,
        "mooncake.bytes": nbytes,
        **extra,
    }


def attempt_attrs(op: str, attempt: int, chunk: int, keys: int, backoff: float, failed: int, nbytes: int, **extra):
    return {
        "db.system.name": "mooncake",
        "db.operation.name": op,
        "mooncake.attempt": attempt,
        "mooncake.chunk": chunk,
        "mooncake.keys": keys,
        "mooncake.backoff_s": backoff,
        "mooncake.keys.failed": failed,
        "mooncake.bytes": nbytes,
        **extra,
    }


# ------------------------------------------------------------------------------------------------ spans


def test_a_clean_put_is_one_operation_span_with_one_attempt(traced_client, otel, keyspace):
    client, _ = traced_client()
    client.put(keyspace(10), tensors(10))
    root, attempts = tree(otel.finished())
    assert root.name == "mooncake.put" and root.status.status_code is StatusCode.UNSET
    assert dict(root.attributes) == op_attrs("put", 10, 1, "success", 0, 640)
    assert [s.name for s in attempts] == ["mooncake.put.attempt"]
    assert attempts[0].status.status_code is StatusCode.UNSET
    assert dict(attempts[0].attributes) == attempt_attrs("put", 1, 0, 10, 0.0, 0, 640)


def test_a_retried_put_has_a_failed_then_a_clean_attempt_and_is_not_an_error(traced_client, otel, keyspace):
    keys = keyspace(10)
    rule = FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[:3]), attempts=frozenset({1}))
    client, store = traced_client(rule)
    client.put(keys, tensors(10))
    root, (first, second) = tree(otel.finished())
    assert root.status.status_code is StatusCode.UNSET
    assert dict(root.attributes) == op_attrs("put", 10, 2, "success_after_retry", 0, 640)
    assert first.status.status_code is StatusCode.ERROR
    assert dict(first.attributes) == attempt_attrs(
        "put", 1, 0, 10, 0.0, 3, 448, **{"mooncake.error.codes": ("TRANSFER_FAIL",), "error.type": "TRANSFER_FAIL"}
    )
    assert second.status.status_code is StatusCode.UNSET
    assert dict(second.attributes) == attempt_attrs("put", 2, 0, 3, BACKOFF, 0, 192)
    assert first.end_time <= second.start_time

    m = otel.metrics()
    assert m["mooncake.client.operations"] == {attrs(op="put", outcome="success_after_retry"): 1}
    assert m["mooncake.client.attempts"] == {
        attrs(op="put", attempt=1, result="partial"): 1,
        attrs(op="put", attempt=2, result="ok"): 1,
    }
    assert m["mooncake.client.keys"] == {attrs(op="put", result="ok"): 7, attrs(op="put", result="retried_ok"): 3}
    assert m["mooncake.client.keys.failed"] == {
        attrs(op="put", error_type="TRANSFER_FAIL"): store.injected[ErrorCode.TRANSFER_FAIL]
    }
    assert store.injected == Counter({ErrorCode.TRANSFER_FAIL: 3})
    assert m["mooncake.client.retry.delay"] == {attrs(op="put", outcome="success_after_retry"): (1, BACKOFF)}
    assert m["mooncake.client.bytes"] == {attrs(op="put"): 640}
    assert m["mooncake.client.operation.duration"].keys() == {attrs(op="put", outcome="success_after_retry")}
    assert {k: count for k, (count, _) in m["mooncake.client.attempt.duration"].items()} == {
        attrs(op="put", attempt=1, result="partial", error_type="TRANSFER_FAIL"): 1,
        attrs(op="put", attempt=2, result="ok"): 1,
    }


def test_an_exhausted_get_is_an_error_with_the_final_code(traced_client, otel, keyspace):
    keys = keyspace(10)
    client, store = traced_client()
    metas = client.put(keys, tensors(10))
    otel.spans.clear()
    store.add_rule(FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[7:]), operations=frozenset({"get"})))
    with pytest.raises(RetriesExhaustedError):
        client.get(keys, custom_backend_meta=metas)
    root, (first, second) = tree(otel.finished())
    assert root.name == "mooncake.get"
    assert root.status.status_code is StatusCode.ERROR
    assert dict(root.attributes) == op_attrs("get", 10, 2, "exhausted", 3, 448, **{"error.type": "TRANSFER_FAIL"})
    codes = {"mooncake.error.codes": ("TRANSFER_FAIL",), "error.type": "TRANSFER_FAIL"}
    assert dict(first.attributes) == attempt_attrs("get", 1, 0, 10, 0.0, 3, 448, **codes)
    assert dict(second.attributes) == attempt_attrs("get", 2, 0, 3, BACKOFF, 3, 0, **codes)
    assert first.status.status_code is second.status.status_code is StatusCode.ERROR

    m = otel.metrics()
    assert m["mooncake.client.operations"] == {
        attrs(op="put", outcome="success"): 1,
        attrs(op="get", outcome="exhausted"): 1,
    }
    assert m["mooncake.client.attempts"] == {
        attrs(op="put", attempt=1, result="ok"): 1,
        attrs(op="get", attempt=1, result="partial"): 1,
        attrs(op="get", attempt=2, result="failed"): 1,
    }
    assert m["mooncake.client.keys"] == {
        attrs(op="put", result="ok"): 10,
        attrs(op="get", result="ok"): 7,
        attrs(op="get", result="failed"): 3,
    }
    injected = store.injected[ErrorCode.TRANSFER_FAIL]
    assert injected == 6
    assert m["mooncake.client.keys.failed"] == {attrs(op="get", error_type="TRANSFER_FAIL"): injected}
    assert m["mooncake.client.operation.duration"].keys() == {
        attrs(op="put", outcome="success"),
        attrs(op="get", outcome="exhausted", error_type="TRANSFER_FAIL"),
    }
    assert m["mooncake.client.retry.delay"] == {attrs(op="get", outcome="exhausted"): (1, BACKOFF)}


def test_chunks_are_sibling_attempts_under_one_operation_span(traced_client, otel, keyspace):
    keys = keyspace(10)
    client, store = traced_client(
        FaultRule(code=TRANSFER_FAIL, keys=frozenset({keys[5]}), attempts=frozenset({1})), config="chunks_of_4"
    )
    client.put(keys, tensors(10))
    root, attempts = tree(otel.finished())
    assert dict(root.attributes) == op_attrs("put", 10, 4, "success_after_retry", 0, 640)
    got = [
        (s.attributes["mooncake.chunk"], s.attributes["mooncake.attempt"], s.attributes["mooncake.keys"])
        for s in attempts
    ]
    assert got == [(0, 1, 4), (1, 1, 4), (1, 2, 1), (2, 1, 2)]
    assert [s.status.status_code for s in attempts] == [StatusCode.UNSET, StatusCode.ERROR] + [StatusCode.UNSET] * 2
    assert attempts[1].attributes["mooncake.keys.failed"] == 1
    m = otel.metrics()
    assert m["mooncake.client.attempts"] == {
        attrs(op="put", attempt=1, result="ok"): 2,
        attrs(op="put", attempt=1, result="partial"): 1,
        attrs(op="put", attempt=2, result="ok"): 1,
    }
    assert sum(m["mooncake.client.attempts"].values()) == len(store.calls_for("put"))
    assert m["mooncake.client.keys.failed"] == {attrs(op="put", error_type="TRANSFER_FAIL"): 1}
    assert m["mooncake.client.keys"] == {attrs(op="put", result="ok"): 9, attrs(op="put", result="retried_ok"): 1}


def test_a_missing_key_is_non_retryable_and_clear_of_it_is_not_an_error(traced_client, otel, keyspace):
    keys = keyspace(4)
    client, _ = traced_client()
    with pytest.raises(NonRetryableError):
        client.get(keys, dtypes=[torch.float32] * 4, shapes=[(16,)] * 4)
    client.clear(keys)
    spans = otel.finished()
    get_root, (get_attempt,) = tree([s for s in spans if s.name.startswith("mooncake.get")])
    assert get_root.status.status_code is StatusCode.ERROR
    assert get_root.attributes["error.type"] == "OBJECT_NOT_FOUND"
    assert get_root.attributes["mooncake.outcome"] == "non_retryable"
    assert get_attempt.attributes["mooncake.error.codes"] == ("OBJECT_NOT_FOUND",)
    clear_root, (clear_attempt,) = tree([s for s in spans if s.name.startswith("mooncake.clear")])
    assert clear_root.status.status_code is clear_attempt.status.status_code is StatusCode.UNSET
    assert clear_root.attributes["mooncake.outcome"] == "success"
    m = otel.metrics()
    assert m["mooncake.client.operations"] == {
        attrs(op="get", outcome="non_retryable"): 1,
        attrs(op="clear", outcome="success"): 1,
    }
    assert m["mooncake.client.attempts"][attrs(op="get", attempt=1, result="failed")] == 1
    assert "mooncake.client.retry.delay" not in m  # nothing was retried


@pytest.mark.parametrize(("config", "outcome"), [("no_budget", "budget_denied"), ("no_time", "deadline_exceeded")])
def test_a_retry_that_is_not_allowed_ends_the_call_with_its_outcome(traced_client, otel, keyspace, config, outcome):
    keys = keyspace(5)
    client, _ = traced_client(FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[:2])), config=config)
    with pytest.raises(Exception) as info:
        client.put(keys, tensors(5))
    assert info.value.outcome.value == outcome
    root, (attempt,) = tree(otel.finished())
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["mooncake.outcome"] == outcome and root.attributes["error.type"] == "TRANSFER_FAIL"
    assert otel.metrics()["mooncake.client.operations"] == {attrs(op="put", outcome=outcome): 1}


def test_the_operation_span_is_a_child_of_the_callers_span(traced_client, otel, keyspace):
    client, _ = traced_client(config="chunks_of_4")
    with otel.tracer_provider.get_tracer("caller").start_as_current_span("caller") as caller:
        client.put(keyspace(10), tensors(10))
    spans = otel.finished()
    root, attempts = tree([s for s in spans if s.name.startswith("mooncake.")])
    assert root.parent is not None and root.parent.span_id == caller.get_span_context().span_id
    assert len(attempts) == 3 and {s.context.trace_id for s in spans} == {caller.get_span_context().trace_id}


def test_no_key_or_value_appears_in_any_exported_attribute(traced_client, otel):
    keys = [f"secretkey-{uuid.uuid4().hex}-{i}" for i in range(8)]
    values = [f"secretvalue-{i}" for i in range(8)]
    client, store = traced_client(
        FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[:2]), attempts=frozenset({1}), operations=frozenset({"put"})),
    )
    metas = client.put(keys, values)
    store.add_rule(FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[2:4]), operations=frozenset({"get"})))
    with pytest.raises(RetriesExhaustedError):
        client.get(keys, custom_backend_meta=metas)
    client.clear(keys)
    spans = otel.finished()
    data = otel.reader.get_metrics_data()
    seen: list[str] = []
    for span in spans:
        seen += [span.name, str(span.status.description)] + [f"{k}={v}" for k, v in span.attributes.items()]
        seen += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                seen += [f"{k}={v}" for dp in metric.data.data_points for k, v in dp.attributes.items()]
    # and the wire form: the OTLP JSON lines the file exporter writes
    text = io.StringIO()
    FileSpanExporter(stream=text).export(spans)
    FileMetricExporter(stream=text).export(data)
    seen.append(text.getvalue())
    assert len(spans) == 3 + 3 + 2  # put, get and clear spans with 2, 2 and 1 attempts
    for item in seen:
        assert "secret" not in item


def test_metric_attributes_stay_within_the_allow_list(traced_client, otel, keyspace):
    keys = keyspace(12)
    client, store = traced_client(
        FaultRule(code=TRANSFER_FAIL, keys=frozenset(keys[:3]), attempts=frozenset({1})), config="chunks_of_4"
    )
    metas = client.put(keys, tensors(12))
    store.add_rule(FaultRule(code=int(ErrorCode.RPC_TIMEOUT), keys=frozenset(keys[5:7]), operations=frozenset({"get"})))
    with pytest.raises(RetriesExhaustedError):
        client.get(keys, custom_backend_meta=metas)
    allowed_values = {
        conventions.OPERATION: set(conventions.OPERATIONS),
        conventions.OUTCOME: set(conventions.OUTCOMES),
        conventions.RESULT: set(conventions.ATTEMPT_RESULTS) | set(conventions.KEY_RESULTS),
        conventions.ERROR_TYPE: {code.name for code in ErrorCode} | {conventions.ERROR_TYPE_OTHER},
        conventions.ATTEMPT: set(range(1, conventions.MAX_ATTEMPT_ATTRIBUTE + 1)),
    }
    m = otel.metrics()
    assert set(m) <= set(conventions.METRIC_ATTRIBUTES)
    for name, series in m.items():
        for attributes in series:
            for key, value in attributes:
                assert key in conventions.METRIC_ATTRIBUTES[name], (name, key)
                assert value in allowed_values[key], (name, key, value)


def test_the_conventions_name_every_operation_and_outcome_of_the_client():
    assert conventions.OPERATIONS == tuple(o.value for o in Operation)
    assert conventions.OUTCOMES == tuple(o.value for o in Outcome)
    assert set(conventions.METRIC_ATTRIBUTES) == set(conventions.UNITS) == set(conventions.DESCRIPTIONS)


# ------------------------------------------------------------------------------------------------ observer alone


def summary(outcome: Outcome, attempts: int, failed: int = 0, codes: Counter | None = None) -> OperationSummary:
    return OperationSummary(outcome, attempts, 10 - failed, 0, failed, 0.0, 0, codes or Counter())


def test_attempts_on_worker_threads_are_parented_explicitly(otel):
    scope = otel.observer().operation(Operation.GET, 40)

    def run(chunk: int) -> None:
        scope.attempt(chunk, 1, 10, 0.0).end(Counter(), 10)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))
    scope.end(summary(Outcome.SUCCESS, 4))
    root, attempts = tree(otel.finished())
    assert [s.attributes["mooncake.chunk"] for s in attempts] == [0, 1, 2, 3]


def test_the_final_error_type_is_the_dominant_final_code_the_client_reports(otel):
    scope = otel.observer().operation(Operation.GET, 20)
    # chunk 0: 2 missing keys (final) and 3 transfer failures that a retry fixes
    scope.attempt(0, 1, 10, 0.0).end(Counter({ErrorCode.OBJECT_NOT_FOUND: 2, ErrorCode.TRANSFER_FAIL: 3}), 0)
    scope.attempt(0, 2, 3, 0.01).end(Counter(), 0)
    # chunk 1: 1 RPC timeout that stays
    scope.attempt(1, 1, 10, 0.0).end(Counter({ErrorCode.RPC_TIMEOUT: 4}), 0)
    scope.attempt(1, 2, 4, 0.01).end(Counter({ErrorCode.RPC_TIMEOUT: 1}), 0)
    # the retry loop's final word: each failed key once, by its last code (telemetry does not re-classify)
    final = Counter({ErrorCode.OBJECT_NOT_FOUND: 2, ErrorCode.RPC_TIMEOUT: 1})
    scope.end(summary(Outcome.NON_RETRYABLE, 4, failed=3, codes=final))
    root, _ = tree(otel.finished())
    assert root.attributes["error.type"] == "OBJECT_NOT_FOUND"  # 2 x OBJECT_NOT_FOUND beats 1 x RPC_TIMEOUT


def test_ties_pick_the_smallest_name_and_a_failure_without_codes_is_other(otel):
    observer = otel.observer()
    scope = observer.operation(Operation.PUT, 4)
    tie = Counter({ErrorCode.RPC_TIMEOUT: 2, ErrorCode.RPC_FAIL: 2})
    scope.attempt(0, 1, 4, 0.0).end(tie, 0)
    scope.end(summary(Outcome.EXHAUSTED, 1, failed=4, codes=tie))
    bare = observer.operation(Operation.PUT, 4)
    bare.end(summary(Outcome.NON_RETRYABLE, 0, failed=4))
    spans = otel.finished()
    assert spans[0].attributes["error.type"] == "RPC_FAIL" and spans[1].attributes["error.type"] == "RPC_FAIL"
    assert spans[2].attributes["error.type"] == "_OTHER" and spans[2].status.status_code is StatusCode.ERROR


def test_late_attempt_numbers_are_clamped_in_metrics_only(otel):
    scope = otel.observer().operation(Operation.PUT, 1)
    scope.attempt(0, 12, 1, 0.5).end(Counter(), 1)
    scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 12, 0, 1, 0, 3.0, 1))
    scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 12, 0, 1, 0, 3.0, 1))  # a second end is ignored
    spans = otel.finished()
    assert len(spans) == 2 and spans[0].attributes["mooncake.attempt"] == 12
    m = otel.metrics()
    assert m["mooncake.client.attempts"] == {attrs(op="put", attempt=10, result="ok"): 1}
    assert m["mooncake.client.operations"] == {attrs(op="put", outcome="success_after_retry"): 1}


def test_the_budget_gauge_sums_the_live_clients(otel):
    first = otel.observer(budget_tokens=lambda: 7.0)
    second = otel.observer(budget_tokens=lambda: 3.0)
    otel.observer()  # no budget: not reported
    assert otel.metrics()["mooncake.client.retry.budget"] == {frozenset(): 10.0}
    del second
    gc.collect()
    assert otel.metrics()["mooncake.client.retry.budget"] == {frozenset(): 7.0}
    assert first is not None


def test_the_budget_gauge_reads_a_real_clients_budget(client_pool, otel):
    client = client_pool("no_time").client  # retries are cut by the deadline, so its reserve stays full
    observer = otel.observer(budget_tokens=client.budget.available)
    assert otel.metrics()["mooncake.client.retry.budget"] == {frozenset(): 10.0}
    assert client.budget.available() == 10.0 and observer is not None


def test_without_an_sdk_the_observer_is_a_cheap_no_op():
    observer = OTelObserver()  # the global providers: no-op until an SDK is installed
    scope = observer.operation(Operation.PUT, 3)
    scope.attempt(0, 1, 3, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 1}), 2)
    scope.end(summary(Outcome.SUCCESS_AFTER_RETRY, 2))


def test_a_client_given_providers_reports_to_them_and_refuses_a_second_observer(shared_master, otel, keyspace):
    config = shared_master.client_config()
    with pytest.raises(TypeError, match="either observer or tracer_provider"):
        MooncakeBatchClient(config, observer=NOOP_OBSERVER, tracer_provider=otel.tracer_provider)
    with MooncakeBatchClient(
        config, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    ) as client:
        client.put(keyspace(3), tensors(3))
        root, children = tree(otel.finished())
        assert root.name == "mooncake.put" and [c.name for c in children] == ["mooncake.put.attempt"]
        m = otel.metrics()
        assert m["mooncake.client.operations"] == {attrs(op="put", outcome="success"): 1}
        assert m["mooncake.client.retry.budget"] == {frozenset(): client.budget.available()}
