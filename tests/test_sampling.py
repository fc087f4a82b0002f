"""Tail sampling at the source: every retried or failed operation's spans kept, clean ones sampled or following
their parent; metrics complete. The real SDK; the sampler also as a pure policy."""

from __future__ import annotations

from collections import Counter
from importlib import metadata

import pytest
from in_memory_otel import Otel  # tests/support
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from tq_mooncake.client import ErrorCode, Operation, Outcome
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry import conventions as c
from tq_mooncake.telemetry.pipeline import choose_sampler, retention_from_env
from tq_mooncake.telemetry.rotating_file import MIB, Retention
from tq_mooncake.telemetry.sampling import (
    DEFAULT_CLEAN_RATIO,
    KeepFailuresSampler,
    keep_operation,
    parse_ratio,
    sampler_factory,
)
from tq_mooncake.transferqueue.telemetry_section import configure_kwargs

pytestmark = pytest.mark.pure

TRACE_ID = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0


def op_attributes(outcome: Outcome) -> dict:
    return {c.DB_SYSTEM_NAME: c.DB_SYSTEM, c.DB_OPERATION_NAME: "get", c.OUTCOME: outcome.value}


def parent(sampled: bool, remote: bool = False) -> otel_context.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span = NonRecordingSpan(SpanContext(TRACE_ID, 0xABCD, is_remote=remote, trace_flags=flags))
    return trace.set_span_in_context(span)


def decide(sampler: KeepFailuresSampler, attributes: dict, context: otel_context.Context | None = None) -> Decision:
    return sampler.should_sample(context, TRACE_ID, "mooncake.get", attributes=attributes).decision


def test_the_policy_keeps_every_call_that_did_not_simply_succeed():
    assert not keep_operation(op_attributes(Outcome.SUCCESS))
    assert all(keep_operation(op_attributes(o)) for o in Outcome if o is not Outcome.SUCCESS)


def test_the_sampler_decides_on_outcome_then_parent_then_ratio():
    none_clean = KeepFailuresSampler(clean_ratio=0.0)
    keep = Decision.RECORD_AND_SAMPLE
    for outcome in (Outcome.SUCCESS_AFTER_RETRY, Outcome.EXHAUSTED, Outcome.NON_RETRYABLE):
        for context in (None, parent(True), parent(False), parent(False, remote=True)):
            assert decide(none_clean, op_attributes(outcome), context) is keep, (outcome, context)
    clean = op_attributes(Outcome.SUCCESS)
    assert decide(none_clean, clean) is Decision.DROP  # no parent: the ratio
    assert decide(KeepFailuresSampler(clean_ratio=1.0), clean) is keep
    assert decide(none_clean, clean, parent(True)) is keep  # a sampled parent is honoured
    assert decide(KeepFailuresSampler(clean_ratio=1.0), clean, parent(False)) is Decision.DROP  # so is an unsampled one
    assert decide(none_clean, clean, parent(True, remote=True)) is keep


def test_other_spans_and_attempts_go_to_the_other_sampler():
    sampler = KeepFailuresSampler(clean_ratio=1.0, other=ALWAYS_OFF)
    attempt = {c.DB_SYSTEM_NAME: c.DB_SYSTEM, c.ATTEMPT: 1}  # no outcome: an attempt span
    assert decide(sampler, attempt, parent(True)) is Decision.DROP
    assert decide(sampler, {"http.method": "GET"}) is Decision.DROP
    default = KeepFailuresSampler()
    assert decide(default, attempt, parent(True)) is Decision.RECORD_AND_SAMPLE  # ParentBased(ALWAYS_ON)
    assert decide(default, attempt, parent(False)) is Decision.DROP
    assert default.clean_ratio == DEFAULT_CLEAN_RATIO == 0.01
    assert "0.01" in default.get_description()


