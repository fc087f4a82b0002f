"""The put and get data path on a real master: what a put asks the master before writing (``written_keys``), how
it overwrites, and the memory transfers use (``transfer_memory``): reused leases of the local buffer, nothing
registered per call when registration is on. Store calls are counted through a wrapper around the real store."""

from __future__ import annotations

import gc
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tq_mooncake.client import BatchOperationError, ErrorCode, MooncakeBatchClient
from tq_mooncake.client.chunks import COPY_MAX_BYTES
from tq_mooncake.client.transfer_memory import POOLED_MIN_BYTES
from tq_mooncake.client.written_keys import WrittenKeys

MiB = 1 << 20
FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.001}


class CountingStore:
    """The real store, with every method call counted by name; ``fail_removes`` makes that many of the next
    ``batch_remove`` calls answer ``REPLICA_IS_NOT_READY`` for every key (without removing anything)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()
        self.fail_removes = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target) or name.startswith("_"):
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                failing = name == "batch_remove" and self.fail_removes > 0
                if failing:
                    self.fail_removes -= 1
            if failing:
                return [int(ErrorCode.REPLICA_IS_NOT_READY)] * len(args[0])
            return target(*args, **kwargs)

        return counted

    def take(self) -> Counter[str]:
        """The calls counted since the last ``take``."""
        with self._lock:
            calls, self.calls = self.calls, Counter()
        return calls


def counted_client(make_client: Any, master: Any, **config: Any) -> tuple[Any, CountingStore]:
    wrappers: list[CountingStore] = []

    def wrap(store: Any) -> CountingStore:
        wrappers.append(CountingStore(store))
        return wrappers[-1]

    client = make_client(master, wrap_store=wrap, **config)
    return client, wrappers[0]


@pytest.fixture(scope="module")
def counted(shared_master: Any) -> Iterator[tuple[MooncakeBatchClient, CountingStore]]:
    """A client (64 MiB segment) whose store calls are counted; shared by this module's tests (a close takes 2 s)."""
    wrappers: list[CountingStore] = []

    def wrap(store: Any) -> CountingStore:
        wrappers.append(CountingStore(store))
        return wrappers[-1]

    client = MooncakeBatchClient(shared_master.client_config(retry=FAST_RETRY), wrap_store=wrap)
    try:
        yield client, wrappers[0]
    finally:
        client.close()


@pytest.fixture(scope="module")
def pooled(shared_master: Any) -> Iterator[MooncakeBatchClient]:
    """A client with an 8 MiB local buffer; shared by this module's tests."""
    client = MooncakeBatchClient(shared_master.client_config(local_buffer_size=8 * MiB, retry=FAST_RETRY))
    try:
        yield client
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------ put
def test_an_overwrite_by_this_client_asks_only_for_the_sizes(counted, keyspace):
    client, store = counted
    store.take()
    keys = keyspace(3)
    values = [torch.full((16,), float(i)) for i in range(3)]
    metas = client.put(keys, values)
    first = store.take()
    assert first["batch_is_exist"] == 1 and first["batch_get_replica_desc"] == 0  # new keys: none exists
    metas = client.put(keys, [v + 1 for v in values])
    again = store.take()
    assert again["batch_is_exist"] == 0 and again["batch_get_replica_desc"] == 1 and again["batch_remove"] == 0
    assert again["batch_upsert_from"] == 1  # replaced in place
    got = client.get(keys, custom_backend_meta=metas)
    assert all(torch.equal(g, v + 1) for g, v in zip(got, values, strict=True))
    # Another size: removed first and written as new.
    metas = client.put(keys, [torch.zeros(32) for _ in keys])
    resized = store.take()
    assert resized["batch_is_exist"] == 0 and resized["batch_get_replica_desc"] == 1 and resized["batch_remove"] == 1
    assert all(torch.equal(g, torch.zeros(32)) for g in client.get(keys, custom_backend_meta=metas))
    # A clear forgets: the next put asks whether they exist again.
    client.clear(keys)
    store.take()
    client.put(keys, values)
    assert store.take()["batch_is_exist"] == 1


def allocated(master: Any) -> int:
    """The bytes the master has allocated in its segments (parked buffers included)."""
    text = master.metrics_text()
    return int(float(re.search(r"^master_allocated_bytes\S* (\S+)", text, re.M).group(1)))


