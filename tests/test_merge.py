"""merge.py: cutting a call into chunks and merging the chunks' ends into the call's result, without a store."""

from __future__ import annotations

from collections import Counter

import pytest

from tq_mooncake.client import (
    ClientClosedError,
    DeadlineExceededError,
    ErrorCode,
    NonRetryableError,
    Operation,
    Outcome,
    RetriesExhaustedError,
)
from tq_mooncake.client.attempts import ChunkAborted, ChunkResult
from tq_mooncake.client.merge import chunk_bounds, merge

pytestmark = pytest.mark.pure

KEYS = [f"k{i}" for i in range(10)]
BOUNDS = chunk_bounds(10, 4)  # [0, 4), [4, 8), [8, 10)


def test_chunk_bounds_cover_every_key_once_in_order():
    assert chunk_bounds(0, 400) == []
    assert chunk_bounds(3, 400) == [(0, 3)]
    assert BOUNDS == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]


def test_clean_chunks_merge_into_a_success_with_no_error():
    ended = [ChunkResult(Outcome.SUCCESS, 1, nbytes=40), ChunkResult(Outcome.SUCCESS, 1, nbytes=40)]
    result = merge(Operation.PUT, KEYS[:8], BOUNDS[:2], ended)
    assert result.error is None
    s = result.summary
    assert (s.outcome, s.attempts, s.keys_ok, s.keys_retried_ok, s.keys_failed, s.nbytes) == (
        Outcome.SUCCESS,
        2,
        8,
        0,
        0,
        80,
    )
    assert s.codes == Counter()


def test_failed_keys_are_named_in_key_order_with_their_last_code_and_the_most_severe_outcome():
    ended = [
        ChunkResult(Outcome.EXHAUSTED, 4, failed={3: ErrorCode.TRANSFER_FAIL, 1: ErrorCode.RPC_TIMEOUT}, backoff_s=0.5),
        ChunkResult(Outcome.SUCCESS_AFTER_RETRY, 2, retried_ok=2, backoff_s=0.25),
        ChunkResult(Outcome.DEADLINE_EXCEEDED, 3, failed={0: ErrorCode.TRANSFER_FAIL}),
    ]
    result = merge(Operation.GET, KEYS, BOUNDS, ended)
    err = result.error
    assert isinstance(err, DeadlineExceededError)  # deadline beats exhausted
    assert list(err.failed.items()) == [
        ("k1", ErrorCode.RPC_TIMEOUT),
        ("k3", ErrorCode.TRANSFER_FAIL),
        ("k8", ErrorCode.TRANSFER_FAIL),
    ]
    assert err.succeeded == 7 and err.attempts == 4 and err.operation is Operation.GET
    s = result.summary
    assert s.outcome is Outcome.DEADLINE_EXCEEDED and s.attempts == 9 and s.retry_delay_s == 0.75
    assert (s.keys_ok, s.keys_retried_ok, s.keys_failed) == (5, 2, 3)
    # what the observer is told is exactly what the exception says: the retry loop's final word
    assert s.codes == err.codes == Counter({ErrorCode.TRANSFER_FAIL: 2, ErrorCode.RPC_TIMEOUT: 1})


def test_a_non_retryable_chunk_makes_the_call_non_retryable():
    ended = [
        ChunkResult(Outcome.EXHAUSTED, 4, failed={0: ErrorCode.TRANSFER_FAIL}),
        ChunkResult(Outcome.NON_RETRYABLE, 1, failed={2: ErrorCode.OBJECT_NOT_FOUND}),
    ]
    result = merge(Operation.GET, KEYS[:8], BOUNDS[:2], ended)
    assert isinstance(result.error, NonRetryableError)
    assert result.error.failed == {"k0": ErrorCode.TRANSFER_FAIL, "k6": ErrorCode.OBJECT_NOT_FOUND}


def test_an_aborted_chunk_fails_its_keys_and_its_exception_is_raised():
    closed = ClientClosedError("client closed during get")
    # the second chunk had 1 key failed for good and 2 awaiting a retry when the client closed
    partial = ChunkResult(
        Outcome.NON_RETRYABLE,
        2,
        failed={0: ErrorCode.OBJECT_NOT_FOUND},
        pending={1: ErrorCode.RPC_TIMEOUT, 3: ErrorCode.RPC_TIMEOUT},
    )
    ended = [ChunkResult(Outcome.EXHAUSTED, 4, failed={0: ErrorCode.TRANSFER_FAIL}), ChunkAborted(closed, partial)]
    result = merge(Operation.GET, KEYS[:8], BOUNDS[:2], ended)
    assert result.error is closed
    s = result.summary
    assert s.outcome is Outcome.NON_RETRYABLE and s.keys_failed == 5 and s.attempts == 4
    # the last code the retry loop saw for each key that failed; keys it never saw fail have none
    assert s.codes == Counter({ErrorCode.TRANSFER_FAIL: 1, ErrorCode.RPC_TIMEOUT: 2, ErrorCode.OBJECT_NOT_FOUND: 1})


def test_a_chunk_stopped_before_its_retry_loop_started_reports_no_code():
    boom = RuntimeError("register_buffer failed")
    result = merge(Operation.PUT, KEYS[:4], BOUNDS[:1], [ChunkAborted(boom)])
    assert result.error is boom and result.summary.keys_failed == 4 and result.summary.codes == Counter()


def test_an_empty_call_is_a_success():
    result = merge(Operation.CLEAR, [], [], [])
    assert result.error is None and result.summary.outcome is Outcome.SUCCESS and result.summary.attempts == 0


def test_the_error_class_follows_the_outcome():
    ended = [ChunkResult(Outcome.EXHAUSTED, 2, failed={0: ErrorCode.RPC_FAIL})]
    assert isinstance(merge(Operation.PUT, KEYS[:4], BOUNDS[:1], ended).error, RetriesExhaustedError)
