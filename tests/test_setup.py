"""Set-up never hangs: whatever answers on a configured address, the constructor raises StoreSetupError (or
ValueError, for a malformed address) within ``setup_timeout_s`` plus a margin, before Mooncake's ``setup()``.

Peers are real: a real ``mooncake_master``'s other ports, plain TCP servers that say nothing, send garbage,
close, or send the start of a right answer (or all of it, too slowly) and then nothing, a gRPC server, closed
ports; a real master, its HTTP metadata server, a TLS server and a real etcd pass. The verdicts on the bytes a
peer sends are tested on their own (pure), and the metadata schemes the config accepts are checked against
the installed wheel in subprocesses (an unsupported one aborts the process).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from tq_mooncake.client import MooncakeBatchClient, StoreSetupError, batch_client
from tq_mooncake.client import store as store_module
from tq_mooncake.client.config import METADATA_SCHEMES, ClientConfig
from tq_mooncake.client.setup_probe import (
    CORO_RPC_REQUEST,
    ETCD_RANGE_PATH,
    H2_DATA,
    H2_GOAWAY,
    H2_HEADERS,
    H2_PREFACE,
    H2_RST_STREAM,
    H2_SETTINGS,
    MAX_ANSWER_BYTES,
    PROBE_KEY,
    Probe,
    etcd_probe,
    etcd_range_request,
    first_problem,
    h2_frame,
    http_probe,
    huffman_decode,
    judge_coro_rpc,
    judge_etcd,
    judge_http,
    master_probe,
    run_probe,
    setup_checks,
)
from tq_mooncake.cluster import MasterProcess, free_port, wait_until

TIMEOUT_S = 0.5  # setup_timeout_s of the hostile-peer tests here
MARGIN_S = 3.0  # the bound asserted: TIMEOUT_S + MARGIN_S, generous for a loaded machine
SEQ = CORO_RPC_REQUEST[4:8]
# What mooncake_master (0.3.13.post1) answered to CORO_RPC_REQUEST: a 16-byte response header (magic 21,
# version 0, error 11 = function_not_registered, our sequence number, a 40-byte body) and the body.
MASTER_ANSWER = (
    b"\x15\x00\x0b\x00"
    + SEQ
    + struct.pack("<II", 40, 0)
    + b"w\xfa\xcf\x9d\x04\x80\x0c\x00\x1fthe rpc function not registered"
)
# What etcd 3.4.23 answered to etcd_range_request (a KV Range of the probe key, count_only): its SETTINGS, the
# ACK of ours, WINDOW_UPDATE, PING, response HEADERS, one DATA frame (a RangeResponse holding only its header),
# and the trailers (grpc-status 0) ending the stream.
ETCD_ANSWER = bytes.fromhex(
    "00000c0400000000000005000040000003ffffffff000000040100000000000004080000000000000000200000080600000000"
    "0002041010090e070700000e010400000001885f8b1d75d0620d263d4c4d6564000021000000000001000000001c0a1a08aaf4"
    "e5f599f3ebe7d101108df2f48ec1f7a6d7bd011801200200001801050000000140889acac8b21234da8f013040899acac8b525"
    "4207317f00"
)
# And to a call of a method it lacks: a trailers-only answer, grpc-status 12 (UNIMPLEMENTED), Huffman-coded.
ETCD_UNIMPLEMENTED = bytes.fromhex(
    "885f8b1d75d0620d263d4c4d656440889acac8b21234da8f02313240899acac8b5254207317fa2b6aeb51fc54a5254ce7914d2"
    "7acaa4a7b14416cee621542a49220b6772d95c6be6e3"
)
SETTINGS = h2_frame(H2_SETTINGS, 0, 0, b"")
SETTINGS_ACK = h2_frame(H2_SETTINGS, 1, 0, b"")
HTTP_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 18\r\n\r\nmetadata not found"


# ------------------------------------------------------------------------------------------------ peers
class FakePeer:
    """A TCP server on 127.0.0.1 that accepts every connection and then: ``silent`` says nothing, ``garbage``
    sends bytes of no protocol, ``close`` closes at once, ``half`` sends the first 2 bytes of a coro_rpc
    header and nothing more; ``answer`` reads the start of the request, sends ``answer`` (one byte every
    ``drip`` s, if given) and then says nothing more, keeping the connection open (closing it if
    ``then_close``). ``stop()`` closes it all and joins its threads."""

    def __init__(self, behaviour: str, answer: bytes = b"", drip: float = 0.0, then_close: bool = False) -> None:
        self.behaviour = behaviour
        self._answer, self._drip, self._then_close = answer, drip, then_close
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._answering: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, name=f"fake-peer-{behaviour}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # stop() shut the listener down
                return
            self.accepted += 1
            if self.behaviour == "close":
                conn.close()
                continue
            self._conns.append(conn)
            if self.behaviour == "answer":
                self._answering.append(threading.Thread(target=self._answer_on, args=(conn,), daemon=True))
                self._answering[-1].start()
                continue
            payload = {"garbage": b"\xde\xad\xbe\xef" * 64, "half": b"\x15\x00"}.get(self.behaviour, b"")
            if payload:
                conn.sendall(payload)

    def _answer_on(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            conn.recv(65536)  # the start of the request
            for i in range(0, len(self._answer), 1 if self._drip else len(self._answer)):
                if self._drip and self._stopped.wait(self._drip):
                    return
                conn.sendall(self._answer[i : i + 1] if self._drip else self._answer)
            if self._then_close:
                conn.shutdown(socket.SHUT_WR)
        except OSError:  # the probe gave up and closed
            pass

    def connections(self) -> list[socket.socket]:
        """The connections accepted (and kept) so far."""
        return list(self._conns)

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=10)
        for conn in self._conns:
            conn.close()
        for thread in self._answering:
            thread.join(timeout=10)


@pytest.fixture
def fake_peer() -> Iterator[Callable[..., FakePeer]]:
    """``fake_peer("silent")``, ``fake_peer("answer", b"...", drip=0.1)``: a started FakePeer, stopped at
    teardown even if the test fails."""
    peers: list[FakePeer] = []

    def start(behaviour: str, answer: bytes = b"", drip: float = 0.0, then_close: bool = False) -> FakePeer:
        peers.append(FakePeer(behaviour, answer, drip, then_close))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def grpc_server() -> Iterator[int]:
    """A real gRPC server (HTTP/2, no services) on 127.0.0.1; its port. Stopped at teardown."""
    grpc = pytest.importorskip("grpc")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None).wait(10)


@pytest.fixture
def setup_never_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mooncake's store is never made: the probes must refuse first (a regression fails at once, not after
    Mooncake's minutes of retries)."""

    class Unreachable:
        def __init__(self) -> None:
            raise AssertionError("Mooncake's setup() was reached: the probes let a bad peer through")

    monkeypatch.setattr(store_module, "_store_class", lambda: Unreachable)


