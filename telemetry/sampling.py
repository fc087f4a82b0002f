"""``KeepFailuresSampler``: every retried or failed operation's trace kept, clean ones sampled; decided at the end.

The client creates an operation's span when the call is over, with its outcome among the attributes, and its
attempt spans after it, as its children (``instruments``). So a sampler sees how the call went: this is the
OpenTelemetry Collector's ``tail_sampling`` (a status-code policy plus a probabilistic one) done at the source,
with no collector and nothing buffered. ``keep_operation`` is the policy:

* an operation span (``db.system.name`` = ``mooncake`` and a ``mooncake.outcome``) that did not end in
  ``success`` (it retried, or it failed) is always recorded and sampled, whatever its parent says;
* a clean one follows a parent span if it has one (sampled parent: kept; unsampled: dropped), else is kept with
  probability ``clean_ratio``, decided on the trace id (``TraceIdRatioBased``), so the operations of one trace
  are kept or dropped together;
* attempt spans follow their operation span (they are its children), and every other span goes to ``other``
  (default ``ParentBased(ALWAYS_ON)``, the SDK's default).

Metrics are never sampled. ``configure()`` installs this sampler unless told otherwise (``OTEL_TRACES_SAMPLER``
or a ``sampler`` argument); ``OTEL_TRACES_SAMPLER=tq_mooncake`` with ``OTEL_TRACES_SAMPLER_ARG=<ratio>`` selects it
explicitly, also under ``opentelemetry-instrument`` (entry point ``tq_mooncake``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from . import conventions as c

logger = logging.getLogger(__name__)

SAMPLER_NAME = "tq_mooncake"
"""The ``OTEL_TRACES_SAMPLER`` value (and entry point name) of ``KeepFailuresSampler``."""
DEFAULT_CLEAN_RATIO = 0.01
"""Clean operations kept without a parent: 1 in 100 (a failed or retried one is always kept)."""


def is_operation_span(attributes: Mapping[str, Any]) -> bool:
    """Whether span ``attributes`` are those of a client operation span (not an attempt, not someone else's)."""
    return attributes.get(c.DB_SYSTEM_NAME) == c.DB_SYSTEM and c.OUTCOME in attributes


def keep_operation(attributes: Mapping[str, Any]) -> bool:
    """Whether an operation span must be kept whatever the sampling: its call retried or failed."""
    return attributes.get(c.OUTCOME) != c.Outcome.SUCCESS.value


def parse_ratio(value: Any) -> float:
    """``value`` as a ratio in [0, 1]; ValueError otherwise (bools, NaN, strings that are not numbers)."""
    if isinstance(value, bool):
        raise ValueError(f"the clean trace ratio must be a number in [0, 1], got {value!r}")
    try:
        ratio = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"the clean trace ratio must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"the clean trace ratio must be a number in [0, 1], got {value!r}")
    return ratio


class KeepFailuresSampler(Sampler):
    """See the module docstring. ``clean_ratio``: the share of clean operations without a parent that are kept."""

    def __init__(self, clean_ratio: float = DEFAULT_CLEAN_RATIO, other: Sampler | None = None) -> None:
        self.clean_ratio = parse_ratio(clean_ratio)
        self._clean = ParentBased(TraceIdRatioBased(self.clean_ratio))  # a parent's decision, else the ratio
        self._other = other or ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        attrs = attributes or {}
        if not is_operation_span(attrs):
            sampler = self._other
        elif keep_operation(attrs):
            sampler = ALWAYS_ON  # whatever the parent says (its trace state is kept)
        else:
            sampler = self._clean
        return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"KeepFailuresSampler{{clean_ratio={self.clean_ratio}}}"


def sampler_factory(arg: str | None) -> KeepFailuresSampler:
    """The ``opentelemetry_traces_sampler`` entry point: ``OTEL_TRACES_SAMPLER_ARG`` is the clean ratio. A bad one
    gives the default ratio with a warning (the SDK would otherwise fall back to keeping every trace)."""
    if arg in (None, ""):
        return KeepFailuresSampler()
    try:
        return KeepFailuresSampler(arg)
    except ValueError as exc:
        logger.warning("%s; using the default %s", exc, DEFAULT_CLEAN_RATIO)
        return KeepFailuresSampler()
