"""Reads of chosen replicas, and probes of storage endpoints, with a transfer engine of the client's own.

Mooncake's store reads the replica it picks (the local one, else the first complete one the master lists) and
never another, so a key whose first replica sits on a dead storage process fails until the master drops that
process (``--client_ttl``), though a second replica is intact elsewhere. ``ReplicaReader`` reads a replica the
caller names (endpoint, address, size, from ``replicas.locations``) with a second ``mooncake.engine``
transfer engine in this process, set up lazily on first use with the client's own addresses, and asks an
endpoint whether it answers (``send_probe``: a handshake RPC that a dead process refuses at once).

``ReplicaReadingStore`` puts both beside the store's own methods (``batch_read_replicas``, ``probe_endpoint``),
so that a store wrapper such as ``FaultInjectingStore`` sees direct reads as reads. What protects a replica
while it is read this way is what protects it under ``batch_get_into``: see ``replica_routing.py``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .codes import ErrorCode
from .config import ClientConfig, split_host_port

logger = logging.getLogger(__name__)


def _unique_name(local_hostname: str) -> str:
    """``host:port`` for the reader's engine, with a port free on this host now: the engine's name is its key in
    the metadata server, and a second engine under a name in use fails to set up (two clients in one process,
    or two processes on one host, would otherwise both take the bare host name)."""
    host = local_hostname
    parts = split_host_port(local_hostname) if not _is_bare_ipv6(local_hostname) else None
    if parts is not None and parts[1].isdigit():
        host = parts[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_bare_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _engine_class() -> Any:
    from mooncake.engine import TransferEngine

    return TransferEngine


class ReplicaReader:
    """A lazily set-up transfer engine for direct replica reads and endpoint probes; thread-safe.

    If the engine cannot be set up, reads answer ``INTERNAL_ERROR`` and probes ``None`` (unknown), so the client
    goes on as if this did not exist; the reason is logged once.
    """

    def __init__(self, config: ClientConfig, engine_factory: Callable[[], Any] | None = None) -> None:
        self._config = config
        self._factory = engine_factory or (lambda: _engine_class()())
        self._lock = threading.Lock()
        self._engine: Any = None
        self._failed = False
        self._closed = False
        self._probing: dict[str, threading.Event] = {}  # endpoint -> set when its probe in flight ends

    def _get(self) -> Any:
        with self._lock:
            if self._engine is not None or self._failed or self._closed:
                return self._engine
            cfg = self._config
            rc: Any = None
            engine = None
            for _ in range(3):  # a name another engine took meanwhile: try another port
                try:
                    engine = self._factory()
                    rc = engine.initialize(_unique_name(cfg.local_hostname), cfg.metadata_server, cfg.protocol,
                                           cfg.device_name)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - the fallback is an extra; the client works without it
                    rc, engine = exc, None
                if rc == 0:
                    break
            if rc != 0:
                self._failed = True
                logger.warning("replica fallback reads are off: a second transfer engine did not set up (%s)", rc)
                return None
            self._engine = engine
            return engine

    def probe(self, endpoint: str, timeout_s: float) -> bool | None:
        """Whether ``endpoint`` answers a handshake probe within ``timeout_s`` (False: refused, failed or silent);
        None when this reader cannot probe. A probe still in flight from an earlier call counts as silent: at
        most one thread per endpoint waits on a peer that does not answer."""
        engine = self._get()
        if engine is None:
            return None
        with self._lock:
            if endpoint in self._probing:
                return False
            done = self._probing[endpoint] = threading.Event()
        answer: list[int] = []

        def run() -> None:
            try:
                answer.append(int(engine.send_probe(endpoint)))
            except Exception:  # noqa: BLE001 - a probe that raises is a failed probe
                answer.append(-1)
            finally:
                with self._lock:
                    self._probing.pop(endpoint, None)
                done.set()

        threading.Thread(target=run, name="tq-mooncake-probe", daemon=True).start()
        done.wait(timeout_s)
        return bool(answer) and answer[0] == 0

    def batch_read_replicas(
        self,
        keys: Sequence[str],
        endpoints: Sequence[str],
        ptrs: Sequence[int],
        addresses: Sequence[int],
        sizes: Sequence[int],
    ) -> list[int]:
        """Read ``sizes[i]`` bytes at ``addresses[i]`` on ``endpoints[i]`` into ``ptrs[i]``, one batch per
        endpoint; per key the number of bytes read, or a negative code (``TRANSFER_FAIL`` for every key of an
        endpoint whose batch failed). ``keys`` name the reads (for wrappers); the bytes are not checked here."""
        engine = self._get()
        if engine is None:
            return [int(ErrorCode.INTERNAL_ERROR)] * len(keys)
        by_endpoint: dict[str, list[int]] = {}
        for i, endpoint in enumerate(endpoints):
            by_endpoint.setdefault(endpoint, []).append(i)
        result = [int(ErrorCode.TRANSFER_FAIL)] * len(keys)
        for endpoint, idx in by_endpoint.items():
            dst, src, lengths = [ptrs[i] for i in idx], [addresses[i] for i in idx], [sizes[i] for i in idx]
            if engine.batch_register_memory(dst, lengths) != 0:
                continue
            try:
                rc = engine.batch_transfer_sync_read(endpoint, dst, src, lengths)
            finally:
                engine.batch_unregister_memory(dst)
            if rc == 0:
                for i in idx:
                    result[i] = sizes[i]
        return result

    def close(self) -> None:
        """Drop the engine (its memory registrations end with it); later calls answer as if it never set up."""
        with self._lock:
            self._closed = True
            self._engine = None


class ReplicaReadingStore:
    """A store with ``batch_read_replicas`` and ``probe_endpoint`` beside its own methods (which pass through)."""

    def __init__(self, store: Any, reader: ReplicaReader) -> None:
        self._store = store
        self._reader = reader
        self.batch_read_replicas = reader.batch_read_replicas
        self.probe_endpoint = reader.probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def close(self) -> Any:
        self._reader.close()
        return self._store.close()