def _refused_in_time(config: dict[str, Any], error: type[Exception] = StoreSetupError) -> str:
    """Build a client from ``config`` (setup_timeout_s set here); the message of the ``error`` it raises
    within the bound."""
    start = time.monotonic()
    with pytest.raises(error) as info:
        MooncakeBatchClient({**config, "setup_timeout_s": TIMEOUT_S})
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + MARGIN_S, f"took {elapsed:.1f} s: {info.value}"
    return str(info.value)


# ---------------------------------------------------------------------------------- the master's address
@pytest.mark.parametrize("port", ["http_port", "metrics_port"])
def test_a_real_masters_http_ports_are_not_a_master(shared_master: MasterProcess, setup_never_reached, port):
    address = f"127.0.0.1:{getattr(shared_master, port)}"
    message = _refused_in_time(shared_master.client_config(master_server_address=address))
    assert f"master {address!r} did not answer as a mooncake_master (coro_rpc) would in " in message
    assert f"metadata server {shared_master.metadata_server!r}" in message  # the addresses tried


@pytest.mark.parametrize(
    ("behaviour", "says"),
    [
        ("silent", "did not answer as a mooncake_master (coro_rpc) would in "),
        ("garbage", r"answered bytes that are not coro_rpc (a mooncake_master speaks it): b'\xde\xad\xbe\xef"),
        ("close", "closed the connection without answering a coro_rpc request"),
        ("half", "did not finish an answer as a mooncake_master (coro_rpc) would in "),
    ],
)
def test_a_peer_that_is_not_a_master(fake_peer, setup_never_reached, behaviour, says):
    peer = fake_peer(behaviour)
    message = _refused_in_time({"master_server_address": peer.address, "global_segment_size": 0})
    assert message.startswith(f"Mooncake store setup failed: master {peer.address!r} ")
    assert says in message
    assert peer.accepted >= 1  # the port was live: only the protocol told


@pytest.mark.parametrize(
    ("answer", "drip", "says"),
    [
        (MASTER_ANSWER[:16], 0, "did not finish an answer as a mooncake_master (coro_rpc) would in "),  # no body
        (MASTER_ANSWER[:8] + b"\x00" * 8, 0, "announcing a 0-byte error message"),  # a plausible header alone
        (MASTER_ANSWER[:2] + b"\x00" + MASTER_ANSWER[3:], 0, "answered coro_rpc error code 0 to a call of no"),
        (MASTER_ANSWER, 2 * TIMEOUT_S / len(MASTER_ANSWER), "did not finish an answer as a mooncake_master"),
    ],
    ids=["header-without-its-body", "header-announcing-no-body", "another-error-code", "slow-drip"],
)
def test_a_peer_that_answers_like_a_master_only_in_part(fake_peer, setup_never_reached, answer, drip, says):
    peer = fake_peer("answer", answer, drip)
    message = _refused_in_time({"master_server_address": peer.address, "global_segment_size": 0})
    assert message.startswith(f"Mooncake store setup failed: master {peer.address!r} ") and says in message


