"""Same-key races on a real store: concurrent put, get and clear of the same few keys through one client.

Mooncake itself can hand a reader another key's bytes, zeros or a torn value in this pattern (a forced remove
or an overwrite frees or rewrites memory a reader is still transferring from; ``docs/mooncake-races.md``).
Every value is self-describing (each element encodes its key, its write and its position), so any value
returned can be classified; the client must return only values some ``put`` wrote under that key, and fail
the rest, named.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import torch

from tq_mooncake.client import BatchOperationError

# Two sizes: below and above the copy limit, so both write paths (staged upsert, zero-copy multi-buffer) race.
SIZES = (2048, 16384)  # int64 elements: 16 KiB and 128 KiB
KEYS_PER_SIZE = 4
OPS_PER_THREAD = 150


def _value(key_id: int, version: int, n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) & 0xFFFF) | (key_id << 48) | (version << 16)


def _classify(t: torch.Tensor, key_id: int, written: set[int]) -> str:
    """``right`` for a value some put wrote under this key; else what is wrong with it."""
    n = t.numel()
    if not torch.any(t):
        return "zeros"
    ids, versions = t >> 48, (t >> 16) & 0xFFFFFFFF
    if not torch.equal(t & 0xFFFF, torch.arange(n, dtype=torch.int64) & 0xFFFF):
        return "garbled"
    if not torch.all(ids == ids[0]) or not torch.all(versions == versions[0]):
        return "torn"
    if int(ids[0]) != key_id:
        return "other key"
    return "right" if int(versions[0]) in written else "never written"


def test_same_key_put_get_clear_never_returns_a_wrong_value(shared_master, make_client, keyspace, figures):
    fig = figures("same-key put/get/clear race")
    client = make_client(shared_master, max_workers=2, retry={"max_attempts": 6, "initial_backoff_s": 0.002})
    names = keyspace(len(SIZES) * KEYS_PER_SIZE)
    layout = [(SIZES[i % len(SIZES)], key) for i, key in enumerate(names)]
    keys = [key for _, key in layout]
    sizes = {key: size for size, key in layout}
    ids = {key: i + 1 for i, key in enumerate(keys)}
    lock = threading.Lock()
    written: dict[str, set[int]] = {key: set() for key in keys}
    metas: dict[str, dict] = {}
    outcome: Counter[str] = Counter()
    unexpected: list[BaseException] = []
    versions = iter(range(1, 1 << 30))

    def writer(rng: random.Random) -> None:
        chosen = rng.sample(keys, 3)
        with lock:
            batch = {key: next(versions) for key in chosen}
            for key, version in batch.items():
                written[key].add(version)  # before the put: a reader may see it as soon as it is written
        try:
            put = client.put(chosen, [_value(ids[k], batch[k], sizes[k]) for k in chosen])
            with lock:
                metas.update(zip(chosen, put, strict=True))
        except BatchOperationError:
            outcome["put failed (named)"] += 1

    def reader(rng: random.Random) -> None:
        chosen = rng.sample(keys, 3)
        with lock:
            known = [metas.get(key) for key in chosen]
        with_meta = rng.random() < 0.5 and all(known)
        try:
            if with_meta:
                got = client.get(chosen, custom_backend_meta=known)
            else:
                got = client.get(chosen, shapes=[[sizes[k]] for k in chosen], dtypes=[torch.int64] * len(chosen))
        except BatchOperationError as exc:
            outcome["get failed (named)"] += 1
            assert set(exc.failed) <= set(chosen)
            fig.codes.update(exc.failed.values())
            return
        for key, value in zip(chosen, got, strict=True):
            with lock:
                verdict = _classify(value, ids[key], written[key])
            outcome[verdict] += 1
            fig.checked += 1
            if verdict != "right":
                fig.wrong += 1
                fig.problem(f"{key}: {verdict}")

    def clearer(rng: random.Random) -> None:
        try:
            client.clear(rng.sample(keys, 2))
        except BatchOperationError:
            outcome["clear failed (named)"] += 1

    def run(role, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(OPS_PER_THREAD):
                role(rng)
        except BaseException as exc:  # noqa: BLE001 - reported below
            unexpected.append(exc)

    roles = [writer, writer, reader, reader, reader, clearer]
    threads = [threading.Thread(target=run, args=(role, i), daemon=True) for i, role in enumerate(roles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not unexpected, unexpected[:3]
    fig.operations = OPS_PER_THREAD * len(roles)
    fig.note = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
    fig.note += "; failed get keys by code: " + ", ".join(f"{c.name} {n}" for c, n in fig.codes.most_common())
    assert outcome["right"] > 0, outcome  # the race ran and reads succeeded
    assert fig.wrong == 0, (fig.problems, outcome)
