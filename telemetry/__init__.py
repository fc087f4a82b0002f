"""tq_mooncake.telemetry: OpenTelemetry instrumentation of the client.

* ``OTelObserver``: the client's observer hooks on the OpenTelemetry API (no SDK needed).
* ``configure()`` (``pipeline``): builds the SDK pipeline once per process (needs the ``telemetry`` extra); imported
  lazily so that library code never pulls in the SDK.
* ``conventions``: every span, attribute and metric name (documented in ``CONVENTIONS.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import conventions
from .instruments import OTelObserver

if TYPE_CHECKING:
    from .pipeline import Telemetry, configure, metric_views

__all__ = ["OTelObserver", "Telemetry", "configure", "conventions", "metric_views"]

_LAZY = {"configure", "Telemetry", "metric_views"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
