"""RetryPolicy, Deadline, WindowedSum and RetryBudget: pure objects, driven by a fake clock."""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import pytest

from tq_mooncake.client.retry import Deadline, RetryBudget, RetryPolicy, WindowedSum
from tq_mooncake.testing import FakeClock

pytestmark = pytest.mark.pure


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------------------------------ RetryPolicy
def test_policy_defaults():
    p = RetryPolicy()
    assert (p.max_attempts, p.initial_backoff_s, p.max_backoff_s, p.multiplier, p.deadline_s) == (
        4,
        0.05,
        2.0,
        2.0,
        30.0,
    )


def test_policy_is_frozen():
    p = RetryPolicy()
    with pytest.raises(AttributeError):
        p.max_attempts = 9  # type: ignore[misc]


def test_backoff_cap_grows_exponentially_from_initial():
    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=100.0, multiplier=3.0)
    assert [p.backoff_cap(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 2.7])


def test_backoff_cap_is_limited_by_max_backoff():
    p = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=3.0, multiplier=2.0)
    assert [p.backoff_cap(n) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.5, 1.0, 2.0, 3.0, 3.0, 3.0])


def test_backoff_cap_with_multiplier_one_is_constant():
    p = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=1.0, multiplier=1.0)
    assert {p.backoff_cap(n) for n in (1, 2, 10, 10_000)} == {0.25}


@pytest.mark.parametrize("retry", [1_000, 10_000, 10**9, 2**62])
def test_backoff_cap_huge_retry_number_returns_max_without_overflow(retry):
    p = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=2.0, multiplier=2.0)
    assert p.backoff_cap(retry) == 2.0


def test_backoff_cap_huge_retry_with_int_multiplier_returns_max():
    p = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=2.0, multiplier=3)
    assert p.backoff_cap(5_000) == 2.0


def test_backoff_cap_is_non_decreasing():
    p = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=5.0, multiplier=1.7)
    caps = [p.backoff_cap(n) for n in range(1, 200)]
    assert caps == sorted(caps)
    assert caps[-1] == 5.0


def test_backoff_cap_with_zero_initial_backoff_is_zero_for_small_retries():
    p = RetryPolicy(initial_backoff_s=0.0, max_backoff_s=2.0)
    assert p.backoff_cap(1) == 0.0
    assert p.backoff_cap(50) == 0.0


def test_backoff_cap_with_zero_initial_backoff_stays_zero_for_huge_retries():
    p = RetryPolicy(initial_backoff_s=0.0, max_backoff_s=2.0)
    assert p.backoff_cap(5_000) == 0.0


@pytest.mark.parametrize("retry", [0, -1])
def test_backoff_cap_rejects_retry_numbers_below_one(retry):
    with pytest.raises(ValueError, match=f"retry numbers start at 1, got {retry}"):
        RetryPolicy().backoff_cap(retry)


@pytest.mark.parametrize("jitter_value", [0.0, 0.5, 0.999])
def test_backoff_is_full_jitter_times_cap(jitter_value):
    p = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=10.0, multiplier=2.0)
    for retry in (1, 2, 3):
        assert p.backoff(retry, lambda v=jitter_value: v) == pytest.approx(jitter_value * p.backoff_cap(retry))


def test_backoff_zero_jitter_gives_no_sleep():
    assert RetryPolicy().backoff(3, lambda: 0.0) == 0.0


def test_backoff_stays_below_cap_with_jitter_just_under_one():
    p = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=1.0)
    assert p.backoff(10, lambda: 0.999) < p.backoff_cap(10) == 1.0


def test_backoff_calls_jitter_once_per_backoff():
    calls = []

    def jitter():
        calls.append(1)
        return 0.5

    RetryPolicy().backoff(2, jitter)
    assert len(calls) == 1


def test_backoff_default_jitter_is_within_range():
    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.1)
    assert all(0.0 <= p.backoff(1) < 0.1 for _ in range(200))


