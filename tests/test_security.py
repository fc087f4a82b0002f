"""Security: stored bytes are never unpickled unless allowed, local services bind loopback, and telemetry
never carries keys or values."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import torch

from tq_mooncake.client import (
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    MooncakeBatchClient,
    NonRetryableError,
    codec,
    integrity,
)
from tq_mooncake.cluster import LOOPBACK, MasterProcess, StorageNodeProcess, start_all, stop_all
from tq_mooncake.telemetry.pipeline import file_pipeline


def raw_write(store, key: str, data: bytes, write_id: int = 1) -> None:
    """Write ``data`` under ``key`` with the raw Mooncake store, bypassing the client's codec, with the trailer a
    hostile writer who knows the stored format would forge."""
    from mooncake.store import ReplicateConfig

    buf = np.frombuffer(bytearray(integrity.seal(key, data, write_id)), dtype=np.uint8)
    assert list(store.batch_upsert_from([key], [buf.ctypes.data], [buf.size], ReplicateConfig())) == [0]


class _Bomb:
    """Unpickling this touches a file: proof that a stored pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bomb_frame(marker: Path) -> bytes:
    return codec._frame(codec.Codec.PICKLE, pickle.dumps(_Bomb(marker)))


def test_a_stored_pickle_bomb_is_refused(client, shared_master, make_client, keyspace, tmp_path):
    (key,) = keyspace(1)
    marker = tmp_path / "unpickled"
    raw_write(client.store, key, _bomb_frame(marker))
    with pytest.raises(NonRetryableError) as info:
        client.get([key])
    assert info.value.failed == {key: ErrorCode.PICKLE_NOT_ALLOWED}
    assert "PICKLE_NOT_ALLOWED" in str(info.value)
    # With the metadata of a real value, the bomb is refused before its payload is looked at: by the write id
    # when the forged trailer names another, by the frame checksum when it names the real one.
    honest = "x" * (len(_bomb_frame(marker)) - codec.HEADER_SIZE)  # a frame of the bomb's size
    meta = client.put([f"{key}-honest"], [honest])
    for write_id, error, code in (
        (7, NonRetryableError, ErrorCode.STALE_VALUE),
        (meta[0]["wid"], NonRetryableError, ErrorCode.METADATA_MISMATCH),
    ):
        raw_write(client.store, f"{key}-honest", _bomb_frame(marker), write_id)
        with pytest.raises(error) as refused:
            client.get([f"{key}-honest"], custom_backend_meta=meta)
        assert refused.value.failed == {f"{key}-honest": code}
    assert not marker.exists()
    # The control: a client that allows pickle does run it, so the bomb above was live.
    trusting = make_client(shared_master, allow_pickle=True)
    trusting.get([key])
    assert marker.exists()


