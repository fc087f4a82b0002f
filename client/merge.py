"""Cutting a call into chunks, and merging how its chunks ended into how the call ended: pure functions.

``merge`` turns the chunks' ``ChunkResult``s (or ``ChunkAborted`` for chunks an exception stopped) into the
call's ``OperationSummary`` (what the observer is told) and the error the call raises, if any.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .attempts import ChunkAborted, ChunkResult
from .codes import ErrorCode
from .errors import ERROR_FOR_OUTCOME
from .observer import OperationSummary

# When chunks of one call end differently, the call reports the first of these that occurred.
OUTCOME_PRECEDENCE: tuple[Outcome, ...] = (
    Outcome.NON_RETRYABLE,
    Outcome.DEADLINE_EXCEEDED,
    Outcome.BUDGET_DENIED,
    Outcome.EXHAUSTED,
    Outcome.SUCCESS_AFTER_RETRY,
    Outcome.SUCCESS,
)


def combine_outcomes(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome of a call made of chunks: the most severe of theirs (``SUCCESS`` for none)."""
    present = set(outcomes)
    for outcome in OUTCOME_PRECEDENCE:
        if outcome in present:
            return outcome
    return Outcome.SUCCESS


def chunk_bounds(n_keys: int, batch_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each chunk of at most ``batch_size`` keys, in key order."""
    return [(lo, min(lo + batch_size, n_keys)) for lo in range(0, n_keys, batch_size)]


@dataclass(frozen=True)
class CallResult:
    """How one call ended: the summary for its observer, and what it raises (None: it succeeded)."""

    summary: OperationSummary
    error: BaseException | None


def merge(
    operation: Operation,
    keys: Sequence[str],
    bounds: Sequence[tuple[int, int]],
    ended: Sequence[ChunkResult | ChunkAborted],
) -> CallResult:
    """Merge how each chunk ``ended`` (``bounds[i]`` its keys) into the call's result.

    A chunk that was aborted (the client closed under it, or an unexpected error) fails all its keys and
    counts as ``NON_RETRYABLE``; the call then raises the first such exception. Otherwise, if keys failed, it
    raises the ``BatchOperationError`` of the combined outcome, naming every failed key with its last code, in
    key order. ``OperationSummary.codes`` counts the last code the retry loop saw for each failed key (an aborted
    chunk's keys it never saw fail have none).
    """
    done: list[ChunkResult] = []
    aborted: list[ChunkAborted] = []
    failed: dict[str, ErrorCode] = {}
    codes: Counter[ErrorCode] = Counter()
    for (lo, hi), end in zip(bounds, ended, strict=True):
        if isinstance(end, ChunkResult):
            done.append(end)
            for pos in sorted(end.failed):
                failed[keys[lo + pos]] = end.failed[pos]
            codes.update(end.failed.values())
        else:
            aborted.append(end)
            for pos in range(lo, hi):
                failed[keys[pos]] = ErrorCode.INTERNAL_ERROR
            if end.partial is not None:
                codes.update(end.partial.failed.values())
                codes.update(end.partial.pending.values())
    outcome = combine_outcomes([r.outcome for r in done] + [Outcome.NON_RETRYABLE] * len(aborted))
    retried_ok = sum(r.retried_ok for r in done)
    summary = OperationSummary(
        outcome=outcome,
        attempts=sum(r.attempts for r in done),
        keys_ok=len(keys) - len(failed) - retried_ok,
        keys_retried_ok=retried_ok,
        keys_failed=len(failed),
        retry_delay_s=sum(r.backoff_s for r in done),
        nbytes=sum(r.nbytes for r in done),
        codes=codes,
    )
    error: BaseException | None = None
    if aborted:
        error = aborted[0].error
    elif failed:
        attempts = max((r.attempts for r in done), default=0)
        error = ERROR_FOR_OUTCOME[outcome](operation, failed, len(keys) - len(failed), attempts)
    return CallResult(summary, error)