def test_two_writers_of_one_key_with_different_sizes_park_nothing(counted, pooled, shared_master, keyspace):
    # Each writer last wrote its own size: the size is asked of the master anyway, so every resize removes first.
    # An in-place upsert over the other's size would park the old buffer each time (a 64 MiB segment was full
    # after 964 such puts).
    (a, _), b = counted, pooled
    (key,) = keyspace(1)
    small, large = torch.zeros(60 << 8, dtype=torch.int32), torch.ones(64 << 8, dtype=torch.int32)
    a.put([key], [small])
    before = allocated(shared_master)
    for _ in range(100):
        b.put([key], [large])
        a.put([key], [small])
    (meta,) = b.put([key], [large])
    assert allocated(shared_master) - before <= 1 * MiB  # 100 parked buffers would be 12 MiB
    assert torch.equal(a.get([key], custom_backend_meta=[meta])[0], large)
    a.clear([key])


def test_a_reader_never_sees_a_key_missing_while_it_is_overwritten_in_place(counted, pooled, keyspace):
    (writer, _), reader = counted, pooled
    (key,) = keyspace(1)
    n = MiB // 4
    writer.put([key], [torch.zeros(n, dtype=torch.int32)])
    codes: Counter[str] = Counter()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                (got,) = reader.get([key], shapes=[[n]], dtypes=[torch.int32])
                codes["ok"] += 1
                assert bool((got == got[0]).all())  # one write's value, whole
            except BatchOperationError as exc:
                codes.update(code.name for code in exc.failed.values())

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for round_ in range(40):
            writer.put([key], [torch.full((n,), round_, dtype=torch.int32)])
    finally:
        stop.set()
        thread.join(30)
    assert codes["ok"] > 0 and codes["OBJECT_NOT_FOUND"] == 0, codes


def test_an_overwrite_by_another_client_is_still_asked_about(counted, pooled, keyspace):
    writer, (other, store) = pooled, counted
    (key,) = keyspace(1)
    writer.put([key], [torch.arange(8)])
    store.take()
    (meta,) = other.put([key], [torch.arange(100)])  # another size, unknown to `other`: asked, removed, written
    calls = store.take()
    assert calls["batch_is_exist"] == 1 and calls["batch_get_replica_desc"] == 1 and calls["batch_remove"] == 1
    assert torch.equal(writer.get([key], custom_backend_meta=[meta])[0], torch.arange(100))


