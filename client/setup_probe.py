"""Before Mooncake's ``setup()``: does the peer at each configured address speak what Mooncake will speak to it?

A live port is not proof of a master. Mooncake's ``setup()`` makes up to 20 attempts of its own
(``MC_STORE_CLIENT_SETUP_RETRIES``), each waiting on the peer (coro_rpc's 30 s request timeout, etcd's
dial and retries), and it holds the GIL throughout, so nothing in this process can end it early. Measured
with ``setup_timeout_s: 5`` before these probes: the master's HTTP port, a server that accepts and says
nothing, one that sends garbage and one that closes each kept ``setup()`` going for more than 480 s;
``etcd://127.0.0.1:1`` failed after 202 s. So every peer is asked first, one small request each, all
under one deadline:

* master: a 20-byte coro_rpc request header (magic 21, function id 0, no body). A real ``mooncake_master``
  answers at once with a 16-byte coro_rpc response header: magic 21, our sequence number, error 11
  (``function_not_registered``), then the message "the rpc function not registered". Nothing is run.
* an http(s) metadata server: ``GET <path>?key=<probe key>``, as Mooncake's HTTP plugin reads keys (a missing
  key is a 404); any HTTP status line passes.
* etcd: the HTTP/2 client preface and an empty SETTINGS frame, what etcd's gRPC client sends first; an etcd
  endpoint answers with its own SETTINGS frame. One answering endpoint is enough.

The verdicts (``judge_*``) are pure functions of the bytes read so far; ``run_probe`` does the bounded I/O
(non-blocking sockets and ``select``; a host name is resolved in a helper thread so that a slow resolver is
bounded too).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import ClientConfig, etcd_endpoints, http_endpoint, parse_host_port

CORO_RPC_MAGIC = 21
CORO_RPC_FUNCTION_NOT_REGISTERED = 11
_CORO_RPC_SEQ = 0x5154_4D43  # "TQMC" read as a little-endian u32; the master echoes it
# magic, version, serialize_type, msg_type, seq_num, function_id (0: none), body length, attachment length
CORO_RPC_REQUEST = struct.pack("<BBBBIIII", CORO_RPC_MAGIC, 0, 0, 0, _CORO_RPC_SEQ, 0, 0, 0)
_CORO_RPC_RESPONSE = struct.Struct("<BBBBIII")  # magic, version, err_code, msg_type, seq_num, length, attach
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
PROBE_KEY = "tq-mooncake-setup-probe"


@dataclass(frozen=True)
class Verdict:
    """What a peer's answer says: ``ok`` or not, and in words."""

    ok: bool
    detail: str


Judge = Callable[[bytes, bool], Verdict | None]
"""``judge(data, eof)``: the verdict on the bytes read so far, or None to read more (never None at eof)."""


def _first_bytes(data: bytes) -> str:
    return repr(data[:24]) + ("..." if len(data) > 24 else "")


def judge_coro_rpc(data: bytes, eof: bool) -> Verdict | None:
    """A coro_rpc response header to ``CORO_RPC_REQUEST``: magic 21 and our sequence number."""
    if data and data[0] != CORO_RPC_MAGIC:
        return Verdict(
            False, f"answered bytes that are not coro_rpc (a mooncake_master speaks it): {_first_bytes(data)}"
        )
    if len(data) >= _CORO_RPC_RESPONSE.size:
        _magic, _version, err_code, _msg_type, seq, _length, _attach = _CORO_RPC_RESPONSE.unpack_from(data)
        if seq != _CORO_RPC_SEQ:
            return Verdict(False, f"answered a coro_rpc header for another request (sequence {seq:#x})")
        named = " (function not registered)" if err_code == CORO_RPC_FUNCTION_NOT_REGISTERED else ""
        return Verdict(True, f"answered coro_rpc, error code {err_code}{named}")
    if eof:
        said = f"after {len(data)} byte(s) " if data else "without answering "
        return Verdict(False, f"closed the connection {said}a coro_rpc request (not a mooncake_master)")
    return None


def judge_http(data: bytes, eof: bool) -> Verdict | None:
    """An HTTP/1.x status line."""
    prefix = b"HTTP/1."
    if data[: len(prefix)] != prefix[: len(data)]:
        return Verdict(False, f"answered bytes that are not HTTP: {_first_bytes(data)}")
    if b"\r\n" in data:
        status = data.split(b"\r\n", 1)[0].decode("latin-1")
        return Verdict(True, f"answered {status!r}")
    if eof:
        return Verdict(False, "closed the connection without an HTTP answer")
    return None


def judge_http2(data: bytes, eof: bool) -> Verdict | None:
    """An HTTP/2 server preface: a SETTINGS frame (type 4) on stream 0, as etcd's gRPC server sends."""
    if len(data) >= 4 and data[3] != 0x04:
        return Verdict(False, f"answered bytes that are not HTTP/2 (gRPC, as etcd speaks): {_first_bytes(data)}")
    if len(data) >= 9:
        stream = struct.unpack_from(">I", data, 5)[0] & 0x7FFF_FFFF
        if stream != 0:
            return Verdict(False, f"answered an HTTP/2 frame on stream {stream} instead of its SETTINGS")
        return Verdict(True, "answered HTTP/2 SETTINGS (gRPC)")
    if eof:
        return Verdict(False, "closed the connection without an HTTP/2 answer (not an etcd endpoint)")
    return None


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


def master_probe(host: str, port: int) -> Probe:
    return Probe(host, port, CORO_RPC_REQUEST, judge_coro_rpc, "a mooncake_master (coro_rpc)")


def etcd_probe(host: str, port: int) -> Probe:
    return Probe(host, port, HTTP2_PREFACE, judge_http2, "an etcd endpoint (gRPC over HTTP/2)")


def http_probe(url: str) -> Probe:
    host, port = http_endpoint(url)
    parts = urlsplit(url)
    query = f"{parts.query}&key={PROBE_KEY}" if parts.query else f"key={PROBE_KEY}"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"GET {parts.path or '/'}?{query} HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n\r\n"
    return Probe(host, port, request.encode("latin-1"), judge_http, "an HTTP server", parts.scheme == "https")


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
        what = late.args[0] if late.args else f"did not answer as {probe.expects} would"
        return Verdict(False, f"{what} in {budget:.1f} s")
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
    data = b""
    while (verdict := judge(data, False)) is None:
        try:
            chunk = conn.recv(4096)
        except OSError as exc:
            write = _blocked(exc, False)
            if write is None:
                return judge(data, True) or Verdict(False, f"broke the connection: {exc}")
            _wait(conn, write, deadline, clock)
            continue
        if not chunk:
            return judge(data, True) or Verdict(False, "closed the connection")
        data += chunk
    return verdict
