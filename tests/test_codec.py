"""Value frames: round trips of every supported type, corruption detection, and the pickle gate."""

from __future__ import annotations

import ctypes
import enum
import math
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

from tq_mooncake.client import ErrorCode, codec, plans
from tq_mooncake.client.codec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Codec,
    CodecError,
    UnencodableValueError,
    decode,
    encode,
    frame_crc,
)
from tq_mooncake.testing import same_value

pytestmark = pytest.mark.pure


def roundtrip(value, allow_pickle: bool = False):
    return decode(encode(value, allow_pickle=allow_pickle), allow_pickle=allow_pickle)


def make_frame(codec_id: int, payload: bytes, *, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """A frame built from the documented layout (independently of the encoder), with a valid CRC."""
    prefix = struct.pack("<4sBBHQ", magic, version, codec_id, 0, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(prefix)) & 0xFFFFFFFF
    return prefix + struct.pack("<I", crc) + payload


def header_codec(frame: bytes) -> int:
    return HEADER.unpack_from(frame)[2]


def assert_tensor_equal(got, want):
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got, want)


def assert_array_equal(got, want):
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------- frame layout
def test_header_is_twenty_bytes():
    assert HEADER_SIZE == 20


def test_encoder_output_matches_documented_layout():
    frame = encode(b"abc")
    assert frame == make_frame(Codec.BYTES, b"abc")
    assert frame_crc(frame) == struct.unpack_from("<I", frame, 16)[0]


def test_none_empty_bytes_and_empty_str_are_distinct_non_empty_frames():
    frames = [encode(None), encode(b""), encode("")]
    assert all(len(f) == HEADER_SIZE for f in frames)
    assert len(set(frames)) == 3
    assert [header_codec(f) for f in frames] == [Codec.NONE, Codec.BYTES, Codec.STR]


def test_none_empty_bytes_and_empty_str_decode_back_to_themselves():
    assert decode(encode(None)) is None
    got_bytes, got_str = decode(encode(b"")), decode(encode(""))
    assert got_bytes == b"" and type(got_bytes) is bytes
    assert got_str == "" and type(got_str) is str


def test_frame_crc_differs_between_values():
    assert frame_crc(encode(b"a")) != frame_crc(encode(b"b"))


# -------------------------------------------------------------------------------------------- scalars etc.
@pytest.mark.parametrize("value", [b"\x00\x01\xff" * 100, bytes(range(256))])
def test_bytes_roundtrip(value):
    got = roundtrip(value)
    assert got == value and type(got) is bytes


def test_bytearray_comes_back_as_bytes():
    got = roundtrip(bytearray(b"hello"))
    assert got == b"hello"
    assert type(got) is bytes


def test_memoryview_comes_back_as_bytes():
    got = roundtrip(memoryview(b"view"))
    assert got == b"view" and type(got) is bytes


@pytest.mark.parametrize("value", ["plain", "héllo wörld", "日本語 🚀", "\x00nul", "a" * 10_000])
def test_str_roundtrip(value):
    got = roundtrip(value)
    assert got == value and type(got) is str


def test_str_with_lone_surrogate_roundtrips():
    assert roundtrip("x\ud800y") == "x\ud800y"


@pytest.mark.parametrize(
    "value",
    [True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 1.5, 1e308, -2.5e-300, math.inf],
)
def test_bool_int_float_roundtrip(value):
    got = roundtrip(value)
    assert got == value
    assert type(got) is type(value)


def test_bool_does_not_become_int():
    assert roundtrip(True) is True
    assert roundtrip(1) is not True


def test_nan_roundtrips():
    assert math.isnan(roundtrip(math.nan))


def test_negative_zero_keeps_its_sign():
    assert math.copysign(1.0, roundtrip(-0.0)) == -1.0


# ------------------------------------------------------------------------------------------- containers
def test_nested_containers_roundtrip():
    value = {"a": [1, 2.5, "x", None, b"raw"], "b": {"c": [[], {}], "d": True}, "e": ("t", 1)}
    assert roundtrip(value) == value


def test_tuples_are_preserved_at_any_depth():
    value = (1, [2, (3, (4,))], {"k": ()})
    got = roundtrip(value)
    assert got == value
    assert type(got) is tuple
    assert type(got[1]) is list
    assert type(got[1][1]) is tuple
    assert type(got[1][1][1]) is tuple
    assert type(got[2]["k"]) is tuple


def test_lists_stay_lists():
    got = roundtrip([1, [2, 3]])
    assert type(got) is list and type(got[1]) is list


def test_dict_with_int_keys_roundtrips():
    value = {1: "one", -2: "minus two", 0: {3: [4]}}
    got = roundtrip(value)
    assert got == value
    assert all(type(k) is int for k in got)


def test_dict_with_mixed_keys_roundtrips():
    value = {"s": 1, 2: "i", b"b": 3}
    assert roundtrip(value) == value


