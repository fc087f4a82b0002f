"""A storage process SIGKILLed while the master still lists it (TQ's ``--client_ttl=30``): reads fall back to the
surviving replica in the same attempt, keys with no replica elsewhere fail fast, writes go to the live nodes, and
the telemetry names the endpoint. Real master, real storage processes, real OpenTelemetry SDK."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from tq_mooncake.client import (
    ClientConfig,
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    MooncakeBatchClient,
    NonRetryableError,
    RetriesExhaustedError,
)
from tq_mooncake.client.replica_reader import ReplicaReader
from tq_mooncake.telemetry import conventions as c

CLIENT_TTL = 30  # TQ's value: the master lists the dead process's replicas for the whole test


def _replica_endpoints(store: Any, keys: list[str]) -> dict[str, list[str]]:
    """Each key's replica endpoints, in the master's order."""
    found = store.batch_get_replica_desc(keys)
    return {k: [r.get_memory_descriptor().buffer_descriptor.transport_endpoint for r in found[k]] for k in found}


def _values(n: int) -> list[Any]:
    tensors = [torch.randn(512, generator=torch.Generator().manual_seed(i)) for i in range(n - n // 5)]
    return tensors + [{"row": i, "text": f"sample {i}"} for i in range(n // 5)]


def _same(a: list[Any], b: list[Any]) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def test_a_killed_node_is_routed_around_with_no_failed_call(
    start_master, start_storage_nodes, closed_at_teardown, keyspace, otel
):
    spans, providers = otel.spans, otel.providers
    master = start_master(client_ttl=CLIENT_TTL)
    dead, live = start_storage_nodes(master, 2)
    holder: list[FaultInjectingStore] = []
    client = MooncakeBatchClient(
        master.client_config(global_segment_size=0, replica_num=2),
        wrap_store=lambda s: holder.append(FaultInjectingStore(s)) or holder[0],
        **providers,
    )
    closed_at_teardown.append(client)
    store = holder[0]
    keys, new = keyspace(180)[:120], keyspace(180)[120:]
    values = _values(120)
    metas = client.put(keys, values)
    assert {m["replicas"] for m in metas} == {2}

    # A key-level TRANSFER_FAIL on a live node is retried as before: the node answers the probe, nobody is ejected.
    store.add_rule(FaultRule(int(ErrorCode.TRANSFER_FAIL), keys=frozenset(keys[:5]), attempts={1}, operations={"get"}))
    assert _same(client.get(keys, custom_backend_meta=metas), values)
    assert client.health.ejected() == frozenset()
    store.clear_rules()
    spans.clear()
    store.calls.clear()

    on_dead = [k for k, eps in _replica_endpoints(store, keys).items() if eps[0] == dead.name]
    assert on_dead  # keys whose replica Mooncake reads first is on the node about to die
    dead.kill()

    # The first read after the kill: every value, intact, in one attempt (the failed keys read from the replica
    # on the live node), and the dead node ejected.
    assert _same(client.get(keys, custom_backend_meta=metas), values)
    assert client.health.ejected() == {dead.name}
    attempts = [s for s in spans.get_finished_spans() if s.name == "mooncake.get.attempt"]
    assert [s.attributes[c.ATTEMPT] for s in attempts] == [1]
    (first,) = attempts
    host, port = dead.name.rsplit(":", 1)
    assert first.attributes[c.SERVER_ADDRESS] == host and first.attributes[c.SERVER_PORT] == int(port)
    assert first.attributes[c.NODES_DOWN] == 1
    assert first.attributes[c.KEYS_FALLBACK] == len(on_dead)
    assert first.attributes[c.KEYS_FAILED] == 0

    # Later reads never send a key whose first replica is on the dead node to the store's own read (each such
    # call would wait about 1 s on the dead endpoint): those are read from the live replica directly.
    store.calls.clear()
    assert _same(client.get(keys, custom_backend_meta=metas), values)
    through_store = {k for call in store.calls if call.method == "batch_get_into" for k in call.keys}
    direct = {k for call in store.calls if call.method == "batch_read_replicas" for k in call.keys}
    assert direct == set(on_dead) and not through_store & set(on_dead)

    # Writes go to the live node: every key written, with the one replica there is room for (said so).
    new_metas = client.put(new, _values(60))
    assert {m["replicas"] for m in new_metas} == {1}
    assert {ep for eps in _replica_endpoints(store, new).values() for ep in eps} == {live.name}
    put_attempts = [s for s in spans.get_finished_spans() if s.name == "mooncake.put.attempt"]
    assert put_attempts and all(s.attributes.get(c.STEERED) for s in put_attempts)

    # Overwrites of keys with a replica on the dead node: removed and written as new, in one attempt (an in-place
    # upsert would write into the dead node's buffer and fail after about 1 s).
    spans.clear()
    again = [v + 1 if isinstance(v, torch.Tensor) else {**v, "again": True} for v in values]
    metas = client.put(keys, again)
    assert [s.attributes[c.ATTEMPT] for s in spans.get_finished_spans() if s.name == "mooncake.put.attempt"] == [1]
    assert _same(client.get(keys, custom_backend_meta=metas), again)

    metrics = otel.metrics()
    dead_attrs = {(c.SERVER_ADDRESS, host), (c.SERVER_PORT, int(port))}
    assert metrics[c.EJECTIONS_METRIC] == {frozenset(dead_attrs): 1}
    assert metrics[c.FALLBACKS_METRIC] == {frozenset({*dead_attrs, (c.OPERATION, "get")}): 2 * len(on_dead)}
    assert metrics[c.NODE_FAILURES_METRIC] == {frozenset({*dead_attrs, (c.OPERATION, "get")}): 1}
    assert metrics[c.EJECTED_METRIC] == {frozenset(): 1}
    outcomes = metrics[c.OPERATIONS_METRIC]
    # Only the read with the injected failures retried; no call failed.
    assert {dict(a)[c.OPERATION]: dict(a)[c.OUTCOME] for a in outcomes if dict(a)[c.OUTCOME] != "success"} == {
        "get": "success_after_retry"
    }, outcomes


def test_keys_only_on_a_killed_node_fail_fast_and_new_writes_land_on_the_live_one(
    start_master, start_storage_nodes, closed_at_teardown, keyspace
):
    master = start_master(client_ttl=CLIENT_TTL)
    dead, live = start_storage_nodes(master, 2)
    client = MooncakeBatchClient(master.client_config(global_segment_size=0))  # replica_num 1, node health on
    closed_at_teardown.append(client)
    plain = MooncakeBatchClient(
        master.client_config(global_segment_size=0, node_health=False, retry={"max_attempts": 2})
    )
    closed_at_teardown.append(plain)
    keys, new = keyspace(400)[:200], keyspace(400)[200:]
    metas = client.put(keys, _values(200))
    lost = {k for k, eps in _replica_endpoints(client.store, keys).items() if eps == [dead.name]}
    assert 0 < len(lost) < len(keys)
    dead.kill()

    with pytest.raises(NonRetryableError) as info:
        client.get(keys, custom_backend_meta=metas)
    assert info.value.failed == dict.fromkeys(lost, ErrorCode.REPLICA_UNREACHABLE)
    assert "REPLICA_UNREACHABLE" in str(info.value)
    assert client.health.ejected() == {dead.name}

    client.put(new, _values(200))  # every key written, none to the dead node
    assert {ep for eps in _replica_endpoints(client.store, new).values() for ep in eps} == {live.name}

    # Two readers in one process (two clients; processes on one host alike) each get an engine of their own.
    readers = [ReplicaReader(ClientConfig.from_dict(master.client_config())) for _ in range(2)]
    assert [r.probe(live.name, 1.0) for r in readers] == [True, True]
    assert [r.probe(dead.name, 1.0) for r in readers] == [False, False]
    for r in readers:
        r.close()

    # With node_health off the same read retries TRANSFER_FAIL until its attempts run out (the old behaviour).
    with pytest.raises(RetriesExhaustedError) as info:
        plain.get(keys, custom_backend_meta=metas)
    assert info.value.failed == dict.fromkeys(lost, ErrorCode.TRANSFER_FAIL)
    assert Counter(info.value.failed.values()) == Counter({ErrorCode.TRANSFER_FAIL: len(lost)})
