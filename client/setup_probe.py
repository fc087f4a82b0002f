"""Before Mooncake's ``setup()``: does the peer at each configured address speak what Mooncake will speak to it?

A live port is not proof of a master. Mooncake's ``setup()`` makes up to 20 attempts of its own
(``MC_STORE_CLIENT_SETUP_RETRIES``), each waiting on the peer (coro_rpc's 30 s request timeout, curl's 3 s,
etcd's 5 s dial and retries), and it holds the GIL throughout, so nothing in this process can end it early.
Measured with ``setup_timeout_s`` of 2-5 s before these probes: the master's HTTP port, a server that accepts
and says nothing, one that sends garbage and one that closes each kept ``setup()`` going for more than 480 s;
an HTTP server that sent only ``HTTP/1.1 200 OK\\r\\n`` 122 s; ``etcd://127.0.0.1:1`` and an endpoint that
sent only an HTTP/2 SETTINGS frame 202 s. So every peer is asked one whole, small request first, all under
one deadline, and passes only on a whole answer:

* master: a 20-byte coro_rpc request header (magic 21, function id 0, no body). A real ``mooncake_master``
  answers at once with a 16-byte coro_rpc response header (magic 21, our sequence number, error 11,
  ``function_not_registered``) and the message it announces ("the rpc function not registered"). Nothing
  is run.
* an http(s) metadata server: ``GET <path>?key=<probe key>``, as Mooncake's HTTP plugin reads keys; the
  answer must be a 200 or a 404 (a missing key) with complete headers and its whole body (to its
  ``Content-Length``, the end of a chunked body, or the server closing).
* etcd: a gRPC call over HTTP/2, as etcd's client makes it: ``etcdserverpb.KV/Range`` of the probe key
  (``count_only``; a linearizable read, so an etcd without a leader does not pass). The answer must be
  HTTP/2 with response headers, the end of the stream, and a gRPC status: 0 with one well-formed
  ``RangeResponse``, or an error etcd gives about the request (auth, say). UNIMPLEMENTED (not etcd),
  UNAVAILABLE and DEADLINE_EXCEEDED (an etcd that cannot serve) fail. One answering endpoint is enough.

The verdicts (``judge_*``) are pure functions of the bytes read so far; ``run_probe`` does the bounded I/O
(non-blocking sockets and ``select``; a host name is resolved in a helper thread so that a slow resolver is
bounded too). An answer is read to at most ``MAX_ANSWER_BYTES``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .config import ClientConfig, etcd_endpoints, http_endpoint, parse_host_port

MAX_ANSWER_BYTES = 256 << 10  # no answer to a probe is larger: a peer sending more is not one of ours
PROBE_KEY = "tq-mooncake-setup-probe"

CORO_RPC_MAGIC = 21
CORO_RPC_FUNCTION_NOT_REGISTERED = 11
_CORO_RPC_SEQ = 0x5154_4D43  # "TQMC" read as a little-endian u32; the master echoes it
# magic, version, serialize_type, msg_type, seq_num, function_id (0: none), body length, attachment length
CORO_RPC_REQUEST = struct.pack("<BBBBIIII", CORO_RPC_MAGIC, 0, 0, 0, _CORO_RPC_SEQ, 0, 0, 0)
_CORO_RPC_RESPONSE = struct.Struct("<BBBBIII")  # magic, version, err_code, msg_type, seq_num, length, attach

H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_PUSH_PROMISE, H2_GOAWAY, H2_CONTINUATION = 0, 1, 3, 4, 5, 7, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
H2_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE: the probe leaves it at its default
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ETCD_RANGE_PATH = "/etcdserverpb.KV/Range"
GRPC_CODES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS "
    "UNAUTHENTICATED"
).split()
_GRPC_NOT_ETCD = 12  # UNIMPLEMENTED: a gRPC server without etcd's KV service
_GRPC_CANNOT_SERVE = (4, 14)  # DEADLINE_EXCEEDED, UNAVAILABLE: etcd there, no leader or quorum to read from


@dataclass(frozen=True)
class Verdict:
    """What a peer's answer says: ``ok`` or not, and in words."""

    ok: bool
    detail: str


