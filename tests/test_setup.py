"""Set-up never hangs: whatever answers on a configured address, the constructor raises StoreSetupError (or
ValueError, for a malformed address) within ``setup_timeout_s`` plus a margin, before Mooncake's ``setup()``.

Peers are real: a real ``mooncake_master``'s other ports, plain TCP servers that say nothing, send garbage or
close, a gRPC server, closed ports. The verdicts on the bytes a peer sends are tested on their own (pure), and
the metadata schemes the config accepts are checked against the installed wheel in subprocesses (an
unsupported one aborts the process).
"""

from __future__ import annotations

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
    HTTP2_PREFACE,
    Probe,
    etcd_probe,
    first_problem,
    http_probe,
    judge_coro_rpc,
    judge_http,
    judge_http2,
    master_probe,
    run_probe,
    setup_checks,
)
from tq_mooncake.cluster import MasterProcess, free_port, wait_until

TIMEOUT_S = 1.0  # setup_timeout_s of every test here
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


# ------------------------------------------------------------------------------------------------ peers
class FakePeer:
    """A TCP server on 127.0.0.1 that accepts every connection and then: ``silent`` says nothing, ``garbage``
    sends bytes of no protocol, ``close`` closes at once, ``half`` sends the first 2 bytes of a coro_rpc
    header and nothing more. ``stop()`` closes it all and joins its thread."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
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
            payload = {"garbage": b"\xde\xad\xbe\xef" * 64, "half": b"\x15\x00"}.get(self.behaviour, b"")
            if payload:
                conn.sendall(payload)

    def connections(self) -> list[socket.socket]:
        """The connections accepted (and kept) so far."""
        return list(self._conns)

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=10)
        for conn in self._conns:
            conn.close()


@pytest.fixture
def fake_peer() -> Iterator[Callable[[str], FakePeer]]:
    """``fake_peer("silent")``: a started FakePeer, stopped at teardown even if the test fails."""
    peers: list[FakePeer] = []

    def start(behaviour: str) -> FakePeer:
        peers.append(FakePeer(behaviour))
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
        ("half", "did not answer as a mooncake_master (coro_rpc) would in "),
    ],
)
def test_a_peer_that_is_not_a_master(fake_peer, setup_never_reached, behaviour, says):
    peer = fake_peer(behaviour)
    message = _refused_in_time({"master_server_address": peer.address, "global_segment_size": 0})
    assert message.startswith(f"Mooncake store setup failed: master {peer.address!r} ")
    assert says in message
    assert peer.accepted >= 1  # the port was live: only the protocol told


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
        ("silent", "did not answer as an etcd endpoint (gRPC over HTTP/2) would in "),
        ("garbage", "answered bytes that are not HTTP/2 (gRPC, as etcd speaks)"),
        ("close", "closed the connection without an HTTP/2 answer"),
    ],
)
def test_etcd_on_a_peer_that_is_not_etcd(shared_master: MasterProcess, fake_peer, setup_never_reached, behaviour, says):
    peer = fake_peer(behaviour)
    message = _refused_in_time(shared_master.client_config(metadata_server=f"etcd://{peer.address}"))
    assert f"metadata server 'etcd://{peer.address}' " in message and says in message


def test_etcd_endpoints_share_the_time_and_are_all_named(shared_master: MasterProcess, fake_peer, setup_never_reached):
    silent, closed = fake_peer("silent"), f"127.0.0.1:{free_port()}"
    message = _refused_in_time(shared_master.client_config(metadata_server=f"etcd://{silent.address},{closed}"))
    assert f"{silent.address} did not answer as an etcd endpoint (gRPC over HTTP/2) would in " in message
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
    client = make_client(shared_master, global_segment_size=0, setup_timeout_s=TIMEOUT_S)
    assert time.monotonic() - start < TIMEOUT_S
    assert client.get([]) == []


def test_a_grpc_server_passes_the_etcd_probe(grpc_server: int):
    """A live HTTP/2 server answers like etcd; whether it *is* etcd is Mooncake's to find (it fails fast)."""
    verdict = run_probe(etcd_probe("127.0.0.1", grpc_server), time.monotonic() + 5)
    assert verdict.ok and verdict.detail == "answered HTTP/2 SETTINGS (gRPC)"


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
def test_a_real_etcd_passes_and_serves_as_the_metadata_server(shared_master: MasterProcess, make_client, tmp_path):
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
        client = make_client(shared_master, metadata_server=f"etcd://127.0.0.1:{port}", setup_timeout_s=5)
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
def test_the_masters_answer_passes_after_its_header():
    assert _feed(judge_coro_rpc, MASTER_ANSWER[:15]) is None
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
    ],
)
def test_what_is_not_a_masters_answer(data, eof, says):
    verdict = _feed(judge_coro_rpc, data, eof)
    assert verdict is not None and not verdict.ok and says in verdict.detail


@pytest.mark.pure
@pytest.mark.parametrize(
    ("data", "eof", "ok", "says"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False, True, "answered 'HTTP/1.1 404 Not Found'"),
        (b"HTTP/1.0 200 OK\r\n", False, True, "answered 'HTTP/1.0 200 OK'"),
        (MASTER_ANSWER, False, False, "not HTTP"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False, False, "not HTTP"),
        (b"HTTP/1.1 200", True, False, "closed the connection without an HTTP answer"),
        (b"", True, False, "closed the connection without an HTTP answer"),
    ],
)
def test_http_verdicts(data, eof, ok, says):
    verdict = _feed(judge_http, data, eof)
    assert verdict is not None and verdict.ok is ok and says in verdict.detail


@pytest.mark.pure
@pytest.mark.parametrize(
    ("data", "eof", "ok", "says"),
    [
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64", False, True, "SETTINGS"),
        (b"\x00\x00\x00\x04\x01\x00\x00\x00\x00", False, True, "SETTINGS"),  # a SETTINGS ack is a SETTINGS frame
        (b"HTTP/1.1 400 Bad Request\r\n", False, False, "not HTTP/2"),
        (b"\x00\x00\x00\x04\x00\x00\x00\x00\x03", False, False, "on stream 3"),
        (b"\x00\x00", True, False, "closed the connection without an HTTP/2 answer"),
    ],
)
def test_http2_verdicts(data, eof, ok, says):
    verdict = _feed(judge_http2, data, eof)
    assert verdict is not None and verdict.ok is ok and says in verdict.detail


@pytest.mark.pure
def test_the_etcd_request_is_the_http2_client_preface_and_an_empty_settings_frame():
    assert HTTP2_PREFACE.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") and HTTP2_PREFACE.endswith(
        b"\x04" + b"\x00" * 5
    )


@pytest.mark.pure
def test_the_http_probe_reads_a_probe_key_at_the_metadata_path():
    probe = http_probe("http://meta:8080/metadata")
    assert (probe.host, probe.port, probe.tls) == ("meta", 8080, False)
    assert probe.request.startswith(b"GET /metadata?key=tq-mooncake-setup-probe HTTP/1.1\r\nHost: meta:8080\r\n")
    assert http_probe("https://meta/x?a=1").request.startswith(b"GET /x?a=1&key=tq-mooncake-setup-probe HTTP/1.1")
    assert http_probe("https://meta/x").tls and http_probe("https://meta/x").port == 443


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
