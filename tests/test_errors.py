"""Error codes, their per-operation classification, outcome precedence and the client's exceptions."""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest

from tq_mooncake.client import (
    BatchOperationError,
    ClientClosedError,
    DeadlineExceededError,
    ErrorClassifier,
    ErrorCode,
    MooncakeClientError,
    NonRetryableError,
    Operation,
    Outcome,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    StoreSetupError,
)
from tq_mooncake.client.codes import RETRYABLE_CODES, Verdict
from tq_mooncake.client.errors import ERROR_FOR_OUTCOME
from tq_mooncake.client.merge import OUTCOME_PRECEDENCE, combine_outcomes

pytestmark = pytest.mark.pure

ALL_OPS = [Operation.PUT, Operation.GET, Operation.CLEAR]


# ---------------------------------------------------------------------------------------------- ErrorCode
@pytest.mark.parametrize(
    ("code", "member"),
    [
        (0, ErrorCode.OK),
        (-1, ErrorCode.INTERNAL_ERROR),
        (-704, ErrorCode.OBJECT_NOT_FOUND),
        (-800, ErrorCode.TRANSFER_FAIL),
        (-901, ErrorCode.RPC_TIMEOUT),
        (-1702, ErrorCode.TENANT_NOT_EMPTY),
        (-90001, ErrorCode.SIZE_MISMATCH),
        (-90004, ErrorCode.PICKLE_NOT_ALLOWED),
    ],
)
def test_error_code_of_known_codes(code, member):
    assert ErrorCode.of(code) is member


@pytest.mark.parametrize("code", [-2, -799, -12345, -90099, -(10**12)])
def test_error_code_of_unknown_codes_is_unknown(code):
    assert ErrorCode.of(code) is ErrorCode.UNKNOWN


def test_error_code_of_accepts_an_enum_member():
    assert ErrorCode.of(ErrorCode.RPC_FAIL) is ErrorCode.RPC_FAIL


def test_error_code_values_match_mooncake():
    assert int(ErrorCode.TRANSFER_FAIL) == -800
    assert int(ErrorCode.RPC_FAIL) == -900
    assert int(ErrorCode.OBJECT_REPLICA_BUSY) == -714
    assert int(ErrorCode.NO_AVAILABLE_HANDLE) == -200
    assert int(ErrorCode.INVALID_PARAMS) == -600


def test_error_code_values_are_unique():
    assert len({int(c) for c in ErrorCode}) == len(list(ErrorCode))


@pytest.mark.parametrize(
    ("member", "text"),
    [
        (ErrorCode.TRANSFER_FAIL, "TRANSFER_FAIL(-800)"),
        (ErrorCode.OK, "OK(0)"),
        (ErrorCode.UNKNOWN, "UNKNOWN(-99999)"),
        (ErrorCode.CHECKSUM_MISMATCH, "CHECKSUM_MISMATCH(-801)"),
    ],
)
def test_describe(member, text):
    assert member.describe() == text


# ------------------------------------------------------------------------------------------ classification
RETRYABLE = [
    ErrorCode.TRANSFER_FAIL,
    ErrorCode.RPC_FAIL,
    ErrorCode.RPC_TIMEOUT,
    ErrorCode.REPLICA_IS_NOT_READY,
    ErrorCode.LEASE_EXPIRED,
    ErrorCode.OBJECT_HAS_LEASE,
    ErrorCode.OBJECT_REPLICA_BUSY,
    ErrorCode.NO_AVAILABLE_HANDLE,
    ErrorCode.INTERNAL_ERROR,
    ErrorCode.CHECKSUM_MISMATCH,
    ErrorCode.TRAILER_MISMATCH,
    ErrorCode.PAYLOAD_CHECKSUM_MISMATCH,
]
NON_RETRYABLE = [
    ErrorCode.STALE_VALUE,
    ErrorCode.INVALID_PARAMS,
    ErrorCode.SIZE_MISMATCH,
    ErrorCode.METADATA_MISMATCH,
    ErrorCode.CORRUPT_VALUE,
    ErrorCode.TYPE_MISMATCH,
    ErrorCode.PICKLE_NOT_ALLOWED,
    ErrorCode.INVALID_KEY,
    ErrorCode.OBJECT_ALREADY_EXISTS,
    ErrorCode.BUFFER_OVERFLOW,
]


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("code", RETRYABLE, ids=lambda c: c.name)
def test_transient_codes_are_retried(op, code):
    classifier = ErrorClassifier()
    assert classifier.classify(op, int(code)) is Verdict.RETRY
    assert classifier.is_retryable(int(code))


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("code", NON_RETRYABLE, ids=lambda c: c.name)
def test_permanent_codes_fail(op, code):
    classifier = ErrorClassifier()
    assert classifier.classify(op, int(code)) is Verdict.FAIL
    assert not classifier.is_retryable(int(code))