def test_str_and_int_subclasses_are_stored_as_their_base():
    class Tag(str):
        pass

    class Level(enum.IntEnum):
        HIGH = 3

    got = roundtrip({"k": [Tag("v"), Level.HIGH]})
    assert got == {"k": ["v", 3]}
    assert type(got["k"][0]) is str
    assert type(got["k"][1]) is int


# ----------------------------------------------------------------------------------------------- numpy
@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5, dtype=np.int64),
        np.array([1, 2, 3], dtype=">i4"),
        np.array([True, False, True]),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([1.5, -2.5], dtype=np.float16),
        np.array(["ab", "cde"]),
        np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
    ],
    ids=lambda a: str(a.dtype),
)
def test_ndarray_roundtrip(array):
    frame = encode(array)
    assert header_codec(frame) == Codec.NDARRAY
    assert_array_equal(decode(frame), array)


def test_zero_dim_ndarray_roundtrip():
    array = np.array(3.25, dtype=np.float64)
    got = roundtrip(array)
    assert_array_equal(got, array)
    assert got.ndim == 0


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 5)])
def test_empty_ndarray_roundtrip(shape):
    array = np.empty(shape, dtype=np.float32)
    assert_array_equal(roundtrip(array), array)


def test_non_contiguous_ndarray_roundtrip():
    base = np.arange(30, dtype=np.int32).reshape(5, 6)
    for view in (base.T, base[::2, 1::2], np.asfortranarray(base)):
        assert_array_equal(roundtrip(view), view)


def test_decoded_ndarray_is_writable_and_owns_its_memory():
    got = roundtrip(np.arange(4, dtype=np.int16))
    got[0] = 7
    assert got[0] == 7


def test_structured_ndarray_roundtrips_or_is_refused():
    array = np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")])
    try:
        got = roundtrip(array)
    except UnencodableValueError:
        return
    assert got.dtype == array.dtype
    assert_array_equal(got, array)


def test_object_ndarray_needs_pickle():
    array = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(UnencodableValueError):
        encode(array)
    got = roundtrip(array, allow_pickle=True)
    assert got.dtype == object and list(got) == [{"a": 1}, None]


@pytest.mark.parametrize(
    "scalar",
    [np.float32(1.5), np.float64(-2.25), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True), np.complex64(1 + 2j)],
    ids=lambda s: type(s).__name__,
)
def test_numpy_scalar_roundtrip_keeps_type(scalar):
    got = roundtrip(scalar)
    assert type(got) is type(scalar)
    assert got == scalar


def test_numpy_values_nested_in_containers():
    value = {"arr": np.arange(6, dtype=np.float64).reshape(2, 3), "s": [np.int32(7), (np.float16(0.5),)]}
    got = roundtrip(value)
    assert_array_equal(got["arr"], value["arr"])
    assert type(got["s"][0]) is np.int32 and got["s"][0] == 7
    assert type(got["s"][1]) is tuple
    assert type(got["s"][1][0]) is np.float16 and got["s"][1][0] == np.float16(0.5)


# ----------------------------------------------------------------------------------------------- torch
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.float32).reshape(3, 4),
        torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
        torch.tensor([1.5, -2.0], dtype=torch.float16),
        torch.arange(10, dtype=torch.int64),
        torch.tensor([-1, 0, 1], dtype=torch.int8),
        torch.tensor([0, 255], dtype=torch.uint8),
        torch.tensor([True, False]),
        torch.tensor([1 + 2j], dtype=torch.complex64),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
    ],
    ids=lambda t: str(t.dtype),
)
def test_tensor_roundtrip(tensor):
    frame = encode(tensor)
    assert header_codec(frame) == Codec.TENSOR
    assert_tensor_equal(decode(frame), tensor)


def test_zero_dim_tensor_roundtrip():
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        tensor = torch.tensor(7, dtype=dtype)
        got = roundtrip(tensor)
        assert_tensor_equal(got, tensor)
        assert got.dim() == 0


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 2)])
def test_empty_tensor_roundtrip(shape):
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    assert_tensor_equal(roundtrip(tensor), tensor)


def test_non_contiguous_tensor_roundtrip():
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    for view in (base.T, base[::2, 1::2], base[:, 3]):
        assert not view.is_contiguous()
        got = roundtrip(view)
        assert_tensor_equal(got, view)
        assert got.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int4])
def test_contiguous_tensor_with_odd_strides_on_size_one_dims_roundtrips(dtype):
    base = codec.tensor_from_bytes(bytes(range(8 * dtype.itemsize)), dtype, [8])
    for t in (base.as_strided((2, 1), (1, 7)), base.as_strided((1, 1), (3, 2)), base.as_strided((1, 3, 1), (9, 1, 5))):
        assert t.is_contiguous() and t.stride(-1) != 1
        for value in (t, {"t": t}):
            assert same_value(roundtrip(value), value)
        meta, stored = raw_put_bytes(t)
        assert (
            stored == bytes(codec.tensor_bytes(t)) == bytes(codec.tensor_bytes(t.clone() if dtype != torch.int4 else t))
        )


