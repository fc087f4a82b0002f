"""Retry policy objects: pure, with time and randomness injected, testable without a store.

* ``RetryPolicy``: an immutable value (like urllib3's ``Retry``): how many attempts, and the backoff
  before retry ``n``: exponential with full jitter, ``uniform(0, min(max, initial * multiplier**(n-1)))``.
* ``Deadline``: the total time one client call may take.
* ``RetryBudget``: a token bucket shared by every call of one client (Finagle's ``RetryBudget``, gRPC's
  retry throttling): each first attempt deposits ``ratio`` tokens, each retry withdraws one; deposits
  and withdrawals expire after ``ttl_s``; a separate reserve refilled at ``min_per_s`` lets a lightly
  loaded client retry at all. When both are empty, retries stop.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .numbers import is_int, is_number

Clock = Callable[[], float]
Jitter = Callable[[], float]  # returns a float in [0, 1)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait between attempts of one chunk.

    ``max_attempts`` counts the first attempt: 1 disables retries.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        if not is_int(self.max_attempts) or self.max_attempts < 1:
            raise ValueError(f"retry.max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("initial_backoff_s", "max_backoff_s", "deadline_s"):
            value = getattr(self, name)
            if not is_number(value) or value < 0 or not math.isfinite(value):
                raise ValueError(f"retry.{name} must be a finite number >= 0, got {value!r}")
        if not is_number(self.multiplier) or self.multiplier < 1 or not math.isfinite(self.multiplier):
            raise ValueError(f"retry.multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"retry.max_backoff_s ({self.max_backoff_s}) must be >= retry.initial_backoff_s "
                f"({self.initial_backoff_s})"
            )

    def can_retry_after(self, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based) may be followed by another."""
        return attempt < self.max_attempts

    def backoff_cap(self, retry: int) -> float:
        """The upper bound of the sleep before retry number ``retry`` (1 = the second attempt)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, got {retry}")
        if self.initial_backoff_s == 0:
            return 0.0
        try:
            raw = self.initial_backoff_s * self.multiplier ** (retry - 1)
        except OverflowError:
            return self.max_backoff_s
        return min(self.max_backoff_s, raw)

    def backoff(self, retry: int, jitter: Jitter = random.random) -> float:
        """The sleep before retry number ``retry``: full jitter over ``[0, backoff_cap(retry))``."""
        return jitter() * self.backoff_cap(retry)

    def deadline(self, clock: Clock = time.monotonic) -> Deadline:
        return Deadline(self.deadline_s, clock)


class Deadline:
    """A point in time after which no new attempt starts."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    def allows_wait(self, delay: float) -> bool:
        """Whether sleeping ``delay`` seconds still leaves time for an attempt."""
        return self.remaining() > delay


class WindowedSum:
    """A sum of the values added during the last ``window_s`` seconds, kept in ``slots`` buckets.

    Not thread-safe on its own; ``RetryBudget`` holds the lock.
    """

    def __init__(self, window_s: float, clock: Clock, slots: int = 10) -> None:
        if window_s <= 0 or slots < 1:
            raise ValueError("window_s must be > 0 and slots >= 1")
        self._width = window_s / slots
        self._clock = clock
        self._values = [0.0] * slots
        self._epochs = [-(10**18)] * slots

    def _epoch(self) -> int:
        return math.floor(self._clock() / self._width)

    def add(self, value: float) -> None:
        epoch = self._epoch()
        slot = epoch % len(self._values)
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._values[slot] = 0.0
        self._values[slot] += value

    def sum(self) -> float:
        now = self._epoch()
        n = len(self._values)
        return sum(v for v, e in zip(self._values, self._epochs, strict=True) if now - e < n)


class RetryBudget:
    """A thread-safe retry budget shared by all calls of one client.

    Over any ``ttl_s`` window, retries are bounded by ``ratio`` x first attempts, plus ``min_per_s`` per
    second from a reserve that holds at most one second's worth (and at least one token, so that a
    ``min_per_s`` below 1 still allows a retry every ``1 / min_per_s`` seconds).
    """

    DEFAULT_RATIO: float = 0.2
    DEFAULT_MIN_PER_S: float = 10.0

    def __init__(
        self,
        ratio: float = DEFAULT_RATIO,
        min_per_s: float = DEFAULT_MIN_PER_S,
        ttl_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not is_number(ratio) or ratio < 0 or not math.isfinite(ratio):
            raise ValueError(f"retry.budget_ratio must be a finite number >= 0, got {ratio!r}")
        if not is_number(min_per_s) or min_per_s < 0 or not math.isfinite(min_per_s):
            raise ValueError(f"retry.budget_min_per_s must be a finite number >= 0, got {min_per_s!r}")
        self.ratio = float(ratio)
        self.min_per_s = float(min_per_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._balance = WindowedSum(ttl_s, clock)
        self._reserve_cap = max(self.min_per_s, 1.0) if self.min_per_s > 0 else 0.0
        self._reserve = self._reserve_cap
        self._reserve_at = clock()
        self.denied = 0

    def _refill_reserve(self) -> None:
        now = self._clock()
        self._reserve = min(self._reserve_cap, self._reserve + (now - self._reserve_at) * self.min_per_s)
        self._reserve_at = now

    def deposit(self) -> None:
        """Record a first attempt (a store call that is not a retry)."""
        with self._lock:
            self._balance.add(self.ratio)

    def try_withdraw(self) -> bool:
        """Take the token for one retry; False (and nothing taken) when the budget is spent."""
        with self._lock:
            if self._balance.sum() >= 1.0:
                self._balance.add(-1.0)
                return True
            self._refill_reserve()
            if self._reserve >= 1.0:
                self._reserve -= 1.0
                return True
            self.denied += 1
            return False

    def available(self) -> float:
        """Whole retries the budget would allow right now."""
        with self._lock:
            self._refill_reserve()
            return float(math.floor(max(self._balance.sum(), 0.0)) + math.floor(self._reserve))