def test_ratios_are_checked():
    for bad in (-0.1, 1.5, float("nan"), True, "x", None, float("inf"), 10**400, "1e999"):
        with pytest.raises(ValueError, match="clean trace ratio"):
            parse_ratio(bad)
    assert parse_ratio("0.25") == 0.25 and parse_ratio(0) == 0.0
    assert sampler_factory(None).clean_ratio == DEFAULT_CLEAN_RATIO and sampler_factory("0.5").clean_ratio == 0.5
    assert sampler_factory("lots").clean_ratio == DEFAULT_CLEAN_RATIO  # not the SDK's fallback: every trace


# ------------------------------------------------------------------------------------------------ with the SDK


def sdk(sampler: KeepFailuresSampler | ParentBased) -> tuple[Otel, OTelObserver]:
    """The in-memory SDK of the ``otel`` fixture, with ``sampler`` on its tracer provider."""
    otel = Otel.start()
    otel.tracer_provider = TracerProvider(sampler=sampler)
    otel.tracer_provider.add_span_processor(SimpleSpanProcessor(otel.spans))
    return otel, otel.observer()


def clean_get(observer: OTelObserver, chunks: int = 1) -> None:
    scope = observer.operation(Operation.GET, 4 * chunks)
    for chunk in range(chunks):
        scope.attempt(chunk, 1, 4, 0.0).end(Counter(), 256)
    scope.end(OperationSummary(Outcome.SUCCESS, chunks, 4 * chunks, 0, 0, 0.0, 256 * chunks))


def retried_get(observer: OTelObserver) -> None:
    scope = observer.operation(Operation.GET, 8)
    scope.attempt(0, 1, 4, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 128)
    scope.attempt(1, 1, 4, 0.0).end(Counter(), 256)
    scope.attempt(0, 2, 2, 0.02).end(Counter(), 128)
    scope.end(OperationSummary(Outcome.SUCCESS_AFTER_RETRY, 3, 6, 2, 0, 0.02, 512))


def exhausted_get(observer: OTelObserver) -> None:
    scope = observer.operation(Operation.GET, 4)
    for attempt in (1, 2, 3):
        scope.attempt(0, attempt, 4, 0.01 * (attempt - 1)).end(Counter({ErrorCode.RPC_FAIL: 4}), 0)
    scope.end(OperationSummary(Outcome.EXHAUSTED, 3, 0, 0, 4, 0.03, 0, Counter({ErrorCode.RPC_FAIL: 4})))


def test_failed_and_retried_calls_keep_every_span_while_clean_ones_go_and_metrics_count_all():
    otel, observer = sdk(KeepFailuresSampler(clean_ratio=0.0))
    try:
        for _ in range(50):
            clean_get(observer, chunks=3)
        retried_get(observer)
        exhausted_get(observer)
        spans = otel.finished()
        ops = [s for s in spans if s.name == "mooncake.get"]
        assert [s.attributes[c.OUTCOME] for s in ops] == ["success_after_retry", "exhausted"]
        for op, attempts in zip(ops, (3, 3), strict=True):
            children = [s for s in spans if s.parent is not None and s.parent.span_id == op.context.span_id]
            assert len(children) == attempts and {s.name for s in children} == {"mooncake.get.attempt"}
            assert all(s.context.trace_id == op.context.trace_id for s in children)
            assert min(s.start_time for s in children) >= op.start_time and op.end_time >= max(
                s.end_time for s in children
            )
        assert ops[1].status.status_code is StatusCode.ERROR and ops[1].attributes[c.ERROR_TYPE] == "RPC_FAIL"
        assert len(spans) == 8
        ops_metric = otel.metrics()[c.OPERATIONS_METRIC]
        assert sum(ops_metric.values()) == 52  # metrics are never sampled
    finally:
        otel.shutdown()


