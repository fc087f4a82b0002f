"""``dashboard.http_get.get`` against raw TCP servers on loopback that answer well, slowly, without end, wrongly or
not at all: it always ends by its deadline with the right kind of error."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tq_mooncake.cluster import free_port, wait_until
from tq_mooncake.dashboard.http_get import (
    ERROR_BODY_BYTES,
    EXCERPT_CHARS,
    HttpAnswer,
    HttpBadAnswer,
    HttpError,
    HttpTimeout,
    HttpTooLarge,
    HttpUnreachable,
    get,
)

pytestmark = pytest.mark.pure

DEADLINE_S = 0.5
MARGIN_S = 0.3  # past the deadline, for a loaded machine
PACE_S = 0.05  # a trickling server's pause between bytes: far shorter than the deadline

Script = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP server on 127.0.0.1 running ``script(conn, stop)`` on a thread per connection, after reading the
    request's head into ``heads`` (unless ``reads_request`` is false). On exit: stop set, connections shut down,
    every thread joined."""

    def __init__(self, script: Script, reads_request: bool = True) -> None:
        self.script, self.reads_request = script, reads_request
        self.heads: list[bytes] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(PACE_S)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="raw-server")]

    def __enter__(self) -> RawServer:
        self.threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.threads[0].join(5)
        self.listener.close()
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already
        for thread in list(self.threads):
            thread.join(5)
        assert not any(t.is_alive() for t in self.threads)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw-server-conn")
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                if self.reads_request:
                    head = b""
                    while b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                        head += data
                    self.heads.append(head)
                self.script(conn, self.stop)
            except OSError:
                pass  # the client went away: what several scripts expect


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    """``serve(script, reads_request=True)``: a started ``RawServer``, stopped at the test's end."""
    started: list[RawServer] = []

    def start(script: Script, reads_request: bool = True) -> RawServer:
        server = RawServer(script, reads_request)
        started.append(server.__enter__())
        return server

    try:
        yield start
    finally:
        for server in started:
            server.__exit__()


def answer(data: bytes) -> Script:
    """Sends ``data``, then closes."""
    return lambda conn, stop: conn.sendall(data)


def answer_then_wait(data: bytes) -> Script:
    """Sends ``data``, then keeps the connection open until the server stops."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
        stop.wait(10)

    return script


def trickle(prefix: bytes) -> Script:
    """Sends ``prefix``, then one byte every ``PACE_S`` until the server stops or the client goes."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(prefix)
        while not stop.wait(PACE_S):
            conn.sendall(b"a")

    return script


