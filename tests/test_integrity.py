"""End-to-end verification of stored values (``client/integrity.py``): every object is its payload followed by a
trailer naming the key, the length and the write; bytes that are not that value are never handed back.

The trailer format is checked as pure functions; the rest on a real master: another key's bytes, zeros, a
stale write, a flipped payload byte and a value of the old format under a key are each detected and named,
and a put that got fewer replicas than asked says so."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from tq_mooncake.client import (
    BatchOperationError,
    ErrorCode,
    MooncakeBatchClient,
    NonRetryableError,
    RetriesExhaustedError,
    integrity,
)
from tq_mooncake.client.chunks import COPY_MAX_BYTES
from tq_mooncake.testing import InMemoryStore, RecordingObserver

T = integrity.TRAILER_SIZE
FAST_RETRY = {"max_attempts": 2, "initial_backoff_s": 0.001}


# ------------------------------------------------------------------------------------------ trailer (pure)
@pytest.mark.pure
def test_a_sealed_object_checks_out_and_every_damage_is_named():
    key, payload = "k", bytes(range(200))
    obj = integrity.seal(key, payload, write_id=5, checksum=True)
    assert len(obj) == len(payload) + T and obj[: len(payload)] == payload
    tag = integrity.key_tag(key)
    assert integrity.check(memoryview(obj), tag, 5) == 0
    assert integrity.check(memoryview(obj), tag, None) == 0
    assert integrity.check(memoryview(obj), integrity.key_tag("other"), None) == ErrorCode.TRAILER_MISMATCH
    assert integrity.check(memoryview(obj), tag, 6) == ErrorCode.STALE_VALUE
    assert integrity.check(memoryview(bytes(len(obj))), tag, None) == ErrorCode.TRAILER_MISMATCH  # zeros
    assert integrity.check(memoryview(obj[:-1]), tag, None) == ErrorCode.TRAILER_MISMATCH  # short read
    assert integrity.check(memoryview(b"x" + obj), tag, None) == ErrorCode.TRAILER_MISMATCH  # length differs
    assert integrity.check(memoryview(obj[: T - 1]), tag, None) == ErrorCode.TRAILER_MISMATCH
    flipped = bytearray(obj)
    flipped[7] ^= 1
    assert integrity.check(memoryview(bytes(flipped)), tag, None) == ErrorCode.PAYLOAD_CHECKSUM_MISMATCH
    for i in range(len(payload), len(obj)):  # any damaged trailer byte
        damaged = bytearray(obj)
        damaged[i] ^= 0x10
        assert integrity.check(memoryview(bytes(damaged)), tag, 5) != 0, i
    unchecked = integrity.seal(key, payload, write_id=5, checksum=False)
    flipped = bytearray(unchecked)
    flipped[7] ^= 1
    assert integrity.check(memoryview(bytes(flipped)), tag, None) == 0  # no checksum: the payload is not covered


@pytest.mark.pure
def test_the_sampled_checksum_sees_any_overwrite_of_4_kib_or_more():
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, 300_000, dtype=np.uint8)
    base = integrity.sampled_crc(payload)
    for start in rng.integers(0, payload.size - 4096, 200):
        other = payload.copy()
        other[start : start + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8)
        assert integrity.sampled_crc(other) != base, start
    tail = payload.copy()
    tail[-1] ^= 1  # the last bytes are always sampled
    assert integrity.sampled_crc(tail) != base
    gap = payload.copy()
    gap[100] ^= 1  # between samples: not seen (the option's whole CRC is)
    assert integrity.sampled_crc(gap) == base


@pytest.mark.pure
def test_the_trailer_layout_is_the_documented_one():
    obj = integrity.seal("key", b"abc", write_id=0x0102030405060708, checksum=True)
    trailer = obj[3:]
    assert trailer[:4] == b"TQMT" and trailer[4] == 1 and trailer[5] == integrity.FLAG_CRC32C
    assert int.from_bytes(trailer[8:16], "little") == 3
    assert int.from_bytes(trailer[16:24], "little") == integrity.key_tag("key")
    assert int.from_bytes(trailer[24:32], "little") == 0x0102030405060708


@pytest.mark.pure
@pytest.mark.parametrize("meta", [{"wid": 0}, {"wid": -1}, {"wid": "7"}, {"wid": 1.0}, {"wid": True}, {"wid": 1 << 63}])
def test_metadata_with_a_write_id_no_put_returns_is_refused(meta):
    with pytest.raises(ValueError, match="not metadata returned by put"):
        integrity.expected_write_id("k", meta)


@pytest.mark.pure
@pytest.mark.parametrize("size", [4, COPY_MAX_BYTES, COPY_MAX_BYTES + 4])
def test_each_put_writes_payload_then_trailer_and_returns_its_write_id(size):
    store = InMemoryStore()
    with MooncakeBatchClient(store=store) as client:
        value = torch.arange(size // 4, dtype=torch.int32)
        (meta,) = client.put(["k"], [value])
        stored = store.raw("k")
        assert stored is not None and len(stored) == size + T
        assert stored[:size] == value.numpy().tobytes()
        assert integrity.check(memoryview(stored), integrity.key_tag("k"), meta["wid"]) == 0
        (again,) = client.put(["k"], [value + 1])  # an overwrite, on either write path
        assert again["wid"] != meta["wid"] and meta["nbytes"] == size
        assert torch.equal(client.get(["k"], custom_backend_meta=[again])[0], value + 1)
        with pytest.raises(NonRetryableError) as info:  # the first write's metadata names a replaced write
            client.get(["k"], custom_backend_meta=[meta])
        assert info.value.failed == {"k": ErrorCode.STALE_VALUE}


@pytest.mark.pure
def test_a_returned_tensor_is_a_view_of_exactly_its_bytes():
    with MooncakeBatchClient(store=InMemoryStore()) as client:
        meta = client.put(["a"], [torch.ones(3, 5)])
        (got,) = client.get(["a"], custom_backend_meta=meta)
        assert got.shape == (3, 5) and got.is_contiguous() and torch.equal(got, torch.ones(3, 5))
        got += 1  # writable, and only its own bytes
        assert torch.equal(got, torch.full((3, 5), 2.0))


# ------------------------------------------------------------------------------------------ real store
def _raw_write(store, key: str, data: bytes) -> None:
    from mooncake.store import ReplicateConfig

    buf = np.frombuffer(bytearray(data), dtype=np.uint8)
    assert list(store.batch_upsert_from([key], [buf.ctypes.data], [buf.size], ReplicateConfig())) == [0]


def _raw_read(store, key: str) -> bytes:
    size = store.get_size(key)
    buf = np.empty(size, dtype=np.uint8)
    assert store.batch_get_into([key], [buf.ctypes.data], [size]) == [size]
    return buf.tobytes()


@pytest.mark.parametrize("elements", [16, COPY_MAX_BYTES // 4 + 16], ids=["staged", "zero-copy"])
def test_bytes_that_are_not_this_keys_value_are_never_returned(client, keyspace, elements):
    a, b, c = keyspace(3)
    metas = client.put([a, b], [torch.arange(elements, dtype=torch.float32), torch.zeros(elements)])
    store = client.store
    fast = {"shapes": [[elements]], "dtypes": [torch.float32]}
    # b's object, trailer included, under a: another key's bytes (what a reused buffer hands a reader).
    _raw_write(store, a, _raw_read(store, b))
    for kwargs in (fast, {"custom_backend_meta": metas[:1]}):
        with pytest.raises(RetriesExhaustedError) as info:
            client.get([a], **kwargs)
        assert info.value.failed == {a: ErrorCode.TRAILER_MISMATCH}
    # Zeros of the right size, and a value of the old format (payload only): no trailer.
    _raw_write(store, c, bytes(elements * 4 + T))
    with pytest.raises(RetriesExhaustedError) as info:
        client.get([c], **fast)
    assert info.value.failed == {c: ErrorCode.TRAILER_MISMATCH}
    _raw_write(store, c, torch.arange(elements, dtype=torch.float32).numpy().tobytes())
    with pytest.raises(BaseException) as info:
        client.get([c], **fast)
    assert set(info.value.failed) == {c}  # a payload without trailer is too short: refused, named


def test_a_flipped_payload_byte_is_caught_by_the_checksum(client, shared_master, make_client, keyspace):
    big = torch.arange(COPY_MAX_BYTES // 4 + 100, dtype=torch.int32)
    sampled = make_client(shared_master, tensor_checksum=False, retry=FAST_RETRY)

    def damage(user, key: str, value: torch.Tensor, position: int) -> dict:
        (meta,) = user.put([key], [value])
        stored = bytearray(_raw_read(user.store, key))
        stored[position] ^= 0x40
        _raw_write(user.store, key, bytes(stored))
        return meta

    # The default covers every byte. With tensor_checksum off a new large key (written zero-copy) is covered by
    # its samples (64 bytes at every 4 KiB): byte 10 is in one, byte 100 is not (the documented limit); small
    # payloads are still covered whole.
    k1, k2, k3, k4, k5 = keyspace(5)
    for user, key, value, position in ((client, k1, big, 100), (sampled, k2, big, 10), (sampled, k4, big[:64], 3)):
        meta = damage(user, key, value, position)
        with pytest.raises(BatchOperationError) as info:
            user.get([key], custom_backend_meta=[meta])
        assert info.value.failed == {key: ErrorCode.PAYLOAD_CHECKSUM_MISMATCH}
    meta = damage(sampled, k3, big, 100)
    (got,) = sampled.get([k3], custom_backend_meta=[meta])
    assert not torch.equal(got, big)
    # An overwrite of a large key of the same size is staged (upserted in one step), so it is checksummed whole.
    sampled.put([k5], [big])
    meta = damage(sampled, k5, big + 1, 100)
    with pytest.raises(RetriesExhaustedError) as info:
        sampled.get([k5], custom_backend_meta=[meta])
    assert info.value.failed == {k5: ErrorCode.PAYLOAD_CHECKSUM_MISMATCH}


def test_an_overwrite_replaces_the_value_on_both_write_paths(client, keyspace):
    small, big = keyspace(2)
    n = COPY_MAX_BYTES // 4 + 1
    for round_ in range(3):
        metas = client.put([small, big], [torch.full((4,), round_), torch.full((n,), round_)])
        got = client.get([small, big], custom_backend_meta=metas)
        assert torch.equal(got[0], torch.full((4,), round_)) and torch.equal(got[1], torch.full((n,), round_))
        # Another size under the same key, read with no metadata: the stored size decides.
        client.put([big], [f"now a string {round_}"])
        assert client.get([big]) == [f"now a string {round_}"]


def test_fewer_replicas_than_asked_are_visible(client, shared_master, keyspace, caplog):
    # One segment in this cluster (the client's own): replica_num 3 is stored once.
    recorder = RecordingObserver()
    asking = MooncakeBatchClient(shared_master.client_config(replica_num=3), observer=recorder)
    try:
        keys = keyspace(3)
        with caplog.at_level(logging.WARNING, logger="tq_mooncake.client.batch_client"):
            metas = asking.put(keys, [torch.ones(4), b"bytes", torch.ones(COPY_MAX_BYTES)])
        segments = len(shared_master.mounted_segments())
        assert [m["replicas"] for m in metas] == [min(3, segments)] * 3
        assert recorder.operations[-1].summary.keys_under_replicated == (3 if segments < 3 else 0)
        if segments < 3:
            assert "fewer than replica_num=3 replicas" in caplog.text
    finally:
        asking.close()
    assert client.put(keyspace(4)[3:], [torch.ones(2)])[0]["replicas"] == 1  # replica_num 1: nothing asked


# ------------------------------------------------------------------------------------------ one writer per key
@pytest.mark.pure
def test_key_locks_hold_all_or_nothing_and_only_overlapping_callers_wait():
    from tq_mooncake.client.key_locks import KeyLocks
    from tq_mooncake.cluster import wait_until

    locks = KeyLocks()
    order: list[str] = []
    with locks.holding(["a", "b"]):
        with locks.holding(["c"]):  # disjoint: no wait
            order.append("c")

        def overlapping() -> None:
            with locks.holding(["b", "z"]):
                order.append("b")

        t = threading.Thread(target=overlapping)
        t.start()
        wait_until(lambda: locks.waiting() == 1, 10, "the overlapping caller to wait")
        assert locks.held() == 2 and "b" not in order
        order.append("a released")
    t.join(10)
    assert order == ["c", "a released", "b"] and locks.held() == 0 and locks.waiting() == 0


class _GatedStore(InMemoryStore):
    """An in-memory store whose writes of ``gated`` block until ``release`` is set; records write starts/ends."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated, self.release, self.events = gated, threading.Event(), []

    def batch_upsert_from(self, keys, ptrs, sizes, config=None):
        self.events.append(("start", tuple(keys)))
        if self.gated in keys:
            assert self.release.wait(30)
        try:
            return super().batch_upsert_from(keys, ptrs, sizes, config)
        finally:
            self.events.append(("end", tuple(keys)))


