"""Closing while calls are in flight, sharing one client across threads, and what gets installed."""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from tq_mooncake.client import ClientClosedError, ErrorCode, FaultInjectingStore, FaultRule, MooncakeBatchClient
from tq_mooncake.cluster import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_close_ends_calls_in_flight_with_a_clear_error(shared_master, keyspace):
    keys = keyspace(5)
    # Retries that never run out on their own (attempts, deadline or budget): only close() can end the call.
    retry = {"max_attempts": 10_000, "initial_backoff_s": 0.01, "max_backoff_s": 0.02, "budget_min_per_s": 10_000}
    client = MooncakeBatchClient(
        shared_master.client_config(retry=retry),
        wrap_store=lambda s: FaultInjectingStore(s, [FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset(keys))]),
    )
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.put(keys, ["v"] * 5)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    try:
        wait_until(lambda: len(client.store.calls_for("put")) >= 3, 10, "the put to be retrying")
    finally:
        client.close()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClientClosedError)
    assert "client closed during put" in str(errors[0])


def test_threads_share_one_client(client, keyspace):
    results: dict[int, bool] = {}

    def work(t: int) -> None:
        keys = [f"{k}-t{t}" for k in keyspace(40)]
        values = [torch.full((32,), float(t * 100 + i)) for i in range(40)]
        metas = client.put(keys, values)
        got = client.get(keys, custom_backend_meta=metas)
        results[t] = all(torch.equal(v, g) for v, g in zip(values, got, strict=True))
        client.clear(keys)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {t: True for t in range(8)}


def test_no_bare_top_level_client_package_is_installed(tmp_path):
    """Outside the checkout (where the folder itself is on sys.path) only the namespaced package exists."""
    probe = "import importlib.util as u; print(u.find_spec('tq_mooncake.client') is not None, u.find_spec('client'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "None"]


@pytest.mark.timeout(600)
def test_wheel_installs_under_the_tq_mooncake_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tq_mooncake-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tq_mooncake/client/batch_client.py" in names
    assert "tq_mooncake/telemetry/__init__.py" in names
    assert "tq_mooncake/dashboard/__init__.py" in names
    assert "tq_mooncake/transferqueue/__init__.py" in names
    assert "tq_mooncake/cluster/storage_node.py" in names
    assert "tq_mooncake/cli/main.py" in names
    assert "tq_mooncake/testing/__init__.py" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("tq_mooncake-")}
    assert tops == {"tq_mooncake"}
