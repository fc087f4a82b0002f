"""Selective retries and every failure outcome: the client's own logic, with faults injected into the
in-memory store (``tq_mooncake.testing``). The same paths on a real store: test_telemetry.py (exact attempts)
and tests/chaos (under load)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from tq_mooncake.client import (
    ClientClosedError,
    DeadlineExceededError,
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    MooncakeBatchClient,
    NonRetryableError,
    Operation,
    Outcome,
    RetriesExhaustedError,
    RetryBudgetExhaustedError,
)
from tq_mooncake.cluster import wait_until
from tq_mooncake.testing import InMemoryStore, RecordingObserver

pytestmark = pytest.mark.pure

FAST = {"initial_backoff_s": 0.001, "max_backoff_s": 0.002}


@pytest.fixture
def fault_client() -> Iterator:
    """``fault_client(*rules, retry=None, clock=None, jitter=None, **config)``: a client on an in-memory store
    that fails keys as the rules say (``client.store`` is the ``FaultInjectingStore``); closed at teardown."""
    made: list[MooncakeBatchClient] = []

    def make(*rules: FaultRule, retry=None, clock=None, jitter=None, **config) -> MooncakeBatchClient:
        kwargs = {k: v for k, v in {"clock": clock, "jitter": jitter}.items() if v is not None}
        client = MooncakeBatchClient(
            {**config, "retry": {**FAST, **(retry or {})}},
            store=InMemoryStore(),
            wrap_store=lambda store: FaultInjectingStore(store, rules, seed=7),
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("operation", ["put", "get", "clear"])
def test_only_the_failed_keys_are_retried(fault_client, keyspace, operation):
    keys = keyspace(20)
    failing = frozenset({keys[3], keys[11], keys[19]})
    rule = FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=failing, attempts=frozenset({1}))
    client = fault_client()
    values = [torch.full((4,), float(i)) for i in range(20)]
    if operation == "put":
        client.store.add_rule(rule)
    metas = client.put(keys, values)
    client.store.add_rule(rule)
    if operation == "get":
        got = client.get(keys, custom_backend_meta=metas)
        assert all(torch.equal(v, g) for v, g in zip(values, got, strict=True))
    elif operation == "clear":
        client.clear(keys)
    calls = client.store.calls_for(operation)
    assert [c.keys for c in calls] == [tuple(keys), tuple(k for k in keys if k in failing)]
    assert set(calls[0].injected) == failing and calls[1].injected == {}


def test_retried_get_returns_every_value_in_order(fault_client, keyspace):
    keys = keyspace(50)
    client = fault_client()
    values = [f"value-{i}" for i in range(50)]
    metas = client.put(keys, values)
    client.store.add_rule(FaultRule(code=ErrorCode.RPC_TIMEOUT, fraction=0.5, attempts=frozenset({1, 2})))
    assert client.get(keys, custom_backend_meta=metas) == values
    assert client.store.injected[ErrorCode.RPC_TIMEOUT] > 0


def test_exhausted_retries_name_the_keys_and_codes(fault_client, keyspace):
    keys = keyspace(10)
    bad = keys[4]
    client = fault_client(FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset({bad})), retry={"max_attempts": 3})
    with pytest.raises(RetriesExhaustedError) as info:
        client.put(keys, [f"v{i}" for i in range(10)])
    err = info.value
    assert err.outcome is Outcome.EXHAUSTED
    assert err.failed == {bad: ErrorCode.TRANSFER_FAIL}
    assert err.succeeded == 9 and err.attempts == 3
    assert repr(bad) in str(err) and "TRANSFER_FAIL(-800)" in str(err) and "9 key(s) succeeded" in str(err)
    assert sum(bad in c.keys for c in client.store.calls_for("put")) == 3
    # Nothing half-done passes as success: the other keys were written, the failed one was not.
    client.store.clear_rules()
    with pytest.raises(NonRetryableError) as missing:
        client.get(keys)
    assert missing.value.failed == {bad: ErrorCode.OBJECT_NOT_FOUND}


def test_non_retryable_code_fails_at_once(fault_client, keyspace):
    keys = keyspace(5)
    client = fault_client(FaultRule(code=ErrorCode.INVALID_PARAMS, keys=frozenset({keys[0]})))
    with pytest.raises(NonRetryableError) as info:
        client.put(keys, list("abcde"))
    assert info.value.failed == {keys[0]: ErrorCode.INVALID_PARAMS}
    assert len(client.store.calls_for("put")) == 1


def test_non_retryable_wins_over_retryable_in_one_call(fault_client, keyspace):
    keys = keyspace(8)
    client = fault_client(retry={"max_attempts": 2}, batch_size=4)
    metas = client.put(keys, list("abcdefgh"))
    client.store.add_rule(FaultRule(code=ErrorCode.OBJECT_NOT_FOUND, keys=frozenset({keys[0]})))
    client.store.add_rule(FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset({keys[5]})))
    with pytest.raises(NonRetryableError) as info:
        client.get(keys, custom_backend_meta=metas)
    assert info.value.failed == {keys[0]: ErrorCode.OBJECT_NOT_FOUND, keys[5]: ErrorCode.TRANSFER_FAIL}
    assert info.value.succeeded == 6


def test_budget_spent_is_its_own_outcome(fault_client, keyspace):
    keys = keyspace(4)
    frozen = lambda: 1000.0  # noqa: E731 - a clock that never moves: the reserve never refills
    client = fault_client(
        FaultRule(code=ErrorCode.TRANSFER_FAIL, attempts=frozenset({1})),
        clock=frozen,
        retry={"budget_ratio": 0.0, "budget_min_per_s": 1.0},
    )
    client.put(keys[:2], ["a", "b"])  # first failure retried with the one reserve token
    with pytest.raises(RetryBudgetExhaustedError) as info:
        client.put(keys[2:], ["c", "d"])
    assert info.value.outcome is Outcome.BUDGET_DENIED
    assert info.value.failed == {keys[2]: ErrorCode.TRANSFER_FAIL, keys[3]: ErrorCode.TRANSFER_FAIL}
    assert len(client.store.calls_for("put")) == 3  # 2 + 1: the denied retry never reached the store
    assert client.budget.denied == 1


def test_budget_grows_with_traffic(fault_client, keyspace):
    """With ratio 0.5 and no reserve, two clean calls pay for one retry."""
    keys = keyspace(3)
    client = fault_client(
        FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset({keys[2]}), attempts={1}),
        clock=lambda: 1000.0,
        retry={"budget_ratio": 0.5, "budget_min_per_s": 0.0},
    )
    client.put([keys[0]], ["a"])
    client.put([keys[1]], ["b"])
    client.put([keys[2]], ["c"])  # its own first attempt deposits 0.5 more: 1.5 >= 1
    assert client.budget.available() == 0.0


def test_deadline_stops_retries(fault_client, keyspace):
    keys = keyspace(3)
    client = fault_client(
        FaultRule(code=ErrorCode.RPC_FAIL, keys=frozenset({keys[1]})),
        jitter=lambda: 0.999,
        retry={"initial_backoff_s": 0.5, "max_backoff_s": 1.0, "deadline_s": 0.2, "max_attempts": 10},
    )
    with pytest.raises(DeadlineExceededError) as info:
        client.put(keys, ["a", "b", "c"])
    assert info.value.failed == {keys[1]: ErrorCode.RPC_FAIL}
    assert isinstance(info.value, TimeoutError)
    assert len(client.store.calls_for("put")) == 1


def test_chunks_report_together(fault_client, keyspace):
    keys = keyspace(30)
    failing = frozenset(keys[i] for i in (1, 12, 25))
    client = fault_client(FaultRule(code=ErrorCode.OBJECT_REPLICA_BUSY, keys=failing), batch_size=10)
    with pytest.raises(RetriesExhaustedError) as info:
        client.put(keys, [str(i) for i in range(30)])
    assert list(info.value.failed) == [keys[1], keys[12], keys[25]]  # in key order
    assert info.value.succeeded == 27


def test_a_sticky_fraction_fails_the_same_keys_every_time_and_a_removed_key_starts_anew(fault_client, keyspace):
    keys = keyspace(200)
    sticky = FaultRule(ErrorCode.RPC_TIMEOUT, fraction=0.1, sticky=True, operations=frozenset({"get"}))
    first = FaultRule(ErrorCode.TRANSFER_FAIL, attempts=frozenset({1}), operations=frozenset({"put"}))
    client = fault_client(sticky, first, retry={"max_attempts": 3})
    store = client.store
    client.put(keys, [b"v"] * len(keys))  # every key fails its first put, then succeeds
    with pytest.raises(RetriesExhaustedError) as info:
        client.get(keys)
    picked = set(info.value.failed)
    assert 0 < len(picked) < 60 and set(info.value.codes) == {ErrorCode.RPC_TIMEOUT}
    with pytest.raises(RetriesExhaustedError) as again:
        client.get(keys)
    assert set(again.value.failed) == picked  # the same keys: retries can never rescue them
    client.clear(keys)
    store.calls.clear()
    client.put(keys, [b"w"] * len(keys))  # removed keys start a new life: their first put fails again
    assert [len(c.injected) for c in store.calls_for("put")] == [len(keys), 0]


class RaisingOnSecondRead:
    """A store whose second ``batch_get_into`` raises (a binding that blew up mid-call)."""

    def __init__(self, store) -> None:
        self._store = store
        self.reads = 0

    def batch_get_into(self, *args):
        self.reads += 1
        if self.reads == 2:
            raise RuntimeError("the binding blew up")
        return self._store.batch_get_into(*args)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_call_stopped_by_an_exception_reports_the_last_codes_it_saw(keyspace):
    keys = keyspace(4)
    recorder = RecordingObserver()
    rules = [FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset({keys[3]}), attempts=frozenset({1}))]
    client = MooncakeBatchClient(
        {"retry": FAST},
        store=InMemoryStore(),
        wrap_store=lambda s: RaisingOnSecondRead(FaultInjectingStore(s, rules)),
        observer=recorder,
    )
    with client:
        client.put(keys[3:], ["written"])
        with pytest.raises(RuntimeError, match="blew up"):  # the exception itself, not a BatchOperationError
            client.get(keys)  # 3 keys missing (final), 1 fails once, then the retry's store call raises
    summary = recorder.operations[-1].summary
    assert summary.outcome is Outcome.NON_RETRYABLE and summary.keys_failed == 4
    assert summary.codes == Counter({ErrorCode.OBJECT_NOT_FOUND: 3, ErrorCode.INTERNAL_ERROR: 1})


def test_a_call_closed_during_its_backoff_reports_the_codes_that_were_being_retried(keyspace):
    keys = keyspace(3)
    recorder = RecordingObserver()
    rules = [FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset(keys[:2]))]
    client = MooncakeBatchClient(
        {"retry": {"initial_backoff_s": 30.0, "max_backoff_s": 30.0}},  # the default sleep wakes on close()
        store=InMemoryStore(),
        wrap_store=lambda s: FaultInjectingStore(s, rules),
        observer=recorder,
        jitter=lambda: 0.5,
    )
    errors: list[BaseException] = []

    def put() -> None:
        try:
            client.put(keys, ["a", "b", "c"])
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    worker = threading.Thread(target=put)
    worker.start()
    wait_until(lambda: any(a.ended for o in recorder.operations for a in o.attempts), 10, "the first attempt")
    client.close()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and isinstance(errors[0], ClientClosedError)
    summary = recorder.operations[-1].summary
    assert summary.keys_failed == 3 and summary.codes == Counter({ErrorCode.TRANSFER_FAIL: 2})


def test_fault_rules_take_any_collection_and_refuse_what_could_only_be_a_mistake():
    rule = FaultRule(ErrorCode.TRANSFER_FAIL, keys=["a"], attempts=[1], operations=(o for o in ["get", Operation.PUT]))
    assert rule.operations == {Operation.GET, Operation.PUT} and rule.keys == {"a"} and rule.attempts == {1}
    assert hash(rule) == hash(
        FaultRule.from_dict({"code": "TRANSFER_FAIL", "keys": ["a"], "attempts": [1], "operations": ["put", "get"]})
    )
    for bad, message in [
        ({"operations": "get"}, "operations must be a collection"),
        ({"keys": "abc"}, "keys must be a collection"),
        ({"operations": []}, "unknown or no operations"),
        ({"operations": ["pull"]}, r"unknown or no operations \['pull'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            FaultRule(ErrorCode.TRANSFER_FAIL, **bad)
    with pytest.raises(ValueError, match="sticky must be true or false"):
        FaultRule.from_dict({"code": -800, "sticky": "false"})
