"""tq_mooncake.transferqueue: ``MooncakeBatchClient`` as a TransferQueue storage backend.

Importing this module registers, with TransferQueue 0.1.11's registries:

* the storage client ``MooncakeStoreObservedClient`` (``ObservedMooncakeClient``);
* the storage manager ``MooncakeStoreObserved`` (``ObservedMooncakeStorageManager``), selected with
  ``backend.storage_backend: MooncakeStoreObserved`` and configured by ``backend.MooncakeStoreObserved``
  (the keys of ``backend.MooncakeStore`` plus ``replica_num``, ``retry``, ``telemetry``, ...);
* its bootstrap provider (starts ``mooncake_master`` when ``auto_init`` is true and none answers, never
  kills one it did not start);
* a switch on TQ's own ``MooncakeStore`` backend: with ``replace_stock: true`` in ``backend.MooncakeStore``
  (or after ``replace_stock()``, or with ``TQ_MOONCAKE_REPLACE_STOCK=1`` in the environment at import) it
  uses this client and bootstrap instead of the stock ones, and its manager runs our client's ``get`` and
  ``clear`` off the caller's event loop; without it, nothing about the stock backend changes.

Nobody needs to import it: the install's ``tq_mooncake.autoload`` hook does, in every process, right after
that process imports ``transfer_queue``.
"""

from __future__ import annotations

import os

from .bootstrap import MasterLease, bootstrap_master, stop_started_masters
from .manager import ObservedMooncakeStorageManager
from .registry import BACKEND_NAME, CLIENT_NAME, register, replace_stock
from .storage_client import ObservedMooncakeClient

__all__ = [
    "BACKEND_NAME",
    "CLIENT_NAME",
    "MasterLease",
    "ObservedMooncakeClient",
    "ObservedMooncakeStorageManager",
    "bootstrap_master",
    "register",
    "replace_stock",
    "stop_started_masters",
]

register()
if os.environ.get("TQ_MOONCAKE_REPLACE_STOCK", "").strip().lower() in ("1", "true", "yes"):
    replace_stock()
