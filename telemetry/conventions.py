"""Every telemetry name the client emits: spans, attribute keys, metrics, units and allowed values.

This module is the single source of names; ``CONVENTIONS.md`` documents the same contract for people.
``Operation`` and ``Outcome`` are defined here, once, as enums: the client, the fault injector and the
dashboard all use them. Metric attributes are bounded by construction: each metric has an allow-list
(``METRIC_ATTRIBUTES``) and every allowed key takes values from a finite set (operations, outcomes, results,
``ErrorCode`` names, attempt numbers clamped at ``MAX_ATTEMPT_ATTRIBUTE``, and storage endpoints capped at
``MAX_ENDPOINT_ATTRIBUTES``). Keys and values of the store never appear.

Nothing here imports anything of the project (the client imports this module), nor torch.
"""

from __future__ import annotations

import enum


class Operation(str, enum.Enum):
    """The client operations; the value is the name used in telemetry."""

    PUT = "put"
    GET = "get"
    CLEAR = "clear"


class Outcome(str, enum.Enum):
    """How one client call ended; the value is the telemetry name."""

    SUCCESS = "success"
    SUCCESS_AFTER_RETRY = "success_after_retry"
    EXHAUSTED = "exhausted"
    NON_RETRYABLE = "non_retryable"
    BUDGET_DENIED = "budget_denied"
    DEADLINE_EXCEEDED = "deadline_exceeded"

    @property
    def failed(self) -> bool:
        return self not in (Outcome.SUCCESS, Outcome.SUCCESS_AFTER_RETRY)


FAILED_OUTCOMES: tuple[Outcome, ...] = tuple(o for o in Outcome if o.failed)
GAVE_UP_OUTCOMES: tuple[Outcome, ...] = (Outcome.EXHAUSTED, Outcome.BUDGET_DENIED, Outcome.DEADLINE_EXCEEDED)
"""The failed outcomes where retrying was still worth it but stopped: attempts, budget or time ran out."""

INSTRUMENTATION_SCOPE = "tq_mooncake"

# ------------------------------------------------------------------------------------------------ spans
DB_SYSTEM = "mooncake"


def operation_span_name(operation: Operation) -> str:
    """``mooncake.<op>``: one INTERNAL span per client call."""
    return f"mooncake.{operation.value}"


def attempt_span_name(operation: Operation) -> str:
    """``mooncake.<op>.attempt``: one CLIENT span per store call on one chunk."""
    return f"mooncake.{operation.value}.attempt"


# ------------------------------------------------------------------------------------------------ attribute keys
DB_SYSTEM_NAME = "db.system.name"  # "mooncake"
DB_OPERATION_NAME = "db.operation.name"  # "put" | "get" | "clear"
DB_OPERATION_BATCH_SIZE = "db.operation.batch.size"  # keys in the call
ERROR_TYPE = "error.type"  # an ErrorCode name, or ERROR_TYPE_OTHER

ATTEMPT = "mooncake.attempt"  # 1-based attempt number on its chunk
CHUNK = "mooncake.chunk"  # 0-based chunk index within the call
KEYS = "mooncake.keys"  # keys sent in this attempt
KEYS_FAILED = "mooncake.keys.failed"  # keys that failed (attempt: in this attempt; call: in the end)
ERROR_CODES = "mooncake.error.codes"  # sorted distinct ErrorCode names of this attempt's failures
BACKOFF_S = "mooncake.backoff_s"  # seconds slept before this attempt
BYTES = "mooncake.bytes"  # bytes moved (attempt: by this attempt; call: in total)
KEYS_UNDER_REPLICATED = "mooncake.keys.under_replicated"  # put: keys stored with fewer replicas than asked
ATTEMPTS = "mooncake.attempts"  # store calls made by the call, over all chunks
# Node loss (attempt spans; the endpoint attributes also on the per-endpoint metrics): OpenTelemetry's names.
SERVER_ADDRESS = "server.address"  # host of the storage endpoint a failure is blamed on (attempt span) / counted for
SERVER_PORT = "server.port"  # its port (an int)
NODES_DOWN = "mooncake.nodes.down"  # attempt: storage endpoints confirmed down in this attempt (refused a probe)
KEYS_FALLBACK = "mooncake.keys.fallback"  # get attempt: keys read from another replica than the one Mooncake picks
KEYS_UNREACHABLE = "mooncake.keys.unreachable"  # attempt: keys failed fast, every replica on an ejected endpoint
STEERED = "mooncake.steered"  # put attempt: true when the write asked for healthy endpoints first
OUTCOME = "mooncake.outcome"  # one of OUTCOMES
OPERATION = "mooncake.operation"  # metric attribute: one of OPERATIONS
RESULT = "mooncake.result"  # metric attribute: ATTEMPT_RESULTS or KEY_RESULTS

