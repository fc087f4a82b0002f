"""``ObservedMooncakeStorageManager``: TQ's Mooncake storage manager, with our client."""

from __future__ import annotations

from typing import Any

from transfer_queue.storage.managers.base import KVStorageManager
from transfer_queue.storage.managers.mooncake_manager import MooncakeStorageManager

CLIENT_NAME = "MooncakeStoreObservedClient"


class ObservedMooncakeStorageManager(MooncakeStorageManager):
    """``MooncakeStorageManager`` whose storage client is ``ObservedMooncakeClient`` (TQ's own manager
    hard-codes the stock client's name), and which closes its client when TQ closes the manager."""

    def __init__(self, controller_info: Any, config: Any, zmq_context: Any = None) -> None:
        config["client_name"] = CLIENT_NAME
        KVStorageManager.__init__(self, controller_info, config, zmq_context=zmq_context)

    def close(self) -> None:
        try:
            super().close()
        finally:
            client = getattr(self, "storage_client", None)
            if client is not None:
                client.close()
