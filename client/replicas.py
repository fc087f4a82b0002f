"""What the master says it holds of each key: where its complete memory replicas are (endpoint, address, size),
how many (Mooncake stores fewer replicas than asked, and says nothing, when there are fewer segments than
``replica_num``) and of what size.

One ``batch_get_replica_desc`` RPC answers all of it. Like the query inside ``batch_get_into``, it grants each key
found a read lease (the master's ``--default_kv_lease_ttl``), which holds off eviction and non-forced removal;
Mooncake logs an error line for every key it is asked about that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class Location(NamedTuple):
    """One complete memory replica: the storage endpoint (``host:port``, also its segment's name) that holds it,
    and the address and size of its buffer there."""

    endpoint: str
    address: int
    size: int


def _descriptors(store: Any, keys: Sequence[str]) -> dict[str, Any] | None:
    """The master's replica descriptors of ``keys`` (absent keys left out), from one RPC; None when the store did
    not answer (a failed query, or a store without ``batch_get_replica_desc``): unknown, it fails nothing."""
    query = getattr(store, "batch_get_replica_desc", None)
    if query is None:
        return None
    try:
        found = query(list(keys))
    except Exception:  # noqa: BLE001 - an unanswered query leaves the answer unknown
        return None
    return found if isinstance(found, dict) else None


def _locations(replicas: Any) -> list[Location]:
    """The complete memory replicas among ``replicas`` (descriptors), in the master's order."""
    found = []
    for r in replicas or ():
        status = getattr(r, "status", None)
        if not (r.is_memory_replica() and getattr(status, "name", str(status)).endswith("COMPLETE")):
            continue
        bd = r.get_memory_descriptor().buffer_descriptor
        found.append(Location(str(getattr(bd, "transport_endpoint", "")), int(bd.buffer_address), int(bd.size)))
    return found


def locations(store: Any, keys: Sequence[str]) -> dict[str, list[Location]] | None:
    """The complete memory replicas of each key the master holds (absent keys left out), from one RPC; None when
    the store did not answer."""
    found = _descriptors(store, keys) if keys else {}
    if found is None:
        return None
    try:
        return {key: _locations(found[key]) for key in keys if key in found}
    except Exception:  # noqa: BLE001 - a descriptor of an unexpected shape: unknown
        return None


def complete_replicas(store: Any, keys: Sequence[str]) -> list[int | None]:
    """The number of complete memory replicas of each key (None where the store did not say)."""
    found = locations(store, keys) if keys else None
    return [len(found[key]) if found is not None and key in found else None for key in keys]


class Held(NamedTuple):
    """What the master holds under a key: the object's size (-1: it did not say) and the endpoints of its complete
    memory replicas."""

    size: int
    endpoints: frozenset[str]


_UNKNOWN = Held(-1, frozenset())


def _held(replicas: Any, endpoints: bool) -> Held:
    size = next(
        (int(r.get_memory_descriptor().buffer_descriptor.size) for r in replicas or () if r.is_memory_replica()), -1
    )
    return Held(size, frozenset(loc.endpoint for loc in _locations(replicas)) if endpoints else frozenset())


def held_objects(store: Any, keys: Sequence[str], endpoints: bool = True) -> list[Held | None]:
    """What is stored under each key: None for a key not stored, a ``Held`` of size -1 where the store did not say
    (a failed query); its endpoints only with ``endpoints`` (else empty: reading them costs about 20 us a key).
    Replicas are asked (``batch_get_replica_desc``) only for the keys ``batch_is_exist`` finds: Mooncake logs an
    error line for every missing key the former is asked about."""
    if not keys:
        return []
    try:
        exists = list(store.batch_is_exist(list(keys)))
    except Exception:  # noqa: BLE001 - unknown, not a failure
        exists = []
    if len(exists) != len(keys):
        return [_UNKNOWN] * len(keys)
    present = [k for k, e in zip(keys, exists, strict=True) if e != 0]
    # A key found by the first query and not by the second: unknown, not absent.
    held = {k: h or _UNKNOWN for k, h in zip(present, described_objects(store, present, endpoints), strict=True)}
    return [None if e == 0 else held[k] for k, e in zip(keys, exists, strict=True)]


def described_objects(store: Any, keys: Sequence[str], endpoints: bool = True) -> list[Held | None]:
    """``held_objects`` for keys that should exist (this client wrote them): one ``batch_get_replica_desc`` RPC, no
    ``batch_is_exist`` first; a key the master does not know is None (and costs an error line in Mooncake's log)."""
    if not keys:
        return []
    found = _descriptors(store, keys)
    if found is None:
        return [_UNKNOWN] * len(keys)
    try:
        return [_held(found[k], endpoints) if k in found else None for k in keys]
    except Exception:  # noqa: BLE001 - a descriptor of an unexpected shape: unknown
        return [_UNKNOWN] * len(keys)
