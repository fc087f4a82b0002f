"""tq_mooncake.testing: doubles and helpers for testing code that uses the client (botocore's ``Stubber`` and
OpenTelemetry's in-memory exporter are the models).

* ``InMemoryStore``: a ``MooncakeDistributedStore`` stand-in in this process, for pure client logic
  (``MooncakeBatchClient(config, store=InMemoryStore())``); wrap it in a ``FaultInjectingStore`` to fail keys;
* ``RecordingObserver``: an ``Observer`` that keeps every call and attempt, and forwards them;
* ``FakeClock``: time that moves only when told (also a backoff ``sleep``);
* ``same_value``: exact equality of a value read back and the value written.

Anything about the real store (failover, chaos, transfers) belongs on real processes (``tq_mooncake.cluster``).
"""

from .clock import FakeClock
from .compare import same_value
from .memory_store import InMemoryStore
from .observers import RecordedAttempt, RecordedOperation, RecordingObserver

__all__ = ["FakeClock", "InMemoryStore", "RecordedAttempt", "RecordedOperation", "RecordingObserver", "same_value"]