Judge = Callable[[bytes, bool], Verdict | None]
"""``judge(data, eof)``: the verdict on the bytes read so far, or None to read more (never None at eof)."""


def _first_bytes(data: bytes) -> str:
    return repr(bytes(data[:24])) + ("..." if len(data) > 24 else "")


# ------------------------------------------------------------------------------------------------ coro_rpc
def judge_coro_rpc(data: bytes, eof: bool) -> Verdict | None:
    """A coro_rpc response to ``CORO_RPC_REQUEST``: magic 21, our sequence number, error 11 (function not
    registered) and the non-empty error message the header announces, all of it."""
    if data and data[0] != CORO_RPC_MAGIC:
        return Verdict(
            False, f"answered bytes that are not coro_rpc (a mooncake_master speaks it): {_first_bytes(data)}"
        )
    if len(data) < _CORO_RPC_RESPONSE.size:
        if eof:
            said = f"after {len(data)} byte(s) " if data else "without answering "
            return Verdict(False, f"closed the connection {said}a coro_rpc request (not a mooncake_master)")
        return None
    _magic, _version, err_code, _msg_type, seq, length, attach = _CORO_RPC_RESPONSE.unpack_from(data)
    if seq != _CORO_RPC_SEQ:
        return Verdict(False, f"answered a coro_rpc header for another request (sequence {seq:#x})")
    if err_code != CORO_RPC_FUNCTION_NOT_REGISTERED:
        return Verdict(
            False,
            f"answered coro_rpc error code {err_code} to a call of no function (a mooncake_master answers "
            f"{CORO_RPC_FUNCTION_NOT_REGISTERED}, function not registered)",
        )
    body = length + attach
    if length == 0 or body > MAX_ANSWER_BYTES:
        return Verdict(
            False,
            f"answered a coro_rpc header announcing a {length}-byte error message and {attach} byte(s) attached "
            "(a mooncake_master sends its message, 'the rpc function not registered')",
        )
    if len(data) >= _CORO_RPC_RESPONSE.size + body:
        return Verdict(True, f"answered coro_rpc, error code {err_code} (function not registered)")
    if eof:
        got = len(data) - _CORO_RPC_RESPONSE.size
        return Verdict(False, f"closed the connection after {got} of the {body} byte(s) its coro_rpc header announced")
    return None


# -------------------------------------------------------------------------------------------------- HTTP/1
_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[\t ]*(.*?)[\t ]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:[\t ]*;[^\r\n]*)?")


def judge_http(data: bytes, eof: bool) -> Verdict | None:
    """A whole HTTP/1.x answer from a metadata server: status 200 or 404, headers ending in an empty line,
    and the body to its ``Content-Length``, to the end of a chunked body, or, with neither, to the close."""
    prefix = b"HTTP/1."
    if data[: len(prefix)] != prefix[: len(data)]:
        return Verdict(False, f"answered bytes that are not HTTP: {_first_bytes(data)}")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if not eof:
            return None
        if b"\r\n" not in data:
            return Verdict(False, "closed the connection without an HTTP answer")
        return Verdict(False, "closed the connection before the end of its HTTP headers")
    status_line, *lines = data[:end].decode("latin-1").split("\r\n")
    said = f"answered {status_line!r}"
    status = _STATUS_LINE.fullmatch(status_line)
    if status is None:
        return Verdict(False, f"answered a malformed HTTP status line: {status_line[:60]!r}")
    if status.group(1) not in ("200", "404"):
        return Verdict(False, f"{said} (a metadata server answers a key's GET with 200 or 404)")
    headers: dict[str, list[str]] = {}
    for line in lines:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:
            return Verdict(False, f"{said} with a malformed header line: {line[:60]!r}")
        headers.setdefault(field.group(1).lower(), []).append(field.group(2))
    body = data[end + 4 :]
    if "transfer-encoding" in headers:
        if [v.lower() for v in headers["transfer-encoding"]] != ["chunked"] or "content-length" in headers:
            return Verdict(False, f"{said} with a transfer coding other than chunked (or with a Content-Length)")
        problem = _chunked_problem(body)
        if problem is None:
            return Verdict(True, said)
        if problem:
            return Verdict(False, f"{said} with a malformed chunked body ({problem})")
        return Verdict(False, f"{said} and closed the connection inside its chunked body") if eof else None
    if "content-length" in headers:
        lengths = set(headers["content-length"])
        size = lengths.pop()
        if lengths or not (size.isascii() and size.isdigit()) or int(size) > MAX_ANSWER_BYTES:
            return Verdict(False, f"{said} with an unusable Content-Length {headers['content-length']}")
        if len(body) >= int(size):
            return Verdict(True, said)
        return (
            Verdict(False, f"{said} and closed the connection after {len(body)} of its {size}-byte body")
            if eof
            else None
        )
    return Verdict(True, said) if eof else None  # the body runs to the close (the probe asked for Connection: close)


