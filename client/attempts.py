"""The one selective-retry loop every operation runs on each chunk.

``run_chunk`` calls the store for the keys still pending, classifies each key's code, keeps the keys
worth retrying, and asks the policy (attempts), the deadline and the budget whether to go again, sleeping
the backoff in between. Every decision about retrying is made here or in ``retry.py``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .codes import ErrorClassifier, ErrorCode, Verdict
from .errors import ClientClosedError
from .observer import OperationScope
from .retry import Deadline, Jitter, RetryBudget, RetryPolicy


class ChunkCall(Protocol):
    """One attempt's store call on a chunk (``chunks.py`` has one per operation)."""

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        """Call the store for the chunk positions still ``pending``; returns one code per position (0 = ok,
        negative = ``ErrorCode``) and the number of bytes moved for the positions that succeeded."""


@dataclass
class ChunkResult:
    """How one chunk ended (or, while it runs, how far it got). ``failed`` maps chunk positions that failed for
    good to their last code; ``pending`` the positions waiting for a retry to their last code (empty once the
    chunk has ended normally: they are then in ``failed`` or succeeded)."""

    outcome: Outcome = Outcome.SUCCESS
    attempts: int = 0
    failed: dict[int, ErrorCode] = field(default_factory=dict)
    retried_ok: int = 0
    backoff_s: float = 0.0
    nbytes: int = 0
    pending: dict[int, ErrorCode] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkAborted:
    """A chunk stopped by an exception (the client closed, or the store call or the chunk's set-up raised):
    the call raises ``error``. ``partial`` is how far the retry loop got (None if it never started)."""

    error: BaseException
    partial: ChunkResult | None = None


class Retrier:
    """Runs chunks under one client's policy, budget and classifier; thread-safe.

    ``closing`` is set by ``close()``: no new attempt starts, and the default sleep (``closing.wait``)
    wakes at once.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget,
        classifier: ErrorClassifier,
        jitter: Jitter,
        closing: threading.Event,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.classifier = classifier
        self._jitter = jitter
        self._closing = closing
        self._sleep = sleep if sleep is not None else closing.wait

    def run_chunk(
        self,
        operation: Operation,
        call: ChunkCall,
        n_keys: int,
        chunk: int,
        deadline: Deadline,
        scope: OperationScope,
        result: ChunkResult | None = None,
    ) -> ChunkResult:
        """Run ``call`` on the chunk's ``n_keys`` positions until every key succeeded or failed for good; returns
        ``result`` (a new one if None), which is kept up to date while it runs, so that a caller still knows how
        far the chunk got when this raises (``ClientClosedError``, or whatever the store call raised)."""
        result = result if result is not None else ChunkResult()
        pending = list(range(n_keys))
        ever_failed: set[int] = set()
        backoff = 0.0
        self.budget.deposit()
        while True:
            if self._closing.is_set():
                raise ClientClosedError(f"client closed during {operation.value}")
            result.attempts += 1
            attempt_scope = scope.attempt(chunk, result.attempts, len(pending), backoff)
            try:
                codes, nbytes = call(pending)
            except BaseException:
                attempt_scope.end(Counter({ErrorCode.INTERNAL_ERROR: len(pending)}), 0)
                result.pending = dict.fromkeys(pending, ErrorCode.INTERNAL_ERROR)
                raise
            if len(codes) != len(pending):  # a short or long result must not pass keys as done
                codes = [ErrorCode.INTERNAL_ERROR] * len(pending)
                nbytes = 0
            retry: dict[int, ErrorCode] = {}
            failed_now: Counter[ErrorCode] = Counter()
            if not any(codes):  # every key succeeded (the common case): nothing to classify key by key
                if ever_failed:
                    result.retried_ok += sum(pos in ever_failed for pos in pending)
            else:
                for pos, code in zip(pending, codes, strict=True):
                    verdict = self.classifier.classify(operation, int(code))
                    if verdict is Verdict.OK:
                        if pos in ever_failed:
                            result.retried_ok += 1
                        continue
                    ec = ErrorCode.of(int(code))
                    failed_now[ec] += 1
                    ever_failed.add(pos)
                    if verdict is Verdict.RETRY:
                        retry[pos] = ec
                    else:
                        result.failed[pos] = ec
                        result.outcome = Outcome.NON_RETRYABLE
            result.nbytes += nbytes
            result.pending = retry
            routing = getattr(call, "routing", None)  # what routing around lost nodes did (chunks.py)
            if routing:
                attempt_scope.end(failed_now, nbytes, routing)
            else:
                attempt_scope.end(failed_now, nbytes)
            if not retry:
                break
            backoff, stop = self._next_backoff(result.attempts, deadline)
            if stop is not None:
                result.failed.update(retry)
                result.pending = {}
                if result.outcome is not Outcome.NON_RETRYABLE:
                    result.outcome = stop
                break
            self._sleep(backoff)
            result.backoff_s += backoff
            pending = list(retry)
        if result.outcome is Outcome.SUCCESS and result.attempts > 1:
            result.outcome = Outcome.SUCCESS_AFTER_RETRY
        return result

    def _next_backoff(self, attempt: int, deadline: Deadline) -> tuple[float, Outcome | None]:
        """The sleep before the next attempt, or why there is none. Checks the cheap limits first and
        the deadline before the budget, so a retry that cannot happen spends no token."""
        if not self.policy.can_retry_after(attempt):
            return 0.0, Outcome.EXHAUSTED
        backoff = self.policy.backoff(attempt, self._jitter)
        if not deadline.allows_wait(backoff):
            return backoff, Outcome.DEADLINE_EXCEEDED
        if not self.budget.try_withdraw():
            return backoff, Outcome.BUDGET_DENIED
        return backoff, None
