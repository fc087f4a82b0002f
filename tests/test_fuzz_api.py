"""Property-based fuzzing of the public API on a real store: random keys, values, shapes and dtypes that
disagree with what was stored, stored bytes truncated or corrupted with the raw store, metadata of another
key, values nested around the depth limit, every torch dtype, conjugate and negative views, numpy subclasses.
Every case ends in the correct value or a clear exception, never a crash, a hang or wrong data."""

from __future__ import annotations

import itertools
import math
import re
import uuid
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tq_mooncake.client import BatchOperationError, ErrorCode, MooncakeBatchClient, codec, integrity
from tq_mooncake.testing import same_value

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = settings(FUZZ, max_examples=30)
_run = itertools.count()
# How a damaged value is refused: Mooncake's "buffer too small", the client's size, checksum and frame checks, or
# the trailer's (retryable: a read racing a write looks the same).
REFUSALS = {ErrorCode.INVALID_PARAMS, ErrorCode.SIZE_MISMATCH, ErrorCode.METADATA_MISMATCH, ErrorCode.CORRUPT_VALUE,
            ErrorCode.TYPE_MISMATCH, ErrorCode.TRAILER_MISMATCH, ErrorCode.STALE_VALUE,
            ErrorCode.PAYLOAD_CHECKSUM_MISMATCH}  # fmt: skip
DTYPES = list(codec.TORCH_DTYPES.values())  # every dtype a tensor can be stored in
ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)  # the quantized too


@pytest.fixture(scope="module")
def no_retry_client(shared_master):
    """A client that reports retryable refusals (the trailer's) after one attempt instead of backing off."""
    client = MooncakeBatchClient(shared_master.client_config(retry={"max_attempts": 1}))
    yield client
    client.close()


def _prefix() -> str:
    return f"fz{next(_run)}-{uuid.uuid4().hex[:6]}-"


def raw_write(store, key: str, data: bytes, write_id: int | None = None) -> None:
    """Write ``data`` under ``key`` with the raw store: as is, or sealed with the trailer of write ``write_id``."""
    from mooncake.store import ReplicateConfig

    stored = integrity.seal(key, data, write_id) if write_id is not None else data
    buf = np.frombuffer(bytearray(stored), dtype=np.uint8)
    assert list(store.batch_upsert_from([key], [buf.ctypes.data], [buf.size], ReplicateConfig())) == [0]


def raw_bytes(value) -> bytes:
    """What the client stores for ``value``: a raw tensor's bytes, else its frame."""
    if isinstance(value, torch.Tensor) and value.numel() > 0:
        return bytes(codec.tensor_bytes(value))
    return codec.encode(value)


def raw_bytes_any(t: torch.Tensor) -> bytes:
    return bytes(codec.tensor_bytes(t)) if t.numel() else b""


# ------------------------------------------------------------------------------------------ strategies
@st.composite
def tensors(draw, min_elements: int = 0):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    if math.prod(shape) < min_elements:
        shape = [max(min_elements, 1)]
    n = math.prod(shape)
    data = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return codec.tensor_from_bytes(data, dtype, shape)  # a fresh tensor (int4 & co. have no clone kernel)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=64),
)
values = st.recursive(
    st.one_of(scalars, tensors()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
    ),
    max_leaves=8,
)
keys_st = st.one_of(
    st.text(min_size=0, max_size=12),  # unicode, sometimes empty
    st.text(alphabet="ab\x00", min_size=1, max_size=4),  # NUL bytes, frequent duplicates
    st.text(min_size=2000, max_size=2100),  # very long
    st.just("\ud800lone-surrogate"),
)


def _key_problem(keys: list[str]) -> type[Exception] | None:
    if any(k == "" for k in keys) or len(set(keys)) != len(keys):
        return ValueError
    if any("\ud800" <= ch <= "\udfff" for k in keys for ch in k):
        return ValueError
    return None


