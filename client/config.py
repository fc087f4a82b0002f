"""The client's configuration: one frozen object parsed and validated from TQ's config dict.

The client's defaults live here, except the retry section's, which are those of ``RetryPolicy`` and
``RetryBudget`` (``retry.py``), defined once there. Keys the client does not know at the top level are
ignored (TQ passes its whole backend section, with keys such as ``client_name`` or ``auto_init``); unknown
keys inside ``retry`` are an error, since they can only be typos.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .retry import Clock, RetryBudget, RetryPolicy

GiB = 1 << 30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(name: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"512MB"``, ``"4 GiB"`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size in bytes, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])
    else:
        raise ValueError(f"{name} must be a size in bytes (int or e.g. '512MB'), got {value!r}")
    if size < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return size


def normalize_metadata_server(value: str) -> str:
    """TQ's rule: ``P2PHANDSHAKE`` as is; ``etcd://``/``redis://`` as is; else an ``http://.../metadata`` URL."""
    if value.upper() == "P2PHANDSHAKE":
        return "P2PHANDSHAKE"
    if value.startswith(("etcd://", "redis://")):
        return value
    url = value if value.startswith(("http://", "https://")) else f"http://{value}"
    return url if url.rstrip("/").endswith("/metadata") else url.rstrip("/") + "/metadata"


_POLICY = RetryPolicy()


@dataclass(frozen=True)
class RetryConfig:
    """The ``retry`` section: per-chunk attempts and backoff, the per-call deadline, the shared budget.
    Its defaults are ``RetryPolicy``'s and ``RetryBudget``'s."""

    max_attempts: int = _POLICY.max_attempts
    initial_backoff_s: float = _POLICY.initial_backoff_s
    max_backoff_s: float = _POLICY.max_backoff_s
    multiplier: float = _POLICY.multiplier
    deadline_s: float = _POLICY.deadline_s
    budget_ratio: float = RetryBudget.DEFAULT_RATIO
    budget_min_per_s: float = RetryBudget.DEFAULT_MIN_PER_S

    def __post_init__(self) -> None:
        self.policy()  # validates the policy fields
        self.budget()  # validates the budget fields

    def budget(self, clock: Clock = time.monotonic) -> RetryBudget:
        """A fresh retry budget with these settings (one per client)."""
        return RetryBudget(self.budget_ratio, self.budget_min_per_s, clock=clock)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff_s=self.initial_backoff_s,
            max_backoff_s=self.max_backoff_s,
            multiplier=self.multiplier,
            deadline_s=self.deadline_s,
        )

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> RetryConfig:
        section = dict(section or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown retry config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**section)


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a plain ``host:port`` or ``http://host:port/...`` address; None for other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.split("/", 1)[0].rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def default_max_workers(cpus: int | None = None) -> int:
    """Threads running chunks by default: one per four CPUs, 1 to 4. Measured on 2 cores over TCP, chunks
    run side by side were 1.4-1.6x slower than one after another (``bench/bench.py``)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 4))


@dataclass(frozen=True)
class ClientConfig:
    """Everything ``MooncakeBatchClient`` needs, validated.

    ``local_hostname``: missing means ``127.0.0.1``; ``""`` means this host's address (TQ's behaviour).
    """

    local_hostname: str = "127.0.0.1"
    metadata_server: str = "P2PHANDSHAKE"
    master_server_address: str = "127.0.0.1:50051"
    protocol: str = "tcp"
    global_segment_size: int = 4 * GiB
    local_buffer_size: int = 1 * GiB
    device_name: str = ""
    replica_num: int = 1
    hard_pin: bool = True
    batch_size: int = 400
    max_workers: int = field(default_factory=default_max_workers)
    allow_pickle: bool = False
    max_value_bytes: int = 1 * GiB
    setup_timeout_s: float = 5.0
    retry: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        for name in ("local_hostname", "metadata_server", "master_server_address", "protocol", "device_name"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.master_server_address:
            raise ValueError("master_server_address must be 'host:port', got ''")
        for name, low in (("replica_num", 1), ("batch_size", 1), ("max_workers", 1), ("max_value_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.setup_timeout_s, bool) or not isinstance(self.setup_timeout_s, (int, float)):
            raise ValueError(f"setup_timeout_s must be a number of seconds, got {self.setup_timeout_s!r}")
        if not self.setup_timeout_s > 0:
            raise ValueError(f"setup_timeout_s must be > 0, got {self.setup_timeout_s!r}")
        for name in ("hard_pin", "allow_pickle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> ClientConfig:
        """Parse TQ's Mooncake section (a dict or an OmegaConf ``DictConfig``)."""
        raw = {k: config[k] for k in config} if config is not None else {}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw or raw[f.name] is None:
                continue
            value = raw[f.name]
            if f.name == "retry":
                value = RetryConfig.from_dict(value if isinstance(value, Mapping) else _mapping(value, "retry"))
            elif f.name in ("global_segment_size", "local_buffer_size", "max_value_bytes"):
                value = parse_size(f.name, value)
            kwargs[f.name] = value
        if kwargs.get("local_hostname") == "":
            kwargs["local_hostname"] = _this_host_address()
        if "metadata_server" in kwargs and isinstance(kwargs["metadata_server"], str):
            kwargs["metadata_server"] = normalize_metadata_server(kwargs["metadata_server"])
        return cls(**kwargs)


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if hasattr(value, "items"):
        return dict(value.items())
    raise ValueError(f"{name} must be a mapping, got {value!r}")


def _this_host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
