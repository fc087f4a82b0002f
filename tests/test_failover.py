"""The real failure: a storage process dies; with two replicas, retries alone (node-loss routing switched off:
``node_health: false``) carry reads through the failover once the master drops the dead process. With routing on
(the default), ``test_node_loss.py``."""

from __future__ import annotations

import torch

from tq_mooncake.client import ErrorCode, FaultInjectingStore, RetriesExhaustedError

CLIENT_TTL = 2  # seconds before the master drops a silent storage process


def test_killed_storage_node_is_survived_by_retries(start_master, start_storage_nodes, make_client, keyspace):
    master = start_master(client_ttl=CLIENT_TTL)
    node_a, _ = start_storage_nodes(master, 2)
    # Pure clients (no segment of their own): every key has one replica in each storage process.
    recorder: dict[str, FaultInjectingStore] = {}
    retrying = make_client(
        master,
        global_segment_size=0,
        replica_num=2,
        node_health=False,
        wrap_store=lambda s: recorder.setdefault("store", FaultInjectingStore(s)),
        # A retry window well beyond client_ttl (+1 s for the master's monitor loop).
        retry={"max_attempts": 40, "initial_backoff_s": 0.1, "max_backoff_s": 0.5, "deadline_s": 30},
    )
    no_retries = make_client(master, global_segment_size=0, node_health=False, retry={"max_attempts": 1})

    keys = keyspace(200)
    values = [torch.randn(1024, generator=torch.Generator().manual_seed(i)) for i in range(150)]
    values += [{"sample": i, "text": f"row {i}"} for i in range(50)]
    metas = retrying.put(keys, values)

    node_a.kill()  # SIGKILL: the master still lists its replicas until client_ttl passes

    # Without retries the dead replica surfaces as TRANSFER_FAIL, never as data.
    try:
        no_retries.get(keys, custom_backend_meta=metas)
        raise AssertionError("a read right after the kill should have failed")
    except RetriesExhaustedError as err:
        assert set(err.failed.values()) == {ErrorCode.TRANSFER_FAIL}
        assert 0 < len(err.failed) < len(keys)  # only the keys whose first replica was on the dead node

    # With retries every value comes back intact from the surviving replica.
    got = retrying.get(keys, custom_backend_meta=metas)
    assert all(torch.equal(v, g) for v, g in zip(values[:150], got[:150], strict=True))
    assert got[150:] == values[150:]
    reads = recorder["store"].calls_for("get")
    assert len(reads) > 1  # it did retry
    assert set(reads[1].keys) < set(keys)  # and only the failed keys
