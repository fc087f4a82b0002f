"""Registration with TransferQueue's three registries, and the switch for TQ's stock Mooncake backend."""

from __future__ import annotations

import threading
from typing import Any

from transfer_queue.storage.bootstrap import StorageBootstrapProvider
from transfer_queue.storage.clients.base import StorageClientFactory
from transfer_queue.storage.managers.base import StorageManagerFactory

from .bootstrap import MasterLease, bootstrap_master
from .manager import CLIENT_NAME, ObservedMooncakeStorageManager, StockNameStorageManager
from .storage_client import ObservedMooncakeClient

BACKEND_NAME = "MooncakeStoreObserved"
STOCK_BACKEND = "MooncakeStore"
STOCK_CLIENT = "MooncakeStoreClient"

_lock = threading.Lock()
_stock: dict[str, Any] = {}  # the stock client class, manager and bootstrap, as found before we wrapped them
_replaced = False


def _section(conf: Any, backend: str) -> Any:
    return conf.backend[backend]


def _observed_bootstrap(conf: Any) -> MasterLease | None:
    return bootstrap_master(_section(conf, BACKEND_NAME))


def _stock_or_observed_client(config: Any) -> Any:
    """TQ's ``MooncakeStoreClient`` name: ours when replaced or ``replace_stock: true``, else the stock one."""
    if _replaced or config.get("replace_stock", False):
        return ObservedMooncakeClient(config)
    return _stock["client"](config)


def _stock_or_observed_bootstrap(conf: Any) -> Any:
    section = _section(conf, STOCK_BACKEND)
    if _replaced or section.get("replace_stock", False):
        return bootstrap_master(section)
    return _stock["bootstrap"](conf)


def register() -> None:
    """Register the ``MooncakeStoreObserved`` backend, and the ``replace_stock`` switch on TQ's
    ``MooncakeStore`` backend (its client and bootstrap; its manager runs our client's calls off the loop and
    closes it); idempotent, and it puts the switch back where TQ re-registered its own (a reloaded module).
    All or nothing: if any step raises, TQ's registries are left as they were."""
    registries = (StorageClientFactory._registry, StorageManagerFactory._registry, StorageBootstrapProvider._providers)
    with _lock:
        saved = [dict(registry) for registry in registries]
        try:
            _register()
        except BaseException:
            for registry, before in zip(registries, saved, strict=True):
                registry.clear()
                registry.update(before)
            raise


def _register() -> None:
    StorageClientFactory.register(CLIENT_NAME)(ObservedMooncakeClient)
    StorageManagerFactory.register(BACKEND_NAME)(ObservedMooncakeStorageManager)
    StorageBootstrapProvider.register_provider(BACKEND_NAME)(_observed_bootstrap)
    client = StorageClientFactory._registry[STOCK_CLIENT]
    if client is not _stock_or_observed_client:
        _stock["client"] = client
        StorageClientFactory.register(STOCK_CLIENT)(_stock_or_observed_client)
    bootstrap = StorageBootstrapProvider.get_provider(STOCK_BACKEND)
    if getattr(bootstrap, "__wrapped__", None) is not _stock_or_observed_bootstrap:
        _stock["bootstrap"] = bootstrap
        StorageBootstrapProvider.register_provider(STOCK_BACKEND)(_stock_or_observed_bootstrap)
    manager = StorageManagerFactory._registry[STOCK_BACKEND]
    if manager is not StockNameStorageManager:
        _stock["manager"] = manager
        StorageManagerFactory.register(STOCK_BACKEND)(StockNameStorageManager)


def replace_stock() -> None:
    """From now on, TQ's own ``MooncakeStore`` backend uses ``ObservedMooncakeClient`` and this package's
    bootstrap in this process (as if every ``backend.MooncakeStore`` section said ``replace_stock: true``)."""
    global _replaced
    register()
    _replaced = True