@pytest.mark.parametrize("op", [Operation.GET, Operation.PUT])
def test_object_not_found_fails_on_get_and_put(op):
    assert ErrorClassifier().classify(op, -704) is Verdict.FAIL


def test_illegal_client_is_retried_on_put_only():
    # Two processes writing one key: the master refuses the end of the write it preempted (-601).
    assert ErrorClassifier().classify(Operation.PUT, -601) is Verdict.RETRY
    assert ErrorClassifier().classify(Operation.GET, -601) is Verdict.FAIL
    assert ErrorClassifier().classify(Operation.CLEAR, -601) is Verdict.FAIL


def test_object_not_found_is_ok_on_clear():
    assert ErrorClassifier().classify(Operation.CLEAR, -704) is Verdict.OK


def test_object_not_found_is_not_retryable():
    assert not ErrorClassifier().is_retryable(-704)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("code", [-2, -799, -12345, -99999])
def test_unknown_codes_fail(op, code):
    assert ErrorClassifier().classify(op, code) is Verdict.FAIL


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("code", [0, 1, 4096, 2**40])
def test_zero_and_byte_counts_are_ok(op, code):
    assert ErrorClassifier().classify(op, code) is Verdict.OK


def test_classifier_with_custom_retryable_set():
    classifier = ErrorClassifier(frozenset({ErrorCode.INVALID_PARAMS}))
    assert classifier.classify(Operation.PUT, -600) is Verdict.RETRY
    assert classifier.classify(Operation.PUT, -800) is Verdict.FAIL


def test_retryable_codes_exclude_permanent_ones():
    assert not RETRYABLE_CODES & set(NON_RETRYABLE)
    assert ErrorCode.OBJECT_NOT_FOUND not in RETRYABLE_CODES
    assert ErrorCode.UNKNOWN not in RETRYABLE_CODES


# ------------------------------------------------------------------------------------------------ outcomes
def test_combine_outcomes_of_nothing_is_success():
    assert combine_outcomes([]) is Outcome.SUCCESS


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([Outcome.SUCCESS, Outcome.SUCCESS], Outcome.SUCCESS),
        ([Outcome.SUCCESS, Outcome.SUCCESS_AFTER_RETRY], Outcome.SUCCESS_AFTER_RETRY),
        ([Outcome.SUCCESS_AFTER_RETRY, Outcome.EXHAUSTED, Outcome.SUCCESS], Outcome.EXHAUSTED),
        ([Outcome.EXHAUSTED, Outcome.BUDGET_DENIED], Outcome.BUDGET_DENIED),
        ([Outcome.BUDGET_DENIED, Outcome.DEADLINE_EXCEEDED], Outcome.DEADLINE_EXCEEDED),
        ([Outcome.DEADLINE_EXCEEDED, Outcome.NON_RETRYABLE, Outcome.SUCCESS], Outcome.NON_RETRYABLE),
        (list(Outcome), Outcome.NON_RETRYABLE),
    ],
)
def test_combine_outcomes_precedence(outcomes, expected):
    assert combine_outcomes(outcomes) is expected
    assert combine_outcomes(list(reversed(outcomes))) is expected