def _chunked_problem(body: bytes) -> str | None:
    """None if ``body`` is a whole chunked body (last chunk and trailers included), "" if it is incomplete so
    far, else what is wrong with it."""
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return "" if len(body) - pos <= 64 else "a chunk-size line without an end"
        size_line = _CHUNK_SIZE.fullmatch(body, pos, eol)
        if size_line is None:
            return f"chunk-size line {bytes(body[pos:eol][:40])!r}"
        size, pos = int(size_line.group(1), 16), eol + 2
        if size == 0:
            if body[pos : pos + 2] == b"\r\n" or body.find(b"\r\n\r\n", pos) >= 0:
                return None
            return ""
        if len(body) < pos + size + 2:
            return ""
        if body[pos + size : pos + size + 2] != b"\r\n":
            return "a chunk longer than its size"
        pos += size + 2


# ------------------------------------------------------------------------------------- etcd: gRPC over HTTP/2
def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """``value`` as an HPACK integer with a ``prefix``-bit prefix; ``first`` holds the first byte's other bits."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 0x80:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    return bytes(out + bytes((value,)))


def _hpack_literal(index: int, value: str, name: str = "") -> bytes:
    """A header field literal without indexing, no Huffman: the name by static ``index``, or ``name`` (index 0)."""
    named = _hpack_int(index, 4) + (_hpack_int(len(name), 7) + name.encode("latin-1") if not index else b"")
    return named + _hpack_int(len(value), 7) + value.encode("latin-1")


def grpc_request(authority: str, path: str, message: bytes) -> bytes:
    """The HTTP/2 client preface, an empty SETTINGS frame and one unary gRPC call on stream 1: HEADERS
    (POST ``path``, http, ``authority``, application/grpc, te: trailers), then ``message`` in one DATA frame
    that ends the stream."""
    headers = (
        b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
        + _hpack_literal(4, path)  # :path
        + _hpack_literal(1, authority)  # :authority
        + _hpack_literal(31, "application/grpc")  # content-type
        + _hpack_literal(0, "trailers", name="te")
    )
    data = b"\x00" + struct.pack(">I", len(message)) + message  # not compressed, length, message
    return (
        H2_PREFACE
        + h2_frame(H2_SETTINGS, 0, 0, b"")
        + h2_frame(H2_HEADERS, _END_HEADERS, 1, headers)
        + h2_frame(H2_DATA, _END_STREAM, 1, data)
    )


def etcd_range_request(authority: str) -> bytes:
    """``etcdserverpb.KV/Range`` of ``PROBE_KEY`` with ``count_only`` (RangeRequest fields 1 and 9)."""
    key = PROBE_KEY.encode()
    return grpc_request(authority, ETCD_RANGE_PATH, b"\x0a" + bytes((len(key),)) + key + b"\x48\x01")


class _Refused(Exception):
    """The answer so far cannot be a good one; the reason in words."""


def judge_etcd(data: bytes, eof: bool) -> Verdict | None:
    """etcd's answer to ``etcd_range_request``: HTTP/2 opened by a SETTINGS frame, then on stream 1 response
    headers (:status 200, application/grpc), the end of the stream and a gRPC status; see the module's
    docstring for the statuses that pass."""
    if len(data) >= 4 and data[3] != H2_SETTINGS:
        return Verdict(False, f"answered bytes that are not HTTP/2 (gRPC, as etcd speaks): {_first_bytes(data)}")
    try:
        answer = _h2_answer(data)
        if answer is None:
            if eof:
                return Verdict(False, "closed the connection before a whole gRPC answer (not an etcd endpoint)")
            return None
        return _judge_range(*answer)
    except _Refused as refused:
        return Verdict(False, str(refused))


def _h2_answer(data: bytes) -> tuple[list[bytes], bytes] | None:
    """The header blocks and the DATA of stream 1 once the stream has ended (None until then); _Refused for
    frames an HTTP/2 server answering one call cannot send."""
    pos, blocks, body = 0, [], bytearray()
    pending: bytearray | None = None  # a header block awaiting CONTINUATION frames
    ends = False  # whether that header block ends the stream
    while pos + 9 <= len(data):
        length, kind, flags = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
        if pos == 0 and (kind != H2_SETTINGS or stream or flags & _ACK):
            raise _Refused("answered HTTP/2 without opening with its SETTINGS frame (not an etcd endpoint)")
        if length > H2_MAX_FRAME:
            raise _Refused(f"sent an HTTP/2 frame of {length} bytes, above the {H2_MAX_FRAME} allowed")
        if pos + 9 + length > len(data):
            return None
        payload, pos = data[pos + 9 : pos + 9 + length], pos + 9 + length
        if pending is not None and (kind != H2_CONTINUATION or stream != 1):
            raise _Refused("broke off an HTTP/2 header block (a frame other than its CONTINUATION)")
        if stream == 0:
            if kind == H2_GOAWAY:
                code, debug = int.from_bytes(payload[4:8], "big"), bytes(payload[8:80])
                raise _Refused(f"closed HTTP/2 with GOAWAY (error code {code}{f': {debug!r}' if debug else ''})")
            if kind in (H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_PUSH_PROMISE, H2_CONTINUATION):
                raise _Refused(f"sent an HTTP/2 frame of type {kind} on stream 0")
            continue  # SETTINGS, PING, WINDOW_UPDATE, PRIORITY and unknown types: nothing to answer
        if stream != 1:
            raise _Refused(f"answered on HTTP/2 stream {stream}, not on the request's stream 1")
        if kind == H2_HEADERS:
            pending, ends = bytearray(_unpad(payload, flags, 5 if flags & _PRIORITY else 0)), bool(flags & _END_STREAM)
        elif kind == H2_CONTINUATION:
            if pending is None:
                raise _Refused("sent an HTTP/2 CONTINUATION frame without a header block")
            pending += payload
        elif kind == H2_DATA:
            if not blocks:
                raise _Refused("sent gRPC data before its response headers")
            body += _unpad(payload, flags, 0)
            if flags & _END_STREAM:
                return blocks, bytes(body)
        elif kind == H2_RST_STREAM:
            raise _Refused(f"reset the gRPC call (HTTP/2 error code {int.from_bytes(payload[:4], 'big')})")
        elif kind == H2_PUSH_PROMISE:
            raise _Refused("pushed an HTTP/2 stream instead of answering the gRPC call")
        if kind in (H2_HEADERS, H2_CONTINUATION) and flags & _END_HEADERS and pending is not None:
            blocks.append(bytes(pending))
            pending = None
            if ends:
                return blocks, bytes(body)
    return None


def _unpad(payload: bytes, flags: int, skip: int) -> bytes:
    """A DATA or HEADERS payload without its padding (and the ``skip`` bytes of priority after the pad length)."""
    pad = payload[0] if flags & _PADDED and payload else 0
    start = (1 if flags & _PADDED else 0) + skip
    if start + pad > len(payload):
        raise _Refused("sent a malformed HTTP/2 frame (padding longer than the frame)")
    return payload[start : len(payload) - pad]


def _judge_range(blocks: list[bytes], body: bytes) -> Verdict:
    decoder = _Hpack()
    try:
        fields = [dict(decoder.decode(block)) for block in blocks]
    except _HpackError as exc:
        return Verdict(False, f"sent a malformed HTTP/2 header block ({exc})")
    head, trailers = fields[0], fields[-1]  # the same block for a trailers-only answer
    if head.get(":status") != "200":
        return Verdict(False, f"answered HTTP/2 status {head.get(':status')!r}, not gRPC (as etcd speaks)")
    if not head.get("content-type", "").startswith("application/grpc"):
        return Verdict(False, f"answered HTTP/2 content-type {head.get('content-type')!r}, not gRPC")
    status = trailers.get("grpc-status", "")
    if not (status.isascii() and status.isdigit() and len(status) <= 3):
        return Verdict(False, f"ended a gRPC answer without a gRPC status (grpc-status {status!r})")
    code = int(status)
    named = f"gRPC status {code} ({GRPC_CODES[code] if code < len(GRPC_CODES) else 'unknown'}"
    message = unquote(trailers.get("grpc-message", ""))[:120]
    named += f": {message!r})" if message else ")"
    if code == 0:
        problem = _range_response_problem(body)
        if problem:
            return Verdict(False, f"answered {named} with {problem} (not etcd)")
        return Verdict(True, f"answered a KV Range with {named}")
    if code == _GRPC_NOT_ETCD:
        return Verdict(False, f"answered {named}: a gRPC server without etcd's KV service")
    if code in _GRPC_CANNOT_SERVE:
        return Verdict(False, f"answered {named}: etcd cannot serve a read (no leader or no quorum?)")
    return Verdict(True, f"answered a KV Range with {named}")


def _range_response_problem(body: bytes) -> str:
    """ "" if ``body`` is one uncompressed gRPC message holding a protobuf with a header (field 1, as in every
    etcd response), else what it is instead."""
    if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        return f"{len(body)} byte(s) that are not one gRPC message"
    if body[0] != 0:
        return "a compressed gRPC message it was not asked for"
    fields = _protobuf_fields(body[5:])
    if fields is None:
        return "a gRPC message that is not protobuf"
    if fields.get(1) != 2:
        return "a protobuf message without a response header"
    return ""


def _protobuf_fields(data: bytes) -> dict[int, int] | None:
    """``{field number: wire type}`` of a protobuf message's top-level fields; None if it is malformed."""
    fields: dict[int, int] = {}
    pos: int | None = 0
    while pos is not None and pos < len(data):
        key, pos = _varint(data, pos)
        if key is None or pos is None or key >> 3 == 0:
            return None
        wire = key & 7
        if wire == 0:
            pos = _varint(data, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            pos = None if size is None or pos is None else pos + size
        else:
            return None
        if pos is None or pos > len(data):
            return None
        fields[key >> 3] = wire
    return fields


def _varint(data: bytes, pos: int) -> tuple[int | None, int | None]:
    """The varint at ``pos`` and the position after it; ``(None, None)`` if truncated or over 64 bits."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    return None, None


# ----------------------------------------------------------------------------------------------------- HPACK
class _HpackError(ValueError):
    pass


# RFC 7541 appendix A, indexes 1 to 61; the values of those that have one.
_STATIC_NAMES = (
    ":authority :method :method :path :path :scheme :scheme :status :status :status :status :status :status "
    ":status accept-charset accept-encoding accept-language accept-ranges accept access-control-allow-origin age "
    "allow authorization cache-control content-disposition content-encoding content-language content-length "
    "content-location content-range content-type cookie date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified link location max-forwards "
    "proxy-authenticate proxy-authorization range referer refresh retry-after server set-cookie "
    "strict-transport-security transfer-encoding user-agent vary via www-authenticate"
).split()
_STATIC_VALUES = {
    **dict(zip(range(2, 15), "GET POST / /index.html http https 200 204 206 304 400 404 500".split(), strict=True)),
    16: "gzip, deflate",
}
_STATIC = tuple((name, _STATIC_VALUES.get(i, "")) for i, name in enumerate(_STATIC_NAMES, 1))
_HPACK_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE: the probe leaves it at its default

# RFC 7541 appendix B: the Huffman code length of each symbol 0..256 (EOS) as a letter, a = 5 bits ... z = 30
# bits. The code is canonical: codes of one length are consecutive, in symbol order, after the shorter ones.
_HUFFMAN_LENGTHS = (
    "isxxxxxxxtzxxzxxxxxxxxzxxxxxxxxxbffhibdgffdgdbbbaaabbbbbbbcdkbhfibccccccccccccccccccccccdcdioijb"
    "kabababbbaccbbbabcbaabccccckgjixprpprrrsrssssststtrstssssqrsrsstrqprrssqsrrtqrssqqrqsrssprrrsrrs"
    "vvporsruvvvwwvtuoqvwwvwtqqvvxwwwptpqrqqsrruuttvsvwvvwwwwwxwwwwwvz"
)
_EOS = 256


@functools.cache
def _huffman_codes() -> dict[tuple[int, int], int]:
    """``{(length, code): symbol}`` of the canonical code ``_HUFFMAN_LENGTHS`` describes."""
    codes, code, prev = {}, 0, 0
    for length, symbol in sorted((ord(c) - ord("a") + 5, s) for s, c in enumerate(_HUFFMAN_LENGTHS)):
        code <<= length - prev
        codes[(length, code)], code, prev = symbol, code + 1, length
    return codes


def huffman_decode(raw: bytes) -> bytes:
    """An HPACK Huffman string (RFC 7541 5.2): _HpackError for EOS inside it or padding other than 1 bits."""
    codes, out, code, bits = _huffman_codes(), bytearray(), 0, 0
    for byte in raw:
        for shift in range(7, -1, -1):
            code, bits = code << 1 | (byte >> shift) & 1, bits + 1
            symbol = codes.get((bits, code)) if bits >= 5 else None
            if symbol == _EOS:
                raise _HpackError("EOS inside a Huffman string")
            if symbol is not None:
                out.append(symbol)
                code = bits = 0
    if bits > 7 or code != (1 << bits) - 1:
        raise _HpackError("bad Huffman padding")
    return bytes(out)


class _Hpack:
    """An HPACK decoder (RFC 7541) for the header blocks of one connection, in order."""

    def __init__(self) -> None:
        self._table: list[tuple[str, str]] = []  # the dynamic table, newest first
        self._max = _HPACK_TABLE_SIZE

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        fields, pos = [], 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _hpack_read_int(block, pos, 7)
                fields.append(self._entry(index))
            elif first & 0x40:  # literal, added to the table
                name, value, pos = self._literal(block, pos, 6)
                fields.append((name, value))
                self._add(name, value)
            elif first & 0x20:  # table size update
                size, pos = _hpack_read_int(block, pos, 5)
                if size > _HPACK_TABLE_SIZE:
                    raise _HpackError(f"table size {size} above {_HPACK_TABLE_SIZE}")
                self._max = size
                self._evict()
            else:  # literal, not indexed or never indexed
                name, value, pos = self._literal(block, pos, 4)
                fields.append((name, value))
        return fields

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = _hpack_read_int(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _hpack_read_str(block, pos)
        value, pos = _hpack_read_str(block, pos)
        return name, value, pos

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(_STATIC):
            return _STATIC[index - 1]
        if 0 <= index - len(_STATIC) - 1 < len(self._table):
            return self._table[index - len(_STATIC) - 1]
        raise _HpackError(f"no table entry {index}")

    def _add(self, name: str, value: str) -> None:
        self._table.insert(0, (name, value))
        self._evict()

    def _evict(self) -> None:
        while self._table and sum(len(n) + len(v) + 32 for n, v in self._table) > self._max:
            self._table.pop()


def _hpack_read_int(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    limit = (1 << prefix) - 1
    value, pos, shift = block[pos] & limit, pos + 1, 0
    if value < limit:
        return value, pos
    while pos < len(block) and shift <= 21:
        byte = block[pos]
        value, pos, shift = value + ((byte & 0x7F) << shift), pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise _HpackError("truncated or oversized integer")


def _hpack_read_str(block: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(block):
        raise _HpackError("truncated string")
    huffman = block[pos] & 0x80
    length, pos = _hpack_read_int(block, pos, 7)
    if pos + length > len(block):
        raise _HpackError("truncated string")
    raw = block[pos : pos + length]
    return (huffman_decode(raw) if huffman else bytes(raw)).decode("latin-1"), pos + length


# ---------------------------------------------------------------------------------------------- the probes
@dataclass(frozen=True)
class Probe:
    """One request to one ``host:port`` and the judge of its answer; ``tls`` wraps it in TLS first."""

    host: str
    port: int
    request: bytes
    judge: Judge
    expects: str  # what answers, for messages: "a mooncake_master", ...
    tls: bool = False


@dataclass(frozen=True)
class Check:
    """A configured address (``what``: "master", "metadata server") and its probes; one passing is enough."""

    what: str
    address: str
    probes: tuple[Probe, ...]


def setup_checks(config: ClientConfig) -> list[Check]:
    """The checks ``connect_store`` runs for ``config``, in Mooncake's order: the master, then the metadata
    server (none for ``P2PHANDSHAKE``)."""
    host, port = parse_host_port("master_server_address", config.master_server_address)
    checks = [Check("master", config.master_server_address, (master_probe(host, port),))]
    meta = config.metadata_server
    if meta.startswith("etcd://"):
        checks.append(Check("metadata server", meta, tuple(etcd_probe(h, p) for h, p in etcd_endpoints(meta))))
    elif meta.startswith(("http://", "https://")):
        checks.append(Check("metadata server", meta, (http_probe(meta),)))
    return checks


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def master_probe(host: str, port: int) -> Probe:
    return Probe(host, port, CORO_RPC_REQUEST, judge_coro_rpc, "a mooncake_master (coro_rpc)")


def etcd_probe(host: str, port: int) -> Probe:
    return Probe(host, port, etcd_range_request(_authority(host, port)), judge_etcd, "an etcd endpoint (gRPC)")


def http_probe(url: str) -> Probe:
    """``GET <path>?key=PROBE_KEY`` on the metadata ``url`` (no query or fragment: the config refuses them)."""
    host, port = http_endpoint(url)
    parts = urlsplit(url)
    request = (
        f"GET {parts.path or '/'}?key={PROBE_KEY} HTTP/1.1\r\nHost: {_authority(host, port)}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    return Probe(host, port, request.encode("ascii"), judge_http, "an HTTP server", parts.scheme == "https")


def first_problem(checks: Sequence[Check], deadline: float, clock: Callable[[], float] = time.monotonic) -> str | None:
    """Run ``checks`` in order before ``deadline`` (a ``clock`` time); the first failure in words, or None.

    A check with several probes (etcd endpoints) gives each an equal share of the time left, in order, and
    passes at the first that passes.
    """
    for check in checks:
        failures = []
        for i, probe in enumerate(check.probes):
            share = (deadline - clock()) / (len(check.probes) - i)
            verdict = run_probe(probe, clock() + share, clock)
            if verdict.ok:
                break
            failures.append(verdict.detail if len(check.probes) == 1 else f"{probe.host}:{probe.port} {verdict.detail}")
        else:
            return f"{check.what} {check.address!r} {'; '.join(failures)}"
    return None


class _Late(Exception):
    """The deadline passed while waiting on the peer (or on resolving its name)."""


def run_probe(probe: Probe, deadline: float, clock: Callable[[], float] = time.monotonic) -> Verdict:
    """Connect, send ``probe.request`` and judge the answer, all before ``deadline``; never raises."""
    budget = max(0.0, deadline - clock())
    try:
        return _exchange(probe, deadline, clock)
    except _Late as late:
        said = late.args[0] if late.args else None
        if isinstance(said, _Unfinished):
            got = f"{len(said.data)} byte(s): {_first_bytes(said.data)}"
            return Verdict(False, f"did not finish an answer as {probe.expects} would in {budget:.1f} s (got {got})")
        return Verdict(False, f"{said or f'did not answer as {probe.expects} would'} in {budget:.1f} s")
    except OSError as exc:  # after connecting: a TLS failure, a reset, ...
        return Verdict(False, f"failed after accepting the connection: {exc} (expected {probe.expects})")


def _exchange(probe: Probe, deadline: float, clock: Callable[[], float]) -> Verdict:
    try:
        family, address = _resolve(probe.host, probe.port, max(0.0, deadline - clock()))
    except OSError as exc:
        return Verdict(False, f"is not reachable: {exc}")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        code = _connect(sock, address, deadline, clock)
        if code:
            return Verdict(False, f"is not reachable: {OSError(code, os.strerror(code))}")
        conn = _tls(sock, probe.host, deadline, clock) if probe.tls else sock
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # judged by what it said before closing
            _send_all(conn, probe.request, deadline, clock)
        return _read_verdict(conn, probe.judge, deadline, clock)


def _resolve(host: str, port: int, timeout: float) -> tuple[int, tuple]:
    """``(family, sockaddr)`` for ``host``; an address literal at once, a name in a helper thread so a slow
    resolver cannot outlast ``timeout`` (the thread is left to finish on its own)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (socket.AF_INET6, (host, port, 0, 0)) if ip.version == 6 else (socket.AF_INET, (host, port))
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0])
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=lookup, name="tq-mooncake-resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        raise _Late(f"could not resolve {host!r}")
    if isinstance(found[0], OSError):
        raise OSError(f"cannot resolve {host!r}: {found[0]}")
    family, _type, _proto, _name, sockaddr = found[0]
    return family, sockaddr