def test_tensor_requiring_grad_roundtrips_as_plain_tensor():
    tensor = torch.ones(3, requires_grad=True)
    got = roundtrip(tensor)
    assert torch.equal(got, tensor.detach())
    assert not got.requires_grad


def test_float8_tensor_roundtrip_bits():
    tensor = torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)
    got = roundtrip(tensor)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))


def test_tensors_nested_in_dicts():
    value = {
        "x": torch.arange(4, dtype=torch.int32),
        "y": [torch.tensor([1.5], dtype=torch.bfloat16), {"z": torch.empty(0, 2)}],
        "t": (torch.tensor(1.0),),
    }
    frame = encode(value)
    assert header_codec(frame) == Codec.MSGPACK
    got = decode(frame)
    assert_tensor_equal(got["x"], value["x"])
    assert_tensor_equal(got["y"][0], value["y"][0])
    assert_tensor_equal(got["y"][1]["z"], value["y"][1]["z"])
    assert type(got["t"]) is tuple
    assert_tensor_equal(got["t"][0], value["t"][0])


def test_nested_non_contiguous_tensor():
    view = torch.arange(12, dtype=torch.int16).reshape(3, 4).T
    got = roundtrip({"v": view})
    assert_tensor_equal(got["v"], view)


# ----------------------------------------------------------------------------------------------- corruption
@pytest.fixture
def good_frame() -> bytes:
    return encode({"payload": [1, 2, 3], "name": "value"})


def decode_error(frame, **kwargs) -> CodecError:
    with pytest.raises(CodecError) as info:
        decode(frame, **kwargs)
    return info.value


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize("cut", [1, 5])
def test_truncated_frame_is_corrupt(good_frame, cut):
    err = decode_error(good_frame[:-cut])
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert "payload bytes" in str(err)


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1])
def test_frame_shorter_than_header_is_corrupt(good_frame, length):
    err = decode_error(good_frame[:length])
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert "shorter than the header" in str(err)


def test_all_zero_buffer_is_corrupt():
    assert decode_error(bytes(64)).code is ErrorCode.CORRUPT_VALUE


def test_flipped_payload_byte_is_checksum_mismatch(good_frame):
    for pos in (HEADER_SIZE, len(good_frame) // 2, len(good_frame) - 1):
        corrupted = bytearray(good_frame)
        corrupted[pos] ^= 0x01
        assert decode_error(bytes(corrupted)).code is ErrorCode.PAYLOAD_CHECKSUM_MISMATCH


def test_flipped_codec_byte_is_checksum_mismatch(good_frame):
    corrupted = bytearray(good_frame)
    corrupted[5] = Codec.BYTES
    assert decode_error(bytes(corrupted)).code is ErrorCode.PAYLOAD_CHECKSUM_MISMATCH


def test_flipped_crc_is_checksum_mismatch(good_frame):
    corrupted = bytearray(good_frame)
    corrupted[HEADER_SIZE - 1] ^= 0x80
    assert decode_error(bytes(corrupted)).code is ErrorCode.PAYLOAD_CHECKSUM_MISMATCH


def test_bad_magic_is_corrupt(good_frame):
    err = decode_error(b"XXXX" + good_frame[4:])
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert "bad magic" in str(err)


def test_bad_magic_with_valid_crc_is_corrupt():
    assert decode_error(make_frame(Codec.BYTES, b"x", magic=b"TQMD")).code is ErrorCode.CORRUPT_VALUE


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version_is_corrupt(version):
    err = decode_error(make_frame(Codec.BYTES, b"x", version=version))
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert f"version {version}" in str(err)


def test_extra_trailing_bytes_are_a_length_mismatch(good_frame):
    err = decode_error(good_frame + b"\x00")
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert "payload bytes" in str(err)


def test_wrong_length_field_is_corrupt(good_frame):
    corrupted = bytearray(good_frame)
    struct.pack_into("<Q", corrupted, 8, len(good_frame))
    assert decode_error(bytes(corrupted)).code is ErrorCode.CORRUPT_VALUE


def test_unknown_codec_with_valid_crc_is_corrupt():
    err = decode_error(make_frame(99, b""))
    assert err.code is ErrorCode.CORRUPT_VALUE
    assert "unknown codec 99" in str(err)


@pytest.mark.parametrize(
    ("codec_id", "payload"),
    [
        (Codec.MSGPACK, b"\xc1"),  # never-used msgpack byte
        (Codec.MSGPACK, b"\x92\x01"),  # truncated array
        (Codec.NDARRAY, b"\x93\xa3<f4\x91\x03\xc4\x04abcd"),  # 3 float32s announced, 4 bytes given
        (Codec.TENSOR, b"\x93\xa7float99\x90\xc4\x00"),  # unknown dtype
        (Codec.STR, b"\xff\xfe"),  # not UTF-8
    ],
)
def test_undecodable_payload_with_valid_crc_is_corrupt(codec_id, payload):
    assert decode_error(make_frame(codec_id, payload)).code is ErrorCode.CORRUPT_VALUE


def test_unknown_msgpack_extension_is_corrupt():
    import msgpack

    payload = msgpack.packb(msgpack.ExtType(42, b"data"))
    err = decode_error(make_frame(Codec.MSGPACK, payload))
    assert err.code is ErrorCode.CORRUPT_VALUE


def test_object_dtype_ndarray_frame_is_refused_without_unpickling():
    import msgpack

    payload = msgpack.packb(["|O", [1], b"\x00" * 8])
    assert decode_error(make_frame(Codec.NDARRAY, payload)).code is ErrorCode.CORRUPT_VALUE


def test_expected_crc_match_decodes(good_frame):
    assert decode(good_frame, expected_crc=frame_crc(good_frame)) == {"payload": [1, 2, 3], "name": "value"}


def test_expected_crc_mismatch_is_metadata_mismatch(good_frame):
    err = decode_error(good_frame, expected_crc=frame_crc(good_frame) ^ 1)
    assert err.code is ErrorCode.METADATA_MISMATCH


def test_intact_frame_of_another_value_fails_expected_crc():
    err = decode_error(encode("other"), expected_crc=frame_crc(encode("mine")))
    assert err.code is ErrorCode.METADATA_MISMATCH


def test_decode_accepts_memoryview_and_numpy_buffer(good_frame):
    assert decode(memoryview(good_frame)) == decode(good_frame)
    assert decode(memoryview(np.frombuffer(good_frame, dtype=np.uint8))) == decode(good_frame)


# ---------------------------------------------------------------------------------------------- pickle gate
class Custom:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Custom) and other.value == self.value


UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Bomb:
    """Unpickling this calls ``_record_unpickle``: observable code execution."""

    def __reduce__(self):
        return (_record_unpickle, ("boom",))


UNENCODABLE = [
    pytest.param({1, 2, 3}, id="set"),
    pytest.param(frozenset({"a"}), id="frozenset"),
    pytest.param(Custom(5), id="custom-class"),
    pytest.param(2**64, id="int-2**64"),
    pytest.param(-(2**63) - 1, id="int-below-int64"),
    pytest.param(10**30, id="huge-int"),
    pytest.param({"nested": [{1, 2}]}, id="nested-set"),
    pytest.param(complex(1, 2), id="complex"),
]


@pytest.mark.parametrize("value", UNENCODABLE)
def test_unencodable_values_raise_without_pickle(value):
    with pytest.raises(UnencodableValueError):
        encode(value)


def test_unencodable_value_error_is_a_type_error():
    assert issubclass(UnencodableValueError, TypeError)


def test_unencodable_message_names_the_type():
    with pytest.raises(UnencodableValueError, match="Custom"):
        encode(Custom(1))


@pytest.mark.parametrize("value", UNENCODABLE)
def test_unencodable_values_roundtrip_with_pickle(value):
    frame = encode(value, allow_pickle=True)
    assert header_codec(frame) == Codec.PICKLE
    assert decode(frame, allow_pickle=True) == value


def test_allow_pickle_does_not_change_encodable_values():
    assert encode({"a": 1}, allow_pickle=True) == encode({"a": 1})
    assert header_codec(encode([1, 2], allow_pickle=True)) == Codec.MSGPACK


def test_pickle_frame_refused_without_allow_pickle():
    frame = encode({1, 2}, allow_pickle=True)
    err = decode_error(frame)
    assert err.code is ErrorCode.PICKLE_NOT_ALLOWED


def test_pickle_frame_checked_before_refusal():
    corrupted = bytearray(encode({1, 2}, allow_pickle=True))
    corrupted[-1] ^= 0xFF
    assert decode_error(bytes(corrupted)).code is ErrorCode.PAYLOAD_CHECKSUM_MISMATCH


def test_pickle_bomb_is_live_when_pickle_is_allowed():
    UNPICKLED.clear()
    frame = encode(Bomb(), allow_pickle=True)
    assert decode(frame, allow_pickle=True) == "boom"
    assert UNPICKLED == ["boom"]


def test_pickle_bomb_never_runs_without_allow_pickle():
    UNPICKLED.clear()
    frame = encode(Bomb(), allow_pickle=True)
    err = decode_error(frame)
    assert err.code is ErrorCode.PICKLE_NOT_ALLOWED
    assert UNPICKLED == []


def test_hand_built_pickle_bomb_never_runs_without_allow_pickle():
    UNPICKLED.clear()
    payload = pickle.dumps(Bomb())
    for codec_id in (Codec.PICKLE, Codec.MSGPACK, Codec.NDARRAY, Codec.TENSOR, Codec.BYTES):
        try:
            decode(make_frame(codec_id, payload))
        except CodecError:
            pass
    assert UNPICKLED == []


def test_codec_module_exposes_dtype_helpers():
    assert codec.torch_dtype("bfloat16") is torch.bfloat16
    assert codec.torch_dtype("torch.float32") is torch.float32
    assert codec.torch_dtype(torch.int8) is torch.int8
    with pytest.raises(ValueError, match="unsupported dtype"):
        codec.torch_dtype("float128")


