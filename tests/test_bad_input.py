"""Bad input gets a clear error before anything is written; misuse after close() raises, never crashes; every
value either round-trips exactly or is refused at put."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import msgpack
import numpy as np
import pytest
import torch

from tq_mooncake.client import (
    BatchOperationError,
    ClientClosedError,
    ErrorCode,
    MooncakeBatchClient,
    NonRetryableError,
    StoreSetupError,
    codec,
    integrity,
)
from tq_mooncake.cluster import free_port
from tq_mooncake.testing import same_value


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
    with pytest.raises(BatchOperationError) as info:
        client.get([a], custom_backend_meta=[metas[1]])
    # Same call, same write id: the trailer passes, but the frame's CRC is not the one b's metadata names.
    assert isinstance(info.value, NonRetryableError) and info.value.failed == {a: ErrorCode.METADATA_MISMATCH}


def test_tensor_read_as_value_is_refused(client, keyspace):
    (key,) = keyspace(1)
    client.put([key], [torch.arange(64, dtype=torch.uint8)])
    with pytest.raises(NonRetryableError) as info:
        client.get([key])  # no dtype, no metadata: read as a frame; the trailer says a raw tensor is stored
    assert info.value.failed == {key: ErrorCode.TYPE_MISMATCH}


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


# ------------------------------------------------------------------------ values put refuses, naming the key
def _nest(depth: int, make=lambda v: (v,)):
    value = None
    for _ in range(depth):
        value = make(value)
    return value


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _masked_tensor():
    from torch.masked import masked_tensor

    return masked_tensor(torch.ones(3), torch.tensor([True, False, True]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _nest(65), "nests lists, tuples or dicts more than MAX_DEPTH=64 deep"),
        (lambda: _nest(200), "nests lists, tuples or dicts more than MAX_DEPTH=64 deep"),  # its get segfaulted
        (lambda: _nest(100_000, lambda v: [v]), "more than MAX_DEPTH=64 deep"),  # was a RecursionError
        (lambda: {"k": _nest(70, lambda v: {"d": v})}, "more than MAX_DEPTH=64 deep"),
        (lambda: np.ma.masked_array([1, 2], mask=[0, 1]), "numpy array subclass MaskedArray"),  # lost its mask
        (lambda: [np.matrix([[1, 2]])], "numpy array subclass matrix"),  # came back as an ndarray
        (lambda: torch.empty(3, device="meta"), "meta tensors hold no data"),  # was NotImplementedError
        (lambda: {"s": torch.eye(2).to_sparse()}, "only strided (dense) tensors"),  # was RuntimeError
        (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensors (torch.nested)"),
        (_masked_tensor, "tensor subclass MaskedTensor"),  # was written from address 0: a segfault
        (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "tensors of dtype torch.qint8"),
        (lambda: [torch.empty(0, dtype=torch.quint8)], "tensors of dtype torch.quint8"),
    ],
    ids=[
        "tuples-65",
        "tuples-200",
        "lists-100000",
        "dicts-70",
        "masked-array",
        "matrix",
        "meta",
        "sparse",
        "torch.nested",
        "MaskedTensor",
        "qint8",
        "quint8-empty",
    ],  # fmt: skip
)
def test_put_refuses_values_it_cannot_store_naming_the_key(client, keyspace, make, message):
    a, b = keyspace(2)
    with pytest.raises(TypeError) as info:
        client.put([a, b], ["fine", _quiet(make)])
    assert f"value for key {b!r}: " in str(info.value) and message in str(info.value)
    _nothing_written(client, [a, b])


# ------------------------------------------------------------------------------ every torch dtype, views
ALL_TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _any_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    n = int(np.prod(shape))
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return codec.tensor_from_bytes(raw.numpy().tobytes(), dtype, list(shape))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_torch_dtype_round_trips_or_is_refused_at_put(client, keyspace):
    storable = [dt for dt in ALL_TORCH_DTYPES if dt in codec.TORCH_DTYPES.values()]
    refused = [dt for dt in ALL_TORCH_DTYPES if dt not in codec.TORCH_DTYPES.values()]
    assert len(storable) + len(refused) == len(ALL_TORCH_DTYPES) and len(refused) <= 5  # the quantized ones
    values = []
    for i, dt in enumerate(storable):
        t = _any_tensor(dt, (2, 3), i)
        values += [t, t.T, t[0, 1], _any_tensor(dt, (0, 3), i), {"x": t, "e": [_any_tensor(dt, (0,), i), (t.T,)]}]
    all_keys = keyspace(len(values) + len(refused))
    keys, refused_keys = all_keys[: len(values)], all_keys[len(values) :]
    metas = client.put(keys, values)
    got = client.get(keys, custom_backend_meta=metas)
    assert [i for i, (v, g) in enumerate(zip(values, got, strict=True)) if not same_value(v, g)] == []
    raw = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]  # TQ's way: shapes and dtypes
    got = client.get(
        [keys[i] for i in raw], shapes=[values[i].shape for i in raw], dtypes=[values[i].dtype for i in raw]
    )
    assert all(same_value(values[i], g) for i, g in zip(raw, got, strict=True))
    for dt, key in zip(refused, refused_keys, strict=True):
        q = _quiet(lambda dt=dt: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, dt))
        for value in (q, {"q": q}, q[:0]):
            with pytest.raises(TypeError, match=f"value for key {key!r}: tensors of dtype {dt}"):
                client.put([key], [value])
    _nothing_written(client, refused_keys)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_conjugate_and_negative_views_round_trip_exactly(client, keyspace):
    z = torch.tensor([[1 + 2j, -3.5 - 0.25j], [0.5j, 4 + 0j]])
    f = torch.tensor([[1.5, -2.0], [-0.0, 3.0]])
    views = [z.conj(), z.to(torch.complex32).conj(), z.to(torch.complex128).T.conj(), f._neg_view(), z._neg_view()]
    values = [*views, *({"v": v, "t": (v[:0],)} for v in views)]  # raw, nested (and zero-element)
    keys = keyspace(len(values))
    got = client.get(keys, custom_backend_meta=client.put(keys, values))
    for v, g in zip(views, got, strict=False):
        assert same_value(g, v.resolve_conj().resolve_neg()) and not (g.is_conj() or g.is_neg())
        if v.dtype != torch.complex32:  # torch.equal has no complex32 kernel
            assert torch.equal(g, v)  # before: x.conj() came back as x
    for v, g in zip(views, got[len(views) :], strict=True):
        assert same_value(g["v"], v.resolve_conj().resolve_neg()) and same_value(g["t"][0], v[:0].resolve_conj())


def test_a_pickling_client_carries_what_msgpack_cannot(shared_master, make_client, keyspace):
    client = make_client(shared_master, allow_pickle=True)
    values = [
        np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]),
        {"m": np.ma.masked_array([1.5], mask=[1])},
        _nest(300),
        {"sparse": torch.eye(2).to_sparse()},
    ]
    keys = keyspace(len(values))
    got = client.get(keys, custom_backend_meta=client.put(keys, values))
    assert type(got[0]) is np.ma.MaskedArray and got[0].mask.tolist() == [False, True, False]
    assert got[0].data.tolist() == [1, 2, 3] and got[1]["m"].mask.tolist() == [True]
    assert got[2] == values[2]
    assert torch.equal(got[3]["sparse"].to_dense(), torch.eye(2))
    with pytest.raises(TypeError, match=rf"value for key {keys[0]!r}: cannot be pickled"):
        client.put(keys[:1], [[lambda: None]])  # was a raw PicklingError


# ------------------------------------------------------------------------------------------------ get sizes
def test_get_refuses_sizes_beyond_max_value_bytes_before_allocating(client, keyspace):
    (key,) = keyspace(1)
    limit = client.config.max_value_bytes
    for meta in ({"nbytes": 1 << 40, "crc32": 1}, {"nbytes": 1 << 40, "dtype": "uint8", "shape": [1 << 40]}):
        with pytest.raises(ValueError, match=rf"custom_backend_meta for key {key!r} says 1099511627776 bytes"):
            client.get([key], custom_backend_meta=[meta])  # was a MemoryError
    with pytest.raises(ValueError, match=rf"for key {key!r} is 1099511627776 bytes, more than max_value_bytes={limit}"):
        client.get([key], shapes=[[1 << 38]], dtypes=[torch.float32])  # was a RuntimeError from the allocator


def test_a_raw_tensor_read_with_shapes_but_no_dtype_is_type_mismatch(client, keyspace):
    """Without a dtype (asked for or in the metadata) a key is read as a frame, whatever shapes say (TQ passes
    shapes for non-tensor fields too); the trailer says a raw tensor is stored, so the key fails with
    TYPE_MISMATCH."""
    (key,) = keyspace(1)
    meta = client.put([key], [torch.arange(4.0)])
    with pytest.raises(NonRetryableError) as info:
        client.get([key], shapes=[[4]])
    assert info.value.failed == {key: ErrorCode.TYPE_MISMATCH}
    (got,) = client.get([key], shapes=[[4]], dtypes=[torch.float32])
    assert torch.equal(got, torch.arange(4.0))
    (got,) = client.get([key], shapes=[[4]], custom_backend_meta=meta)
    assert torch.equal(got, torch.arange(4.0))


# ------------------------------------------------------------------------------------- crafted deep frames
def _ext_tuples(depth: int, inner: bytes) -> bytes:
    """msgpack bytes of ``depth`` tuples (extension 3) around ``inner``, built as a hostile writer would."""
    for _ in range(depth):
        inner = msgpack.packb(msgpack.ExtType(3, b"\x91" + inner))
    return inner


_READ_IN_A_CHILD = """
import json, sys
from tq_mooncake.client import BatchOperationError, MooncakeBatchClient
config, keys = json.load(sys.stdin)
with MooncakeBatchClient(config) as client:
    try:
        client.get(keys)
        failed = {}
    except BatchOperationError as err:
        failed = {k: code.name for k, code in err.failed.items()}