def test_a_failure_under_an_unsampled_parent_is_kept_in_the_parents_trace():
    otel, observer = sdk(KeepFailuresSampler(clean_ratio=1.0))
    try:
        token = otel_context.attach(parent(False))
        try:
            clean_get(observer)  # follows its unsampled parent: dropped
            exhausted_get(observer)
        finally:
            otel_context.detach(token)
        spans = otel.finished()
        assert len(spans) == 4 and {s.context.trace_id for s in spans} == {TRACE_ID}
        (op,) = [s for s in spans if s.name == "mooncake.get"]
        assert op.parent.span_id == 0xABCD and op.context.trace_flags.sampled
    finally:
        otel.shutdown()


def test_clean_calls_are_kept_at_the_ratio_by_trace_id():
    otel, observer = sdk(KeepFailuresSampler(clean_ratio=0.25))
    try:
        for _ in range(2000):
            clean_get(observer)
        ops = [s for s in otel.finished() if s.name == "mooncake.get"]
        assert 400 < len(ops) < 600  # 500 expected; 4.5 standard deviations either side
        ratio = TraceIdRatioBased(0.25)
        assert all(s.context.trace_id & ratio.TRACE_ID_LIMIT < ratio.bound for s in ops)  # decided on the trace id
        assert len(otel.finished()) == 2 * len(ops)  # each with its attempt
    finally:
        otel.shutdown()


def test_an_attempt_that_ends_after_its_call_is_still_a_child_of_the_call():
    otel, observer = sdk(KeepFailuresSampler(clean_ratio=0.0))
    try:
        scope = observer.operation(Operation.PUT, 4)
        late = scope.attempt(1, 1, 2, 0.0)
        scope.attempt(0, 1, 2, 0.0).end(Counter({ErrorCode.TRANSFER_FAIL: 2}), 0)
        scope.end(
            OperationSummary(Outcome.DEADLINE_EXCEEDED, 2, 0, 0, 4, 0.0, 0, Counter({ErrorCode.TRANSFER_FAIL: 2}))
        )
        late.end(Counter(), 128)
        op, *_ = [s for s in otel.finished() if s.name == "mooncake.put"]
        attempts = [s for s in otel.finished() if s.name == "mooncake.put.attempt"]
        assert len(attempts) == 2 and all(s.parent.span_id == op.context.span_id for s in attempts)
    finally:
        otel.shutdown()


def test_a_caller_sampler_still_applies_to_everything():
    otel, observer = sdk(ParentBased(ALWAYS_OFF))
    try:
        exhausted_get(observer)
        assert otel.finished() == []  # a user's own sampler decides: head sampling drops failures too
    finally:
        otel.shutdown()


# ------------------------------------------------------------------------------------------------ configuration


def test_configure_chooses_the_sampler_from_arguments_then_environment(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    default = choose_sampler(None, None)
    assert isinstance(default, KeepFailuresSampler) and default.clean_ratio == DEFAULT_CLEAN_RATIO
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")  # without OTEL_TRACES_SAMPLER it means nothing here
    assert choose_sampler(None, None).clean_ratio == DEFAULT_CLEAN_RATIO
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "tq_mooncake")
    assert choose_sampler(None, None).clean_ratio == 0.5
    assert choose_sampler(None, 0.2).clean_ratio == 0.2  # an argument wins
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    assert choose_sampler(None, None) is None  # the SDK reads its own
    assert choose_sampler(None, 1.0).clean_ratio == 1.0
    assert choose_sampler(ALWAYS_OFF, None) is ALWAYS_OFF
    with pytest.raises(ValueError, match="not both"):
        choose_sampler(ALWAYS_OFF, 0.5)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "tq_mooncake")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "lots")
    with pytest.raises(ValueError, match="clean trace ratio"):
        choose_sampler(None, None)