# ------------------------------------------------------------------------------------------------ allowed values
OPERATIONS: tuple[str, ...] = tuple(o.value for o in Operation)
OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
RESULT_OK = "ok"
RESULT_PARTIAL = "partial"
RESULT_FAILED = "failed"
RESULT_RETRIED_OK = "retried_ok"
ATTEMPT_RESULTS: tuple[str, ...] = (RESULT_OK, RESULT_PARTIAL, RESULT_FAILED)
KEY_RESULTS: tuple[str, ...] = (RESULT_OK, RESULT_RETRIED_OK, RESULT_FAILED)
ERROR_TYPE_OTHER = "_OTHER"  # a failed call whose failures carried no code (e.g. closed before any attempt)
ENDPOINT_OTHER = "_OTHER"  # server.address once MAX_ENDPOINT_ATTRIBUTES endpoints have been seen (no server.port)
MAX_ENDPOINT_ATTRIBUTES = 256
"""Distinct storage endpoints a process labels metrics with; later ones are counted under ``_OTHER``. The values
are the cluster's storage processes (host and port), never keys."""
# error.type is otherwise always an ErrorCode name (a finite enum, UNKNOWN included).
MAX_ATTEMPT_ATTRIBUTE = 10
"""Metric values of ``mooncake.attempt`` stop here: attempts after the 10th are counted as 10 (spans keep the
exact number)."""

# ------------------------------------------------------------------------------------------------ metrics
OPERATIONS_METRIC = "mooncake.client.operations"
ATTEMPTS_METRIC = "mooncake.client.attempts"
KEYS_METRIC = "mooncake.client.keys"
KEYS_FAILED_METRIC = "mooncake.client.keys.failed"
OPERATION_DURATION_METRIC = "mooncake.client.operation.duration"
ATTEMPT_DURATION_METRIC = "mooncake.client.attempt.duration"
RETRY_DELAY_METRIC = "mooncake.client.retry.delay"
BYTES_METRIC = "mooncake.client.bytes"
RETRY_BUDGET_METRIC = "mooncake.client.retry.budget"
UNDER_REPLICATED_METRIC = "mooncake.client.keys.under_replicated"
NODE_FAILURES_METRIC = "mooncake.client.node.failures"
FALLBACKS_METRIC = "mooncake.client.replica.fallbacks"
EJECTIONS_METRIC = "mooncake.client.node.ejections"
EJECTED_METRIC = "mooncake.client.nodes.ejected"

UNITS: dict[str, str] = {
    OPERATIONS_METRIC: "{operation}",
    ATTEMPTS_METRIC: "{attempt}",
    KEYS_METRIC: "{key}",
    KEYS_FAILED_METRIC: "{key}",
    OPERATION_DURATION_METRIC: "s",
    ATTEMPT_DURATION_METRIC: "s",
    RETRY_DELAY_METRIC: "s",
    BYTES_METRIC: "By",
    RETRY_BUDGET_METRIC: "{token}",
    UNDER_REPLICATED_METRIC: "{key}",
    NODE_FAILURES_METRIC: "{failure}",
    FALLBACKS_METRIC: "{key}",
    EJECTIONS_METRIC: "{ejection}",
    EJECTED_METRIC: "{endpoint}",
}