def test_a_refused_set_up_leaves_no_thread_or_connection_behind(fake_peer, setup_never_reached):
    peer = fake_peer("silent")
    threads = set(threading.enumerate())
    _refused_in_time({"master_server_address": peer.address})
    assert set(threading.enumerate()) <= threads
    for conn in peer.connections():  # the probe sent its request and closed the connection
        conn.settimeout(5)
        assert _read_to_eof(conn) == CORO_RPC_REQUEST


def _read_to_eof(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


def test_a_closed_master_port_is_not_reachable(setup_never_reached):
    address = f"127.0.0.1:{free_port()}"
    message = _refused_in_time({"master_server_address": address})
    assert f"master {address!r} is not reachable: [Errno 111] Connection refused" in message


@pytest.mark.pure
@pytest.mark.parametrize("address", ["127.0.0.1", "", "127.0.0.1:0", "127.0.0.1:65536", ":50051", "[::1]"])
def test_a_master_address_without_a_usable_port_is_a_value_error(setup_never_reached, address):
    message = _refused_in_time({"master_server_address": address}, ValueError)
    assert message.startswith("master_server_address must be 'host:port' with a port from 1 to 65535")


def test_an_unresolvable_master_name_is_refused_in_time(setup_never_reached):
    message = _refused_in_time({"master_server_address": "no-such-host.invalid:50051"})
    assert "master 'no-such-host.invalid:50051' " in message
    assert "resolve 'no-such-host.invalid'" in message


# ------------------------------------------------------------------------------- the metadata server
def test_etcd_on_a_closed_port(shared_master: MasterProcess, setup_never_reached):
    url = f"etcd://127.0.0.1:{free_port()}"
    message = _refused_in_time(shared_master.client_config(metadata_server=url))
    assert f"metadata server {url!r} is not reachable: [Errno 111] Connection refused" in message


@pytest.mark.parametrize(
    ("behaviour", "says"),
    [
        ("silent", "did not answer as an etcd endpoint (gRPC) would in "),
        ("garbage", "answered bytes that are not HTTP/2 (gRPC, as etcd speaks)"),
        ("close", "closed the connection before a whole gRPC answer (not an etcd endpoint)"),
    ],
)
def test_etcd_on_a_peer_that_is_not_etcd(shared_master: MasterProcess, fake_peer, setup_never_reached, behaviour, says):
    peer = fake_peer(behaviour)
    message = _refused_in_time(shared_master.client_config(metadata_server=f"etcd://{peer.address}"))
    assert f"metadata server 'etcd://{peer.address}' " in message and says in message


_ETCD_HEAD = ETCD_ANSWER[: ETCD_ANSWER.index(bytes.fromhex("00000e0104")) + 9 + 14]  # up to the response HEADERS


@pytest.mark.parametrize(
    ("answer", "drip", "says"),
    [
        (SETTINGS, 0, "did not finish an answer as an etcd endpoint (gRPC) would in "),
        (SETTINGS + SETTINGS_ACK, 0, "did not finish an answer as an etcd endpoint (gRPC) would in "),
        (_ETCD_HEAD, 0, "did not finish an answer as an etcd endpoint (gRPC) would in "),  # headers, no end
        (ETCD_ANSWER, 2 * TIMEOUT_S / len(ETCD_ANSWER), "did not finish an answer as an etcd endpoint"),
        (SETTINGS + h2_frame(H2_GOAWAY, 0, 0, bytes(8)), 0, "closed HTTP/2 with GOAWAY (error code 0)"),
        (SETTINGS + h2_frame(H2_RST_STREAM, 0, 1, bytes(4)), 0, "reset the gRPC call (HTTP/2 error code 0)"),
    ],
    ids=["settings-only", "settings-and-ack", "headers-without-end", "slow-drip", "goaway", "rst-stream"],
)
def test_etcd_on_a_peer_that_answers_like_etcd_only_in_part(
    shared_master: MasterProcess, fake_peer, setup_never_reached, answer, drip, says
):
    peer = fake_peer("answer", answer, drip)
    message = _refused_in_time(shared_master.client_config(metadata_server=f"etcd://{peer.address}"))
    assert f"metadata server 'etcd://{peer.address}' {says}" in message


def test_etcd_on_a_grpc_server_without_etcds_services(shared_master: MasterProcess, grpc_server, setup_never_reached):
    """A live gRPC server answers the Range, with UNIMPLEMENTED: not etcd, refused before Mooncake."""
    url = f"etcd://127.0.0.1:{grpc_server}"
    message = _refused_in_time(shared_master.client_config(metadata_server=url))
    assert f"metadata server {url!r} answered gRPC status 12 (UNIMPLEMENTED" in message
    assert "a gRPC server without etcd's KV service" in message


def test_etcd_endpoints_share_the_time_and_are_all_named(shared_master: MasterProcess, fake_peer, setup_never_reached):
    silent, closed = fake_peer("silent"), f"127.0.0.1:{free_port()}"
    message = _refused_in_time(shared_master.client_config(metadata_server=f"etcd://{silent.address},{closed}"))
    assert f"{silent.address} did not answer as an etcd endpoint (gRPC) would in " in message
    assert f"{closed} is not reachable" in message


@pytest.mark.parametrize(
    ("port", "behaviour", "says"),
    [
        ("rpc_port", None, "closed the connection without an HTTP answer"),  # coro_rpc hangs up on HTTP
        (None, "silent", "did not answer as an HTTP server would in "),
        (None, "garbage", "answered bytes that are not HTTP"),
    ],
)
def test_an_http_metadata_server_that_does_not_speak_http(
    shared_master: MasterProcess, fake_peer, setup_never_reached, port, behaviour, says
):
    where = f"127.0.0.1:{getattr(shared_master, port)}" if port else fake_peer(behaviour).address
    message = _refused_in_time(shared_master.client_config(metadata_server=f"http://{where}/metadata"))
    assert f"metadata server 'http://{where}/metadata' " in message and says in message


@pytest.mark.parametrize(
    ("answer", "drip", "says"),
    [
        (b"HTTP/1.1 200 OK\r\n", 0, "did not finish an answer as an HTTP server would in "),  # status line alone
        (b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n", 0, "did not finish an answer as an HTTP server"),
        (b"HTTP/1.1 404 Not Found\r\n\r\nnot found", 0, "did not finish an answer as an HTTP server"),  # no close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", 0, "did not finish an answer"),
        (HTTP_404, 2 * TIMEOUT_S / len(HTTP_404), "did not finish an answer as an HTTP server would in "),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", 0, "answered 'HTTP/1.1 500 Oops' (a metadata server"),
    ],
    ids=["status-line-only", "headers-without-body", "body-without-end", "chunks-without-end", "slow-drip", "500"],
)
def test_an_http_metadata_server_that_answers_only_in_part(
    shared_master: MasterProcess, fake_peer, setup_never_reached, answer, drip, says
):
    url = f"http://{fake_peer('answer', answer, drip).address}/metadata"
    message = _refused_in_time(shared_master.client_config(metadata_server=url))
    assert f"metadata server {url!r} {says}" in message


@pytest.mark.parametrize(
    ("peer", "says"),
    [
        ("garbage", "failed after accepting the connection: [SSL"),  # no TLS record: the handshake fails
        ("master http", "did not answer as an HTTP server would in "),  # it waits for more of an HTTP request
    ],
)
def test_https_to_a_server_without_tls(shared_master: MasterProcess, fake_peer, setup_never_reached, peer, says):
    where = fake_peer(peer).address if peer == "garbage" else f"127.0.0.1:{shared_master.http_port}"
    url = f"https://{where}/metadata"
    message = _refused_in_time(shared_master.client_config(metadata_server=url))
    assert f"metadata server {url!r} {says}" in message


def test_the_whole_set_up_shares_one_timeout(fake_peer, setup_never_reached):
    master, metadata = fake_peer("silent"), fake_peer("silent")
    message = _refused_in_time(
        {"master_server_address": master.address, "metadata_server": f"http://{metadata.address}/metadata"}
    )
    assert f"master {master.address!r} did not answer" in message  # the master took all of the time


@pytest.mark.pure
@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://h:6379/0", "consul://h:8500", "REDIS://h:1"])
def test_unsupported_metadata_schemes_never_reach_mooncake(monkeypatch, setup_never_reached, url):
    """redis:// aborts the process inside Mooncake (no plugin in this wheel): refused in the config."""
    monkeypatch.setattr(batch_client, "connect_store", lambda config: pytest.fail("connect_store was reached"))
    message = _refused_in_time({"metadata_server": url}, ValueError)
    assert message.startswith("metadata_server must be 'P2PHANDSHAKE', 'host:port'")
    assert "metadata plugin (it would abort the process)" in message


@pytest.mark.pure
@pytest.mark.parametrize("config", [["master_server_address"], "127.0.0.1:50051", 50051, b"{}"])
def test_a_config_that_is_not_a_mapping_is_a_type_error(setup_never_reached, config):
    with pytest.raises(TypeError, match="must be a mapping"):
        MooncakeBatchClient(config)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- real peers pass
def test_a_real_master_and_its_metadata_server_pass(shared_master: MasterProcess):
    config = ClientConfig.from_dict(shared_master.client_config())
    (master_check, metadata_check) = setup_checks(config)
    master = run_probe(master_check.probes[0], time.monotonic() + 5)
    assert master.ok and master.detail == "answered coro_rpc, error code 11 (function not registered)"
    metadata = run_probe(metadata_check.probes[0], time.monotonic() + 5)
    assert metadata.ok and metadata.detail == "answered 'HTTP/1.1 404 Not Found'"  # the probe key is not stored
    assert first_problem(setup_checks(config), time.monotonic() + 5) is None


def test_a_client_on_a_real_master_sets_up_well_within_the_timeout(shared_master: MasterProcess, make_client):
    start = time.monotonic()
    client = make_client(shared_master, global_segment_size=0, setup_timeout_s=5)
    assert time.monotonic() - start < 5
    assert client.get([]) == []


@pytest.mark.parametrize(
    "answer",
    [
        HTTP_404,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.0 404 No\r\n\r\n",
    ],
    ids=["content-length", "chunked", "to-the-close"],
)
def test_a_whole_http_answer_passes(fake_peer, answer: bytes):
    peer = fake_peer("answer", answer, then_close=answer.startswith(b"HTTP/1.0"))  # no length: ends at the close
    verdict = run_probe(http_probe(f"http://{peer.address}/metadata"), time.monotonic() + 5)
    status_line = answer.split(b"\r\n")[0].decode()
    assert verdict.ok and verdict.detail == f"answered {status_line!r}"


def test_a_tls_http_server_passes_the_https_probe(tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener, context.wrap_socket(listener.accept()[0], server_side=True) as conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        verdict = run_probe(http_probe(f"https://127.0.0.1:{listener.getsockname()[1]}/metadata"), time.monotonic() + 5)
    finally:
        listener.close()
        server.join(timeout=10)
    assert verdict.ok and verdict.detail == "answered 'HTTP/1.1 404 Not Found'"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary (Debian's etcd-server) on PATH")
def test_a_real_etcd_passes_and_serves_as_the_metadata_server(start_master, make_client, tmp_path):
    """A private master: on a shared one the put may land in another client's segment, whose descriptor lives
    in the HTTP metadata server, not in this etcd (TRANSFER_FAIL, as CI once saw)."""
    master = start_master(http_metadata=False)
    port, peer_port = free_port(), free_port()
    args = [
        "etcd",
        f"--data-dir={tmp_path / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{port}",
        f"--advertise-client-urls=http://127.0.0.1:{port}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
    ]
    with open(tmp_path / "etcd.log", "wb") as log:
        etcd = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probe = etcd_probe("127.0.0.1", port)
        wait_until(lambda: run_probe(probe, time.monotonic() + 1).ok, 30, "etcd to answer")
        assert run_probe(probe, time.monotonic() + 5).detail == "answered a KV Range with gRPC status 0 (OK)"
        client = make_client(master, metadata_server=f"etcd://127.0.0.1:{port}", setup_timeout_s=5)
        metas = client.put(["etcd-key"], [b"value"])
        assert client.get(["etcd-key"], custom_backend_meta=metas) == [b"value"]
        client.close()
    finally:
        etcd.terminate()
        etcd.wait(timeout=10)


# ------------------------------------------------------------------------- what the wheel supports
_CHILD = """
import sys
from mooncake.engine import TransferEngine
print("RC", TransferEngine().initialize("127.0.0.1", sys.argv[1], "tcp", ""), flush=True)
"""


def test_the_accepted_metadata_schemes_are_exactly_the_wheels_plugins(grpc_server: int):
    """Each scheme goes to a fresh process's transfer engine (the same plugin factory ``setup()`` uses), at a
    peer that fails fast: a plugin that exists returns an error code; a missing one aborts the process."""
    closed = free_port()
    urls = {
        "http": f"http://127.0.0.1:{closed}/metadata",
        "https": f"https://127.0.0.1:{closed}/metadata",
        "etcd": f"etcd://127.0.0.1:{grpc_server}",  # a gRPC server without etcd's services: Put fails at once
        "redis": f"redis://127.0.0.1:{closed}",
        "consul": f"consul://127.0.0.1:{closed}",
    }
    env = dict(os.environ, MC_TCP_BIND_ADDRESS="127.0.0.1")
    children = {
        scheme: subprocess.Popen(
            [sys.executable, "-c", _CHILD, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for scheme, url in urls.items()
    }
    outcomes = {}
    try:
        for scheme, child in children.items():
            out, err = child.communicate(timeout=120)
            aborted = child.returncode == -signal.SIGABRT and "Unable to find metadata storage plugin" in err
            assert aborted or (child.returncode == 0 and out.startswith("RC ")), (scheme, child.returncode, err[-500:])
            outcomes[scheme] = not aborted
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    supported = {scheme for scheme, ok in outcomes.items() if ok}
    assert supported == set(METADATA_SCHEMES)
    for scheme, url in urls.items():  # and the config refuses exactly the others
        if scheme not in supported:
            with pytest.raises(ValueError, match="it would abort the process"):
                ClientConfig.from_dict({"metadata_server": url})


# ------------------------------------------------------------------------------------- verdicts (pure)
def _feed(judge, data: bytes, eof: bool = False):
    """The judge's verdict on ``data`` arriving one byte at a time (None: still waiting)."""
    for i in range(1, len(data) + 1):
        verdict = judge(data[:i], False)
        if verdict is not None:
            return verdict
    return judge(data, True) if eof else judge(data, False)


@pytest.mark.pure
def test_the_coro_rpc_request_is_a_bare_header_for_no_function():
    magic, version, serialize, msg_type, seq, function_id, length, attach = struct.unpack("<BBBBIIII", CORO_RPC_REQUEST)
    assert (magic, version, serialize, msg_type, function_id, length, attach) == (21, 0, 0, 0, 0, 0, 0)
    assert struct.pack("<I", seq) == SEQ and len(CORO_RPC_REQUEST) == 20


@pytest.mark.pure
def test_the_masters_answer_passes_only_once_whole():
    assert _feed(judge_coro_rpc, MASTER_ANSWER[:-1]) is None  # the header and all but a byte of its message
    verdict = _feed(judge_coro_rpc, MASTER_ANSWER)
    assert verdict.ok and verdict.detail == "answered coro_rpc, error code 11 (function not registered)"


@pytest.mark.pure
@pytest.mark.parametrize(
    ("data", "eof", "says"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", False, "answered bytes that are not coro_rpc"),
        (b"\x00" * 16, False, "answered bytes that are not coro_rpc"),
        (b"", True, "closed the connection without answering a coro_rpc request"),
        (b"\x15\x00\x0b", True, "closed the connection after 3 byte(s)"),
        (b"\x15\x00\x0b\x00" + b"\x07\x00\x00\x00" + b"\x00" * 8, False, "a coro_rpc header for another request"),
        (MASTER_ANSWER[:8] + b"\x00" * 8, False, "announcing a 0-byte error message"),
        (MASTER_ANSWER[:8] + struct.pack("<II", 1 << 30, 0), False, "announcing a 1073741824-byte error message"),
        (MASTER_ANSWER[:2] + b"\x00" + MASTER_ANSWER[3:], False, "coro_rpc error code 0 to a call of no function"),
        (MASTER_ANSWER[:20], True, "closed the connection after 4 of the 40 byte(s) its coro_rpc header announced"),
    ],
)
def test_what_is_not_a_masters_answer(data, eof, says):
    verdict = _feed(judge_coro_rpc, data, eof)
    assert verdict is not None and not verdict.ok and says in verdict.detail


@pytest.mark.pure
@pytest.mark.parametrize(
    ("data", "eof", "ok", "says"),
    [
        (HTTP_404, False, True, "answered 'HTTP/1.1 404 Not Found'"),
        (b"HTTP/1.1 200 OK\r\ncontent-length:2\r\n\r\n{}", False, True, "answered 'HTTP/1.1 200 OK'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{}\r\n0\r\nT: 1\r\n\r\n", False, True, "200"),
        (b"HTTP/1.0 404 Not Found\r\n\r\nnothing here", True, True, "answered 'HTTP/1.0 404 Not Found'"),
        (b"HTTP/1.1 500 Internal Server Error\r\n\r\n", False, False, "a metadata server answers a key's GET"),
        (b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n", False, False, "answered 'HTTP/1.1 301 Moved' (a metadata"),
        (b"HTTP/1.1 20x OK\r\n\r\n", False, False, "a malformed HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", False, False, "a malformed header line: 'no colon'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", False, False, "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa3\r\n\r\n", False, False, "unusable Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", False, False, "unusable Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False, False, "other than chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, False, "malformed chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n", False, False, "longer than"),
        (MASTER_ANSWER, False, False, "not HTTP"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False, False, "not HTTP"),
        (b"HTTP/1.1 200", True, False, "closed the connection without an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\n", True, False, "closed the connection before the end of its HTTP headers"),
        (HTTP_404[:-1], True, False, "closed the connection after 17 of its 18-byte body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True, False, "inside its chunked body"),
        (b"", True, False, "closed the connection without an HTTP answer"),
    ],
)
def test_http_verdicts(data, eof, ok, says):
    verdict = _feed(judge_http, data, eof)
    assert verdict is not None and verdict.ok is ok and says in verdict.detail


@pytest.mark.pure
@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
        HTTP_404[:-1],
        b"HTTP/1.1 404 x\r\n\r\n",
    ],
)
def test_an_unfinished_http_answer_waits(data):
    assert _feed(judge_http, data) is None


def _hpack(*fields: tuple[str, str]) -> bytes:
    """A header block of literal fields, new names, no Huffman (any HPACK decoder reads it)."""
    return b"".join(b"\x00" + bytes([len(n)]) + n.encode() + bytes([len(v)]) + v.encode() for n, v in fields)


_GRPC_HEAD = (":status", "200"), ("content-type", "application/grpc")


def _etcd_answer(*frames: bytes) -> bytes:
    return SETTINGS + b"".join(frames)


def _trailers_only(code: int, message: str = "") -> bytes:
    block = _hpack(*_GRPC_HEAD, ("grpc-status", str(code)), ("grpc-message", message))
    return _etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, block))


def _unary(message: bytes, status: str = "0") -> bytes:
    return _etcd_answer(
        h2_frame(H2_HEADERS, 0x4, 1, _hpack(*_GRPC_HEAD)),
        h2_frame(H2_DATA, 0, 1, b"\x00" + struct.pack(">I", len(message)) + message),
        h2_frame(H2_HEADERS, 0x5, 1, _hpack(("grpc-status", status))),
    )


_RANGE_RESPONSE = b"\x0a\x04\x08\x01\x10\x02"  # RangeResponse{header: {cluster_id: 1, member_id: 2}}


@pytest.mark.pure
def test_etcds_answer_passes_only_once_whole():
    verdict = _feed(judge_etcd, ETCD_ANSWER)
    assert verdict.ok and verdict.detail == "answered a KV Range with gRPC status 0 (OK)"
    assert _feed(judge_etcd, ETCD_ANSWER[:-1]) is None  # all but the last byte of the trailers


@pytest.mark.pure
@pytest.mark.parametrize(
    ("data", "ok", "says"),
    [
        (_unary(_RANGE_RESPONSE), True, "answered a KV Range with gRPC status 0 (OK)"),
        (_trailers_only(3, "etcdserver: user name is empty"), True, "status 3 (INVALID_ARGUMENT: 'etcdserver: user"),
        (_trailers_only(7, "a%20b"), True, "gRPC status 7 (PERMISSION_DENIED: 'a b')"),  # grpc-message %-decoded
        (SETTINGS + h2_frame(H2_HEADERS, 0x5, 1, ETCD_UNIMPLEMENTED), False, "12 (UNIMPLEMENTED: 'unknown method"),
        (_trailers_only(14, "etcdserver: request timed out"), False, "etcd cannot serve a read"),
        (_trailers_only(4), False, "gRPC status 4 (DEADLINE_EXCEEDED): etcd cannot serve a read"),
        (_unary(b"\xff"), False, "a gRPC message that is not protobuf"),
        (_unary(b"\x08\x01"), False, "a protobuf message without a response header"),
        (_unary(_RANGE_RESPONSE, status="zero"), False, "without a gRPC status (grpc-status 'zero')"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, _hpack(*_GRPC_HEAD))), False, "without a gRPC status"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, _hpack((":status", "404")))), False, "status '404', not gRPC"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, _hpack((":status", "200")))), False, "content-type None"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, b"\xff\xff")), False, "a malformed HTTP/2 header block"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 1, b"\x00\x85\xff\xff\xff\xff\xff\x00")), False, "malformed"),
        (_etcd_answer(h2_frame(H2_DATA, 1, 1, b"\x00" * 5)), False, "sent gRPC data before its response headers"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 3, b"")), False, "answered on HTTP/2 stream 3"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x5, 0, b"")), False, "sent an HTTP/2 frame of type 1 on stream 0"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0x0, 1, b""), h2_frame(6, 0, 0, bytes(8))), False, "broke off"),
        (_etcd_answer(h2_frame(H2_HEADERS, 0xD, 1, b"\x09")), False, "padding longer than the frame"),
        (_etcd_answer(b"\x00\x40\x01\x00\x00\x00\x00\x00\x00"), False, "frame of 16385 bytes"),
        (_etcd_answer(h2_frame(H2_GOAWAY, 0, 0, bytes(7) + b"\x0bbye")), False, "GOAWAY (error code 11: b'bye')"),
        (SETTINGS_ACK, False, "without opening with its SETTINGS frame"),
        (h2_frame(H2_SETTINGS, 0, 1, b""), False, "without opening with its SETTINGS frame"),
        (b"HTTP/1.1 400 Bad Request\r\n", False, "not HTTP/2"),
    ],
)
def test_etcd_verdicts(data, ok, says):
    verdict = _feed(judge_etcd, data)
    assert verdict is not None and verdict.ok is ok and says in verdict.detail