def _wait(sock: socket.socket, write: bool, deadline: float, clock: Callable[[], float]) -> None:
    left = deadline - clock()
    if left <= 0:
        raise _Late
    ready = select.select([], [sock], [], left) if write else select.select([sock], [], [], left)
    if not ready[1 if write else 0]:
        raise _Late


def _connect(sock: socket.socket, address: tuple, deadline: float, clock: Callable[[], float]) -> int:
    """0 once the connection is accepted, else the errno why not (refused, unreachable, ...)."""
    code = sock.connect_ex(address)
    if code not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR):
        return code
    _wait(sock, True, deadline, clock)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _tls(sock: socket.socket, host: str, deadline: float, clock: Callable[[], float]) -> socket.socket:
    """``sock`` after a TLS handshake (certificates unchecked: the probe asks only whether TLS is spoken)."""
    import ssl  # only an https metadata server needs it

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    while True:
        try:
            conn.do_handshake()
            return conn
        except ssl.SSLWantReadError:
            _wait(conn, False, deadline, clock)
        except ssl.SSLWantWriteError:
            _wait(conn, True, deadline, clock)


def _blocked(exc: OSError, writing: bool) -> bool | None:
    """None if ``exc`` is a real error; else whether the socket must become writable (else readable)."""
    if isinstance(exc, (BlockingIOError, InterruptedError)):
        return writing
    ssl = sys.modules.get("ssl")  # imported by _tls when TLS is in use
    if ssl is not None and isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return isinstance(exc, ssl.SSLWantWriteError)
    return None


