"""tq_mooncake.testing: the in-memory store keeps the real binding's contract, the client runs on it, and the
helpers (clock, comparer, recording observer) do what their docstrings say."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from tq_mooncake.client import ErrorCode, FaultInjectingStore, FaultRule, MooncakeBatchClient, Operation, Outcome
from tq_mooncake.client.observer import NOOP_OBSERVER
from tq_mooncake.testing import FakeClock, InMemoryStore, RecordingObserver, same_value

pytestmark = pytest.mark.pure


def buf(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def test_the_store_copies_bytes_in_and_out_of_caller_memory_with_per_key_codes():
    store = InMemoryStore()
    a, b = buf(b"hello"), buf(b"world!")
    assert store.batch_upsert_from(["a", "b"], [a.ctypes.data, b.ctypes.data], [5, 6], None) == [0, 0]
    a[:] = 0  # the store holds a copy
    dest, small = np.zeros(8, np.uint8), np.zeros(2, np.uint8)
    codes = store.batch_get_into(
        ["a", "b", "missing"], [dest.ctypes.data, small.ctypes.data, dest.ctypes.data], [8, 2, 8]
    )
    assert codes == [5, int(ErrorCode.INVALID_PARAMS), int(ErrorCode.OBJECT_NOT_FOUND)]
    assert dest[:5].tobytes() == b"hello"
    assert store.get_size("b") == 6 and store.get_size("missing") == int(ErrorCode.OBJECT_NOT_FOUND)
    assert store.batch_put_from(["a"], [b.ctypes.data], [6], None) == [0]  # Mooncake: success, old value kept
    assert store.raw("a") == b"hello"
    assert store.batch_remove(["a", "a"], True) == [0, int(ErrorCode.OBJECT_NOT_FOUND)]
    assert store.keys() == ["b"]


def test_a_full_store_refuses_writes_until_cleared_and_a_closed_one_raises():
    store = InMemoryStore(capacity=10)
    six = buf(b"x" * 6)
    assert store.batch_upsert_from(["a", "b"], [six.ctypes.data] * 2, [6, 6]) == [0, int(ErrorCode.NO_AVAILABLE_HANDLE)]
    assert store.batch_upsert_from(["a"], [six.ctypes.data], [6]) == [0]  # the same size: overwritten in place
    # another size needs room for the new bytes before the old ones are freed (6 + 5 > 10)
    assert store.batch_upsert_from(["a"], [six.ctypes.data], [5]) == [int(ErrorCode.NO_AVAILABLE_HANDLE)]
    assert store.batch_upsert_from(["a"], [six.ctypes.data], [0]) == [int(ErrorCode.INVALID_PARAMS)]
    store.batch_remove(["a"])
    assert store.batch_upsert_from(["b"], [six.ctypes.data], [6]) == [0]
    assert store.register_buffer(six.ctypes.data, 6) == 0 and store.registered == {six.ctypes.data: 6}
    assert store.unregister_buffer(six.ctypes.data) == 0 and store.registered == {}
    store.close()
    with pytest.raises(RuntimeError, match="after close"):
        store.get_size("b")


def test_the_client_round_trips_on_the_in_memory_store_and_retries_injected_failures():
    clock = FakeClock()
    recorder = RecordingObserver()
    rules = [FaultRule(ErrorCode.TRANSFER_FAIL, attempts=frozenset({1}), operations=frozenset({Operation.GET}))]
    client = MooncakeBatchClient(
        {"batch_size": 3},
        store=InMemoryStore(),
        wrap_store=lambda s: FaultInjectingStore(s, rules),
        observer=recorder,
        clock=clock,
        sleep=clock.sleep,
        jitter=lambda: 0.5,
    )
    values = [torch.randn(2, 3), "text", {"a": [1, 2]}, torch.tensor(1.5), b"", None, np.arange(4)]
    keys = [f"k{i}" for i in range(len(values))]
    with client:
        metas = client.put(keys, values)
        got = client.get(keys, custom_backend_meta=metas)
        client.clear(keys)
    assert all(same_value(v, g) for v, g in zip(values, got, strict=True))
    put, get, clear = recorder.operations
    assert [o.operation for o in recorder.operations] == [Operation.PUT, Operation.GET, Operation.CLEAR]
    assert get.summary.outcome is Outcome.SUCCESS_AFTER_RETRY and get.summary.keys_retried_ok == 7
    assert sorted((a.chunk, a.attempt, a.keys) for a in get.attempts) == [
        (0, 1, 3),
        (0, 2, 3),
        (1, 1, 3),
        (1, 2, 3),
        (2, 1, 1),
        (2, 2, 1),
    ]
    assert all(a.ended == 1 for o in recorder.operations for a in o.attempts)
    assert clock.sleeps == [0.025] * 3  # one backoff per chunk, on the fake clock: no real sleep
    assert recorder.totals() == {
        "operations": 3,
        "attempts": 10,  # put 3 chunks, get 3 chunks twice, clear 1 (batch_size does not bound a removal)
        "retries": 3,
        **{o.value: 0 for o in Outcome},
        "success": 2,
        "success_after_retry": 1,
    }
    assert put.summary.codes == Counter() and clear.summary.outcome is Outcome.SUCCESS


def test_the_recording_observer_forwards_and_can_be_switched_and_cleared():
    seen: list[Operation] = []

    class Forward:
        def operation(self, operation, batch_size):
            seen.append(operation)
            return NOOP_OBSERVER.operation(operation, batch_size)

    recorder = RecordingObserver(keep=False)
    recorder.operation(Operation.PUT, 1).attempt(0, 1, 1, 0.0).end(Counter(), 1)
    recorder.forward = Forward()
    scope = recorder.operation(Operation.GET, 2)
    scope.attempt(0, 2, 2, 0.1).end(Counter({ErrorCode.RPC_FAIL: 1}), 0)
    assert seen == [Operation.GET] and recorder.operations == []  # keep=False: totals only
    assert (recorder.attempts, recorder.retries) == (2, 1)
    recorder.clear()
    assert recorder.totals()["attempts"] == 0


def test_the_fake_clock_moves_only_when_told():
    clock = FakeClock(5.0)
    assert clock() == 5.0
    clock.advance(1.5)
    clock.sleep(0.5)
    assert clock() == 7.0 and clock.sleeps == [0.5]


def test_same_value_is_exact():
    nan = torch.tensor([math.nan, 1.0])
    assert same_value(nan, nan.clone())  # bytes, not ==
    assert not same_value(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not same_value(torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64))
    assert not same_value(torch.zeros(2, 1), torch.zeros(1, 2))
    assert same_value({"a": (1, [torch.ones(2)])}, {"a": (1, [torch.ones(2)])})
    assert not same_value((1, 2), [1, 2]) and not same_value(1, 1.0) and not same_value(np.arange(2), [0, 1])
    assert not same_value([0, 1], np.arange(2))
    objects = np.array([{"a": 1}, "x"], dtype=object)
    assert same_value(objects, np.array([{"a": 1}, "x"], dtype=object))  # the objects, not their addresses
    assert not same_value(objects, np.array([{"a": 2}, "x"], dtype=object))