DESCRIPTIONS: dict[str, str] = {
    OPERATIONS_METRIC: "Client calls (put/get/clear), by how they ended.",
    ATTEMPTS_METRIC: "Store calls on one chunk (first attempts and retries), by result.",
    KEYS_METRIC: "Keys handled by client calls, by final result.",
    KEYS_FAILED_METRIC: "Keys that failed in an attempt, by error code (one per key per attempt).",
    OPERATION_DURATION_METRIC: "Duration of client calls, including every attempt and backoff sleep.",
    ATTEMPT_DURATION_METRIC: "Duration of single store calls on one chunk.",
    RETRY_DELAY_METRIC: "Backoff slept by one client call in total (recorded for calls that retried).",
    BYTES_METRIC: "Bytes moved to or from the store by successful keys.",
    RETRY_BUDGET_METRIC: "Retries the client's retry budget would allow right now.",
    UNDER_REPLICATED_METRIC: "Keys a put stored with fewer replicas than replica_num asked for.",
    NODE_FAILURES_METRIC: "Confirmed failures of a storage endpoint (a probe refused or unanswered after a failed "
    "transfer or direct read), by endpoint; one per endpoint per attempt.",
    FALLBACKS_METRIC: "Keys read from another replica because the one Mooncake picks is on this endpoint, down or "
    "ejected.",
    EJECTIONS_METRIC: "Times a storage endpoint was ejected (routed around) by this client, by endpoint.",
    EJECTED_METRIC: "Storage endpoints ejected by this client right now.",
}

METRIC_ATTRIBUTES: dict[str, frozenset[str]] = {
    OPERATIONS_METRIC: frozenset({OPERATION, OUTCOME}),
    ATTEMPTS_METRIC: frozenset({OPERATION, ATTEMPT, RESULT}),
    KEYS_METRIC: frozenset({OPERATION, RESULT}),
    KEYS_FAILED_METRIC: frozenset({OPERATION, ERROR_TYPE}),
    OPERATION_DURATION_METRIC: frozenset({OPERATION, OUTCOME, ERROR_TYPE}),
    ATTEMPT_DURATION_METRIC: frozenset({OPERATION, ATTEMPT, RESULT, ERROR_TYPE}),
    RETRY_DELAY_METRIC: frozenset({OPERATION, OUTCOME}),
    BYTES_METRIC: frozenset({OPERATION}),
    RETRY_BUDGET_METRIC: frozenset(),
    UNDER_REPLICATED_METRIC: frozenset({OPERATION}),
    NODE_FAILURES_METRIC: frozenset({OPERATION, SERVER_ADDRESS, SERVER_PORT}),
    FALLBACKS_METRIC: frozenset({OPERATION, SERVER_ADDRESS, SERVER_PORT}),
    EJECTIONS_METRIC: frozenset({SERVER_ADDRESS, SERVER_PORT}),
    EJECTED_METRIC: frozenset(),
}
"""The attribute allow-list: the only keys each metric may carry (kept by construction; tests check it)."""

DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Histogram bucket bounds (seconds) for the three duration histograms."""

HISTOGRAMS: tuple[str, ...] = (OPERATION_DURATION_METRIC, ATTEMPT_DURATION_METRIC, RETRY_DELAY_METRIC)
GAUGES: tuple[str, ...] = (RETRY_BUDGET_METRIC, EJECTED_METRIC)
"""The gauges; every other metric not in ``HISTOGRAMS`` is a (monotonic) counter."""

RESOURCE_SERVICE_NAME = "service.name"
RESOURCE_HOST_NAME = "host.name"
RESOURCE_PROCESS_PID = "process.pid"
DEFAULT_SERVICE_NAME = "tq-mooncake"

# ------------------------------------------------------------------------------------------------ environment
ENV_TELEMETRY_DIR = "TQ_MOONCAKE_TELEMETRY_DIR"
ENV_PROMETHEUS_PORT = "TQ_MOONCAKE_PROMETHEUS_PORT"
ENV_FILE_MB = "TQ_MOONCAKE_TELEMETRY_FILE_MB"  # rotate a telemetry file at this size (MiB)
ENV_KEEP_FILES = "TQ_MOONCAKE_TELEMETRY_KEEP_FILES"  # rotated files kept per telemetry file
ENV_MAX_MB = "TQ_MOONCAKE_TELEMETRY_MAX_MB"  # all of a process's telemetry files together (MiB)


def endpoint_attributes(endpoint: str) -> tuple[tuple[str, str | int], ...]:
    """``server.address`` and ``server.port`` of a storage endpoint ``host:port`` (``[v6]:port`` too); the address
    alone when it has no numeric port."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return ((SERVER_ADDRESS, endpoint),)
    return ((SERVER_ADDRESS, host.strip("[]")), (SERVER_PORT, int(port)))