def _send_all(conn: socket.socket, data: bytes, deadline: float, clock: Callable[[], float]) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view) :]
        except OSError as exc:
            write = _blocked(exc, True)
            if write is None:
                raise
            _wait(conn, write, deadline, clock)


def _read_verdict(conn: socket.socket, judge: Judge, deadline: float, clock: Callable[[], float]) -> Verdict:
    """Read until ``judge`` gives a verdict, at most ``MAX_ANSWER_BYTES``; _Late at ``deadline`` (checked after
    every read, so a peer that keeps sending is cut off too), saying what had come by then."""
    data = b""
    while (verdict := judge(data, False)) is None:
        if len(data) > MAX_ANSWER_BYTES:
            return Verdict(False, f"sent more than {MAX_ANSWER_BYTES} bytes without a whole answer")
        try:
            if clock() >= deadline:
                raise _Late
            try:
                chunk = conn.recv(16384)
            except OSError as exc:
                write = _blocked(exc, False)
                if write is None:
                    return judge(data, True) or Verdict(False, f"broke the connection: {exc}")
                _wait(conn, write, deadline, clock)
                continue
        except _Late:
            if not data:
                raise
            raise _Late(_Unfinished(data)) from None
        if not chunk:
            return judge(data, True) or Verdict(False, "closed the connection")
        data += chunk
    return verdict


@dataclass(frozen=True)
class _Unfinished:
    """What a peer had sent when the deadline came: the start of an answer, not all of it."""

    data: bytes
