"""The connection to Mooncake: a set-up ``MooncakeDistributedStore``, and memory registered with it.

``connect_store`` fails within ``setup_timeout_s`` naming the addresses it tried, whatever answers on them
(``setup_probe`` asks each peer first; Mooncake alone retries a wrong or silent peer for minutes). Its one
process-wide side effect: on a loopback-only set-up with a metadata server, it sets
``MC_TCP_BIND_ADDRESS=127.0.0.1`` unless already set, because the transfer engine otherwise advertises the
first non-loopback interface, which such a machine does not have.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
from typing import Any

from .codes import ErrorCode
from .config import ClientConfig, host_port
from .errors import StoreSetupError
from .setup_probe import first_problem, setup_checks

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
    a plain address). Accepting a connection is not proof of a master: ``setup_probe`` asks for that."""
    hp = host_port(address)
    if hp is None:
        return None
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        return f"{what} {address!r} is not reachable: {exc}"
    return None


def _store_class() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise ImportError(
            "mooncake.store is not importable: install tq-mooncake[cpu] (mooncake-transfer-engine-non-cuda) "
            "or tq-mooncake[cuda], and Debian's libibverbs1 and librdmacm1"
        ) from exc
    return MooncakeDistributedStore


def _bind_loopback(config: ClientConfig) -> None:
    if (
        config.metadata_server != "P2PHANDSHAKE"
        and _is_loopback(config.local_hostname)
        and "MC_TCP_BIND_ADDRESS" not in os.environ
    ):
        os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"


def describe(config: ClientConfig) -> str:
    """The addresses a set-up of ``config`` tries, for messages."""
    return (
        f"master {config.master_server_address!r}, metadata server {config.metadata_server!r}, "
        f"local hostname {config.local_hostname!r}, protocol {config.protocol!r}"
    )


def connect_store(config: ClientConfig) -> Any:
    """A set-up ``MooncakeDistributedStore`` for ``config``; StoreSetupError naming the addresses if not.

    Contract: with a wrong, closed, silent, garbling, half-answering or slow peer at any configured address,
    StoreSetupError comes within ``setup_timeout_s`` (counted from after importing ``mooncake.store``), before
    Mooncake is touched: ``setup_probe`` makes one whole request of each peer under one deadline and passes
    it only on a whole answer: the master's coro_rpc error response with its message, an HTTP 200 or 404
    with its body, or etcd's gRPC answer to a KV Range (see ``setup_probe``). Malformed addresses and
    metadata schemes this build has no plugin for never get here (``ClientConfig`` refuses them).

    What is left unbounded: Mooncake's ``setup()`` itself, once every peer has answered. The 0.3.13 binding
    holds the GIL for the whole call (measured: a thread running it blocks every other Python thread), so
    no thread, timer or signal here can end it early; a peer that answers the probe in full and then stalls
    or garbles Mooncake's own requests is bounded only by Mooncake (20 attempts, each up to coro_rpc's 30 s
    request timeout, curl's 3 s or etcd's 5 s per call). Such a late set-up is still returned if it succeeded
    (with a warning), and a late failure says how long it took. Nothing is left behind: a failed store is
    closed.
    """
    store_class = _store_class()
    start = time.monotonic()
    deadline = start + config.setup_timeout_s
    _bind_loopback(config)
    where = describe(config)
    problem = first_problem(setup_checks(config), deadline)
    if problem:
        raise StoreSetupError(f"Mooncake store setup failed: {problem} ({where})")
    store = store_class()
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
    late = _lateness(start, deadline, config.setup_timeout_s)
    if rc != 0:
        with contextlib.suppress(Exception):
            store.close()
        raise StoreSetupError(f"Mooncake store setup failed with {ErrorCode.of(rc).describe()}{late} ({where})")
    if late:
        logger.warning("Mooncake store setup succeeded%s (%s)", late, where)
    return store


def _lateness(start: float, deadline: float, timeout: float) -> str:
    now = time.monotonic()
    return f" after {now - start:.1f} s, past setup_timeout_s={timeout:g}" if now > deadline else ""


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