def test_outcome_precedence_covers_every_outcome_once():
    assert sorted(OUTCOME_PRECEDENCE, key=lambda o: o.value) == sorted(Outcome, key=lambda o: o.value)


@pytest.mark.parametrize(
    ("outcome", "failed"),
    [
        (Outcome.SUCCESS, False),
        (Outcome.SUCCESS_AFTER_RETRY, False),
        (Outcome.EXHAUSTED, True),
        (Outcome.NON_RETRYABLE, True),
        (Outcome.BUDGET_DENIED, True),
        (Outcome.DEADLINE_EXCEEDED, True),
    ],
)
def test_outcome_failed(outcome, failed):
    assert outcome.failed is failed


# ---------------------------------------------------------------------------------------------- exceptions
def test_batch_error_attributes():
    err = RetriesExhaustedError(
        Operation.GET, {"a": ErrorCode.TRANSFER_FAIL, "b": ErrorCode.RPC_TIMEOUT}, succeeded=5, attempts=4
    )
    assert err.operation is Operation.GET
    assert err.failed == {"a": ErrorCode.TRANSFER_FAIL, "b": ErrorCode.RPC_TIMEOUT}
    assert err.succeeded == 5
    assert err.attempts == 4
    assert err.outcome is Outcome.EXHAUSTED


def test_batch_error_failed_is_a_copy():
    failed = {"a": ErrorCode.TRANSFER_FAIL}
    err = RetriesExhaustedError(Operation.PUT, failed, succeeded=0, attempts=1)
    failed["b"] = ErrorCode.RPC_FAIL
    assert err.failed == {"a": ErrorCode.TRANSFER_FAIL}


def test_batch_error_codes_counts_failed_keys_by_code():
    err = NonRetryableError(
        Operation.GET,
        {"a": ErrorCode.OBJECT_NOT_FOUND, "b": ErrorCode.OBJECT_NOT_FOUND, "c": ErrorCode.SIZE_MISMATCH},
        succeeded=0,
        attempts=1,
    )
    assert err.codes == Counter({ErrorCode.OBJECT_NOT_FOUND: 2, ErrorCode.SIZE_MISMATCH: 1})


def test_batch_error_message_names_keys_codes_and_counts():
    err = RetriesExhaustedError(
        Operation.PUT, {"k1": ErrorCode.TRANSFER_FAIL, "k2": ErrorCode.RPC_FAIL}, succeeded=3, attempts=4
    )
    msg = str(err)
    assert msg.startswith("mooncake put failed (retries exhausted) for 2 key(s) after 4 attempt(s)")
    assert "'k1': TRANSFER_FAIL(-800)" in msg
    assert "'k2': RPC_FAIL(-900)" in msg
    assert "TRANSFER_FAIL x1" in msg
    assert "3 key(s) succeeded" in msg
    assert "more" not in msg


def test_batch_error_message_orders_code_summary_by_frequency():
    failed = {"a": ErrorCode.RPC_FAIL, "b": ErrorCode.TRANSFER_FAIL, "c": ErrorCode.TRANSFER_FAIL}
    msg = str(RetriesExhaustedError(Operation.GET, failed, succeeded=0, attempts=2))
    assert "[TRANSFER_FAIL x2, RPC_FAIL x1]" in msg


def test_batch_error_message_keeps_caller_key_order():
    failed = {"zeta": ErrorCode.RPC_FAIL, "alpha": ErrorCode.RPC_FAIL}
    msg = str(RetriesExhaustedError(Operation.GET, failed, succeeded=0, attempts=2))
    assert msg.index("'zeta'") < msg.index("'alpha'")


def test_batch_error_message_shows_exactly_ten_keys_without_more():
    failed = {f"key-{i:02d}": ErrorCode.TRANSFER_FAIL for i in range(10)}
    msg = str(RetriesExhaustedError(Operation.GET, failed, succeeded=0, attempts=4))
    assert "'key-09'" in msg
    assert "more" not in msg