def test_a_large_overwrite_of_the_same_size_is_replaced_in_place(counted, keyspace):
    client, store = counted
    store.take()
    (key,) = keyspace(1)
    for round_ in range(80):
        value = torch.full((MiB // 4,), round_, dtype=torch.int32)
        (meta,) = client.put([key], [value])
        if round_ % 20 == 19:
            assert torch.equal(client.get([key], custom_backend_meta=[meta])[0], value)
    calls = store.take()
    assert calls["batch_put_from_multi_buffers"] == 1 and calls["batch_upsert_from"] == 79  # new once, then in place
    assert calls["batch_remove"] == 0 and calls["batch_is_exist"] == 1


def test_a_key_whose_removal_fails_is_not_written_until_it_is_removed(counted, keyspace):
    client, store = counted
    (key,) = keyspace(1)
    client.put([key], [torch.arange(4)])
    store.take()
    store.fail_removes = 1  # the removal before the resized write answers REPLICA_IS_NOT_READY once
    (meta,) = client.put([key], [torch.arange(2 * COPY_MAX_BYTES // 8)])
    calls = store.take()
    assert calls["batch_remove"] == 2  # failed, then again on the retry
    assert calls["batch_put_from_multi_buffers"] == 1  # written once, after the removal went through
    assert torch.equal(client.get([key], custom_backend_meta=[meta])[0], torch.arange(2 * COPY_MAX_BYTES // 8))


@pytest.mark.pure
def test_written_keys_remembers_the_newest_keys_and_forgets_on_request():
    written = WrittenKeys(max_keys=3)
    written.wrote(["a", "b", "c"])
    written.wrote(["a", "d"])  # "a" rewritten: the newest; "b" the oldest, forgotten
    assert written.wrote_any(["a", "b", "c", "d", "e"]) == [True, False, True, True, False]
    written.forget(["c", "zz"])
    assert written.wrote_any(["c"]) == [False] and len(written) == 2
    off = WrittenKeys(max_keys=0)
    off.wrote(["a"])
    assert off.wrote_any(["a"]) == [False]
    with pytest.raises(ValueError):
        WrittenKeys(max_keys=-1)


# ------------------------------------------------------------------------------------------------ memory
def big_values(n: int, size: int = MiB, base: int = 0) -> list[torch.Tensor]:
    return [torch.full((size // 4,), base + i, dtype=torch.int32) for i in range(n)]


def test_large_reads_reuse_the_local_buffer_and_fall_back_to_fresh_memory_when_it_is_full(pooled, keyspace):
    client = pooled
    memory = client._memory
    assert memory.available
    gc.collect()  # values of earlier tests freed
    before = memory.fallbacks
    keys = keyspace(4)
    metas = client.put(keys, big_values(4))
    for _ in range(10):  # each read's values dropped before the next: the same regions serve every read
        got = client.get(keys, custom_backend_meta=metas)
        assert all(torch.equal(g, v) for g, v in zip(got, big_values(4), strict=True))
        del got
    assert memory.fallbacks == before
    held = [client.get(keys, custom_backend_meta=metas) for _ in range(3)]  # 12 MiB held: more than the buffer
    assert memory.fallbacks > before
    assert all(torch.equal(g, v) for got in held for g, v in zip(got, big_values(4), strict=True))
    del held
    gc.collect()
    refused = memory.fallbacks
    client.get(keys, custom_backend_meta=metas)
    assert memory.fallbacks == refused  # the regions came back when the values were freed


def test_a_failed_read_gives_its_leases_back_at_once(pooled, keyspace):
    # The exception is kept (its traceback holds the call's frames) and the cyclic collector is off: the leases of
    # the keys that were read must come back anyway, before the error reaches the caller.
    client = pooled
    gc.collect()
    before = client._memory.fallbacks
    *keys, missing = keyspace(5)
    metas = client.put(keys, big_values(4))
    kept: list[BaseException] = []
    gc.disable()
    try:
        for _ in range(6):
            with pytest.raises(BatchOperationError) as info:
                client.get([*keys, missing], shapes=[[MiB // 4]] * 5, dtypes=[torch.int32] * 5)
            kept.append(info.value)
            got = client.get(keys, custom_backend_meta=metas)
            assert all(torch.equal(g, v) for g, v in zip(got, big_values(4), strict=True))
            del got
    finally:
        gc.enable()
    assert client._memory.fallbacks == before


def test_small_reads_over_tcp_use_fresh_memory(pooled, keyspace):
    client = pooled
    keys = keyspace(2)
    metas = client.put(keys, [torch.arange(10), torch.zeros(POOLED_MIN_BYTES // 4)])
    small, large = client.get(keys, custom_backend_meta=metas)
    assert not client._memory.wants(small.numel() * 8 + 40) and client._memory.wants(POOLED_MIN_BYTES)
    assert torch.equal(small, torch.arange(10)) and torch.equal(large, torch.zeros(POOLED_MIN_BYTES // 4))


def test_values_read_into_the_local_buffer_stay_valid_after_close(make_client, shared_master, keyspace):
    client = make_client(shared_master, local_buffer_size=8 * MiB)
    keys = keyspace(3)
    metas = client.put(keys, big_values(3, base=7))
    got = client.get(keys, custom_backend_meta=metas)
    client.clear(keys)
    client.close()
    gc.collect()
    churn = [torch.randn(MiB) for _ in range(16)]  # reuse freed memory, if any was freed
    assert all(torch.equal(g, v) for g, v in zip(got, big_values(3, base=7), strict=True))
    del churn


def test_registered_transfers_register_nothing_per_call_with_a_local_buffer(make_client, shared_master, keyspace):
    """With registration on (what RDMA needs; forced here over TCP, where it is bookkeeping), every transfer uses
    leases of the local buffer that the store registered at set-up: no register_buffer call per put or get."""
    keys = keyspace(42)
    values: list[Any] = [torch.full((16 << 10,), float(i)) for i in range(40)]  # 64 KiB each
    values += [torch.arange(MiB // 8), {"a non-tensor": [1, 2]}]
    for local_buffer, per_call in ((32 * MiB, False), (0, True)):
        client, store = counted_client(make_client, shared_master, register_memory=True, local_buffer_size=local_buffer)
        metas = client.put(keys, values)
        client.get(keys, custom_backend_meta=metas)
        store.take()
        for _ in range(3):
            metas = client.put(keys, values)
            got = client.get(keys, custom_backend_meta=metas)
            assert all(
                torch.equal(g, v) if isinstance(v, torch.Tensor) else g == v for g, v in zip(got, values, strict=True)
            )
        calls = store.take()
        if per_call:  # no local buffer: every block registered and unregistered on every call
            assert calls["register_buffer"] >= 3 * 2 and calls["register_buffer"] == calls["unregister_buffer"]
        else:
            assert calls["register_buffer"] == 0 and calls["unregister_buffer"] == 0
            assert client._memory.fallbacks == 0
        client.clear(keys)
