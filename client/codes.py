"""Mooncake's error codes and which of them are worth retrying.

Mooncake reports failures as negative integers (``mooncake-store/include/types.h``); the Python binding
does not export the enum, so it is mirrored here. A few codes below ``-90000`` are the client's own:
checks that fail after a read (size, frame, type) are reported per key through the same channel as the
store's codes.
"""

from __future__ import annotations

import enum

from tq_mooncake.telemetry.conventions import Operation


class ErrorCode(enum.IntEnum):
    """Every Mooncake store error code by name, plus the client's own post-read checks."""

    OK = 0
    INTERNAL_ERROR = -1
    BUFFER_OVERFLOW = -10
    SHARD_INDEX_OUT_OF_RANGE = -100
    SEGMENT_NOT_FOUND = -101
    SEGMENT_ALREADY_EXISTS = -102
    CLIENT_NOT_FOUND = -103
    NO_AVAILABLE_HANDLE = -200
    INVALID_VERSION = -300
    INVALID_KEY = -400
    WRITE_FAIL = -500
    INVALID_PARAMS = -600
    ILLEGAL_CLIENT = -601
    INVALID_WRITE = -700
    INVALID_READ = -701
    INVALID_REPLICA = -702
    REPLICA_IS_NOT_READY = -703
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706
    LEASE_EXPIRED = -707
    OBJECT_HAS_REPLICATION_TASK = -708
    OBJECT_NO_REPLICATION_TASK = -709
    REPLICA_NOT_FOUND = -710
    REPLICA_ALREADY_EXISTS = -711
    REPLICA_IS_GONE = -712
    REPLICA_NOT_IN_LOCAL_MEMORY = -713
    OBJECT_REPLICA_BUSY = -714
    TRANSFER_FAIL = -800
    CHECKSUM_MISMATCH = -801
    RPC_FAIL = -900
    RPC_TIMEOUT = -901
    ETCD_OPERATION_ERROR = -1000
    ETCD_KEY_NOT_EXIST = -1001
    ETCD_TRANSACTION_FAIL = -1002
    ETCD_CTX_CANCELLED = -1003
    OPLOG_ENTRY_NOT_FOUND = -1004
    K8S_LEASE_OPERATION_ERROR = -1005
    K8S_LEASE_NOT_FOUND = -1006
    INCOMPLETE_OPLOG_CATCH_UP = -1007
    UNAVAILABLE_IN_CURRENT_STATUS = -1010
    UNAVAILABLE_IN_CURRENT_MODE = -1011
    NOT_SUPPORTED = -1012
    FILE_NOT_FOUND = -1100
    FILE_OPEN_FAIL = -1101
    FILE_READ_FAIL = -1102
    FILE_WRITE_FAIL = -1103
    FILE_INVALID_BUFFER = -1104
    FILE_LOCK_FAIL = -1105
    FILE_INVALID_HANDLE = -1106
    BUCKET_NOT_FOUND = -1200
    BUCKET_ALREADY_EXISTS = -1201
    KEYS_EXCEED_BUCKET_LIMIT = -1202
    KEYS_ULTRA_LIMIT = -1203
    UNABLE_OFFLOAD = -1300
    UNABLE_OFFLOADING = -1301
    TASK_NOT_FOUND = -1400
    TASK_PENDING_LIMIT_EXCEEDED = -1401
    JOB_NOT_FOUND = -1402
    SERIALIZE_UNSUPPORTED = -1500
    SERIALIZE_FAIL = -1501
    DESERIALIZE_FAIL = -1502
    PERSISTENT_FAIL = -1503
    DFS_NETWORK_TIMEOUT = -1600
    DFS_SERVICE_UNAVAILABLE = -1601
    DFS_QUOTA_EXCEEDED = -1602
    DFS_PERMISSION_DENIED = -1603
    DFS_STALE_HANDLE = -1604
    DFS_PARTIAL_WRITE = -1605
    TENANT_QUOTA_EXCEEDED = -1700
    TENANT_NOT_REGISTERED = -1701
    TENANT_NOT_EMPTY = -1702
    # The client's own codes: a read whose result failed a check.
    SIZE_MISMATCH = -90001  # bytes read differ from the size expected from shape/dtype or put metadata
    CORRUPT_VALUE = -90002  # the framed value's header is missing, unknown or inconsistent
    TYPE_MISMATCH = -90003  # the stored value's dtype/shape differs from what the caller asked for
    PICKLE_NOT_ALLOWED = -90004  # a pickled value was read but `allow_pickle` is off
    # The end-to-end check (``integrity.py``): the bytes read are not the value written under this key. Races in
    # the store cause them (a read of memory freed and reused meanwhile, a torn overwrite), so they are retried.
    TRAILER_MISMATCH = -90005  # no intact trailer naming this key and the length read: zeros, another key's bytes
    STALE_VALUE = -90006  # this key's value, but from another write than the metadata names (not retried)
    PAYLOAD_CHECKSUM_MISMATCH = -90007  # the payload's checksum (raw tensor CRC32C, or frame CRC-32) fails
    METADATA_MISMATCH = -90008  # an intact value, but not the one the caller's metadata names (not retried)
    # Node loss (``replica_routing.py``): every replica of the key is on a storage endpoint ejected as down.
    REPLICA_UNREACHABLE = -90009  # not retried: the data is on nodes that do not answer
    UNKNOWN = -99999  # a negative code this table does not know

    @classmethod
    def of(cls, code: int) -> ErrorCode:
        """The enum member for ``code``; ``UNKNOWN`` for a negative code not in the table."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN

    def describe(self) -> str:
        """``NAME(code)``, the form used in messages."""
        return f"{self.name}({int(self)})"


class Verdict(enum.Enum):
    """What to do with one key after one attempt."""

    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"


# Transient conditions: the same call may succeed later (a busy or moving object, a lost or slow transfer, an
# RPC or metadata-service failure, a full segment or quota that clearing frees).
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.NO_AVAILABLE_HANDLE,
        ErrorCode.REPLICA_IS_NOT_READY,
        ErrorCode.OBJECT_HAS_LEASE,
        ErrorCode.LEASE_EXPIRED,
        ErrorCode.OBJECT_HAS_REPLICATION_TASK,
        ErrorCode.OBJECT_REPLICA_BUSY,
        ErrorCode.TRANSFER_FAIL,
        ErrorCode.CHECKSUM_MISMATCH,  # the store's own check (MOONCAKE_STORE_CHECKSUM=1) saw the races above
        ErrorCode.RPC_FAIL,
        ErrorCode.RPC_TIMEOUT,
        ErrorCode.ETCD_OPERATION_ERROR,
        ErrorCode.ETCD_KEY_NOT_EXIST,
        ErrorCode.ETCD_TRANSACTION_FAIL,
        ErrorCode.ETCD_CTX_CANCELLED,
        ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
        ErrorCode.UNAVAILABLE_IN_CURRENT_MODE,
        ErrorCode.TASK_PENDING_LIMIT_EXCEEDED,
        ErrorCode.DFS_NETWORK_TIMEOUT,
        ErrorCode.DFS_SERVICE_UNAVAILABLE,
        ErrorCode.TENANT_QUOTA_EXCEEDED,
        ErrorCode.TRAILER_MISMATCH,
        ErrorCode.PAYLOAD_CHECKSUM_MISMATCH,
    }
)

PUT_RETRYABLE_CODES: frozenset[ErrorCode] = frozenset({ErrorCode.ILLEGAL_CLIENT})
"""Retryable for ``put`` only: two store instances (processes) writing one key at once make the master refuse the
end of the write it preempted with ``ILLEGAL_CLIENT``; written again, the key holds one of the two values."""


class ErrorClassifier:
    """Pure per-operation classification of a per-key result code.

    ``0`` is OK; a code in ``retryable`` is RETRY; every other negative code (unknown ones included)
    is FAIL. ``OBJECT_NOT_FOUND`` is OK for ``clear`` (removing a missing key is not an error) and FAIL
    elsewhere; the codes in ``PUT_RETRYABLE_CODES`` are RETRY for ``put``.
    """

    def __init__(self, retryable: frozenset[ErrorCode] = RETRYABLE_CODES) -> None:
        self._retryable = retryable

    def classify(self, operation: Operation, code: int) -> Verdict:
        if code >= 0:
            return Verdict.OK
        ec = ErrorCode.of(code)
        if operation is Operation.CLEAR and ec is ErrorCode.OBJECT_NOT_FOUND:
            return Verdict.OK
        if operation is Operation.PUT and ec in PUT_RETRYABLE_CODES:
            return Verdict.RETRY
        return Verdict.RETRY if ec in self._retryable else Verdict.FAIL

    def is_retryable(self, code: int) -> bool:
        return ErrorCode.of(code) in self._retryable