@pytest.mark.parametrize(
    "frame",
    [
        # Object arrays could only be rebuilt by unpickling their items: refused, never unpickled.
        codec._frame(codec.Codec.NDARRAY, msgpack.packb(["|O", [1], b"\0" * 8])),
        codec._frame(codec.Codec.NDARRAY, msgpack.packb(["O,O", [1], b"\0" * 16])),
        codec._frame(codec.Codec.MSGPACK, msgpack.packb(msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\0" * 8])))),
        codec._frame(codec.Codec.MSGPACK, msgpack.packb(msgpack.ExtType(4, msgpack.packb(["|O", b"\0" * 8])))),
        codec._frame(codec.Codec.MSGPACK, msgpack.packb(msgpack.ExtType(99, b"\x80\x04N."))),  # unknown ext
        codec._frame(codec.Codec.TENSOR, msgpack.packb(["object", [1], b"\0" * 8])),
        codec._frame(7, pickle.dumps("a pickle under an unknown codec")),
    ],
    ids=["object-ndarray", "object-struct", "object-nested", "object-scalar", "unknown-ext", "tensor", "codec-7"],
)
def test_crafted_frames_that_would_need_pickle_are_refused(client, keyspace, frame):
    (key,) = keyspace(1)
    raw_write(client.store, key, frame)
    with pytest.raises(NonRetryableError) as info:
        client.get([key])
    assert info.value.failed == {key: ErrorCode.CORRUPT_VALUE}


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"}


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1")


def test_local_services_bind_loopback(tmp_path):
    """What tq_mooncake starts binds 127.0.0.1, except two listeners Mooncake 0.3.13 does not let a caller
    bind: the master's embedded HTTP metadata server (it ignores --http_metadata_server_host) and the transfer
    engine of every store process (MC_TCP_BIND_ADDRESS chooses only the address it advertises)."""
    # Both masters side by side, and the storage node closing its store while the client is made and closed:
    # each stop costs a second or two, mostly waiting.
    quiet, master = MasterProcess(tmp_path, http_metadata=False), MasterProcess(tmp_path)
    node = StorageNodeProcess(master, tmp_path, "16MB")
    try:
        start_all([quiet, master])
        assert _listening(quiet.pid) == {(LOOPBACK, quiet.rpc_port), (LOOPBACK, quiet.metrics_port)}
        listening = _listening(master.pid)
        assert {(LOOPBACK, master.rpc_port), (LOOPBACK, master.metrics_port)} <= listening
        assert {(ip, port) for ip, port in listening if not _loopback(ip)} <= {("0.0.0.0", master.http_port)}
        node.start()
        assert len(_listening(node.pid)) <= 2  # the transfer engine's data and handshake ports only
        node.kill(signal.SIGTERM)  # it unmounts its segment and exits meanwhile
        before = _listening(os.getpid())
        client = MooncakeBatchClient(master.client_config())
        try:
            assert len(_listening(os.getpid()) - before) <= 2  # the same two, and nothing of ours
        finally:
            client.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)  # type: ignore[union-attr]
    finally:
        stop_all([node])  # before the masters: a node closing its store needs its master
        stop_all([quiet, master], timeout=0)  # SIGKILL: nothing is left to stop gracefully


def test_the_prometheus_endpoint_binds_loopback():
    probe = (
        "import os, psutil; from tq_mooncake import telemetry; t = telemetry.configure(prometheus_port=0); "
        "print(sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(os.getpid()).net_connections('inet') "
        "if c.status == 'LISTEN'), t.prometheus_port)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    listening, port = out.stdout.strip().rsplit(" ", 1)
    assert listening == repr([(LOOPBACK, int(port))])


def test_telemetry_never_carries_keys_or_values(shared_master, tmp_path):
    secret = uuid.uuid4().hex
    keys = [f"KEY{secret}-{i}@field" for i in range(12)]
    values = [f"VALUE{secret}-{i}" for i in range(6)] + [torch.full((4,), 7.0) for _ in range(6)]
    tracer_provider, meter_provider = file_pipeline(tmp_path)
    rules = [FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset(keys[:3]), attempts=frozenset({1}))]
    client = MooncakeBatchClient(
        shared_master.client_config(retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002}),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        wrap_store=lambda s: FaultInjectingStore(s, rules),
    )
    try:
        metas = client.put(keys, values)
        client.get(keys, custom_backend_meta=metas)
        client.store.add_rule(FaultRule(code=ErrorCode.RPC_FAIL, keys=frozenset(keys[4:6]), operations={"get"}))
        with pytest.raises(Exception, match=keys[4]):  # the exception names the key; telemetry must not
            client.get(keys)
        client.clear(keys)
        with pytest.raises(NonRetryableError, match=keys[7]):
            client.get(keys)
    finally:
        client.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    exported = "".join(p.read_text() for p in sorted(tmp_path.glob("*.jsonl")))
    assert "mooncake.get.attempt" in exported and "mooncake.client.keys.failed" in exported  # real content
    assert "RPC_FAIL" in exported and "OBJECT_NOT_FOUND" in exported
    assert secret not in exported
    for text in keys + [v for v in values if isinstance(v, str)]:
        assert text not in exported
