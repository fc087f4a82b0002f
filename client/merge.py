"""Cutting a call into chunks, and merging how its chunks ended into how the call ended: pure functions.

``merge`` turns the chunks' ``ChunkResult``s (or the exceptions chunks raised) into the call's
``OperationSummary`` (what the observer is told) and the error the call raises, if any.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .attempts import ChunkResult
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
    ended: Sequence[ChunkResult | BaseException],
) -> CallResult:
    """Merge how each chunk ``ended`` (``bounds[i]`` its keys) into the call's result.

    A chunk that raised (the client closed under it, or an unexpected error) fails all its keys with
    ``INTERNAL_ERROR`` and counts as ``NON_RETRYABLE``; the call then raises the first such exception.
    Otherwise, if keys failed, it raises the ``BatchOperationError`` of the combined outcome, naming every
    failed key with its last code, in key order.
    """
    raised = [e for e in ended if isinstance(e, BaseException)]
    done = [r for r in ended if isinstance(r, ChunkResult)]
    failed: dict[str, ErrorCode] = {}
    for (lo, hi), res in zip(bounds, ended, strict=True):
        if isinstance(res, ChunkResult):
            for pos in sorted(res.failed):
                failed[keys[lo + pos]] = res.failed[pos]
        else:
            for pos in range(lo, hi):
                failed[keys[pos]] = ErrorCode.INTERNAL_ERROR
    outcome = combine_outcomes([r.outcome for r in done] + [Outcome.NON_RETRYABLE] * len(raised))
    retried_ok = sum(r.retried_ok for r in done)
    summary = OperationSummary(
        outcome=outcome,
        attempts=sum(r.attempts for r in done),
        keys_ok=len(keys) - len(failed) - retried_ok,
        keys_retried_ok=retried_ok,
        keys_failed=len(failed),
        retry_delay_s=sum(r.backoff_s for r in done),
        nbytes=sum(r.nbytes for r in done),
        codes=Counter(failed.values()),
    )
    error: BaseException | None = None
    if raised:
        error = raised[0]
    elif failed:
        attempts = max((r.attempts for r in done), default=0)
        error = ERROR_FOR_OUTCOME[outcome](operation, failed, len(keys) - len(failed), attempts)
    return CallResult(summary, error)