def test_retention_settings_come_from_the_environment_and_are_checked(monkeypatch):
    for name in ("TQ_MOONCAKE_TELEMETRY_FILE_MB", "TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "TQ_MOONCAKE_TELEMETRY_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    assert retention_from_env() == Retention(32 * MIB, 20, 768 * MIB)
    monkeypatch.setenv("TQ_MOONCAKE_TELEMETRY_FILE_MB", "0.5")
    monkeypatch.setenv("TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "3")
    assert retention_from_env() == Retention(MIB // 2, 3, 768 * MIB)
    mine = Retention(1000, 1, 5000)
    assert retention_from_env(mine) is mine
    for name, bad in (
        ("TQ_MOONCAKE_TELEMETRY_FILE_MB", "0"),
        ("TQ_MOONCAKE_TELEMETRY_FILE_MB", "big"),
        ("TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "1.5"),
        ("TQ_MOONCAKE_TELEMETRY_MAX_MB", "-3"),
        ("TQ_MOONCAKE_TELEMETRY_MAX_MB", "inf"),
        ("TQ_MOONCAKE_TELEMETRY_MAX_MB", "1e308"),
        ("TQ_MOONCAKE_TELEMETRY_FILE_MB", "1e-9"),
        ("TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "-1"),
        ("TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "٣"),
    ):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            retention_from_env()
        monkeypatch.delenv(name)


def test_the_tq_telemetry_section_passes_ratio_and_retention(monkeypatch, tmp_path):
    for name in ("TQ_MOONCAKE_TELEMETRY_FILE_MB", "TQ_MOONCAKE_TELEMETRY_KEEP_FILES", "TQ_MOONCAKE_TELEMETRY_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    kwargs = configure_kwargs(
        {
            "telemetry_dir": str(tmp_path),
            "clean_trace_ratio": 0.1,
            "telemetry_file_mb": 8,
            "telemetry_keep_files": 4,
        }
    )
    assert kwargs == {
        "telemetry_dir": str(tmp_path),
        "clean_trace_ratio": 0.1,
        "retention": Retention(8 * MIB, 4, 768 * MIB),
    }
    for key, bad in (
        ("telemetry_max_mb", 1e303),
        ("telemetry_max_mb", 2**2000),
        ("telemetry_keep_files", True),
        ("telemetry_max_mb", "1"),
        ("telemetry_file_mb", float("nan")),
        ("telemetry_file_mb", 0),
        ("telemetry_keep_files", 1.5),
    ):
        with pytest.raises(ValueError, match=key):
            configure_kwargs({"telemetry_dir": str(tmp_path), key: bad})


def test_the_sampler_is_an_entry_point_for_opentelemetry_instrument():
    (entry,) = metadata.entry_points(group="opentelemetry_traces_sampler", name="tq_mooncake")
    sampler = entry.load()("0.3")
    assert isinstance(sampler, KeepFailuresSampler) and sampler.clean_ratio == 0.3


def test_attempts_of_a_dropped_call_are_not_kept_and_an_attempt_ends_once():
    otel, observer = sdk(KeepFailuresSampler(clean_ratio=0.0))
    try:
        scope = observer.operation(Operation.GET, 4)
        late = scope.attempt(1, 1, 2, 0.0)
        scope.attempt(0, 1, 2, 0.0).end(Counter(), 128)
        scope.end(OperationSummary(Outcome.SUCCESS, 2, 4, 0, 0, 0.0, 256))  # clean, no parent: dropped
        late.end(Counter(), 128)
        assert otel.finished() == [] and scope._attempts == []  # nothing held for a span that will never be
        kept = observer.operation(Operation.GET, 2)
        attempt = kept.attempt(0, 1, 2, 0.0)
        attempt.end(Counter({ErrorCode.RPC_FAIL: 2}), 0)
        attempt.end(Counter({ErrorCode.RPC_FAIL: 2}), 0)  # a second end is ignored
        kept.end(OperationSummary(Outcome.NON_RETRYABLE, 1, 0, 0, 2, 0.0, 0, Counter({ErrorCode.RPC_FAIL: 2})))
        assert sorted(s.name for s in otel.finished()) == ["mooncake.get", "mooncake.get.attempt"]
        attempts = otel.metrics()[c.ATTEMPTS_METRIC]
        assert sum(attempts.values()) == 3  # 2 of the dropped call, 1 of the kept one: metrics count all, once
    finally:
        otel.shutdown()