@pytest.mark.pure
def test_two_puts_of_one_key_through_one_client_never_overlap_in_the_store():
    from tq_mooncake.cluster import wait_until

    store = _GatedStore("k")
    with MooncakeBatchClient(store=store) as client:
        first = threading.Thread(target=client.put, args=(["k"], [torch.ones(4)]))
        first.start()
        wait_until(lambda: ("start", ("k",)) in store.events, 10, "the first write to reach the store")
        second = threading.Thread(target=client.put, args=(["k", "other"], [torch.zeros(4), torch.zeros(4)]))
        second.start()
        wait_until(lambda: client._writing.waiting() == 1, 10, "the second put to wait for the key")
        client.put(["unrelated"], [torch.ones(1)])  # other keys are not held up
        assert store.events[-1] == ("end", ("unrelated",)) and len(store.events) == 3
        store.release.set()
        first.join(10)
        second.join(10)
        assert store.events[1:] == [("start", ("unrelated",)), ("end", ("unrelated",)), ("end", ("k",)),
                                    ("start", ("k", "other")), ("end", ("k", "other"))]  # fmt: skip
        assert torch.equal(client.get(["k"], shapes=[[4]], dtypes=[torch.float32])[0], torch.zeros(4))


# ------------------------------------------------------------------------------------------ clear
def test_clear_force_false_waits_out_read_leases(client, shared_master, make_client, keyspace):
    (key,) = keyspace(1)
    gentle = make_client(shared_master, clear_force=False, retry=FAST_RETRY)
    meta = gentle.put([key], [torch.ones(8)])
    gentle.get([key], custom_backend_meta=meta)  # the master grants a read lease (10 s)
    with pytest.raises(RetriesExhaustedError) as info:
        gentle.clear([key])
    assert info.value.failed == {key: ErrorCode.OBJECT_HAS_LEASE}
    client.clear([key])  # the default (forced) removes it anyway
    with pytest.raises(BaseException) as gone:
        client.get([key], custom_backend_meta=meta)
    assert gone.value.failed == {key: ErrorCode.OBJECT_NOT_FOUND}


