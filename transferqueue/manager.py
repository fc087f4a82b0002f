"""TQ's Mooncake storage manager with our client, its storage calls off the caller's event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from transfer_queue.storage.managers.base import KVStorageManager
from transfer_queue.storage.managers.mooncake_manager import MooncakeStorageManager

from .storage_client import ObservedMooncakeClient

CLIENT_NAME = "MooncakeStoreObservedClient"


class OffLoopCalls(MooncakeStorageManager):
    """``get_data`` and ``clear_data`` of TQ's ``KVStorageManager``, run in a worker thread when the storage
    client is ours; ``close`` closes our client too.

    TQ 0.1.11 runs only ``put_data``'s client call in ``run_in_executor``; its ``get_data`` and ``clear_data``
    call the client inside ``async def``, so a retrying read (back-off sleeps included) froze the caller's event
    loop for the whole call. Here the whole synchronous part (keys, the client call, TQ's merge into a
    TensorDict) runs in ``asyncio.to_thread`` (the loop's default executor, as TQ's put, and with the caller's
    context, so an active span parents ours; our client's ``put`` carries it through TQ's ``run_in_executor``
    itself). Results and exceptions are those of TQ's methods. With another client (TQ's stock one under the
    stock name) TQ's methods run unchanged.
    """

    def _ours(self) -> bool:
        return isinstance(getattr(self, "storage_client", None), ObservedMooncakeClient)

    async def get_data(self, metadata: Any) -> Any:
        if not self._ours() or not metadata.field_names:  # no fields: TQ's warning and empty TensorDict
            return await super().get_data(metadata)
        return await asyncio.to_thread(self._get_data, metadata)

    async def clear_data(self, metadata: Any) -> None:
        if not self._ours() or not metadata.field_names:  # no fields: TQ's RuntimeError
            return await super().clear_data(metadata)
        await asyncio.to_thread(self._clear_data, metadata)

    def _get_data(self, metadata: Any) -> Any:
        keys = self._generate_keys(metadata.field_names, metadata.global_indexes)
        shapes, dtypes, custom_meta = self._get_shape_type_custom_backend_meta_list(metadata)
        values = self.storage_client.get(keys=keys, shapes=shapes, dtypes=dtypes, custom_backend_meta=custom_meta)
        return self._merge_tensors_to_tensordict(metadata, values)

    def _clear_data(self, metadata: Any) -> None:
        keys = self._generate_keys(metadata.field_names, metadata.global_indexes)
        self.storage_client.clear(keys=keys)  # our clear needs no metadata: TQ's per-key gathering of it is skipped

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._ours():
                self.storage_client.close()  # TQ's manager never closes its storage client


class ObservedMooncakeStorageManager(OffLoopCalls):
    """The ``MooncakeStoreObserved`` backend: TQ's Mooncake manager on ``ObservedMooncakeClient`` (TQ's own
    manager hard-codes the stock client's name)."""

    def __init__(self, controller_info: Any, config: Any, zmq_context: Any = None) -> None:
        config["client_name"] = CLIENT_NAME
        KVStorageManager.__init__(self, controller_info, config, zmq_context=zmq_context)


class StockNameStorageManager(OffLoopCalls):
    """TQ's ``MooncakeStore`` backend as registered by ``register()``: TQ's own manager and client, unless
    ``replace_stock`` made the client ours; then our client's calls run off the loop and close with it."""