# ---------------------------------------------------------------------------------------- nesting depth
def nest(kind: str, depth: int, inner=None):
    """``inner`` in ``depth`` containers of ``kind`` (list, tuple, dict, key: a dict keyed by a tuple, mixed)."""
    value = inner
    for level in range(depth):
        k = "list tuple dict".split()[level % 3] if kind == "mixed" else kind
        value = {"list": lambda v: [v], "tuple": lambda v: (v,), "dict": lambda v: {"k": v}, "key": lambda v: (v,)}[k](
            value
        )
    return {value: 1} if kind == "key" else value


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "mixed"])
def test_values_nested_to_max_depth_roundtrip(kind):
    assert codec.MAX_DEPTH == 64
    value = nest(kind, codec.MAX_DEPTH, 7)
    assert roundtrip(value) == value


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "mixed", "key"])
@pytest.mark.parametrize("depth", [codec.MAX_DEPTH + 1, 200, 400, 20_000])
def test_values_nested_deeper_are_refused_before_recursing(kind, depth):
    value = nest(kind, depth)
    with pytest.raises(codec.NestingTooDeepError, match=r"more than MAX_DEPTH=64 deep") as info:
        encode(value)
    assert isinstance(info.value, TypeError) and info.value.__cause__ is None  # refused, not a RecursionError


def test_values_nested_deeper_are_pickled_when_pickle_is_allowed():
    value = nest("tuple", 300, "leaf")
    frame = encode(value, allow_pickle=True)
    assert header_codec(frame) == Codec.PICKLE
    assert decode(frame, allow_pickle=True) == value


def test_cyclic_values_are_refused_at_once_or_pickled():
    cycle: list = [1]
    cycle.append(cycle)
    wide: list = []
    wide.extend([wide] * 1000)  # a naive walk would visit 1000**64 members
    for value in (cycle, wide):
        with pytest.raises(codec.NestingTooDeepError):
            encode(value)
    got = roundtrip(cycle, allow_pickle=True)
    assert got[0] == 1 and got[1] is got


def shared(depth: int) -> list:
    """``depth`` lists, each holding the next twice: 2**depth paths through ``depth`` distinct containers."""
    value: list = []
    for _ in range(depth - 1):
        value = [value, value]
    return value


@pytest.mark.parametrize(
    ("value", "depth"),
    [
        (1, 0),
        ([], 1),
        ([1, "x"], 1),
        ([[]], 2),
        ({"a": [1, (2,)]}, 3),
        ({(1,): 0}, 2),
        ([[1]] * 1000, 2),
        (shared(64), 64),
        (shared(65), 65),
        ([list(range(100)), [[1]] * 100], 3),
    ],  # fmt: skip
)
def test_nests_deeper_than_counts_containers(value, depth):
    assert not codec.nests_deeper_than(value, depth)
    assert codec.nests_deeper_than(value, depth - 1) == (depth > 0)


def _ext_header(code: int, n: int) -> bytes:
    if n < 1 << 8:
        return struct.pack(">BBb", 0xC7, n, code)
    if n < 1 << 16:
        return struct.pack(">BHb", 0xC8, n, code)
    return struct.pack(">BIb", 0xC9, n, code)


def crafted_tuples(depth: int, inner: bytes = b"") -> bytes:
    """msgpack bytes of ``depth`` tuples nested by hand (each an extension holding its child), the innermost holding
    ``inner`` (msgpack bytes of one value, or nothing): O(depth) to build, unlike packing level by level."""
    parts, n = [], 0
    body = b"\x91" + inner if inner else b"\x90"
    n = len(body)
    for level in range(depth):
        header = _ext_header(3, n)
        parts.append(header)
        n += len(header)
        if level < depth - 1:
            parts.append(b"\x91")
            n += 1
    return b"".join(reversed(parts)) + body


def test_crafted_tuples_are_what_the_encoder_writes():
    assert decode(make_frame(Codec.MSGPACK, crafted_tuples(5))) == nest("tuple", 4, ())
    arr = np.arange(3, dtype=np.int16)
    ext = msgpack_ext(1, encode(arr)[HEADER_SIZE:])
    got = decode(make_frame(Codec.MSGPACK, crafted_tuples(3, ext)))
    assert_array_equal(got[0][0][0], arr)


def msgpack_ext(code: int, data: bytes) -> bytes:
    return _ext_header(code, len(data)) + data


