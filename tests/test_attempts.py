"""Retrier.run_chunk: the selective-retry loop, driven by a scripted store call and a fake clock."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from tq_mooncake.client import ClientClosedError, ErrorClassifier, ErrorCode, Operation, Outcome
from tq_mooncake.client.attempts import ChunkResult, Retrier
from tq_mooncake.client.observer import NOOP_OBSERVER
from tq_mooncake.client.retry import Deadline, RetryBudget, RetryPolicy
from tq_mooncake.testing import FakeClock, RecordingObserver

pytestmark = pytest.mark.pure

OK = 0
TRANSFER_FAIL = int(ErrorCode.TRANSFER_FAIL)  # -800, retryable
RPC_FAIL = int(ErrorCode.RPC_FAIL)  # -900, retryable
NOT_FOUND = int(ErrorCode.OBJECT_NOT_FOUND)  # -704, not retryable on get/put
ALMOST_ONE = 1.0 - 1e-9


class ScriptedCall:
    """The store call: attempt ``i`` answers with ``script[i]`` (the last entry repeats).

    An entry is a dict ``{position: code}`` (positions not named succeed), a list of codes returned as is,
    a callable ``pending -> codes``, or an exception instance to raise. Every successful position moves
    ``bytes_per_key`` bytes.
    """

    def __init__(self, *script, bytes_per_key: int = 10, clock: FakeClock | None = None, takes_s: float = 0.0):
        self.script = list(script) or [{}]
        self.calls: list[list[int]] = []
        self.bytes_per_key = bytes_per_key
        self.clock = clock
        self.takes_s = takes_s

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        step = self.script[min(len(self.calls), len(self.script) - 1)]
        self.calls.append(list(pending))
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            codes = list(step(pending))
        elif isinstance(step, list):
            codes = list(step)
        else:
            codes = [step.get(pos, OK) for pos in pending]
        return codes, self.bytes_per_key * sum(1 for c in codes if c >= 0)


class Harness:
    """A Retrier on a fake clock whose sleep advances the clock instead of waiting."""

    def __init__(
        self,
        *,
        max_attempts: int = 4,
        initial_backoff_s: float = 0.001,
        max_backoff_s: float = 0.004,
        multiplier: float = 2.0,
        deadline_s: float = 30.0,
        budget_ratio: float = 0.0,
        budget_min_per_s: float = 100.0,
        jitter: Callable[[], float] = lambda: ALMOST_ONE,
        fake_sleep: bool = True,
    ) -> None:
        self.clock = FakeClock(100.0)
        self.policy = RetryPolicy(
            max_attempts=max_attempts,
            initial_backoff_s=initial_backoff_s,
            max_backoff_s=max_backoff_s,
            multiplier=multiplier,
            deadline_s=deadline_s,
        )
        self.budget = RetryBudget(ratio=budget_ratio, min_per_s=budget_min_per_s, clock=self.clock)
        self.closing = threading.Event()
        self.sleeps = self.clock.sleeps
        sleep = self.clock.sleep if fake_sleep else None
        self.retrier = Retrier(self.policy, self.budget, ErrorClassifier(), jitter, self.closing, sleep=sleep)
        self.scope = RecordingObserver().operation(Operation.GET, 0)

    def run(self, call, n_keys: int, operation: Operation = Operation.GET, chunk: int = 0) -> ChunkResult:
        deadline = Deadline(self.policy.deadline_s, self.clock)
        return self.retrier.run_chunk(operation, call, n_keys, chunk, deadline, self.scope)


# ------------------------------------------------------------------------------------------------ success
def test_all_ok_in_one_attempt():
    h = Harness()
    call = ScriptedCall({})
    result = h.run(call, 5)
    assert result.outcome is Outcome.SUCCESS
    assert result.attempts == 1
    assert result.failed == {}
    assert result.retried_ok == 0
    assert result.backoff_s == 0.0
    assert result.nbytes == 50
    assert call.calls == [[0, 1, 2, 3, 4]]
    assert h.sleeps == []


def test_zero_keys_makes_one_empty_call():
    h = Harness()
    call = ScriptedCall({})
    result = h.run(call, 0)
    assert result.outcome is Outcome.SUCCESS
    assert call.calls == [[]]


def test_failed_positions_are_retried_selectively():
    h = Harness()
    call = ScriptedCall({1: TRANSFER_FAIL, 3: TRANSFER_FAIL}, {})
    result = h.run(call, 5)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert result.attempts == 2
    assert result.retried_ok == 2
    assert result.failed == {}
    assert call.calls == [[0, 1, 2, 3, 4], [1, 3]]
    assert result.nbytes == 30 + 20


def test_retry_sleeps_the_jittered_backoff():
    h = Harness(initial_backoff_s=0.001, max_backoff_s=0.004, jitter=lambda: 0.5)
    call = ScriptedCall({0: RPC_FAIL}, {0: RPC_FAIL}, {0: RPC_FAIL}, {})
    result = h.run(call, 2)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert h.sleeps == pytest.approx([0.0005, 0.001, 0.002])
    assert result.backoff_s == pytest.approx(0.0035)


def test_keys_that_succeed_later_are_counted_once_each():
    h = Harness()
    call = ScriptedCall({0: RPC_FAIL, 1: RPC_FAIL, 2: RPC_FAIL}, {0: RPC_FAIL}, {})
    result = h.run(call, 4)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert result.retried_ok == 3
    assert call.calls == [[0, 1, 2, 3], [0, 1, 2], [0]]


# ------------------------------------------------------------------------------------------------ failures
def test_exhaustion_after_max_attempts_keeps_last_codes():
    h = Harness(max_attempts=3)
    call = ScriptedCall({0: TRANSFER_FAIL, 2: TRANSFER_FAIL}, {0: TRANSFER_FAIL, 2: RPC_FAIL}, {0: RPC_FAIL, 2: -901})
    result = h.run(call, 3)
    assert result.outcome is Outcome.EXHAUSTED
    assert result.attempts == 3
    assert result.failed == {0: ErrorCode.RPC_FAIL, 2: ErrorCode.RPC_TIMEOUT}
    assert len(call.calls) == 3
    assert len(h.sleeps) == 2  # no sleep after the last attempt


def test_max_attempts_one_never_retries():
    h = Harness(max_attempts=1)
    call = ScriptedCall({0: TRANSFER_FAIL})
    available = h.budget.available()
    result = h.run(call, 2)
    assert result.outcome is Outcome.EXHAUSTED
    assert result.attempts == 1
    assert result.failed == {0: ErrorCode.TRANSFER_FAIL}
    assert h.budget.available() == available  # no token spent


def test_non_retryable_code_stops_that_position_at_once():
    h = Harness()
    call = ScriptedCall({0: NOT_FOUND, 1: TRANSFER_FAIL}, {})
    result = h.run(call, 3, Operation.GET)
    assert result.outcome is Outcome.NON_RETRYABLE
    assert call.calls == [[0, 1, 2], [1]]
    assert result.failed == {0: ErrorCode.OBJECT_NOT_FOUND}
    assert result.retried_ok == 1
    assert result.attempts == 2


def test_non_retryable_outcome_wins_over_later_exhaustion():
    h = Harness(max_attempts=2)
    call = ScriptedCall({0: NOT_FOUND, 1: TRANSFER_FAIL}, {1: TRANSFER_FAIL})
    result = h.run(call, 2, Operation.PUT)
    assert result.outcome is Outcome.NON_RETRYABLE
    assert result.failed == {0: ErrorCode.OBJECT_NOT_FOUND, 1: ErrorCode.TRANSFER_FAIL}


def test_object_not_found_on_clear_is_success():
    h = Harness()
    call = ScriptedCall({0: NOT_FOUND, 2: NOT_FOUND})
    result = h.run(call, 3, Operation.CLEAR)
    assert result.outcome is Outcome.SUCCESS
    assert result.failed == {}
    assert len(call.calls) == 1


def test_unknown_code_is_not_retried_and_reported_as_unknown():
    h = Harness()
    call = ScriptedCall({1: -4242})
    result = h.run(call, 2)
    assert result.outcome is Outcome.NON_RETRYABLE
    assert result.failed == {1: ErrorCode.UNKNOWN}
    assert len(call.calls) == 1


def test_positive_codes_are_success():
    h = Harness()
    call = ScriptedCall([4096, 0, 1])
    result = h.run(call, 3)
    assert result.outcome is Outcome.SUCCESS


# --------------------------------------------------------------------------------------------------- budget
def test_budget_denial_stops_after_one_call():
    h = Harness(budget_ratio=0.0, budget_min_per_s=0.0)
    call = ScriptedCall({0: TRANSFER_FAIL, 2: RPC_FAIL})
    result = h.run(call, 3)
    assert result.outcome is Outcome.BUDGET_DENIED
    assert len(call.calls) == 1
    assert result.failed == {0: ErrorCode.TRANSFER_FAIL, 2: ErrorCode.RPC_FAIL}
    assert h.budget.denied == 1
    assert h.sleeps == []


def test_each_chunk_deposits_once_and_each_retry_withdraws_once():
    h = Harness(budget_ratio=1.0, budget_min_per_s=0.0)
    budget = h.budget
    h.run(ScriptedCall({}), 3)
    assert budget.available() == 1  # one deposit for the chunk, not one per key
    result = h.run(ScriptedCall({0: RPC_FAIL}, {0: RPC_FAIL}, {}), 3)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert budget.available() == 0  # 2 deposits, 2 withdrawals


def test_budget_running_out_midway():
    h = Harness(max_attempts=5, budget_ratio=1.0, budget_min_per_s=0.0)
    call = ScriptedCall({0: RPC_FAIL})
    result = h.run(call, 2)
    assert result.outcome is Outcome.BUDGET_DENIED
    assert len(call.calls) == 2  # the deposit paid for one retry
    assert result.failed == {0: ErrorCode.RPC_FAIL}


def test_non_retryable_outcome_wins_over_budget_denial():
    h = Harness(budget_ratio=0.0, budget_min_per_s=0.0)
    result = h.run(ScriptedCall({0: NOT_FOUND, 1: RPC_FAIL}), 2)
    assert result.outcome is Outcome.NON_RETRYABLE
    assert result.failed == {0: ErrorCode.OBJECT_NOT_FOUND, 1: ErrorCode.RPC_FAIL}


# ------------------------------------------------------------------------------------------------- deadline
def test_deadline_smaller_than_backoff_stops_without_sleeping():
    h = Harness(initial_backoff_s=0.001, max_backoff_s=0.001, deadline_s=0.0005)
    call = ScriptedCall({1: TRANSFER_FAIL})
    available = h.budget.available()
    result = h.run(call, 2)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED
    assert result.failed == {1: ErrorCode.TRANSFER_FAIL}
    assert len(call.calls) == 1
    assert h.sleeps == []
    assert h.budget.available() == available  # the deadline is checked before the budget
    assert h.budget.denied == 0


def test_deadline_spent_by_slow_calls():
    h = Harness(max_attempts=10, initial_backoff_s=0.001, max_backoff_s=0.001, deadline_s=1.0)
    call = ScriptedCall({0: RPC_FAIL}, clock=h.clock, takes_s=0.4)
    result = h.run(call, 1)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED
    assert len(call.calls) == 3  # 0.4 + 0.001 + 0.4 + 0.001 + 0.4 > 1.0 - 0.001
    assert result.failed == {0: ErrorCode.RPC_FAIL}


def test_zero_jitter_still_respects_an_expired_deadline():
    h = Harness(deadline_s=0.5, jitter=lambda: 0.0)
    call = ScriptedCall({0: RPC_FAIL}, clock=h.clock, takes_s=1.0)
    result = h.run(call, 1)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED
    assert len(call.calls) == 1


# ------------------------------------------------------------------------------------------- bad results
def test_wrong_length_result_fails_every_pending_key_as_internal_error():
    h = Harness()
    call = ScriptedCall([OK], {})
    result = h.run(call, 3)
    assert call.calls == [[0, 1, 2], [0, 1, 2]]
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert result.retried_ok == 3
    assert h.scope.attempts[0].failed == Counter({ErrorCode.INTERNAL_ERROR: 3})
    assert h.scope.attempts[0].nbytes == 0
    assert result.nbytes == 30  # bytes claimed by the bad answer are not counted


def test_too_long_result_is_also_rejected():
    h = Harness(max_attempts=2)
    call = ScriptedCall([OK, OK, OK, OK])
    result = h.run(call, 2)
    assert result.outcome is Outcome.EXHAUSTED
    assert result.failed == {0: ErrorCode.INTERNAL_ERROR, 1: ErrorCode.INTERNAL_ERROR}
    assert result.nbytes == 0


def test_wrong_length_on_retry_only_fails_the_retried_keys():
    h = Harness(max_attempts=2)
    call = ScriptedCall({2: RPC_FAIL}, [OK, OK])
    result = h.run(call, 3)
    assert result.outcome is Outcome.EXHAUSTED
    assert result.failed == {2: ErrorCode.INTERNAL_ERROR}


# -------------------------------------------------------------------------------------------------- closing
def test_closed_before_run_raises_without_calling():
    h = Harness()
    h.closing.set()
    call = ScriptedCall({})
    with pytest.raises(ClientClosedError, match="client closed during get"):
        h.run(call, 2)
    assert call.calls == []
    assert h.scope.attempts == []


def test_closed_during_backoff_raises_before_next_attempt():
    h = Harness()

    def close_on_sleep(seconds: float) -> None:
        h.closing.set()

    h.retrier = Retrier(h.policy, h.budget, ErrorClassifier(), lambda: 0.5, h.closing, sleep=close_on_sleep)
    call = ScriptedCall({0: RPC_FAIL}, {})
    with pytest.raises(ClientClosedError, match="client closed during put"):
        h.run(call, 2, Operation.PUT)
    assert len(call.calls) == 1


def test_default_sleep_waits_on_closing_event():
    h = Harness(initial_backoff_s=0.0001, max_backoff_s=0.0001, fake_sleep=False)
    call = ScriptedCall({0: RPC_FAIL}, {})
    result = h.run(call, 2)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
    assert len(call.calls) == 2


def test_closing_during_call_wakes_default_sleep_and_raises():
    h = Harness(initial_backoff_s=60.0, max_backoff_s=60.0, deadline_s=600.0, fake_sleep=False)

    def fail_and_close(pending):
        h.closing.set()  # were the 60 s backoff really slept, the test would hit its timeout
        return [RPC_FAIL] * len(pending)

    call = ScriptedCall(fail_and_close)
    with pytest.raises(ClientClosedError):
        h.run(call, 1)
    assert len(call.calls) == 1


# ------------------------------------------------------------------------------------------------- observer
def test_observer_records_every_attempt():
    h = Harness(initial_backoff_s=0.001, max_backoff_s=0.004, jitter=lambda: 0.5)
    call = ScriptedCall({0: TRANSFER_FAIL, 1: RPC_FAIL, 2: RPC_FAIL}, {0: TRANSFER_FAIL}, {})
    result = h.run(call, 4, chunk=7)
    recs = h.scope.attempts
    assert [(r.chunk, r.attempt, r.keys) for r in recs] == [(7, 1, 4), (7, 2, 3), (7, 3, 1)]
    assert [r.backoff_s for r in recs] == pytest.approx([0.0, 0.0005, 0.001])
    assert [r.failed for r in recs] == [
        Counter({ErrorCode.RPC_FAIL: 2, ErrorCode.TRANSFER_FAIL: 1}),
        Counter({ErrorCode.TRANSFER_FAIL: 1}),
        Counter(),
    ]
    assert [r.nbytes for r in recs] == [10, 20, 10]
    assert all(r.ended == 1 for r in recs)
    assert result.attempts == len(recs)


def test_observer_sees_non_retryable_failures():
    h = Harness()
    h.run(ScriptedCall({0: NOT_FOUND, 1: -600}), 3)
    (rec,) = h.scope.attempts
    assert rec.failed == Counter({ErrorCode.OBJECT_NOT_FOUND: 1, ErrorCode.INVALID_PARAMS: 1})


def test_exception_from_call_ends_the_attempt_and_propagates():
    h = Harness()
    call = ScriptedCall({0: RPC_FAIL, 1: RPC_FAIL}, RuntimeError("store exploded"))
    with pytest.raises(RuntimeError, match="store exploded"):
        h.run(call, 3)
    assert len(h.scope.attempts) == 2
    last = h.scope.attempts[-1]
    assert last.ended == 1
    assert last.keys == 2
    assert last.failed == Counter({ErrorCode.INTERNAL_ERROR: 2})
    assert last.nbytes == 0


def test_keyboard_interrupt_from_call_also_ends_the_attempt():
    h = Harness()
    call = ScriptedCall(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        h.run(call, 1)
    assert h.scope.attempts[0].ended == 1


def test_noop_observer_scope_is_accepted():
    h = Harness()
    deadline = Deadline(1.0, h.clock)
    scope = NOOP_OBSERVER.operation(Operation.GET, 2)
    result = h.retrier.run_chunk(Operation.GET, ScriptedCall({0: RPC_FAIL}, {}), 2, 0, deadline, scope)
    assert result.outcome is Outcome.SUCCESS_AFTER_RETRY
