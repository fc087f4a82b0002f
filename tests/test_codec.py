"""Value frames: round trips of every supported type, corruption detection, and the pickle gate."""

from __future__ import annotations

import enum
import math
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from tq_mooncake.client import ErrorCode, codec
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
        assert decode_error(bytes(corrupted)).code is ErrorCode.CHECKSUM_MISMATCH


def test_flipped_codec_byte_is_checksum_mismatch(good_frame):
    corrupted = bytearray(good_frame)
    corrupted[5] = Codec.BYTES
    assert decode_error(bytes(corrupted)).code is ErrorCode.CHECKSUM_MISMATCH


def test_flipped_crc_is_checksum_mismatch(good_frame):
    corrupted = bytearray(good_frame)
    corrupted[HEADER_SIZE - 1] ^= 0x80
    assert decode_error(bytes(corrupted)).code is ErrorCode.CHECKSUM_MISMATCH


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


def test_expected_crc_mismatch_is_checksum_mismatch(good_frame):
    err = decode_error(good_frame, expected_crc=frame_crc(good_frame) ^ 1)
    assert err.code is ErrorCode.CHECKSUM_MISMATCH


def test_intact_frame_of_another_value_fails_expected_crc():
    err = decode_error(encode("other"), expected_crc=frame_crc(encode("mine")))
    assert err.code is ErrorCode.CHECKSUM_MISMATCH


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
    assert decode_error(bytes(corrupted)).code is ErrorCode.CHECKSUM_MISMATCH


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
