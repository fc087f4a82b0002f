"""How many copies of each key the store really holds: Mooncake stores fewer replicas than asked, and says
nothing, when there are fewer segments than ``replica_num``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def complete_replicas(store: Any, keys: Sequence[str]) -> list[int | None]:
    """The number of complete memory replicas of each key (None where the store did not say: a failed query,
    or a store without ``batch_get_replica_desc``). One master RPC for the batch."""
    query = getattr(store, "batch_get_replica_desc", None)
    if query is None or not keys:
        return [None] * len(keys)
    try:
        found = query(list(keys))
    except Exception:  # noqa: BLE001 - an unanswered query leaves the count unknown, it fails nothing
        return [None] * len(keys)
    return [_count(found.get(key)) if isinstance(found, dict) else None for key in keys]


def _count(replicas: Any) -> int | None:
    if replicas is None:
        return None
    n = 0
    for r in replicas:
        status = getattr(r, "status", None)
        if r.is_memory_replica() and getattr(status, "name", str(status)).endswith("COMPLETE"):
            n += 1
    return n
