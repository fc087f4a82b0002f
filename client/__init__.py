"""tq_mooncake.client: a retrying batch client for the Mooncake store, with TransferQueue's interface."""

from .batch_client import MooncakeBatchClient, connect_store
from .config import ClientConfig, RetryConfig
from .errors import (
    BatchOperationError,
    ClientClosedError,
    DeadlineExceededError,
    ErrorClassifier,
    ErrorCode,
    MooncakeClientError,
    NonRetryableError,
    Operation,
    Outcome,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
    StoreSetupError,
)
from .faults import FaultInjectingStore, FaultRule
from .retry import Deadline, RetryBudget, RetryPolicy

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