@pytest.mark.pure
@pytest.mark.parametrize(
    "data",
    [SETTINGS, SETTINGS + SETTINGS_ACK, _unary(_RANGE_RESPONSE)[:-1], _etcd_answer(h2_frame(H2_HEADERS, 0x1, 1, b""))],
    ids=["settings", "settings-ack", "all-but-a-byte", "headers-awaiting-continuation"],
)
def test_an_unfinished_etcd_answer_waits_and_fails_at_the_close(data):
    assert _feed(judge_etcd, data) is None
    verdict = judge_etcd(data, True)
    assert (
        not verdict.ok and verdict.detail == "closed the connection before a whole gRPC answer (not an etcd endpoint)"
    )


@pytest.mark.pure
def test_the_etcd_request_is_one_grpc_call_of_kv_range():
    request = etcd_range_request("127.0.0.1:2379")
    assert request.startswith(H2_PREFACE + SETTINGS)
    frames, pos = [], len(H2_PREFACE + SETTINGS)
    while pos < len(request):
        length = int.from_bytes(request[pos : pos + 3], "big")
        frames.append(
            (request[pos + 3], request[pos + 4], request[pos + 5 : pos + 9], request[pos + 9 : pos + 9 + length])
        )
        pos += 9 + length
    (headers_kind, headers_flags, stream1, block), (data_kind, data_flags, stream2, data) = frames
    assert (headers_kind, headers_flags, data_kind, data_flags) == (H2_HEADERS, 0x4, H2_DATA, 0x1)
    assert stream1 == stream2 == b"\x00\x00\x00\x01"
    from tq_mooncake.client.setup_probe import _Hpack

    assert _Hpack().decode(block) == [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", ETCD_RANGE_PATH),
        (":authority", "127.0.0.1:2379"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    key = PROBE_KEY.encode()
    assert data == b"\x00" + struct.pack(">I", len(key) + 4) + b"\x0a" + bytes([len(key)]) + key + b"\x48\x01"
    assert b"[::1]:2379" in etcd_probe("::1", 2379).request


@pytest.mark.pure
@pytest.mark.parametrize(
    ("coded", "text"),
    [  # RFC 7541 C.4 and C.6
        ("f1e3c2e5f23a6ba0ab90f4ff", b"www.example.com"),
        ("a8eb10649cbf", b"no-cache"),
        ("25a849e95bb8e8b4bf", b"custom-value"),
        ("6402", b"302"),
        ("d07abe941054d444a8200595040b8166e082a62d1bff", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        ("9d29ad171863c78f0b97c8e9ae82ae43d3", b"https://www.example.com"),
        ("", b""),
    ],
)
def test_huffman_decoding_matches_the_rfc(coded, text):
    assert huffman_decode(bytes.fromhex(coded)) == text


@pytest.mark.pure
@pytest.mark.parametrize("coded", ["00", "ff", "fffffffc", "f1e3c2e5f23a6ba0ab90f4ffff"])
def test_bad_huffman_strings_are_refused(coded):
    """Padding of zeros, EOS (30 one bits), padding longer than 7 bits: RFC 7541 5.2 errors."""
    from tq_mooncake.client.setup_probe import _HpackError

    with pytest.raises(_HpackError):
        huffman_decode(bytes.fromhex(coded))


def test_a_peer_sending_more_than_an_answer_is_cut_off():
    """A stream of frames that never ends the gRPC call is not read past MAX_ANSWER_BYTES."""
    ping = h2_frame(6, 0, 0, bytes(8))
    assert _feed(judge_etcd, SETTINGS + ping * 3) is None
    listener = socket.create_server(("127.0.0.1", 0))

    def flood() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):
                conn.sendall(SETTINGS + ping * (MAX_ANSWER_BYTES // len(ping) + 100))
                conn.recv(1)

    server = threading.Thread(target=flood, daemon=True)
    server.start()
    start = time.monotonic()
    verdict = run_probe(etcd_probe("127.0.0.1", listener.getsockname()[1]), time.monotonic() + 30)
    server.join(timeout=10)
    assert not verdict.ok and verdict.detail == f"sent more than {MAX_ANSWER_BYTES} bytes without a whole answer"
    assert time.monotonic() - start < 5


@pytest.mark.pure
def test_the_http_probe_reads_a_probe_key_at_the_metadata_path():
    probe = http_probe("http://meta:8080/metadata")
    assert (probe.host, probe.port, probe.tls) == ("meta", 8080, False)
    assert probe.request == (
        b"GET /metadata?key=tq-mooncake-setup-probe HTTP/1.1\r\nHost: meta:8080\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert http_probe("https://meta/x").tls and http_probe("https://meta/x").port == 443
    assert http_probe("http://[::1]:8/m").request.startswith(
        b"GET /m?key=tq-mooncake-setup-probe HTTP/1.1\r\nHost: [::1]:8\r\n"
    )
    with pytest.raises(ValueError, match="without a query or fragment"):
        http_probe("https://meta/x?a=1")


@pytest.mark.pure
@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ("P2PHANDSHAKE", []),
        ("http://127.0.0.1:8080/metadata", [("metadata server", [("127.0.0.1", 8080)])]),
        ("etcd://a:1,b:2", [("metadata server", [("a", 1), ("b", 2)])]),
    ],
)
def test_the_checks_are_the_master_then_the_metadata_server(metadata, expected):
    config = ClientConfig(metadata_server=metadata, master_server_address="10.0.0.1:50051")
    checks = [(c.what, [(p.host, p.port) for p in c.probes]) for c in setup_checks(config)]
    assert checks == [("master", [("10.0.0.1", 50051)]), *expected]
    assert setup_checks(config)[0].probes[0] == master_probe("10.0.0.1", 50051)


@pytest.mark.pure
def test_a_probe_with_no_time_left_fails_without_waiting():
    probe = Probe("127.0.0.1", 9, CORO_RPC_REQUEST, judge_coro_rpc, "a mooncake_master (coro_rpc)")
    start = time.monotonic()
    verdict = run_probe(probe, time.monotonic() - 1)
    assert not verdict.ok and time.monotonic() - start < 1