print(json.dumps(failed))
"""


def test_crafted_deep_frames_fail_as_corrupt_and_the_reader_survives(client, shared_master, keyspace):
    """Hostile frames written with the raw store are read by a client in a child process: a crash would fail this
    test (before: the reader segfaulted on tuples ~195 deep)."""
    payloads = {
        "tuples 300 deep": _ext_tuples(300, b"\xc0"),
        "tuples 63 deep around 1000 lists": _ext_tuples(63, b"\x91" * 1000 + b"\xc0"),
        "lists 1000 deep": b"\x91" * 1000 + b"\xc0",
        "dicts 100000 deep": b"\x81\xa1k" * 100_000 + b"\xc0",
        "tuples at the limit": _ext_tuples(63, b"\x90"),
    }
    keys = keyspace(len(payloads))
    for key, payload in zip(keys, payloads.values(), strict=True):
        stored = np.frombuffer(bytearray(integrity.seal(key, codec._frame(codec.Codec.MSGPACK, payload))), np.uint8)
        assert list(client.store.batch_upsert_from([key], [stored.ctypes.data], [stored.size])) == [0]
    config = shared_master.client_config(global_segment_size=0)
    child = subprocess.run(
        [sys.executable, "-c", _READ_IN_A_CHILD], input=json.dumps([config, keys]), capture_output=True, text=True
    )
    assert child.returncode == 0, f"the reader died (rc {child.returncode}): {child.stderr[-2000:]}"
    assert json.loads(child.stdout.splitlines()[-1]) == {k: "CORRUPT_VALUE" for k in keys[:-1]}
    assert client.get(keys[-1:]) == [_nest(63, lambda v: (v,) if v is not None else ([],))]  # 63 tuples, a list