def endless(prefix: bytes) -> Script:
    """Sends ``prefix``, then bytes as fast as the client takes them."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(prefix)
        while not stop.is_set():
            conn.sendall(b"x" * 65536)

    return script


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    began = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        return exc, time.monotonic() - began
    return None, time.monotonic() - began


def test_a_normal_answer_and_the_request_sent(serve):
    body = b"mooncake_up 1\n"
    server = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\n" + body))
    got = get(f"{server.url}/metrics?x=1#frag", DEADLINE_S, 1024, accept="text/plain")
    assert got == HttpAnswer(200, "text/plain", body) and got.text() == "mooncake_up 1\n"
    (head,) = server.heads
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /metrics?x=1 HTTP/1.1"
    assert {f"Host: 127.0.0.1:{server.port}", "Accept: text/plain", "Connection: close"} <= set(lines)


def test_a_host_name_is_resolved_off_the_calling_thread_and_each_address_tried(serve):
    server = serve(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))  # on 127.0.0.1 only: ::1, if first, refuses
    assert get(f"http://localhost:{server.port}/", DEADLINE_S, 10) == HttpAnswer(204, "", b"")
    wait_until(lambda: all(t.name != "tq-mooncake-resolve" for t in threading.enumerate()), 2, "the resolver")


def test_a_chunked_answer_is_joined(serve):
    chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks))
    assert get(server.url, DEADLINE_S, 11, accept="*/*").body == b"hello world"


@pytest.mark.parametrize(
    ("prefix", "stage"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Slow: ", "waiting for the headers"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", "reading the body"),
    ],
    ids=["headers", "body"],
)
def test_a_trickling_server_is_given_up_at_the_deadline(serve, prefix, stage):
    server = serve(trickle(prefix))
    exc, elapsed = timed(lambda: get(server.url, DEADLINE_S, 10**7))
    assert isinstance(exc, HttpTimeout) and isinstance(exc, TimeoutError), exc
    assert f"within {DEADLINE_S:g} s (late {stage})" in str(exc)
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + MARGIN_S


def test_a_tls_handshake_never_answered_is_given_up_at_the_deadline(serve):
    server = serve(lambda conn, stop: stop.wait(10), reads_request=False)
    exc, elapsed = timed(lambda: get(f"https://127.0.0.1:{server.port}/", DEADLINE_S, 1024))
    assert isinstance(exc, HttpTimeout) and "late in the TLS handshake" in str(exc), exc
    assert elapsed < DEADLINE_S + MARGIN_S


def test_an_endless_body_stops_past_max_bytes(serve):
    server = serve(endless(b"HTTP/1.1 200 OK\r\n\r\n"))
    exc, elapsed = timed(lambda: get(server.url, 5.0, 200_000))
    assert isinstance(exc, HttpTooLarge) and "more than 200000 bytes" in str(exc), exc
    assert elapsed < 2


def test_a_content_length_past_max_bytes_is_refused_unread(serve):
    server = serve(answer_then_wait(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n"))
    exc, elapsed = timed(lambda: get(server.url, 5.0, 1000))
    assert isinstance(exc, HttpTooLarge) and "10000000 bytes" in str(exc), exc
    assert elapsed < 2


def test_a_refused_connection_is_unreachable():
    exc, elapsed = timed(lambda: get(f"http://127.0.0.1:{free_port()}/", 5.0, 1000))
    assert isinstance(exc, HttpUnreachable) and "refused" in str(exc).lower(), exc
    assert elapsed < 2


def test_an_error_status_carries_the_start_of_its_body(serve):
    body = b"storage\n  is on fire " + b"x" * 200_000
    head = f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    server = serve(answer(head + body))
    exc, _ = timed(lambda: get(server.url, 5.0, 10**7))
    assert isinstance(exc, HttpError) and (exc.status, exc.reason) == (500, "Internal Server Error"), exc
    assert exc.body == body[:ERROR_BODY_BYTES]
    assert exc.excerpt.startswith("storage is on fire xxx") and len(exc.excerpt) == EXCERPT_CHARS
    assert str(exc).startswith("HTTP 500 Internal Server Error: storage is on fire")


def test_a_redirect_is_not_followed(serve):
    server = serve(answer(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"))
    exc, _ = timed(lambda: get(server.url, 5.0, 1000))
    assert isinstance(exc, HttpError) and exc.status == 302 and exc.body == b"", exc
    assert len(server.heads) == 1


@pytest.mark.parametrize(
    ("script", "said"),
    [
        (answer_then_wait(b"SSH-2.0-OpenSSH_9.6\r\n"), "BadStatusLine"),
        (answer(b""), "RemoteDisconnected"),
        (answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"), "closed after 10 of the body's 100"),
        (answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nhel"), "IncompleteRead"),
    ],
    ids=["ssh-banner", "closed-at-once", "closed-mid-body", "closed-mid-chunk"],
)
def test_what_is_not_a_whole_http_answer_is_a_bad_answer(serve, script, said):
    server = serve(script)
    exc, elapsed = timed(lambda: get(server.url, 5.0, 1000))
    assert isinstance(exc, HttpBadAnswer) and said in str(exc), exc
    assert elapsed < 2


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/",
        "http:///path",
        "http://user:secret@127.0.0.1/",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/a\r\nX-Forged: 1",
        "http://127.0.0.1/é",
    ],
)
def test_urls_it_does_not_take(url):
    with pytest.raises(ValueError) as caught:
        get(url, 1.0, 1000)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf"), 1e12])
def test_timeouts_it_does_not_take(timeout_s):
    with pytest.raises(ValueError, match="timeout_s"):
        get("http://127.0.0.1:1/", timeout_s, 1000)
