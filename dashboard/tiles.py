"""The headline tiles as plain data (label, value, change against the previous window, alert), and the
number formats the page uses; no Streamlit here, so tests can compute the exact text a tile shows."""

from __future__ import annotations

from dataclasses import dataclass

from tq_mooncake.telemetry import conventions as c

from .metrics import Figures
from .settings import Thresholds

DASH = "—"


def percent(x: float | None) -> str:
    """``12.5%``; two decimals under 1% (``0.25%``); ``0%``; a dash for no data."""
    if x is None:
        return DASH
    if x == 0:
        return "0%"
    return f"{x * 100:.2f}%" if abs(x) < 0.01 else f"{x * 100:.1f}%"


def per_second(x: float | None) -> str:
    if x is None:
        return DASH
    if x == 0:
        return "0/s"
    return f"{x:.2f}/s" if abs(x) < 10 else f"{x:,.1f}/s"


def duration(s: float | None) -> str:
    if s is None:
        return DASH
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _change(now: float | None, before: float | None, unit: str, scale: float = 1.0, decimals: int = 2) -> str | None:
    """Signed change (``+1.25 pp``), None when either window has no figure, ``"0"`` when it rounds to 0."""
    if now is None or before is None:
        return None
    d = round((now - before) * scale, decimals)
    return "0" if d == 0 else f"{d:+.{decimals}f}{unit}"


@dataclass(frozen=True)
class Tile:
    label: str
    value: str
    delta: str | None  # change against the previous window, signed
    worse_when_up: bool  # the delta is coloured red when it rises
    alert: bool  # above its threshold
    threshold: str  # the threshold as the page writes it ("" for tiles without one)
    caption: str
    help: str


def tiles(now: Figures, before: Figures, thresholds: Thresholds) -> list[Tile]:
    """The six headline tiles for window ``now`` compared with the window ``before`` it."""
    p50, p99 = now.latency_quantile(0.5), now.latency_quantile(0.99)
    gave_up = sum(now.outcome_rate(o) or 0.0 for o in c.GAVE_UP_OUTCOMES)
    retries_per_op = now.retries_per_operation
    return [
        Tile(
            "Operations/s",
            per_second(now.ops_per_s),
            _change(now.ops_per_s, before.ops_per_s, "/s"),
            False,
            False,
            "",
            f"{now.operations:,.0f} calls in the window",
            "Client calls (put, get, clear) per second.",
        ),
        Tile(
            "Retry rate",
            percent(now.retry_rate),
            _change(now.retry_rate, before.retry_rate, " pp", 100),
            True,
            (now.retry_rate or 0.0) > thresholds.retry_rate,
            percent(thresholds.retry_rate),
            f"{retries_per_op:.2f} retries per operation" if retries_per_op is not None else "no operations",
            "Share of operations that retried at least once; below it, store-call retries per operation.",
        ),
        Tile(
            "Exhaustion rate",
            percent(now.exhaustion_rate),
            _change(now.exhaustion_rate, before.exhaustion_rate, " pp", 100),
            True,
            gave_up > thresholds.exhaustion_rate,
            percent(thresholds.exhaustion_rate),
            f"budget denied {percent(now.outcome_rate(c.Outcome.BUDGET_DENIED))} · "
            f"deadline {percent(now.outcome_rate(c.Outcome.DEADLINE_EXCEEDED))}",
            "Share of operations whose retries ran out (max_attempts). Alert when exhausted + budget-denied + "
            "deadline-exceeded operations pass the threshold.",
        ),
        Tile(
            "Key failures/s",
            per_second(now.key_failures_per_s),
            _change(now.key_failures_per_s, before.key_failures_per_s, "/s"),
            True,
            (now.key_failures_per_s or 0.0) > thresholds.key_failures_per_s,
            per_second(thresholds.key_failures_per_s),
            f"{per_second(now.failed_keys_per_s)} failed for good",
            "Keys that failed a store call, per second (a key failing 3 attempts counts 3); below it, keys that "
            "still failed when the call gave up.",
        ),
        Tile(
            "p50 latency",
            duration(p50),
            _change(p50, before.latency_quantile(0.5), " ms", 1000, 1),
            True,
            False,
            "",
            "operation duration, median",
            "Median client-call duration (all attempts and backoff), from the histogram buckets.",
        ),
        Tile(
            "p99 latency",
            duration(p99),
            _change(p99, before.latency_quantile(0.99), " ms", 1000, 1),
            True,
            (p99 or 0.0) > thresholds.p99_s,
            duration(thresholds.p99_s),
            "operation duration, 99th percentile",
            "99th-percentile client-call duration, interpolated in its histogram bucket as Prometheus does.",
        ),
    ]
