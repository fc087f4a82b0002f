"""Bad input gets a clear error before anything is written; misuse after close() raises, never crashes."""

from __future__ import annotations

import pytest
import torch

from tq_mooncake.client import (
    ClientClosedError,
    ErrorCode,
    MooncakeBatchClient,
    NonRetryableError,
    StoreSetupError,
)
from tq_mooncake.cluster import free_port


def _nothing_written(client, keys):
    assert list(client.store.batch_is_exist(keys)) == [0] * len(keys)


@pytest.mark.parametrize(
    ("keys", "values", "error", "message"),
    [
        (["a", "b", "c"], ["x", "y"], ValueError, "values has 2 entries for 3 keys"),
        (["a", "b", "a"], [1, 2, 3], ValueError, "duplicate keys in one call: 'a."),
        (["a", "", "c"], [1, 2, 3], ValueError, "keys[1] is an empty string"),
        ("abc", ["x", "y", "z"], TypeError, "keys must be a list of str, got str"),
        (["a", 7, "c"], [1, 2, 3], TypeError, "keys[1] must be a str, got int"),
        (["a", "\ud800"], [1, 2], ValueError, "is not valid UTF-8"),
        (["a", "b"], "xy", TypeError, "values must be a list (one entry per key), got str"),
        (["a", "b"], None, TypeError, "values must be a list (one entry per key), got None"),
        (["a", "b"], [1, object()], TypeError, "cannot be stored without pickle"),
        (["a", "b"], [1, {1, 2}], TypeError, "set allow_pickle: true to allow it"),
    ],
)
def test_put_rejects_bad_input_before_writing(client, keyspace, keys, values, error, message):
    unique = keyspace(1)[0]
    keys = [f"{k}.{unique}" if isinstance(k, str) and k else k for k in keys] if isinstance(keys, list) else keys
    with pytest.raises(error) as info:
        client.put(keys, values)
    assert message in str(info.value)
    if isinstance(keys, list):
        _nothing_written(client, [k for k in keys if isinstance(k, str) and k and k.isascii()])


def test_value_too_big_rejects_the_whole_batch(shared_master, make_client, keyspace):
    client = make_client(shared_master, max_value_bytes=1024)
    keys = keyspace(3)
    with pytest.raises(ValueError, match=r"is 2048 bytes, more than max_value_bytes=1024"):
        client.put(keys, ["small", torch.zeros(512), "also small"])
    with pytest.raises(ValueError, match=r"more than max_value_bytes=1024"):
        client.put(keys[:1], ["x" * 2000])
    _nothing_written(client, keys)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"shapes": [[2]]}, ValueError, "shapes has 1 entries for 2 keys"),
        ({"dtypes": [torch.float32, "cplx"], "shapes": [[2], [2]]}, ValueError, "unsupported dtype 'cplx'"),
        ({"dtypes": [torch.float32, None]}, ValueError, "has a dtype but no shape"),
        ({"shapes": [[-1], None], "dtypes": [torch.float32, None]}, ValueError, "must hold non-negative ints"),
        ({"custom_backend_meta": [{"nbytes": 8}, None]}, ValueError, "is not metadata returned by put"),
        ({"custom_backend_meta": ["junk", None]}, ValueError, "is not metadata returned by put"),
    ],
)
def test_get_rejects_bad_arguments(client, keyspace, kwargs, error, message):
    keys = keyspace(2)
    with pytest.raises(error) as info:
        client.get(keys, **kwargs)
    assert message in str(info.value)


def test_shapes_and_dtypes_that_disagree_with_the_stored_tensor(client, keyspace):
    (key,) = keyspace(1)
    meta = client.put([key], [torch.arange(8, dtype=torch.float32)])
    with pytest.raises(ValueError, match=r"stored as torch.float32, but dtype torch.int32 was asked for"):
        client.get([key], dtypes=[torch.int32], custom_backend_meta=meta)
    with pytest.raises(ValueError, match=r"stored with shape \[8\], but shape \[3, 4\] was asked for"):
        client.get([key], shapes=[[3, 4]], custom_backend_meta=meta)
    # The same elements in another layout are the caller's choice (TQ asks [1] for the 0-d rows it stored).
    (got,) = client.get([key], shapes=[[2, 4]], custom_backend_meta=meta)
    assert torch.equal(got, torch.arange(8, dtype=torch.float32).reshape(2, 4))
    # Without metadata the store's byte count decides: a buffer too small or too large is an error.
    with pytest.raises(NonRetryableError) as small:
        client.get([key], shapes=[[4]], dtypes=[torch.float32])
    assert small.value.failed == {key: ErrorCode.INVALID_PARAMS}  # Mooncake: buffer too small
    with pytest.raises(NonRetryableError) as large:
        client.get([key], shapes=[[16]], dtypes=[torch.float32])
    assert large.value.failed == {key: ErrorCode.SIZE_MISMATCH}


def test_metadata_of_another_key_is_refused(client, keyspace):
    a, b = keyspace(2)
    metas = client.put([a, b], ["same-length-1", "same-length-2"])
    assert metas[0]["nbytes"] == metas[1]["nbytes"]
    with pytest.raises(NonRetryableError) as info:
        client.get([a], custom_backend_meta=[metas[1]])
    assert info.value.failed == {a: ErrorCode.CHECKSUM_MISMATCH}


def test_tensor_read_as_value_is_refused(client, keyspace):
    (key,) = keyspace(1)
    client.put([key], [torch.arange(64, dtype=torch.uint8)])
    with pytest.raises(NonRetryableError) as info:
        client.get([key])  # no dtype, no metadata: read as a frame, which raw tensor bytes are not
    assert info.value.failed == {key: ErrorCode.CORRUPT_VALUE}


def test_calls_after_close_raise_and_close_is_idempotent(shared_master, keyspace):
    client = MooncakeBatchClient(shared_master.client_config())
    keys = keyspace(1)
    client.put(keys, ["x"])
    client.close()
    client.close()
    assert client.closed
    for call, args in ((client.put, (keys, ["y"])), (client.get, (keys,)), (client.clear, (keys,))):
        with pytest.raises(ClientClosedError, match=r"called after close\(\)"):
            call(*args)


def test_setup_failure_names_the_addresses():
    port = free_port()
    with pytest.raises(StoreSetupError) as info:
        MooncakeBatchClient({"master_server_address": f"127.0.0.1:{port}", "global_segment_size": 0})
    assert f"master '127.0.0.1:{port}' is not reachable" in str(info.value)
    assert "metadata server 'P2PHANDSHAKE'" in str(info.value)


def test_bad_config_is_rejected_before_connecting():
    with pytest.raises(ValueError, match=r"unknown retry config key\(s\) \['max_attempt'\]"):
        MooncakeBatchClient({"retry": {"max_attempt": 3}})
    with pytest.raises(ValueError, match=r"retry.max_attempts must be an integer >= 1, got 0"):
        MooncakeBatchClient({"retry": {"max_attempts": 0}})
    with pytest.raises(ValueError, match=r"global_segment_size must be a size in bytes"):
        MooncakeBatchClient({"global_segment_size": "lots"})