# ------------------------------------------------------------------------------------------ properties
@FUZZ
@given(data=st.data())
def test_random_keys_and_values_round_trip_or_are_refused(client, data):
    raw_keys = data.draw(st.lists(keys_st, min_size=1, max_size=6), label="keys")
    prefix = _prefix()
    keys = [prefix + k if k else k for k in raw_keys]  # empty keys stay empty
    vals = data.draw(st.lists(values, min_size=len(keys), max_size=len(keys)), label="values")
    problem = _key_problem(keys)
    if problem is not None:
        with pytest.raises(problem):
            client.put(keys, vals)
        return
    metas = client.put(keys, vals)
    got = client.get(keys, custom_backend_meta=metas)
    assert all(same_value(v, g) for v, g in zip(vals, got, strict=True))
    # TQ's way: shapes and dtypes for tensors, nothing for the rest.
    is_raw = [isinstance(v, torch.Tensor) and v.numel() > 0 for v in vals]
    shapes = [list(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]
    dtypes = [v.dtype if isinstance(v, torch.Tensor) else None for v in vals]
    got = client.get(keys, shapes=shapes, dtypes=dtypes)
    assert all(same_value(v, g) for v, g in zip(vals, got, strict=True))
    plain = [k for k, r in zip(keys, is_raw, strict=True) if not r]
    if plain:
        got = client.get(plain)  # frames need nothing at all
        assert all(
            same_value(v, g) for v, g in zip([v for v, r in zip(vals, is_raw, strict=True) if not r], got, strict=True)
        )
    client.clear(keys)


@FUZZ
@given(stored=st.one_of(tensors(min_elements=1), values), dtype=st.sampled_from([None, *DTYPES]),
       shape=st.one_of(st.none(), st.lists(st.integers(0, 6), max_size=3)), use_meta=st.booleans())  # fmt: skip
def test_shapes_and_dtypes_that_disagree_end_in_the_value_or_an_error(client, stored, dtype, shape, use_meta):
    key = _prefix() + "k"
    (meta,) = client.put([key], [stored])
    stored_bytes = raw_bytes(stored)
    try:
        (got,) = client.get([key], shapes=[shape], dtypes=[dtype], custom_backend_meta=[meta if use_meta else None])
    except (ValueError, TypeError) as exc:  # refused before reading: the request contradicts the metadata
        event("refused before reading")
        assert not isinstance(exc, BatchOperationError) and str(exc)
        return
    except BatchOperationError as err:
        event(f"refused by the read: {err.failed[key].name}")
        assert set(err.failed) == {key} and repr(key) in str(err)
        return
    if isinstance(got, torch.Tensor) and dtype is not None and not isinstance(stored, torch.Tensor):
        pytest.fail(f"a {type(stored).__name__} came back as a tensor")
    if isinstance(stored, torch.Tensor) and stored.numel() > 0 and isinstance(got, torch.Tensor):
        # A raw tensor has no header: the caller's dtype/shape is how its bytes are read, and exactly the
        # stored bytes come back (same count, same content), in the asked dtype and shape.
        event("raw tensor read as asked" + (" (another dtype)" if got.dtype != stored.dtype else ""))
        assert raw_bytes_any(got) == stored_bytes
        if dtype is not None:
            assert got.dtype == dtype
        if shape is not None and (dtype is not None or use_meta):
            assert list(got.shape) == list(shape)
        if use_meta or dtype is None:
            assert got.dtype == stored.dtype
        return
    expected = stored
    if isinstance(stored, torch.Tensor) and shape is not None and dtype is not None:
        expected = stored.reshape(shape)
    assert same_value(expected, got)
    client.clear([key])


@FUZZ
@given(
    stored=st.one_of(tensors(min_elements=1), values),
    cut=st.one_of(st.just(10_000), st.integers(1, 10_000)),  # often the whole value: same-size damage
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
    extra=st.one_of(st.just(b""), st.binary(max_size=8)),
    use_meta=st.booleans(),
    sealed=st.booleans(),  # the damaged payload behind an intact trailer of the put's write, or bare bytes
)
def test_truncated_or_corrupted_stored_bytes_are_refused(no_retry_client, stored, cut, flips, extra, use_meta, sealed):
    client = no_retry_client
    key = _prefix() + "k"
    (meta,) = client.put([key], [stored])
    original = raw_bytes(stored)
    damaged = bytearray(original[: max(1, min(cut, len(original)))] + extra)
    for pos, xor in flips:
        damaged[pos % len(damaged)] ^= xor
    raw_write(client.store, key, bytes(damaged), meta.get("wid", 1) if sealed else None)
    is_raw = isinstance(stored, torch.Tensor) and stored.numel() > 0
    shapes = [list(stored.shape)] if is_raw else None
    dtypes = [stored.dtype] if is_raw else None
    try:
        (got,) = client.get([key], shapes=shapes, dtypes=dtypes, custom_backend_meta=[meta] if use_meta else None)
    except BatchOperationError as err:
        assert set(err.failed) == {key} and repr(key) in str(err)
        event(f"damage refused: {err.failed[key].name}")
        assert err.failed[key] in REFUSALS
        assert not sealed or bytes(damaged) != original  # an intact value is never refused
        return
    assert sealed  # bare bytes (no trailer) are never returned
    if is_raw:
        # Raw tensors carry no checksum: what the store holds, if it has the right size, is what comes back.
        event("raw tensor returned as stored" + (" (damaged)" if bytes(damaged) != original else ""))
        assert len(damaged) == len(original) and raw_bytes_any(got) == bytes(damaged)
    else:
        event("intact frame returned")
        assert bytes(damaged) == original and same_value(stored, got)  # a frame is returned only intact


@FUZZ
@given(a=st.one_of(tensors(min_elements=1), values), data=st.data())
def test_metadata_of_another_key_never_returns_wrong_data(client, a, data):
    how = data.draw(st.sampled_from(["any", "same layout", "same value"]), label="b")
    if how == "same value":
        b = a
    elif how == "same layout" and isinstance(a, torch.Tensor):  # the metadata cannot tell them apart
        b = codec.tensor_from_bytes(data.draw(st.binary(min_size=a.nbytes, max_size=a.nbytes)), a.dtype, list(a.shape))
    elif how == "same layout":
        b = "x" * max(0, len(codec.encode(a)) - codec.HEADER_SIZE)  # a frame of the same size
    else:
        b = data.draw(st.one_of(tensors(min_elements=1), values), label="any b")
    ka, kb = _prefix() + "a", _prefix() + "b"
    meta_a, meta_b = client.put([ka, kb], [a, b])
    try:
        (got,) = client.get([ka], custom_backend_meta=[meta_b])
    except BatchOperationError as err:
        event(f"other key's metadata refused: {err.failed[ka].name}")
        assert set(err.failed) == {ka} and repr(ka) in str(err)
        return
    if "dtype" in meta_b:
        # Read as b's dtype and shape: the bytes are still exactly a's stored bytes.
        event("read as the other key's tensor layout")
        assert isinstance(got, torch.Tensor) and raw_bytes_any(got) == raw_bytes(a)
    else:
        # Only a frame identical to b's (same checksum) passes b's metadata: then it is a's value as well.
        event("identical frame")
        assert same_value(a, got) and raw_bytes(a) == raw_bytes(b)


# ------------------------------------------------------------------------------------ nesting depth
def _depth(value) -> int:
    """How deep containers nest in ``value`` (an oracle independent of the codec's)."""
    if isinstance(value, dict):
        return 1 + max((_depth(x) for x in (*value, *value.values())), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((_depth(x) for x in value), default=0)
    return 0


def _wrap(kind: str, value):
    if kind == "key":  # a tuple as a dict key (when the value can be in one)
        try:
            return {(value,): 0}
        except TypeError:
            kind = "dict"
    return {"list": lambda: [value], "tuple": lambda: (value,), "dict": lambda: {"k": value, "n": 1}}[kind]()


@SMALL
@given(data=st.data(), depth=st.one_of(st.integers(0, 80), st.sampled_from([62, 63, 64, 65, 66])))
def test_values_nested_around_the_depth_limit_round_trip_or_are_refused(client, data, depth):
    kinds = data.draw(st.lists(st.sampled_from(["list", "tuple", "dict", "key"]), min_size=depth, max_size=depth))
    value = data.draw(st.one_of(scalars, tensors()), label="leaf")
    for kind in kinds:
        value = _wrap(kind, value)
    key = _prefix() + "deep"
    if _depth(value) > codec.MAX_DEPTH:
        event("refused: too deep")
        with pytest.raises(TypeError, match=rf"^value for key {re.escape(repr(key))}: .*MAX_DEPTH={codec.MAX_DEPTH}"):
            client.put([key], [value])
        assert list(client.store.batch_is_exist([key])) == [0]
        return
    event("round trip" + (" at the limit" if _depth(value) == codec.MAX_DEPTH else ""))
    meta = client.put([key], [value])
    for got in (client.get([key], custom_backend_meta=meta), client.get([key])):
        assert same_value(value, got[0])
    client.clear([key])


# ------------------------------------------------------------- every dtype, lazy views, numpy subclasses
def _quantized(dtype: torch.dtype) -> bool:
    return dtype not in codec.TORCH_DTYPES.values()


def _view(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` seen ``how``: transposed, sliced, or as a lazy conjugate or negative view."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1)
    if how == "sliced" and t.dim() >= 1:
        return t[..., ::2]
    return {"conj": t.conj, "neg": t._neg_view, "conj imag": lambda: t.conj().imag}.get(how, lambda: t)()


@st.composite
def any_dtype_tensors(draw):
    dtype = draw(st.one_of(st.sampled_from(ALL_DTYPES), st.sampled_from([torch.complex64, torch.complex32])))
    shape = draw(st.lists(st.integers(0, 4), max_size=3), label="shape")
    if _quantized(dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(torch.rand(shape), 0.1, 0, dtype)
    n = math.prod(shape)
    t = codec.tensor_from_bytes(draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize)), dtype, shape)
    views = ["plain", "transposed", "sliced", "neg"] + (["conj", "conj imag"] * 2 if dtype.is_complex else [])
    return _view(t, draw(st.sampled_from(views), label="view"))


class _Array(np.ndarray):
    pass


NUMPY_VALUES = [
    ("ndarray", lambda: np.arange(6, dtype=np.float32).reshape(2, 3)),
    ("ndarray transposed", lambda: np.arange(6, dtype=">i2").reshape(2, 3).T),
    ("numpy scalar", lambda: np.complex64(1 - 2j)),
    ("masked array", lambda: np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])),
    ("matrix", lambda: np.matrix([[1.5, 2.5]])),
    ("recarray", lambda: np.rec.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")])),
    ("ndarray subclass", lambda: np.arange(3).view(_Array)),
]


def _resolved(value):
    """What ``get`` returns for ``value``: tensors with lazy conjugate and negative views resolved."""
    if isinstance(value, torch.Tensor):
        return value.resolve_conj().resolve_neg()
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    return tuple(_resolved(v) for v in value) if isinstance(value, tuple) else value


def _storable(value) -> bool:
    if isinstance(value, torch.Tensor):  # torch cannot negate every dtype: such a negative view is refused
        return not _quantized(value.dtype) and (not value.is_neg() or _can(value.resolve_neg))
    if isinstance(value, np.ndarray):
        return type(value) is np.ndarray and value.dtype.kind != "V"
    return True


def _can(call) -> bool:
    try:
        call()
    except RuntimeError:
        return False
    return True


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PendingDeprecationWarning")
@settings(FUZZ, max_examples=50)
@given(
    leaf=st.one_of(any_dtype_tensors(), st.sampled_from(NUMPY_VALUES).map(lambda named: named[1]())),
    wrap=st.sampled_from(["as is", "in a dict", "in a tuple"]),
)
def test_every_dtype_view_and_numpy_subclass_round_trips_or_is_refused(client, leaf, wrap):
    value = {"as is": leaf, "in a dict": {"v": leaf, "n": 1}, "in a tuple": (leaf,)}[wrap]
    key = _prefix() + "x"
    kind = f"{leaf.dtype}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
    if isinstance(leaf, torch.Tensor) and leaf.is_neg() and not _quantized(leaf.dtype):
        kind = "negative view of " + kind
    if not _storable(leaf):
        event(f"refused: {kind}")
        with pytest.raises(TypeError, match=rf"^value for key {re.escape(repr(key))}: "):
            client.put([key], [value])
        assert list(client.store.batch_is_exist([key])) == [0]
        return
    lazy = isinstance(leaf, torch.Tensor) and (leaf.is_conj() or leaf.is_neg())
    event("round trip" + (" of a lazy view" if lazy else ""))
    meta = client.put([key], [value])
    (got,) = client.get([key], custom_backend_meta=meta)
    assert same_value(_resolved(value), got), kind
    if isinstance(value, torch.Tensor):  # TQ's way
        (got,) = client.get([key], shapes=[value.shape], dtypes=[value.dtype])
        assert same_value(_resolved(value), got)
    client.clear([key])