@pytest.mark.parametrize(
    ("max_attempts", "expected"),
    [(1, [False, False]), (2, [True, False, False]), (4, [True, True, True, False, False])],
)
def test_can_retry_after_counts_the_first_attempt(max_attempts, expected):
    p = RetryPolicy(max_attempts=max_attempts)
    assert [p.can_retry_after(a) for a in range(1, len(expected) + 1)] == expected


def test_policy_deadline_uses_deadline_s_and_clock(clock):
    d = RetryPolicy(deadline_s=7.5).deadline(clock)
    assert d.remaining() == pytest.approx(7.5)
    clock.advance(2.5)
    assert d.remaining() == pytest.approx(5.0)


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True, None])
def test_policy_rejects_bad_max_attempts(value):
    with pytest.raises(ValueError, match=r"retry\.max_attempts must be an integer >= 1, got "):
        RetryPolicy(max_attempts=value)


@pytest.mark.parametrize("name", ["initial_backoff_s", "max_backoff_s", "deadline_s"])
@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1", True, None])
def test_policy_rejects_bad_durations(name, value):
    kwargs = {name: value}
    if name == "initial_backoff_s" and isinstance(value, float) and math.isfinite(value):
        kwargs["max_backoff_s"] = 10.0
    with pytest.raises(ValueError, match=rf"retry\.{name} must be a finite number >= 0, got {value!r}"):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("value", [0.5, 0, -2.0, math.nan, math.inf, "2", False])
def test_policy_rejects_bad_multiplier(value):
    with pytest.raises(ValueError, match=r"retry\.multiplier must be a finite number >= 1, got "):
        RetryPolicy(multiplier=value)


def test_policy_rejects_max_backoff_below_initial():
    with pytest.raises(ValueError, match=r"retry\.max_backoff_s \(0\.1\) must be >= retry\.initial_backoff_s \(0\.5\)"):
        RetryPolicy(initial_backoff_s=0.5, max_backoff_s=0.1)


def test_policy_accepts_edge_values():
    p = RetryPolicy(max_attempts=1, initial_backoff_s=0, max_backoff_s=0, multiplier=1, deadline_s=0)
    assert not p.can_retry_after(1)
    assert p.backoff_cap(3) == 0


# ---------------------------------------------------------------------------------------------- Deadline
def test_deadline_remaining_follows_clock(clock):
    d = Deadline(10.0, clock)
    assert d.remaining() == pytest.approx(10.0)
    clock.advance(4.0)
    assert d.remaining() == pytest.approx(6.0)
    clock.advance(10.0)
    assert d.remaining() == pytest.approx(-4.0)


def test_deadline_allows_wait_only_when_time_is_left_after_it(clock):
    d = Deadline(1.0, clock)
    assert d.allows_wait(0.0)
    assert d.allows_wait(0.5)
    assert not d.allows_wait(1.0)  # nothing would be left for the attempt
    assert not d.allows_wait(1.5)


def test_deadline_in_the_past_allows_no_wait(clock):
    d = Deadline(1.0, clock)
    clock.advance(2.0)
    assert not d.allows_wait(0.0)


def test_zero_deadline_allows_no_wait(clock):
    assert not Deadline(0.0, clock).allows_wait(0.0)


# ------------------------------------------------------------------------------------------ WindowedSum
def test_windowed_sum_adds_values(clock):
    w = WindowedSum(10.0, clock)
    assert w.sum() == 0.0
    w.add(1.5)
    w.add(2.0)
    clock.advance(3.0)
    w.add(-0.5)
    assert w.sum() == pytest.approx(3.0)


def test_windowed_sum_keeps_values_within_window(clock):
    clock.now = 0.0
    w = WindowedSum(10.0, clock, slots=10)
    w.add(1.0)
    clock.advance(9.5)
    assert w.sum() == 1.0


def test_windowed_sum_expires_values_after_window(clock):
    clock.now = 0.0
    w = WindowedSum(10.0, clock, slots=10)
    w.add(1.0)
    clock.advance(5.0)
    w.add(2.0)
    clock.now = 10.0
    assert w.sum() == 2.0
    clock.now = 15.0
    assert w.sum() == 0.0