DEEP_FRAMES = {
    # name: (msgpack payload, what decode must give: "ok" or an error code's name)
    "tuples at the limit": (crafted_tuples(64), "ok"),
    "tuples past the limit": (crafted_tuples(65), "CORRUPT_VALUE"),
    "tuples 300 deep (crashed the reader at ~195)": (crafted_tuples(300), "CORRUPT_VALUE"),
    "tuples 20000 deep": (crafted_tuples(20_000), "CORRUPT_VALUE"),
    "lists at the limit": (b"\x91" * 63 + b"\x90", "ok"),
    "lists past the limit": (b"\x91" * 64 + b"\x90", "CORRUPT_VALUE"),
    "lists 1000 deep (within msgpack's stack)": (b"\x91" * 1000 + b"\xc0", "CORRUPT_VALUE"),
    "lists 100000 deep (past msgpack's stack)": (b"\x91" * 100_000 + b"\xc0", "CORRUPT_VALUE"),
    "dicts past the limit": (b"\x81\xa1k" * 65 + b"\xc0", "CORRUPT_VALUE"),
    "dicts 100000 deep": (b"\x81\xa1k" * 100_000 + b"\xc0", "CORRUPT_VALUE"),
    "tuple keys past the limit": (b"\x81" + crafted_tuples(65) + b"\x01", "CORRUPT_VALUE"),
    "60 tuples of 1000 lists": (crafted_tuples(60, b"\x91" * 1000 + b"\xc0"), "CORRUPT_VALUE"),
    "an array under 63 tuples": (crafted_tuples(63, msgpack_ext(1, encode(np.arange(3))[HEADER_SIZE:])), "ok"),
    "deep lists in an array's payload": (msgpack_ext(1, b"\x93" + b"\x91" * 5000), "CORRUPT_VALUE"),
}

_DECODE_IN_A_SMALL_THREAD = """
import json, sys, threading
from tq_mooncake.client import codec
frames = [bytes.fromhex(h) for h in json.load(sys.stdin)]
out = []
def run():
    for frame in frames:
        try:
            codec.decode(frame)
            out.append("ok")
        except codec.CodecError as exc:
            out.append(exc.code.name)
        print(out[-1], file=sys.stderr, flush=True)
threading.stack_size(256 << 10)  # far below the usual 8 MiB: the decoder's C stack must stay bounded
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps(out))
"""


def test_crafted_deep_frames_fail_as_corrupt_and_never_crash_the_reader():
    """Decoded in a child process (a crash fails this test instead of killing pytest), in a thread with a 256 KiB
    stack."""
    import json
    import subprocess
    import sys

    frames = [make_frame(Codec.MSGPACK, payload).hex() for payload, _ in DEEP_FRAMES.values()]
    child = subprocess.run(
        [sys.executable, "-c", _DECODE_IN_A_SMALL_THREAD], input=json.dumps(frames), capture_output=True, text=True
    )
    done = child.stderr.split()
    assert child.returncode == 0, f"the reader died (rc {child.returncode}) after {done}: {child.stderr[-2000:]}"
    got = dict(zip(DEEP_FRAMES, json.loads(child.stdout), strict=True))
    assert got == {name: want for name, (_, want) in DEEP_FRAMES.items()}


# ------------------------------------------------------------------------------------ every torch dtype
ALL_TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
STORABLE = set(codec.TORCH_DTYPES.values())
BIG = 1 << 30


def quantized(dtype: torch.dtype) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.empty(0, dtype=dtype).is_quantized


