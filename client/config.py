"""The client's configuration: one frozen object parsed and validated from TQ's config dict.

The client's defaults live here, except the retry section's, which are those of ``RetryPolicy`` and
``RetryBudget`` (``retry.py``), defined once there. Keys the client does not know at the top level are
ignored (TQ passes its whole backend section, with keys such as ``client_name`` or ``auto_init``); unknown
keys inside ``retry`` are an error, since they can only be typos.

Every value is checked here, before anything reaches Mooncake: a bad value is a ``ValueError`` naming the
key and what it accepts (a config that is not a mapping at all: ``TypeError``). Addresses are checked for
their form only; whether the right server answers on them is ``setup_probe``'s job at connect time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import ipaddress
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .node_health import NodeHealthPolicy
from .numbers import is_int, is_number
from .retry import Clock, RetryBudget, RetryPolicy

GiB = 1 << 30
MAX_SIZE = 1 << 50  # 1 PiB: no size of this client is larger; anything above is a typo
MAX_LOCAL_BUFFER_SIZE = 1 << 40  # Mooncake's own limit for local_buffer_size (1 TiB)
MAX_SETUP_TIMEOUT_S = 3600.0
MAX_WORKERS = 256
MAX_REPLICAS = 64  # the master reserves replica_num slots per key: a huge count must never reach it
PROTOCOLS = ("tcp", "rdma")
# The metadata plugins of the installed wheel (mooncake-transfer-engine-non-cuda 0.3.13.post1, probed in
# subprocesses): http and https (USE_HTTP) and etcd (USE_ETCD). Any other scheme, redis:// included (no
# USE_REDIS), makes Mooncake LOG(FATAL), i.e. abort the process, inside setup().
METADATA_SCHEMES = ("http", "https", "etcd")
METADATA_FORMS = (
    "'P2PHANDSHAKE', 'host:port' (becomes http://host:port/metadata), 'http(s)://host[:port]/path' "
    "(no query or fragment) or 'etcd://host:port[,host:port...]'"
)
# ASCII only (re.ASCII): "١" or "１２" are digits to str.isdigit() and to a plain \d, not sizes.
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # a host name or an IPv4 address (matched whole: fullmatch)


def parse_size(name: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"512MB"``, ``"4 GiB"`` (binary units; fractions of a byte
    are dropped); ValueError naming ``name`` for anything else, negative, or above ``MAX_SIZE``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size in bytes, got {_short(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = int(decimal.Decimal(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])
    else:
        raise ValueError(f"{name} must be a size in bytes (int or e.g. '512MB'), got {_short(value)}")
    if size < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"{name} must be at most {MAX_SIZE} bytes (1 PiB), got {_short(value)}")
    return size


def normalize_metadata_server(value: str) -> str:
    """TQ's rule: ``P2PHANDSHAKE`` (any case) as is; ``host:port`` or an http(s) URL becomes an
    ``http(s)://.../metadata`` URL. A scheme is lowered (``HTTP://`` is ``http://``: schemes are
    case-insensitive, Mooncake matches them in lower case); the rest is left as it is, for
    ``check_metadata_server`` to refuse what it must: an ``etcd://`` value, another scheme, or an http(s)
    URL with a query or fragment (``?``, ``#``), which gets no ``/metadata`` appended to it."""
    if value.upper() == "P2PHANDSHAKE":
        return "P2PHANDSHAKE"
    scheme, sep, rest = value.partition("://")
    if sep:
        value = f"{scheme.lower()}://{rest}"
    if sep and scheme.lower() not in ("http", "https"):
        return value
    url = value if sep else f"http://{value}"
    if "?" in url or "#" in url:
        return url
    return url if url.rstrip("/").endswith("/metadata") else url.rstrip("/") + "/metadata"


def split_host_port(address: str) -> tuple[str, str] | None:
    """``(host, port)`` strings of ``host:port`` or ``[v6]:port`` (brackets dropped); None without a ``:``."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return None
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), port


def parse_host_port(name: str, address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` (IPv6 as ``[addr]:port``); ValueError naming ``name`` for any other
    form: no port, an empty host, a port outside 1..65535 or not in ASCII digits, spaces, control or
    non-ASCII characters, a scheme, or brackets around anything but an IPv6 address."""
    hint = f"{name} must be 'host:port' with a port from 1 to 65535 (IPv6 as '[addr]:port'), got {_short(address)}"
    parts = split_host_port(address)
    if parts is None or "://" in address:
        raise ValueError(hint)
    host, port = parts
    if not is_host(host, bracketed=address.startswith("[")):
        raise ValueError(hint)
    return host, _port(port, hint)


def is_host(host: str, bracketed: bool = False) -> bool:
    """Whether ``host`` is a host name or IPv4 address (ASCII letters, digits, ``_ . -``), or, where it was
    ``bracketed``, an IPv6 address (no zone: ``%`` is refused, with any space or control character)."""
    if not bracketed:
        return _NAME.fullmatch(host) is not None
    if "%" in host:
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _port(text: str, hint: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(hint)
    return int(text)


def check_local_hostname(value: str) -> None:
    """ValueError unless ``value`` is a host name or address, optionally with ``:port`` (``[v6]:port``); no
    IPv6 zone (``%eth0``). Mooncake takes anything here, a space, a newline or a scheme included, and
    advertises it as this node's address."""
    if "%" not in value:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value)
            return
    if is_host(value):
        return
    try:
        parse_host_port("local_hostname", value)
    except ValueError:
        raise ValueError(
            "local_hostname must be a host name or address, optionally with ':port' (1 to 65535), "
            f"or '' for this host's address, got {_short(value)}"
        ) from None


def check_metadata_server(value: str) -> None:
    """ValueError naming the accepted forms (``METADATA_FORMS``) unless ``value`` (normalised) is one of them:
    printable ASCII, a lower-case scheme this Mooncake build has a plugin for (``METADATA_SCHEMES``), and for
    http(s) no query or fragment (Mooncake appends ``?key=<key>`` to the URL as it is)."""
    if value == "P2PHANDSHAKE":
        return
    if not (value.isascii() and value.isprintable()):
        raise ValueError(
            f"metadata_server must be {METADATA_FORMS} in printable ASCII (no control characters), got {_short(value)}"
        )
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in METADATA_SCHEMES and scheme.lower() in METADATA_SCHEMES:
        raise ValueError(
            f"metadata_server's scheme must be in lower case ({scheme.lower()!r}), as Mooncake matches it "
            f"(ClientConfig.from_dict lowers it), got {_short(value)}"
        )
    if scheme not in METADATA_SCHEMES:
        extra = f"; this Mooncake build has no {scheme!r} metadata plugin (it would abort the process)"
        raise ValueError(f"metadata_server must be {METADATA_FORMS}, got {_short(value)}" + (extra if scheme else ""))
    if scheme == "etcd":
        etcd_endpoints(value)
    else:
        http_endpoint(value)


def http_endpoint(url: str) -> tuple[str, int]:
    """``(host, port)`` of an http(s) metadata URL (port 80/443 when not given); ValueError if malformed:
    no host or a host ``parse_host_port`` would refuse, a port outside 1..65535, user info, a query or
    fragment, or anything but printable ASCII without spaces."""
    if "?" in url or "#" in url:
        raise ValueError(
            "metadata_server must be an http(s) URL without a query or fragment: Mooncake appends "
            f"'?key=<key>' to it as it is, got {_short(url)}"
        )
    hint = f"metadata_server must be an http(s) URL with a host and a port from 1 to 65535, got {_short(url)}"
    if not (url.isascii() and url.isprintable()) or " " in url:
        raise ValueError(hint)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(hint) from None
    host = parts.hostname
    if not host or not is_host(host, bracketed=parts.netloc.startswith("[")) or port == 0 or "@" in parts.netloc:
        raise ValueError(hint)
    return host, port or (443 if parts.scheme == "https" else 80)


def etcd_endpoints(value: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` endpoints of ``etcd://host:port[,host:port...]`` (``,`` or ``;`` between them, spaces
    around them, as Mooncake's etcd wrapper splits and trims them); ValueError if there is none or one is
    malformed."""
    rest = value.split("://", 1)[1]
    found = [e.strip(" ") for e in rest.replace(";", ",").split(",") if e.strip(" ")]
    if not found:
        raise ValueError(f"metadata_server must name at least one etcd endpoint host:port, got {_short(value)}")
    return [parse_host_port("every etcd endpoint of metadata_server", e) for e in found]


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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "max_attempts" and is_int(value) and abs(value) > sys.float_info.max:
                raise ValueError(f"retry.{f.name} must be a finite number, got {_short(value)}")
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
        unknown = sorted((k for k in section if k not in known), key=str)
        if unknown:
            raise ValueError(f"unknown retry config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**section)


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a plain ``host:port`` or ``http://host:port/...`` address; None for other forms
    (no host, or no port from 1 to 65535)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    parts = split_host_port(rest.split("/", 1)[0])
    if parts is None or not parts[0]:
        return None
    try:
        return parts[0], _port(parts[1], "")
    except ValueError:
        return None


def default_max_workers(cpus: int | None = None) -> int:
    """Threads running chunks by default: one per four CPUs, 1 to 4. Measured on 2 cores over TCP, chunks
    run side by side were 1.4-1.6x slower than one after another (``bench/bench.py``)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 4))


_STRINGS = ("local_hostname", "metadata_server", "master_server_address", "protocol", "device_name")
# name, lowest, highest (None: no upper bound)
_COUNTS = (
    ("replica_num", 1, MAX_REPLICAS),
    ("batch_size", 1, None),
    ("max_workers", 1, MAX_WORKERS),
    ("max_value_bytes", 1, MAX_SIZE),
)
_SIZES = (("global_segment_size", MAX_SIZE), ("local_buffer_size", MAX_LOCAL_BUFFER_SIZE))


@dataclass(frozen=True)
class ClientConfig:
    """Everything ``MooncakeBatchClient`` needs, validated on construction (ValueError naming the key and
    what it accepts; ``retry`` that is not a ``RetryConfig``: TypeError).

    ``local_hostname``: missing means ``127.0.0.1``; ``""`` means this host's address (TQ's behaviour).
    ``metadata_server`` is taken as given here (``from_dict`` normalises TQ's forms first).
    ``register_memory``: None (the default) registers transfer memory where the protocol needs it (not over TCP).
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
    tensor_checksum: bool = True
    clear_force: bool = True
    max_value_bytes: int = 1 * GiB
    setup_timeout_s: float = 5.0
    register_memory: bool | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    node_health: NodeHealthPolicy = field(default_factory=NodeHealthPolicy)

    def __post_init__(self) -> None:
        for name in _STRINGS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {_short(getattr(self, name))}")
        check_local_hostname(self.local_hostname)
        parse_host_port("master_server_address", self.master_server_address)
        check_metadata_server(self.metadata_server)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {_short(self.protocol)}")
        for name, low, high in _COUNTS:
            _check_count(name, getattr(self, name), low, high)
        for name, high in _SIZES:
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value <= high:
                raise ValueError(f"{name} must be a size in bytes from 0 to {high}, got {_short(value)}")
        _check_setup_timeout(self.setup_timeout_s)
        if self.register_memory is not None and not isinstance(self.register_memory, bool):
            raise ValueError(f"register_memory must be true, false or null, got {_short(self.register_memory)}")
        for name in ("hard_pin", "allow_pickle", "tensor_checksum", "clear_force"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {_short(getattr(self, name))}")
        if not isinstance(self.retry, RetryConfig):
            raise TypeError(f"retry must be a RetryConfig (from_dict parses a mapping), got {_short(self.retry)}")
        if not isinstance(self.node_health, NodeHealthPolicy):
            raise TypeError(
                f"node_health must be a NodeHealthPolicy (from_dict parses a mapping or a bool), got "
                f"{_short(self.node_health)}"
            )

    @property
    def registers_memory(self) -> bool:
        """Whether transfers use registered memory: ``register_memory``, or by default every protocol but TCP."""
        return self.protocol != "tcp" if self.register_memory is None else self.register_memory

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> ClientConfig:
        """Parse TQ's Mooncake section (a dict or an OmegaConf ``DictConfig``); TypeError if it is not a
        mapping, ValueError for a bad value."""
        raw = _items(config) if config is not None else {}
        if raw is None:
            raise TypeError(
                "the client config must be a mapping (TQ's Mooncake section: a dict or an OmegaConf DictConfig) "
                f"or a ClientConfig, got {type(config).__name__} {_short(config)}"
            )
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw or raw[f.name] is None:
                continue
            value = raw[f.name]
            if f.name == "retry":
                section = _items(value)
                if section is None:
                    raise ValueError(f"retry must be a mapping, got {_short(value)}")
                value = RetryConfig.from_dict(section)
            elif f.name == "node_health":
                value = _node_health(value)
            elif f.name in ("global_segment_size", "local_buffer_size", "max_value_bytes"):
                value = parse_size(f.name, value)
            kwargs[f.name] = value
        if kwargs.get("local_hostname") == "":
            kwargs["local_hostname"] = _this_host_address()
        if "metadata_server" in kwargs and isinstance(kwargs["metadata_server"], str):
            kwargs["metadata_server"] = normalize_metadata_server(kwargs["metadata_server"])
        return cls(**kwargs)


def _node_health(value: Any) -> NodeHealthPolicy:
    """The ``node_health`` section: true/false (the defaults, or everything off), or a mapping of
    ``NodeHealthPolicy``'s fields (unknown keys are an error: they can only be typos)."""
    if isinstance(value, bool):
        return NodeHealthPolicy(enabled=value)
    section = _items(value)
    if section is None:
        raise ValueError(f"node_health must be true, false or a mapping, got {_short(value)}")
    known = {f.name for f in dataclasses.fields(NodeHealthPolicy)}
    unknown = sorted((k for k in section if k not in known), key=str)
    if unknown:
        raise ValueError(f"unknown node_health config key(s) {unknown}; known keys: {sorted(known)}")
    return NodeHealthPolicy(**section)


def _check_count(name: str, value: Any, low: int, high: int | None) -> None:
    if is_int(value) and value >= low and (high is None or value <= high):
        return
    accepted = f">= {low}" if high is None else f"from {low} to {high}"
    raise ValueError(f"{name} must be an integer {accepted}, got {_short(value)}")


def _check_setup_timeout(value: Any) -> None:
    # The chained comparison also refuses NaN and infinity, and compares huge ints exactly (no overflow).
    if is_number(value) and 0 < value <= MAX_SETUP_TIMEOUT_S:
        return
    raise ValueError(
        f"setup_timeout_s must be a number of seconds > 0 and <= {MAX_SETUP_TIMEOUT_S:g}, got {_short(value)}"
    )


def _items(value: Any) -> dict[Any, Any] | None:
    """A plain dict of a mapping (or of anything with ``items()``); None for anything else."""
    if isinstance(value, Mapping):
        return {k: value[k] for k in value}
    if hasattr(value, "items") and not isinstance(value, (str, bytes)):
        return dict(value.items())
    return None


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value in a message may be a huge string or int)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str(): Python refuses to print it
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _this_host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