def test_batch_error_message_truncates_after_ten_keys():
    failed = {f"key-{i:02d}": ErrorCode.TRANSFER_FAIL for i in range(13)}
    msg = str(RetriesExhaustedError(Operation.GET, failed, succeeded=0, attempts=4))
    assert "for 13 key(s)" in msg
    assert "'key-09'" in msg
    assert "'key-10'" not in msg
    assert "'key-12'" not in msg
    assert msg.endswith(", ... and 3 more")
    assert "TRANSFER_FAIL x13" in msg


def test_batch_error_message_uses_repr_of_keys():
    msg = str(NonRetryableError(Operation.CLEAR, {"it's": ErrorCode.INVALID_KEY}, succeeded=0, attempts=1))
    assert repr("it's") in msg
    assert "mooncake clear failed (not retryable)" in msg


@pytest.mark.parametrize(
    ("cls", "outcome", "reason"),
    [
        (RetriesExhaustedError, Outcome.EXHAUSTED, "retries exhausted"),
        (NonRetryableError, Outcome.NON_RETRYABLE, "not retryable"),
        (RetryBudgetExhaustedError, Outcome.BUDGET_DENIED, "retry budget spent"),
        (DeadlineExceededError, Outcome.DEADLINE_EXCEEDED, "deadline exceeded"),
    ],
)
def test_error_classes_outcome_and_reason(cls, outcome, reason):
    err = cls(Operation.GET, {"k": ErrorCode.RPC_TIMEOUT}, succeeded=0, attempts=2)
    assert err.outcome is outcome
    assert f"({reason})" in str(err)
    assert ERROR_FOR_OUTCOME[outcome] is cls
    assert isinstance(err, BatchOperationError)
    assert isinstance(err, MooncakeClientError)
    assert isinstance(err, RuntimeError)


@pytest.mark.parametrize(
    "cls", [RetriesExhaustedError, NonRetryableError, RetryBudgetExhaustedError, DeadlineExceededError]
)
def test_batch_errors_survive_pickling_and_copying(cls):
    """They cross process boundaries (a TQ client in a Ray actor raises them to its caller)."""
    err = cls(Operation.GET, {"k1": ErrorCode.RPC_TIMEOUT, "k2": ErrorCode.TRANSFER_FAIL}, succeeded=3, attempts=2)
    for back in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(back) is cls and str(back) == str(err)
        assert (back.operation, back.failed, back.succeeded, back.attempts) == (Operation.GET, err.failed, 3, 2)


def test_the_base_batch_error_names_no_outcome_and_cannot_be_raised_itself():
    assert not hasattr(BatchOperationError, "outcome")
    with pytest.raises(TypeError, match="raise one of its subclasses"):
        BatchOperationError(Operation.GET, {"k": ErrorCode.RPC_TIMEOUT}, succeeded=0, attempts=1)


def test_error_for_outcome_covers_exactly_the_failed_outcomes():
    assert set(ERROR_FOR_OUTCOME) == {o for o in Outcome if o.failed}


def test_deadline_exceeded_is_a_timeout_error():
    err = DeadlineExceededError(Operation.PUT, {"k": ErrorCode.RPC_TIMEOUT}, succeeded=0, attempts=3)
    assert isinstance(err, TimeoutError)
    with pytest.raises(TimeoutError):
        raise err


def test_other_batch_errors_are_not_timeout_errors():
    for cls in (RetriesExhaustedError, NonRetryableError, RetryBudgetExhaustedError):
        assert not issubclass(cls, TimeoutError)


def test_client_closed_and_setup_errors_are_runtime_errors():
    assert issubclass(ClientClosedError, MooncakeClientError)
    assert issubclass(ClientClosedError, RuntimeError)
    assert issubclass(StoreSetupError, MooncakeClientError)
    assert issubclass(StoreSetupError, RuntimeError)
