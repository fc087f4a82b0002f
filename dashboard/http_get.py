"""One HTTP GET with a deadline for the whole exchange, for every request the dashboard makes (Jaeger's query API,
a master's metrics): ``get`` ends within ``timeout_s`` of its call whatever the server does (trickles its headers
or its body, never answers, streams without end), or raises one of the ``HttpGetError`` kinds.

How: the name is resolved on a daemon thread waited for until the deadline (``getaddrinfo`` cannot be
interrupted; such a thread ends when the resolver gives up), and before every blocking step (connect, TLS
handshake, send, each receive) the socket's timeout is set to the time left.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

ERROR_BODY_BYTES = 64 * 1024
"""The most read of an error answer's body (``HttpError.body``)."""
EXCERPT_CHARS = 200
"""The longest ``HttpError.excerpt``."""
USER_AGENT = "tq-mooncake-dashboard"
_CHUNK = 64 * 1024
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # in the request target or Host: would split or forge the request


class HttpGetError(OSError):
    """``get`` got no usable answer; the message says why (without the URL: the caller names what it asked)."""


class HttpUnreachable(HttpGetError):
    """No exchange: the name does not resolve, the connection is refused or reset, TLS fails."""


class HttpTimeout(HttpGetError, TimeoutError):
    """The whole exchange (resolve, connect, TLS, request, headers, body) took longer than ``timeout_s``."""


class HttpBadAnswer(HttpGetError):
    """What the server sent is not an HTTP answer (e.g. another protocol's banner), or it closed the connection
    before the answer's end."""


class HttpTooLarge(HttpGetError):
    """The body is longer than ``max_bytes`` (told by its Content-Length or found reading it)."""


class HttpError(HttpGetError):
    """An answer whose status is not 2xx (3xx included: redirects are not followed). ``body``: its first
    ``ERROR_BODY_BYTES`` at most, what came before the deadline; ``excerpt``: its start as one line of text."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        self.status, self.reason, self.body = status, reason, body
        super().__init__(f"HTTP {status} {reason}".strip() + (f": {self.excerpt}" if self.excerpt else ""))

    @property
    def excerpt(self) -> str:
        text = " ".join(self.body[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace").split())
        return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


@dataclass(frozen=True)
class HttpAnswer:
    """A 2xx answer: its status, Content-Type (``""`` if none) and whole body."""

    status: int
    content_type: str
    body: bytes

    def text(self) -> str:
        """The body as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")


def get(url: str, timeout_s: float, max_bytes: int, accept: str = "*/*") -> HttpAnswer:
    """``GET url`` (http or https, TLS verified with the system's CAs), over by ``timeout_s`` seconds after the
    call. Redirects are not followed (a 3xx is an ``HttpError``); the body is not decompressed (``identity`` is
    asked for). Raises ``HttpError``, ``HttpUnreachable``, ``HttpTimeout``, ``HttpBadAnswer`` or ``HttpTooLarge``
    (all ``HttpGetError``, an OSError); ValueError for a URL that is not ``http(s)://host[:port]/...`` without
    credentials or for a ``timeout_s`` or ``max_bytes`` that is not positive."""
    if not 0 < timeout_s <= 86400 or max_bytes < 1:
        raise ValueError("timeout_s must be in (0, 86400] and max_bytes positive")
    parts, request = _request(url, accept)
    deadline = time.monotonic() + timeout_s
    stage = "resolving the host name"
    sock: socket.socket | None = None
    response: http.client.HTTPResponse | None = None
    try:
        addresses = _resolve(parts.hostname or "", parts.port or _PORTS[parts.scheme], deadline)
        stage = "connecting"
        sock = _connect(addresses, deadline)
        if parts.scheme == "https":
            stage = "in the TLS handshake"
            sock = _tls(sock, parts.hostname or "", deadline)
        stage = "sending the request"
        sock.settimeout(_left(deadline))
        sock.sendall(request)
        stage = "waiting for the headers"
        response = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="GET")  # type: ignore[arg-type]
        response.begin()
        stage = "reading the body"
        if not 200 <= response.status < 300:
            raise HttpError(response.status, response.reason or "", _error_body(response, ERROR_BODY_BYTES))
        if response.length is not None and response.length > max_bytes:
            raise HttpTooLarge(f"the body is {response.length} bytes, more than {max_bytes}")
        body = _body(response, max_bytes)
        return HttpAnswer(response.status, response.getheader("Content-Type", "") or "", body)
    except HttpTimeout:
        raise HttpTimeout(f"no whole answer within {timeout_s:g} s (late {stage})") from None
    except HttpGetError:
        raise
    except TimeoutError:
        raise HttpTimeout(f"no whole answer within {timeout_s:g} s (late {stage})") from None
    except http.client.HTTPException as exc:  # before OSError: RemoteDisconnected is both
        raise HttpBadAnswer(f"no proper HTTP answer ({stage}): {type(exc).__name__}: {exc}") from None
    except OSError as exc:  # ssl.SSLError included
        raise HttpUnreachable(f"{stage}: {exc}") from None
    finally:
        if response is not None:
            response.close()
        if sock is not None:
            sock.close()


