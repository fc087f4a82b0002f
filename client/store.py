"""The connection to Mooncake: a set-up ``MooncakeDistributedStore``, and memory registered with it.

``connect_store`` fails fast with the addresses it tried (Mooncake alone retries an unreachable master for
about 90 s). Its one process-wide side effect: on a loopback-only set-up with a metadata server, it sets
``MC_TCP_BIND_ADDRESS=127.0.0.1`` unless already set, because the transfer engine otherwise advertises the
first non-loopback interface, which such a machine does not have.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from typing import Any

from .codes import ErrorCode
from .config import ClientConfig, host_port
from .errors import StoreSetupError

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(what: str, address: str, timeout: float) -> str | None:
    """Why ``address`` does not accept a TCP connection within ``timeout`` s (None if it does or is not
    a plain address). Mooncake's own setup retries an unreachable master for about 90 s."""
    hp = host_port(address)
    if hp is None:
        return None
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        return f"{what} {address!r} is not reachable: {exc}"
    return None


def connect_store(config: ClientConfig) -> Any:
    """A set-up ``MooncakeDistributedStore`` for ``config``; StoreSetupError (naming the addresses) if not.

    The master (and an HTTP metadata server) are probed with a TCP connect first, so an unreachable one
    fails within ``setup_timeout_s`` instead of Mooncake's 90 s of internal retries.
    """
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise ImportError(
            "mooncake.store is not importable: install tq-mooncake[cpu] (mooncake-transfer-engine-non-cuda) "
            "or tq-mooncake[cuda], and Debian's libibverbs1 and librdmacm1"
        ) from exc
    if (
        config.metadata_server != "P2PHANDSHAKE"
        and _is_loopback(config.local_hostname)
        and "MC_TCP_BIND_ADDRESS" not in os.environ
    ):
        os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    where = (
        f"master {config.master_server_address!r}, metadata server {config.metadata_server!r}, "
        f"local hostname {config.local_hostname!r}, protocol {config.protocol!r}"
    )
    probes = [("master", config.master_server_address)]
    if config.metadata_server.startswith("http"):
        probes.append(("metadata server", config.metadata_server))
    for what, address in probes:
        problem = unreachable(what, address, config.setup_timeout_s)
        if problem:
            raise StoreSetupError(f"Mooncake store setup failed: {problem} ({where})")
    store = MooncakeDistributedStore()
    try:
        rc = store.setup(
            config.local_hostname,
            config.metadata_server,
            config.global_segment_size,
            config.local_buffer_size,
            config.protocol,
            config.device_name,
            config.master_server_address,
        )
    except Exception as exc:
        raise StoreSetupError(f"Mooncake store setup raised {exc!r} ({where})") from exc
    if rc != 0:
        with contextlib.suppress(Exception):
            store.close()
        raise StoreSetupError(f"Mooncake store setup failed with {ErrorCode.of(rc).describe()} ({where})")
    return store


def replicate_config(config: ClientConfig) -> Any:
    """The ``ReplicateConfig`` every write of a client uses: ``replica_num`` copies, hard-pinned or not."""
    from mooncake.store import ReplicateConfig

    rc = ReplicateConfig()
    rc.replica_num = config.replica_num
    rc.with_hard_pin = config.hard_pin
    return rc


class Registrations:
    """Memory registered with the transfer engine for one chunk. Over TCP registration is bookkeeping
    only, so it is skipped; other protocols (RDMA) register each region and unregister it at the end."""

    def __init__(self, store: Any, enabled: bool) -> None:
        self._store = store
        self._enabled = enabled
        self._ptrs: list[int] = []

    def add(self, ptr: int, size: int) -> None:
        if not self._enabled or size == 0:
            return
        rc = self._store.register_buffer(ptr, size)
        if rc != 0:
            raise RuntimeError(f"register_buffer failed with {ErrorCode.of(rc).describe()}")
        self._ptrs.append(ptr)

    def release(self) -> None:
        for ptr in self._ptrs:
            rc = self._store.unregister_buffer(ptr)
            if rc != 0:
                logger.warning("unregister_buffer failed with %s", ErrorCode.of(rc).describe())
        self._ptrs.clear()
