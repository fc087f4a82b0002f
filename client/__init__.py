"""tq_mooncake.client: a retrying batch client for the Mooncake store, with TransferQueue's interface."""

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .batch_client import MooncakeBatchClient
from .codes import ErrorClassifier, ErrorCode
from .config import ClientConfig, RetryConfig
from .errors import (
    BatchOperationError,
    ClientClosedError,
    DeadlineExceededError,
    MooncakeClientError,
    NonRetryableError,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    StoreSetupError,
)
from .faults import FaultInjectingStore, FaultRule
from .retry import Deadline, RetryBudget, RetryPolicy
from .store import connect_store

__all__ = [
    "BatchOperationError",
    "ClientClosedError",
    "ClientConfig",
    "Deadline",
    "DeadlineExceededError",
    "ErrorClassifier",
    "ErrorCode",
    "FaultInjectingStore",
    "FaultRule",
    "MooncakeBatchClient",
    "MooncakeClientError",
    "NonRetryableError",
    "Operation",
    "Outcome",
    "RetriesExhaustedError",
    "RetryBudget",
    "RetryBudgetExhaustedError",
    "RetryConfig",
    "RetryPolicy",
    "StoreSetupError",
    "connect_store",
]