def test_windowed_sum_reuses_a_slot_after_wraparound(clock):
    clock.now = 0.0
    w = WindowedSum(10.0, clock, slots=10)
    w.add(5.0)
    clock.now = 10.0  # same slot index, new epoch: the old value must not leak in
    w.add(1.0)
    assert w.sum() == 1.0


def test_windowed_sum_long_idle_forgets_everything(clock):
    w = WindowedSum(1.0, clock, slots=4)
    w.add(3.0)
    clock.advance(1_000_000.0)
    assert w.sum() == 0.0


@pytest.mark.parametrize(("window_s", "slots"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_windowed_sum_rejects_bad_parameters(clock, window_s, slots):
    with pytest.raises(ValueError, match="window_s must be > 0 and slots >= 1"):
        WindowedSum(window_s, clock, slots)


# ------------------------------------------------------------------------------------------ RetryBudget
def test_budget_first_attempts_deposit_ratio(clock):
    b = RetryBudget(ratio=0.5, min_per_s=0, clock=clock)
    assert b.available() == 0
    b.deposit()
    assert b.available() == 0  # 0.5 token is not a whole retry
    b.deposit()
    assert b.available() == 1
    for _ in range(4):
        b.deposit()
    assert b.available() == 3


def test_budget_withdraw_takes_one_token(clock):
    b = RetryBudget(ratio=1.0, min_per_s=0, clock=clock)
    b.deposit()
    b.deposit()
    assert b.try_withdraw()
    assert b.available() == 1
    assert b.try_withdraw()
    assert b.available() == 0
    assert not b.try_withdraw()


def test_budget_denied_counts_refusals(clock):
    b = RetryBudget(ratio=0.0, min_per_s=0.0, clock=clock)
    assert b.denied == 0
    assert not b.try_withdraw()
    assert not b.try_withdraw()
    assert b.denied == 2
    b2 = RetryBudget(ratio=1.0, min_per_s=0.0, clock=clock)
    b2.deposit()
    assert b2.try_withdraw()
    assert b2.denied == 0


def test_budget_empty_without_reserve_denies(clock):
    b = RetryBudget(ratio=0.0, min_per_s=0.0, clock=clock)
    b.deposit()
    assert b.available() == 0
    assert not b.try_withdraw()
    assert b.denied == 1


def test_budget_reserve_allows_a_burst_of_min_per_s(clock):
    b = RetryBudget(ratio=0.0, min_per_s=3.0, clock=clock)
    assert b.available() == 3
    assert [b.try_withdraw() for _ in range(4)] == [True, True, True, False]
    assert b.denied == 1
    assert b.available() == 0


def test_budget_reserve_refills_at_min_per_s(clock):
    b = RetryBudget(ratio=0.0, min_per_s=4.0, clock=clock)
    for _ in range(4):
        assert b.try_withdraw()
    assert not b.try_withdraw()
    clock.advance(0.25)  # one token
    assert b.try_withdraw()
    assert not b.try_withdraw()
    clock.advance(0.5)  # two tokens
    assert b.available() == 2
    assert b.try_withdraw()
    assert b.try_withdraw()
    assert not b.try_withdraw()


def test_budget_reserve_holds_at_most_one_second(clock):
    b = RetryBudget(ratio=0.0, min_per_s=5.0, clock=clock)
    for _ in range(5):
        assert b.try_withdraw()
    clock.advance(3600.0)
    assert b.available() == 5
    assert sum(b.try_withdraw() for _ in range(10)) == 5


def test_budget_fractional_min_per_s_allows_some_retries(clock):
    b = RetryBudget(ratio=0.0, min_per_s=0.5, clock=clock)
    clock.advance(10.0)  # 10 s at 0.5/s
    assert b.try_withdraw()


def test_budget_balance_is_used_before_reserve(clock):
    b = RetryBudget(ratio=1.0, min_per_s=2.0, clock=clock)
    b.deposit()
    assert b.available() == 3
    assert b.try_withdraw()  # from the balance
    assert b.available() == 2  # reserve untouched
    assert b.try_withdraw()
    assert b.try_withdraw()
    assert not b.try_withdraw()


def test_budget_deposits_expire_after_ttl(clock):
    clock.now = 0.0
    b = RetryBudget(ratio=1.0, min_per_s=0.0, ttl_s=10.0, clock=clock)
    for _ in range(3):
        b.deposit()
    clock.now = 9.0
    assert b.available() == 3
    clock.now = 11.0
    assert b.available() == 0
    assert not b.try_withdraw()


def test_budget_withdrawals_expire_after_ttl_too(clock):
    clock.now = 0.0
    b = RetryBudget(ratio=1.0, min_per_s=0.0, ttl_s=10.0, clock=clock)
    b.deposit()
    b.deposit()
    clock.now = 5.0
    assert b.try_withdraw()
    assert b.try_withdraw()
    clock.now = 11.0  # the deposits are gone, the withdrawals (at t=5) still count: the balance is negative
    b.deposit()
    assert b.available() == 0
    assert not b.try_withdraw()
    clock.now = 16.0  # now the withdrawals are gone as well; the deposit at t=11 remains
    assert b.available() == 1
    assert b.try_withdraw()


def test_budget_available_is_whole_retries_only(clock):
    b = RetryBudget(ratio=0.3, min_per_s=0.0, clock=clock)
    for _ in range(6):
        b.deposit()
    assert b.available() == 1.0
    assert isinstance(b.available(), float)


def test_budget_available_does_not_withdraw(clock):
    b = RetryBudget(ratio=1.0, min_per_s=1.0, clock=clock)
    b.deposit()
    for _ in range(5):
        assert b.available() == 2
    assert b.denied == 0


def _retry_bound(n: int, ratio: float) -> int:
    """floor(n * ratio) for the ratio meant (0.7 is 7/10, not the float nearest to it)."""
    return math.floor(n * Fraction(ratio).limit_denominator(1000))


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0, 1.5])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 33, 100, 997])
def test_budget_bound_without_reserve(clock, ratio, n):
    b = RetryBudget(ratio=ratio, min_per_s=0.0, clock=clock)
    for _ in range(n):
        b.deposit()
    allowed = 0
    while b.try_withdraw():
        allowed += 1
    bound = _retry_bound(n, ratio)
    assert allowed <= bound
    assert allowed >= bound - 1  # float rounding may cost at most one
    assert b.denied == 1


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35])
def test_budget_bound_with_interleaved_attempts_and_retries(clock, ratio):
    """Each first attempt is followed by as many retries as the budget allows, within one ttl window."""
    b = RetryBudget(ratio=ratio, min_per_s=0.0, ttl_s=100.0, clock=clock)
    allowed = 0
    n = 500
    for _ in range(n):
        b.deposit()
        clock.advance(0.05)
        while b.try_withdraw():
            allowed += 1
    bound = _retry_bound(n, ratio)
    assert allowed <= bound
    assert allowed >= bound - 1


def test_budget_is_thread_safe(clock):
    b = RetryBudget(ratio=1.0, min_per_s=0.0, clock=clock)
    for _ in range(200):
        b.deposit()
    threads_n, tries = 16, 50
    start = threading.Barrier(threads_n)
    granted = [0] * threads_n

    def worker(i: int) -> None:
        start.wait()
        for _ in range(tries):
            if b.try_withdraw():
                granted[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 200
    assert b.denied == threads_n * tries - 200
    assert b.available() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": -0.1}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"ratio": math.inf}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"ratio": math.nan}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"ratio": "0.2"}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"ratio": True}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"min_per_s": -1}, r"retry\.budget_min_per_s must be a finite number >= 0"),
        ({"min_per_s": math.inf}, r"retry\.budget_min_per_s must be a finite number >= 0"),
        ({"min_per_s": None}, r"retry\.budget_min_per_s must be a finite number >= 0"),
        ({"ttl_s": 0}, r"window_s must be > 0"),
    ],
)
def test_budget_rejects_bad_values(clock, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryBudget(clock=clock, **kwargs)
