"""What the master says it holds of each key: how many complete copies (Mooncake stores fewer replicas than
asked, and says nothing, when there are fewer segments than ``replica_num``) and of what size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def complete_replicas(store: Any, keys: Sequence[str]) -> list[int | None]:
    """The number of complete memory replicas of each key (None where the store did not say)."""
    found = _descriptors(store, keys) if keys else None
    return [_count(found.get(key)) if found is not None else None for key in keys]


def _count(replicas: Any) -> int | None:
    if replicas is None:
        return None
    n = 0
    for r in replicas:
        status = getattr(r, "status", None)
        if r.is_memory_replica() and getattr(status, "name", str(status)).endswith("COMPLETE"):
            n += 1
    return n


def _size(replicas: Any) -> int | None:
    for r in replicas or ():
        if r.is_memory_replica():
            return int(r.get_memory_descriptor().buffer_descriptor.size)
    return None


def stored_sizes_of_existing(store: Any, keys: Sequence[str]) -> list[int | None]:
    """The size of the object stored under each key: None for a key not stored, -1 where the store did not say (a
    failed query). Sizes are asked (``batch_get_replica_desc``) only for the keys ``batch_is_exist`` finds:
    Mooncake logs an error line for every missing key the former is asked about."""
    try:
        exists = list(store.batch_is_exist(list(keys)))
    except Exception:  # noqa: BLE001 - unknown, not a failure
        exists = []
    if len(exists) != len(keys):
        return [-1] * len(keys)
    present = [k for k, e in zip(keys, exists, strict=True) if e != 0]
    found = (_descriptors(store, present) if present else None) or {}
    sizes = {k: _size(found.get(k)) for k in present}
    return [None if e == 0 else (-1 if sizes[k] is None else sizes[k]) for k, e in zip(keys, exists, strict=True)]