def test_a_frame_is_never_read_as_a_tensor_nor_a_tensor_as_a_frame(client, keyspace):
    framed, raw = keyspace(2)
    frame_meta, tensor_meta = client.put([framed, raw], [b"x" * 60, torch.zeros(15, dtype=torch.int32)])
    # Same byte count: without the trailer's kind bit the bytes would come back reinterpreted.
    size = frame_meta["nbytes"]
    with pytest.raises(NonRetryableError) as info:
        client.get([framed], shapes=[[size]], dtypes=[torch.uint8])
    assert info.value.failed == {framed: ErrorCode.TYPE_MISMATCH}
    forged = {**tensor_meta, "dtype": "uint8", "shape": [60]}  # metadata put never returned, same size
    assert client.get([raw], custom_backend_meta=[forged])[0].shape == (60,)  # the bytes of a raw tensor, as asked
    with pytest.raises(NonRetryableError) as info:
        client.get([raw])
    assert info.value.failed == {raw: ErrorCode.TYPE_MISMATCH}


def test_overwrites_that_change_a_keys_size_do_not_leak_store_space(start_master, make_client, keyspace):
    # Mooncake parks the old buffer of an upsert that changes the size for 600 s or more: 85 such overwrites of
    # 1 MiB / 512 KiB fill a 64 MB segment (measured with the raw store). The client removes and rewrites instead.
    import re

    master = start_master()
    client = make_client(master, global_segment_size=64 << 20)
    (key,) = keyspace(1)
    values = [torch.ones(1 << 18), torch.ones(1 << 17), b"x" * 1000]  # 1 MiB, 512 KiB tensors, a small frame
    for i in range(150):
        client.put([key], [values[i % 3]])
    allocated = int(float(re.search(r"^master_allocated_bytes\S* (\S+)", master.metrics_text(), re.M).group(1)))
    assert allocated <= 2 << 20, allocated
    assert client.get([key])[0] == values[149 % 3]


@pytest.mark.pure
def test_the_staging_arena_reuses_its_pages_and_never_overlaps_blocks_of_one_chunk():
    from tq_mooncake.client.staging import RETAIN_MAX_BYTES, Arena

    arena = Arena()
    arena.begin()
    a, b = arena.take(100), arena.take(1000)
    a[:] = 1
    b[:] = 2
    pa, pb = a.ctypes.data, b.ctypes.data
    assert (a == 1).all() and (pa + 100 <= pb or pb + 1000 <= pa)
    grown = arena.take(arena.capacity + 1)  # does not fit: a new buffer; the blocks before stay valid
    grown[:] = 3
    assert (a == 1).all() and (b == 2).all()
    arena.begin()
    assert arena.take(10).ctypes.data == grown.ctypes.data  # the next chunk reuses the same pages
    huge = arena.take(RETAIN_MAX_BYTES + 1)
    assert huge.size == RETAIN_MAX_BYTES + 1 and arena.capacity <= RETAIN_MAX_BYTES