_PORTS = {"http": 80, "https": 443}


CREDENTIALS = "credentials in the URL are not supported"


def url_problem(parts: urllib.parse.SplitResult) -> str:
    """Why ``get`` does not take a URL of these parts (``""``: it does): not http(s), no host, credentials
    (``CREDENTIALS``), a port that is 0, not a number or out of range. The callers that check a user's URL say it
    in their own words."""
    if parts.scheme not in _PORTS or not parts.hostname:
        return "not an http:// or https:// URL with a host"
    if "@" in parts.netloc:
        return CREDENTIALS
    try:
        port = parts.port
    except ValueError:
        return "a port that is not a number from 1 to 65535"
    return "port 0 in the URL" if port == 0 else ""


def _request(url: str, accept: str) -> tuple[urllib.parse.SplitResult, bytes]:
    """The URL's parts and the request's bytes; ValueError for a URL ``get`` does not take."""
    parts = urllib.parse.urlsplit(url)
    if why := url_problem(parts):
        raise ValueError(why)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _UNSAFE.search(target + parts.netloc) or any(ch in accept for ch in "\r\n\0"):
        raise ValueError("control characters or spaces in the URL or the Accept header")
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {accept}\r\nAccept-Encoding: identity\r\n"
        f"User-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n"
    )
    try:
        return parts, head.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("a URL or Accept header that is not ASCII (quote it)") from None


def _left(deadline: float) -> float:
    """Seconds until ``deadline``; HttpTimeout if none are left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise HttpTimeout("deadline passed")
    return left


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """``getaddrinfo``'s TCP addresses of ``host``: at once for an IP address, else on a daemon thread waited for
    until ``deadline``."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    found: list[Any] = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=resolve, name="tq-mooncake-resolve", daemon=True)
    thread.start()
    thread.join(_left(deadline))
    if not found:
        raise HttpTimeout("resolving")
    if isinstance(found[0], OSError):
        raise HttpUnreachable(f"cannot resolve {host!r}: {found[0]}")
    return found[0]


def _connect(addresses: list[Any], deadline: float) -> socket.socket:
    """A socket connected to the first of ``addresses`` that accepts, each tried until ``deadline``."""
    problem: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except HttpTimeout:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            raise HttpTimeout("connecting") from None
        except OSError as exc:
            sock.close()
            problem = exc
    raise HttpUnreachable(f"cannot connect: {problem}")


def _tls(sock: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
    """``sock`` in TLS to ``host``, verified; the handshake is bounded by the time left (CPython's handshake keeps
    one deadline for all its waits)."""
    try:
        tls = ssl.create_default_context().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.settimeout(_left(deadline))
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


class _DeadlineReader(io.RawIOBase):
    """A socket's receiving side whose every receive waits at most until ``deadline`` (HttpTimeout then)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_left(self._deadline))
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise HttpTimeout("receiving") from None


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` reads from: ``makefile`` over a ``_DeadlineReader``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        assert mode == "rb", mode
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline), _CHUNK)


def _body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The whole body (chunked or not); HttpTooLarge past ``max_bytes``, HttpBadAnswer if it ends before its
    Content-Length."""
    expected, body = response.length, bytearray()
    while chunk := response.read1(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise HttpTooLarge(f"more than {max_bytes} bytes")
    if expected is not None and len(body) < expected:  # read1 gives b"" at a close, with no IncompleteRead
        raise HttpBadAnswer(f"the connection closed after {len(body)} of the body's {expected} bytes")
    return bytes(body)


def _error_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of an error answer's body: what arrives before the deadline, the connection's end or
    a broken answer."""
    body = bytearray()
    try:
        while len(body) < limit and (chunk := response.read1(min(_CHUNK, limit - len(body)))):
            body += chunk
    except (OSError, http.client.HTTPException):
        pass
    return bytes(body[:limit])
