"""Round trips through a real mooncake_master: tensors, non-tensor values, overwrite, metadata paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tq_mooncake.client import ErrorCode, NonRetryableError
from tq_mooncake.testing import same_value


def _mixed_values(n: int) -> list:
    """n values cycling through every kind the client stores."""
    g = torch.Generator().manual_seed(n)
    makers = [
        lambda i: torch.randn(4, 8, generator=g),
        lambda i: torch.randn(3, 5, generator=g).to(torch.bfloat16),
        lambda i: torch.randint(0, 1000, (7,), generator=g, dtype=torch.int64),
        lambda i: torch.tensor(float(i)),  # 0-d
        lambda i: torch.arange(12, dtype=torch.float16).reshape(3, 4).t(),  # non-contiguous
        lambda i: torch.empty(0, 3),  # zero bytes
        lambda i: torch.tensor([True, False, True]),
        lambda i: None,
        lambda i: b"",
        lambda i: "",
        lambda i: f"text-{i}-ünïcödé",
        lambda i: bytes(range(i % 256)),
        lambda i: {"uid": i, "tags": ["a", "b"], "nested": {"x": 1.5, "t": (1, 2)}},
        lambda i: [i, i * 2.5, "s", None, True],
        lambda i: np.arange(i % 10, dtype=np.int32),
        lambda i: i,
        lambda i: i * 0.5,
        lambda i: bool(i % 2),
    ]
    return [makers[i % len(makers)](i) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2000])
def test_mixed_round_trip_with_metadata(client, keyspace, n):
    keys = keyspace(n)
    values = _mixed_values(n)
    metas = client.put(keys, values)
    assert len(metas) == n and all(m["nbytes"] > 0 for m in metas)
    got = client.get(keys, custom_backend_meta=metas)
    assert len(got) == n
    bad = [i for i, (v, g) in enumerate(zip(values, got, strict=True)) if not same_value(v, g)]
    assert bad == []


def test_tensors_with_shapes_and_dtypes_only(client, keyspace):
    keys = keyspace(4)
    values = [
        torch.randn(2, 3),
        torch.randn(5).to(torch.bfloat16),
        torch.tensor(7, dtype=torch.int32),
        torch.arange(6.0).reshape(2, 3).t(),
    ]
    client.put(keys, values)
    got = client.get(keys, shapes=[list(v.shape) for v in values], dtypes=[v.dtype for v in values])
    for v, g in zip(values, got, strict=True):
        assert g.dtype == v.dtype and g.shape == v.shape and torch.equal(g, v) and g.device.type == "cpu"


def test_values_without_metadata_are_sized_by_the_store(client, keyspace):
    keys = keyspace(5)
    values = [None, b"", "", {"a": [1, 2]}, "x" * 100_000]
    client.put(keys, values)
    got = client.get(keys)  # no shapes, dtypes or metadata: sizes come from the store
    assert [type(g) for g in got] == [type(None), bytes, str, dict, str]
    assert got == values


def test_none_empty_bytes_and_empty_string_stay_distinct(client, keyspace):
    keys = keyspace(3)
    metas = client.put(keys, [None, b"", ""])
    got = client.get(keys, custom_backend_meta=metas)
    assert got[0] is None and got[1] == b"" and isinstance(got[1], bytes) and got[2] == "" and isinstance(got[2], str)
    assert len({m["crc32"] for m in metas}) == 3


def test_put_overwrites_existing_keys(client, keyspace):
    keys = keyspace(3)
    client.put(keys, [torch.zeros(4), "old", torch.zeros(2, 2)])
    new = [torch.ones(4), "new value", torch.full((8,), 3.0)]  # same size, other type, other size
    metas = client.put(keys, new)
    got = client.get(keys, custom_backend_meta=metas)
    assert torch.equal(got[0], new[0]) and got[1] == "new value" and torch.equal(got[2], new[2])


def test_clear_removes_and_tolerates_missing_keys(client, keyspace):
    keys = keyspace(3)
    metas = client.put(keys[:2], ["a", torch.ones(3)])
    client.get(keys[:2], custom_backend_meta=metas)  # takes read leases; a forced remove ignores them
    client.clear(keys, custom_backend_meta=metas + [None])  # keys[2] was never written
    with pytest.raises(NonRetryableError) as info:
        client.get(keys[:2], custom_backend_meta=metas)
    assert info.value.failed == {keys[0]: ErrorCode.OBJECT_NOT_FOUND, keys[1]: ErrorCode.OBJECT_NOT_FOUND}


def test_missing_key_is_an_error_never_a_value(client, keyspace):
    present, missing = keyspace(2)
    client.put([present], ["here"])
    with pytest.raises(NonRetryableError) as info:
        client.get([present, missing])
    err = info.value
    assert err.failed == {missing: ErrorCode.OBJECT_NOT_FOUND}
    assert err.succeeded == 1
    assert repr(missing) in str(err) and "OBJECT_NOT_FOUND(-704)" in str(err)


def test_many_chunks_on_the_thread_pool(shared_master, make_client, keyspace):
    client = make_client(shared_master, batch_size=7, max_workers=3)
    keys = keyspace(100)
    values = [torch.full((16,), float(i)) for i in range(100)]
    metas = client.put(keys, values)
    got = client.get(keys, custom_backend_meta=metas)
    assert all(torch.equal(v, g) for v, g in zip(values, got, strict=True))


def test_pure_client_writes_into_a_storage_node(shared_master, make_client, start_storage_node, keyspace):
    """A client that contributes no memory stores data in another process's segment."""
    start_storage_node(shared_master)
    client = make_client(shared_master, global_segment_size=0)
    keys = keyspace(20)
    values = [torch.randn(256) for _ in keys]
    metas = client.put(keys, values)
    assert all(torch.equal(v, g) for v, g in zip(values, client.get(keys, custom_backend_meta=metas), strict=True))


def test_p2p_handshake_metadata(start_master, make_client, keyspace):
    master = start_master(http_metadata=False)
    client = make_client(master)
    assert client.config.metadata_server == "P2PHANDSHAKE"
    keys = keyspace(2)
    metas = client.put(keys, [torch.arange(10), {"k": "v"}])
    got = client.get(keys, custom_backend_meta=metas)
    assert torch.equal(got[0], torch.arange(10)) and got[1] == {"k": "v"}