def any_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` holding arbitrary bytes (quantized dtypes: floats quantized)."""
    n = math.prod(shape)
    if quantized(dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(torch.rand(n).reshape(shape), 0.1, 0, dtype)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return codec.tensor_from_bytes(raw.numpy().tobytes(), dtype, list(shape))


def raw_put_bytes(value, allow_pickle: bool = False) -> tuple[dict, bytes]:
    """What ``put`` would write for ``value``: its metadata and the bytes at the item's pointer."""
    item = plans.prepare_put("k", value, allow_pickle, BIG)
    return item.meta, ctypes.string_at(item.ptr, item.size)


def test_every_dtype_but_the_quantized_ones_is_storable():
    assert len(ALL_TORCH_DTYPES) > 40  # torch 2.13: 46
    assert {dt for dt in ALL_TORCH_DTYPES if dt not in STORABLE} == {dt for dt in ALL_TORCH_DTYPES if quantized(dt)}
    assert {torch.complex32, torch.int4, torch.uint7, torch.bits8, torch.float4_e2m1fn_x2} <= STORABLE


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_every_torch_dtype_roundtrips_or_is_refused(dtype):
    t, empty = any_tensor(dtype), any_tensor(dtype, (0, 3))
    values = {"frame": empty, "nested": {"x": t, "y": [empty, (t.T,)]}, "0-d": {"s": t[0, 1]}}
    if dtype not in STORABLE:
        for value in (t, empty, *values.values()):
            with pytest.raises(UnencodableValueError, match=f"dtype {dtype}"):
                encode(value)
            with pytest.raises(TypeError, match=f"value for key 'k': tensors of dtype {dtype}"):
                plans.prepare_put("k", value, False, BIG)
        return
    for name, value in values.items():
        assert same_value(roundtrip(value), value), name
    for raw in (t, t.T, t[:, 1]):  # the raw path, from the tensor's memory or a contiguous copy
        meta, stored = raw_put_bytes(raw)
        assert meta == {
            "nbytes": raw.numel() * dtype.itemsize,
            "dtype": codec.dtype_name(dtype),
            "shape": list(raw.shape),
        }
        got = codec.tensor_from_bytes(stored, codec.torch_dtype(meta["dtype"]), meta["shape"])
        assert same_value(got, raw)
    plan = plans.plan_get("k", None, None, meta, max_value_bytes=BIG)
    assert (plan.dtype, plan.shape) == (dtype, tuple(meta["shape"]))


# ------------------------------------------------------------------------------- conjugate and negative views
def lazy_views() -> dict[str, torch.Tensor]:
    z = torch.tensor([[1 + 2j, -3.5 - 0.25j], [0j, 4j]], dtype=torch.complex64)
    f = torch.tensor([[1.5, -2.0], [0.0, 3.0]])
    return {
        "conj": z.conj(),
        "conj complex128": z.to(torch.complex128).conj(),
        "conj complex32": z.to(torch.complex32).conj(),
        "neg": f._neg_view(),
        "neg complex": z._neg_view(),
        "conj of neg": z._neg_view().conj(),
        "conj transposed": z.T.conj(),
        "neg column": f[:, 1]._neg_view(),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(lazy_views()))
def test_conjugate_and_negative_views_are_stored_resolved(name):
    view = lazy_views()[name]
    assert view.is_conj() or view.is_neg()
    want = view.resolve_conj().resolve_neg()  # torch's own materialisation
    meta, stored = raw_put_bytes(view)
    got = codec.tensor_from_bytes(stored, codec.torch_dtype(meta["dtype"]), meta["shape"])
    assert same_value(got, want) and not got.is_conj() and not got.is_neg()
    for value in ({"v": view}, [view[:0]], (view,)):
        assert same_value(roundtrip(value), resolved(value))
    if view.dtype != torch.complex32:  # torch.equal has no complex32 kernel
        assert torch.equal(got, view)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", sorted(STORABLE, key=str), ids=str)
def test_a_negative_view_of_any_dtype_roundtrips_or_is_refused(dtype):
    view = any_tensor(dtype, (3,))._neg_view()
    try:
        want = view.resolve_neg()
    except RuntimeError:  # torch cannot negate this dtype (bool, float8, int4, uint16, ...)
        for value in (view, {"v": view}):
            with pytest.raises(TypeError, match=r"value for key 'k': tensor of .* could not be copied: .*neg"):
                plans.prepare_put("k", value, False, BIG)
        return
    assert same_value(roundtrip({"v": view})["v"], want)
    meta, stored = raw_put_bytes(view)
    assert stored == bytes(codec.tensor_bytes(want))


def resolved(value):
    """``value`` with every tensor in it materialised (conjugate and negative bits resolved)."""
    if isinstance(value, torch.Tensor):
        return value.resolve_conj().resolve_neg()
    if isinstance(value, dict):
        return {k: resolved(v) for k, v in value.items()}
    return type(value)(resolved(v) for v in value)


# ------------------------------------------------------------------------ tensors that are not dense data
class PlainTensorSubclass(torch.Tensor):
    pass


def _masked():
    from torch.masked import masked_tensor

    return masked_tensor(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]))


NOT_DENSE = {
    "sparse_coo": lambda: torch.eye(3).to_sparse(),
    "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
    "sparse_csc": lambda: torch.eye(3).to_sparse_csc(),
    "sparse_bsr": lambda: torch.eye(2).to_sparse_bsr((1, 1)),
    "sparse_bsc": lambda: torch.eye(2).to_sparse_bsc((1, 1)),
    "mkldnn": lambda: torch.ones(2, 2).to_mkldnn(),
    "meta": lambda: torch.empty(3, device="meta"),
    "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    "nested jagged": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
    "masked": _masked,
    "subclass": lambda: torch.arange(3.0).as_subclass(PlainTensorSubclass),
    "quantized": lambda: any_tensor(torch.qint8),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(NOT_DENSE))
def test_tensors_that_are_not_dense_data_are_refused_or_pickled(name):
    t = NOT_DENSE[name]()
    for value in (t, {"v": t}, [1, (t,)]):
        with pytest.raises(UnencodableValueError):
            encode(value)
        with pytest.raises(TypeError, match=r"value for key 'k': .*set allow_pickle: true"):
            plans.prepare_put("k", value, False, BIG)
        try:  # with pickle: the same tensor back (type, layout, values), or still a TypeError
            meta, stored = raw_put_bytes(value, allow_pickle=True)
        except TypeError as exc:
            assert "value for key 'k': cannot be pickled" in str(exc) and "allow_pickle" not in str(exc)
            continue
        assert "crc32" in meta and header_codec(stored) == Codec.PICKLE
        got = decode(stored, allow_pickle=True)
        assert type(got) is type(value) and same_repr(got, value)


def same_repr(a, b) -> bool:
    """Equal reprs (values, layout, device), but for the symbolic sizes (j1, j2, ...) jagged tensors number anew."""
    return re.sub(r"\bj\d+\b", "j", repr(a)) == re.sub(r"\bj\d+\b", "j", repr(b))


def test_a_parameter_is_stored_as_its_data():
    p = torch.nn.Parameter(torch.arange(4.0))
    meta, stored = raw_put_bytes(p)
    assert meta["dtype"] == "float32" and stored == bytes(codec.tensor_bytes(p.detach()))
    got = roundtrip({"p": p, "empty": torch.nn.Parameter(torch.empty(0))})
    assert type(got["p"]) is torch.Tensor and torch.equal(got["p"], p.detach()) and not got["p"].requires_grad


# ------------------------------------------------------------------------------------- numpy subclasses
class MyArray(np.ndarray):
    pass


class MyFloat(np.float64):
    pass


NUMPY_SUBCLASSES = {
    "masked array": lambda: np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]),
    "matrix": lambda: np.matrix([[1, 2], [3, 4]]),
    "recarray": lambda: np.rec.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    "ndarray subclass": lambda: np.arange(3).view(MyArray),
    "scalar subclass": lambda: MyFloat(1.5),
}


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("name", list(NUMPY_SUBCLASSES))
def test_numpy_subclasses_are_refused_or_pickled_faithfully(name):
    a = NUMPY_SUBCLASSES[name]()
    for value in (a, {"v": a}, (a,)):
        with pytest.raises(UnencodableValueError, match=type(a).__name__):
            encode(value)
        with pytest.raises(TypeError, match=f"value for key 'k': numpy .*{type(a).__name__}"):
            plans.prepare_put("k", value, False, BIG)
    got = roundtrip({"v": a}, allow_pickle=True)["v"]
    if isinstance(a, np.ndarray):
        assert type(got) is type(a) and repr(got) == repr(a)
    else:  # pickle itself keeps a numpy scalar's value, not its subclass
        assert got == a and type(got) is np.float64
    if isinstance(a, np.ma.MaskedArray):
        assert got.mask.tolist() == [False, True, False]


def test_a_memmap_is_refused(tmp_path):
    m = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(4,))
    with pytest.raises(UnencodableValueError, match="memmap"):
        encode({"m": m})
    with pytest.raises(UnencodableValueError, match="memmap"):
        encode(m)


# ------------------------------------------------------------------------------------ pickle failures
def test_a_value_pickle_cannot_hold_is_a_type_error():
    with pytest.raises(UnencodableValueError, match="cannot be pickled: (PicklingError|AttributeError)"):
        encode(lambda: 1, allow_pickle=True)
    with pytest.raises(TypeError, match=r"^value for key 'k': cannot be pickled: .*[^)]$"):
        plans.prepare_put("k", [lambda: 1], True, BIG)


# --------------------------------------------------------------------------------- get plans: sizes, dims
def test_get_refuses_metadata_and_shapes_beyond_max_value_bytes():
    frame_meta = {"nbytes": 1 << 40, "crc32": 1}
    with pytest.raises(ValueError, match=r"custom_backend_meta for key 'k' says 1099511627776 bytes, more than max"):
        plans.plan_get("k", None, None, frame_meta, max_value_bytes=BIG)
    tensor_meta = {"nbytes": 1 << 40, "dtype": "uint8", "shape": [1 << 40]}
    with pytest.raises(ValueError, match=r"says 1099511627776 bytes, more than max_value_bytes=1073741824"):
        plans.plan_get("k", None, None, tensor_meta, max_value_bytes=BIG)
    with pytest.raises(ValueError, match=r"shape \[274877906944\] of torch.float32 for key 'k' is 1099511627776 bytes"):
        plans.plan_get("k", [1 << 38], torch.float32, None, max_value_bytes=BIG)
    assert plans.plan_get("k", [256], torch.float32, None, max_value_bytes=1024).size == 1024  # at the limit
    assert plans.plan_get("k", None, None, {"nbytes": 1024, "crc32": 1}, max_value_bytes=1024).size == 1024


def test_get_refuses_dimensions_torch_cannot_hold_and_unstorable_dtypes():
    with pytest.raises(ValueError, match=r"shape for key 'k' must hold non-negative ints \(below 2\*\*63\)"):
        plans.plan_get("k", [0, 1 << 63], torch.float32, None, max_value_bytes=BIG)
    with pytest.raises(ValueError, match=r"is not metadata returned by put"):
        plans.plan_get("k", None, None, {"nbytes": 1, "dtype": "uint8", "shape": [1, 1 << 64]}, max_value_bytes=BIG)
    with pytest.raises(ValueError, match=r"dtype for key 'k': unsupported dtype torch.qint8"):
        plans.plan_get("k", [2], torch.qint8, None, max_value_bytes=BIG)
    with pytest.raises(ValueError, match=r"is not metadata returned by put"):
        plans.plan_get("k", None, None, {"nbytes": 2, "dtype": "qint8", "shape": [2]}, max_value_bytes=BIG)


def test_shapes_without_a_dtype_read_a_frame():
    """TQ passes shapes for non-tensor fields too: without a dtype (asked for or in the metadata) a key is read as a
    frame, so a raw tensor read that way fails with CORRUPT_VALUE (see test_bad_input for the store)."""
    plan = plans.plan_get("k", [3, 4], None, None, max_value_bytes=BIG)
    assert plan.kind is plans.ReadKind.FRAME and plan.size is None and plan.dtype is None
