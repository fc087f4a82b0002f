"""Start ``mooncake_master`` for TQ's first process when ``auto_init`` is true, the careful way.

Unlike TQ 0.1.11's own provider (which ``pkill``s every ``mooncake_master`` on the node and sleeps 3 s),
this one reuses a master that already answers on the configured address, never signals a process it did
not start, waits for readiness by polling, and stops the master it started at interpreter exit (or by
``stop_started_masters()``).
"""

from __future__ import annotations

import atexit
import logging
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tq_mooncake.client.config import host_port
from tq_mooncake.client.store import unreachable
from tq_mooncake.cluster import MasterProcess

logger = logging.getLogger(__name__)

# What TQ 0.1.11's bootstrap passes, so that data behaves the same: no lease expiry, no eviction.
TQ_MASTER_FLAGS = (
    "-default_kv_lease_ttl=999999",
    "-default_kv_soft_pin_ttl=999999",
    "--allow_evict_soft_pinned_objects=false",
    "--eviction_high_watermark_ratio=1.0",
    "--eviction_ratio=0.0",
)
DEFAULT_CLIENT_TTL_S = 30  # TQ's value: heartbeats starve under Python load below it


@dataclass
class MasterLease:
    """What the bootstrap did: ``started`` (a process we own) or reused what answered at ``address``."""

    address: str
    metadata_server: str
    started: bool
    process: MasterProcess | None = None

    def stop(self) -> None:
        """Stop the master if this lease started it; a reused master is left alone."""
        if self.process is not None:
            self.process.stop()


_started: list[MasterLease] = []
_lock = threading.Lock()


def _host_port(value: str, what: str) -> tuple[str, int]:
    found = host_port(value)
    if found is None:
        raise ValueError(f"invalid {what} {value!r}: host and port are required (e.g. 127.0.0.1:50051)")
    return found


def bootstrap_master(section: Mapping[str, Any]) -> MasterLease | None:
    """Make sure a master serves ``section`` (TQ's backend section); None when ``auto_init`` is false.

    Keys read: ``auto_init`` (default true), ``master_server_address``, ``metadata_server`` (``host:port``
    or ``P2PHANDSHAKE``), ``client_ttl`` (default 30), ``master_log_dir`` (default a new temp folder).
    Raises ValueError for malformed addresses, RuntimeError when the master does not come up.
    """
    if not section.get("auto_init", True):
        return None
    host, port = _host_port(str(section["master_server_address"]), "master_server_address")
    metadata = str(section.get("metadata_server", "P2PHANDSHAKE")).strip()
    p2p = metadata.upper() == "P2PHANDSHAKE"
    http_host, http_port = (None, None) if p2p else _host_port(metadata, "metadata_server")
    if unreachable("master", f"{host}:{port}", 1.0) is None:
        logger.info("mooncake_master already answers on %s:%s; reusing it (not restarting it)", host, port)
        return MasterLease(f"{host}:{port}", metadata, started=False)
    if not p2p and http_host != host:
        raise ValueError(f"metadata_server host {http_host!r} must be the master's host {host!r} for auto_init")
    log_dir = Path(section.get("master_log_dir") or tempfile.mkdtemp(prefix="tq-mooncake-master-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    process = MasterProcess(
        log_dir,
        client_ttl=int(section.get("client_ttl", DEFAULT_CLIENT_TTL_S)),
        http_metadata=not p2p,
        extra_args=list(TQ_MASTER_FLAGS),
        rpc_port=port,
        host=host,
        http_port=http_port,
    ).start()
    lease = MasterLease(process.address, process.metadata_server, started=True, process=process)
    with _lock:
        if not _started:
            atexit.register(stop_started_masters)
        _started.append(lease)
    logger.info("started mooncake_master on %s (log %s)", process.address, process.log_path)
    return lease


def stop_started_masters() -> None:
    """Stop every master this process's bootstrap started (also run at interpreter exit)."""
    with _lock:
        leases = list(_started)
        _started.clear()
    for lease in leases:
        lease.stop()
