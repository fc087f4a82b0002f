"""TransferQueue backend: registration, the careful bootstrap, TQ's client interface on a real master, and
end to end with real TQ 0.1.11, a real local Ray and a real master (each TQ job runs as its own process,
because TQ, Ray and telemetry are set up once per process)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from background import Background  # tests/support
from transfer_queue.storage.bootstrap import StorageBootstrapProvider
from transfer_queue.storage.clients.base import StorageClientFactory
from transfer_queue.storage.managers.base import StorageManagerFactory

import tq_mooncake.transferqueue as tqm
from tq_mooncake.client import NonRetryableError
from tq_mooncake.cluster import LOOPBACK, free_port
from tq_mooncake.transferqueue.manager import StockNameStorageManager
from tq_mooncake.transferqueue.telemetry_section import telemetry_enabled

JOB = Path(__file__).parent / "jobs" / "tq_roundtrip.py"
E2E_CONFTEST = Path(__file__).parent / "jobs" / "tq_e2e_conftest.py"
FAST_RETRY = {"initial_backoff_s": 0.01, "max_backoff_s": 0.05}


def test_importing_registers_the_backend_its_client_and_its_bootstrap():
    assert StorageManagerFactory._registry["MooncakeStoreObserved"] is tqm.ObservedMooncakeStorageManager
    assert StorageManagerFactory._registry["MooncakeStore"] is StockNameStorageManager
    assert StorageClientFactory._registry["MooncakeStoreObservedClient"] is tqm.ObservedMooncakeClient
    assert StorageBootstrapProvider.get_provider("MooncakeStoreObserved") is not None
    tqm.register()  # idempotent: the stock client is still found behind the switch
    from transfer_queue.storage.clients.mooncake_client import MooncakeStoreClient
    from transfer_queue.storage.managers.mooncake_manager import MooncakeStorageManager

    from tq_mooncake.transferqueue import registry

    assert registry._stock["client"] is MooncakeStoreClient
    assert registry._stock["manager"] is MooncakeStorageManager


def test_register_puts_the_switch_back_after_tq_re_registers_its_own_backend():
    """A reloaded TQ module re-registers TQ's stock manager, client and bootstrap: ``register()`` wraps them
    again (else, after ``replace_stock``, our client would run under TQ's manager: on the loop, never closed)."""
    from transfer_queue.storage.clients.mooncake_client import MooncakeStoreClient
    from transfer_queue.storage.managers.mooncake_manager import MooncakeStorageManager

    from tq_mooncake.transferqueue import registry

    StorageManagerFactory.register("MooncakeStore")(MooncakeStorageManager)
    StorageClientFactory.register("MooncakeStoreClient")(MooncakeStoreClient)
    StorageBootstrapProvider.register_provider("MooncakeStore")(registry._stock["bootstrap"])
    tqm.register()
    assert StorageManagerFactory._registry["MooncakeStore"] is StockNameStorageManager
    assert StorageClientFactory._registry["MooncakeStoreClient"] is registry._stock_or_observed_client
    assert StorageBootstrapProvider.get_provider("MooncakeStore").__wrapped__ is registry._stock_or_observed_bootstrap
    assert registry._stock["client"] is MooncakeStoreClient and registry._stock["manager"] is MooncakeStorageManager
    assert getattr(registry._stock["bootstrap"], "__wrapped__", None) is not registry._stock_or_observed_bootstrap


def test_a_registration_that_fails_midway_leaves_tqs_registries_as_they_were(monkeypatch):
    """All or nothing: no half-registered backend (say, a manager without its bootstrap provider)."""
    from tq_mooncake.transferqueue import registry

    registries = (StorageClientFactory._registry, StorageManagerFactory._registry, StorageBootstrapProvider._providers)
    for reg in registries:  # as if nothing of ours were registered yet
        for name in ("MooncakeStoreObserved", "MooncakeStoreObservedClient", "mooncakestoreobserved"):
            monkeypatch.delitem(reg, name, raising=False)
    before = [dict(reg) for reg in registries]

    def drifted(name: str):
        raise AttributeError("TQ's API changed")

    monkeypatch.setattr(StorageBootstrapProvider, "register_provider", drifted)
    with pytest.raises(AttributeError, match="API changed"):
        registry.register()
    assert [dict(reg) for reg in registries] == before
    monkeypatch.undo()
    tqm.register()
    assert StorageManagerFactory._registry["MooncakeStoreObserved"] is tqm.ObservedMooncakeStorageManager


def test_tq_interface_on_a_real_master_through_the_stock_name_with_replace_stock(shared_master, keyspace):
    config = {**shared_master.client_config(), "replace_stock": True, "client_name": "MooncakeStoreClient"}
    client = StorageClientFactory.create("MooncakeStoreClient", config)
    try:
        assert isinstance(client, tqm.ObservedMooncakeClient)
        keys = keyspace(4)
        values = [torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), {"a": [1, 2]}, None, "text"]
        meta = client.put(keys, values)
        got = client.get(
            keys, shapes=[[2, 3], None, None, None], dtypes=[torch.bfloat16, None, None, None], custom_backend_meta=meta
        )
        assert torch.equal(got[0], values[0]) and got[1:] == values[1:]
        client.clear(keys, custom_backend_meta=meta)
        with pytest.raises(NonRetryableError, match="OBJECT_NOT_FOUND"):
            client.get(keys[1:2], custom_backend_meta=meta[1:2])
    finally:
        client.close()
    assert client.client.closed


def test_tq_keeps_only_a_raw_tensors_write_id_and_a_stale_one_still_fails(shared_master, keyspace):
    """TQ carries every key's metadata to its controller and back: a raw tensor's is its write id alone (TQ knows
    the dtype and shape), a frame's all of it; the write id is still checked on get."""
    client = tqm.ObservedMooncakeClient({**shared_master.client_config(), "telemetry": {"enabled": False}})
    try:
        keys = keyspace(2)
        values = [torch.arange(6, dtype=torch.int64).reshape(2, 3), "text"]
        first = client.put(keys, values)
        assert type(first[0]) is int and isinstance(first[1], dict) and first[1]["wid"] == first[0]
        shapes, dtypes = [[2, 3], None], [torch.int64, None]
        got = client.get(keys, shapes=shapes, dtypes=dtypes, custom_backend_meta=first)
        assert torch.equal(got[0], values[0]) and got[1] == "text"
        client.put(keys[:1], [values[0] + 1])  # a newer write: the first metadata names a replaced value
        with pytest.raises(NonRetryableError, match="STALE_VALUE"):
            client.get(keys[:1], shapes=shapes[:1], dtypes=dtypes[:1], custom_backend_meta=first[:1])
        client.clear(keys)
    finally:
        client.close()


@pytest.mark.pure
def test_a_write_id_alone_plans_the_read_from_the_callers_dtype_and_shape():
    from tq_mooncake.client import plans

    plan = plans.plan_get("k", [2, 3], torch.float32, {"wid": 5}, max_value_bytes=1 << 30)
    assert (plan.kind, plan.size, plan.shape) == (plans.ReadKind.TENSOR, 24, (2, 3))
    assert plans.plan_get("k", None, None, {"wid": 5}, max_value_bytes=1 << 30).kind is plans.ReadKind.FRAME
    with pytest.raises(ValueError, match="has a dtype but no shape"):
        plans.plan_get("k", None, torch.float32, {"wid": 5}, max_value_bytes=1 << 30)
    with pytest.raises(ValueError, match="not metadata returned by put"):  # anything else must be put's whole dict
        plans.plan_get("k", [2, 3], torch.float32, {"wid": 5, "x": 1}, max_value_bytes=1 << 30)


def test_the_telemetry_section_is_checked():
    assert telemetry_enabled({}) and not telemetry_enabled({"enabled": False})
    with pytest.raises(ValueError, match=r"unknown keys \['endpoint'\] in the telemetry section"):
        telemetry_enabled({"endpoint": "x"})
    with pytest.raises(ValueError, match="telemetry.enabled must be true or false"):
        telemetry_enabled({"enabled": "yes"})


def test_bootstrap_reuses_a_running_master_and_never_stops_it(start_master):
    master = start_master()
    section = {
        "auto_init": True,
        "master_server_address": master.address,
        "metadata_server": f"{LOOPBACK}:{master.http_port}",
    }
    lease = tqm.bootstrap_master(section)
    assert lease is not None and not lease.started and lease.process is None
    tqm.stop_started_masters()
    lease.stop()
    assert master.alive() and master.healthy()


def test_bootstrap_starts_a_master_when_none_answers_and_stops_only_that_one(tmp_path, start_master):
    bystander = start_master()
    port, http_port = free_port(), free_port()
    section = {
        "auto_init": True,
        "master_server_address": f"{LOOPBACK}:{port}",
        "metadata_server": f"{LOOPBACK}:{http_port}",
        "master_log_dir": str(tmp_path),
    }
    lease = tqm.bootstrap_master(section)
    try:
        assert lease is not None and lease.started and lease.process.alive() and lease.process.healthy()
        assert lease.metadata_server == f"http://{LOOPBACK}:{http_port}/metadata"
        assert "-default_kv_lease_ttl=999999" in lease.process._args
    finally:
        tqm.stop_started_masters()
    assert not lease.process.alive()
    assert bystander.alive()
    assert tqm.bootstrap_master({**section, "auto_init": False}) is None
    with pytest.raises(ValueError, match="host and port are required"):
        tqm.bootstrap_master({**section, "master_server_address": "nohost"})


# ------------------------------------------------------------------------------------------ end to end
def section(**overrides: Any) -> dict[str, Any]:
    return {
        "auto_init": True,
        "metadata_server": f"{LOOPBACK}:{free_port()}",
        "master_server_address": f"{LOOPBACK}:{free_port()}",
        "local_hostname": LOOPBACK,
        "protocol": "tcp",
        "global_segment_size": 256 << 20,
        "local_buffer_size": 0,
        "retry": FAST_RETRY,
        **overrides,
    }


FAULTS = {"seed": 3, "rules": [{"code": "TRANSFER_FAIL", "fraction": 0.1, "attempts": [1]}]}
# event_loop: a key's 1st and 2nd get attempts fail (the first get succeeds on its 3rd), then its 4th-6th (the
# second get runs out of its 3 attempts); its first clear attempt fails.
LOOP_FAULTS = {
    "seed": 4,
    "rules": [
        {"code": "TRANSFER_FAIL", "operations": ["get"], "attempts": [1, 2, 4, 5, 6]},
        {"code": "TRANSFER_FAIL", "operations": ["clear"], "attempts": [1]},
    ],
}
LOOP_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.2}
# The scenarios of tests/jobs/tq_roundtrip.py, in the order one process runs them (the first configures
# telemetry for the process): name -> (backend, its section, samples, mode).
SCENARIOS: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "faults": ("MooncakeStoreObserved", {"replica_num": 1, "fault_injection": FAULTS}, 300, "roundtrip"),
    "replace_stock": ("MooncakeStore", {"replace_stock": True, "telemetry": {"enabled": False}}, 64, "ray_worker"),
    "ray_worker": ("MooncakeStoreObserved", {"telemetry": {"enabled": False}}, 32, "ray_worker"),
    "event_loop": (
        "MooncakeStoreObserved",
        {"telemetry": {"enabled": False}, "retry": LOOP_RETRY, "fault_injection": LOOP_FAULTS},
        64,
        "event_loop",
    ),
}


def tq_e2e_files(folder: Path) -> Path:
    """TQ 0.1.11's own end-to-end tests for its Mooncake backend, copied out of the installed distribution."""
    from importlib import metadata

    folder.mkdir()
    wanted = {"test_kv_interface_e2e.py", "test_e2e_lifecycle_consistency.py"}
    for file in metadata.files("transferqueue") or []:
        if file.parts[:2] == ("tests", "e2e") and file.name in wanted:
            (folder / file.name).write_bytes(Path(file.locate()).read_bytes())
    assert {p.name for p in folder.iterdir()} == wanted
    return folder


class Jobs:
    """The TQ processes of this module, started together before the session's first test (tests/conftest.py's
    ``background_jobs``): one runs the scenarios of
    tests/jobs/tq_roundtrip.py in one Ray session, the other TQ's own e2e suite. Each brings up its own Ray, TQ
    and masters and mostly waits; side by side they take little longer than the longer alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: dict[str, Background] = {}

    def start(self) -> None:
        env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        work = self.dir("scenarios")
        work.mkdir()
        telemetry = {"telemetry_dir": str(self.telemetry_dir), "service_name": "tq-e2e"}
        scenarios = {}
        for name, (backend, overrides, samples, mode) in SCENARIOS.items():
            sec = section(**{"telemetry": telemetry, **overrides})
            conf = {"controller": {"polling_mode": True}, "backend": {"storage_backend": backend, backend: sec}}
            scenarios[name] = {"conf": conf, "samples": samples, "mode": mode}
        (work / "conf.json").write_text(json.dumps(scenarios))
        args = [sys.executable, str(JOB), str(work / "conf.json"), str(work / "out.json")]
        self.runs["scenarios"] = Background(args, work / "job.log", env)
        self._start_e2e(env)

    @property
    def telemetry_dir(self) -> Path:
        """Where the scenario that reports telemetry (``faults``) writes it."""
        return self.dir("scenarios") / "telemetry"

    def dir(self, name: str) -> Path:
        return self.folder / name

    def result(self, name: str) -> dict[str, Any]:
        """What scenario ``name`` saw, once the scenarios process has ended (with 0, within 300 s)."""
        rc = self.runs["scenarios"].wait(timeout=300)
        log = (self.dir("scenarios") / "job.log").read_text()
        assert rc == 0, log[-4000:]
        out = json.loads((self.dir("scenarios") / "out.json").read_text())
        assert name in out, log[-4000:]
        assert "error" not in out[name], out[name]["error"]
        return out[name]

    def kill(self) -> None:
        for run in self.runs.values():
            run.kill()

    def _start_e2e(self, env: dict[str, str]) -> None:
        """TQ's e2e files under ``TQ_TEST_BACKEND=MooncakeStoreObserved`` (tests/jobs/tq_e2e_conftest.py adds
        that config entry), in an environment with no ``TQ_MOONCAKE_*`` variable of ours and no ``-p`` plugin:
        the install's autoload alone registers the backend, in pytest's process and in TQ's Ray workers."""
        work = self.dir("e2e")
        work.mkdir()
        tests = tq_e2e_files(work / "tests")
        (tests / "conftest.py").write_bytes(E2E_CONFTEST.read_bytes())
        # every call's spans (clean ones too: the check below wants each process's put, get and clear)
        telemetry = {"telemetry_dir": str(work / "telemetry"), "service_name": "tq-e2e", "clean_trace_ratio": 1.0}
        extra = {"telemetry": telemetry}
        (tests / "observed_section.json").write_text(json.dumps(extra))
        e2e_env = {k: v for k, v in env.items() if not k.startswith("TQ_MOONCAKE_")}
        e2e_env |= {
            "TQ_TEST_BACKEND": "MooncakeStoreObserved",
            # TQ's e2e files read these two for the master's and the metadata server's addresses.
            "TQ_MOONCAKE_METADATA_SERVER": f"{LOOPBACK}:{free_port()}",
            "TQ_MOONCAKE_MASTER_SERVER": f"{LOOPBACK}:{free_port()}",
        }
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "300", "-o", "addopts="]
        args += ["-rA", str(tests)]
        self.runs["e2e"] = Background(args, work / "e2e.log", e2e_env, cwd=work)

    def e2e_result(self) -> tuple[int, str]:
        """TQ's e2e suite's exit code and output, once it has ended (within 420 s)."""
        rc = self.runs["e2e"].wait(timeout=420)
        return rc, (self.dir("e2e") / "e2e.log").read_text()


BACKGROUND_JOBS = Jobs  # started by tests/conftest.py's background_jobs; the `jobs` fixture


def attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP/JSON attributes as a dict (``intValue`` is a string in OTLP/JSON)."""
    out = {}
    for a in items:
        (kind, value), *_ = a["value"].items()
        out[a["key"]] = int(value) if kind == "intValue" else value
    return out


def read_lines(folder: Path, prefix: str) -> list[dict[str, Any]]:
    files = sorted(folder.glob(f"{prefix}-*.jsonl"))
    assert files, f"no {prefix} files in {folder}"
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def spans(folder: Path) -> list[dict[str, Any]]:
    return [span for _, span in spans_by_process(folder)]


def spans_by_process(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every span in the trace files of ``folder``, with the ``process.pid`` of its resource."""
    return [
        (attributes(rs["resource"]["attributes"]).get("process.pid", 0), span)
        for line in read_lines(folder, "traces")
        for rs in line["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]


def counter_totals(folder: Path, name: str, by: str) -> Counter[str]:
    """The last cumulative value of each series of counter ``name``, summed by attribute ``by``."""
    last: dict[tuple, tuple[str, int]] = {}
    for line in read_lines(folder, "metrics"):
        for rm in line["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                for metric in sm["metrics"]:
                    if metric["name"] != name:
                        continue
                    for dp in metric["sum"]["dataPoints"]:
                        attrs = attributes(dp.get("attributes", []))
                        last[tuple(sorted(attrs.items()))] = (attrs.get(by, ""), int(dp.get("asInt", 0)))
    totals: Counter[str] = Counter()
    for key, value in last.values():
        totals[key] += value
    return totals


def test_tq_end_to_end_with_faults_retries_every_failure_and_reports_the_attempts(jobs):
    out = jobs.result("faults")
    folder = jobs.telemetry_dir
    assert out["client_type"] == "ObservedMooncakeClient"
    assert out["fields"] == ["ids", "logp", "obs", "response", "uid"]
    assert out["mismatched_fields"] == []
    assert out["listed_after_clear"] == 0
    injected = out["injected"].get(str(-800), 0)
    assert injected > 50, out  # 10% of 1500 keys, on put, get and clear
    assert out["telemetry_flushed"]

    all_spans = spans(folder)
    attempts = [s for s in all_spans if s["name"].endswith(".attempt")]
    operations = [s for s in all_spans if not s["name"].endswith(".attempt")]
    assert {s["name"] for s in operations} >= {"mooncake.put", "mooncake.get", "mooncake.clear"}
    retried = [s for s in attempts if attributes(s["attributes"])["mooncake.attempt"] == 2]
    failed = [s for s in attempts if s.get("status", {}).get("code") == 2]  # STATUS_CODE_ERROR
    assert retried and len(failed) == len(retried)  # every failed first attempt was retried once, then ok
    assert sum(int(attributes(s["attributes"])["mooncake.keys.failed"]) for s in failed) == injected
    outcomes = counter_totals(folder, "mooncake.client.operations", "mooncake.outcome")
    assert set(outcomes) <= {"success", "success_after_retry"} and outcomes["success_after_retry"] >= 1
    assert counter_totals(folder, "mooncake.client.keys.failed", "error.type") == Counter({"TRANSFER_FAIL": injected})


def test_tq_stock_backend_name_uses_our_client_with_replace_stock(jobs):
    out = jobs.result("replace_stock")
    assert out["client_type"] == "ObservedMooncakeClient" and out["manager_type"] == "StockNameStorageManager"
    assert out["mismatched_fields"] == [] and out["listed_after_clear"] == 0
    assert out["closed_with_tq"]  # tq.close() closed our client (TQ's stock manager never closes its own)
    # the config's replace_stock took effect in a fresh Ray worker too (registered there by the install alone)
    assert out["worker"] == {"registered": True, "client_type": "ObservedMooncakeClient", "mismatched_fields": []}


def test_importing_transfer_queue_registers_the_backend_in_the_driver_and_in_a_fresh_ray_worker(jobs):
    """No import of ours, no setup hook, no variable: the install's autoload registered the backend in the job's
    process when it imported TQ, and in a Ray worker that only unpickled a function using TQ."""
    out = jobs.result("ray_worker")
    assert out["registered_at_import"] and out["client_type"] == "ObservedMooncakeClient"
    assert out["worker"] == {"registered": True, "client_type": "ObservedMooncakeClient", "mismatched_fields": []}
    assert out["closed_with_tq"]


def test_tqs_async_get_and_clear_run_off_the_callers_event_loop_with_tqs_results_and_errors(jobs):
    """TQ 0.1.11 calls the storage client's get and clear inside ``async def``: the caller's loop froze for a
    whole retrying read. Ours run in a worker thread: while they ran (retries and back-off included), the
    caller's 5 ms ticker kept ticking; the data and the error are what the calls return and raise."""
    out = jobs.result("event_loop")
    print(f"event loop: longest stall per call (ms) {out['max_stall_ms']}, call time (s) {out['call_s']}")
    assert out["mismatched_fields"] == [] and out["listed_after_clear"] == 0
    assert out["second_get_error"] == "RetriesExhaustedError"
    assert out["get_on_loop_thread"] == [False, False] and out["clear_on_loop_thread"] == [False]
    assert out["get_loop_ticked"] == [True, True] and out["clear_loop_ticked"] == [True]
    assert out["get_caller_context"] == [True, True] and out["clear_caller_context"] == [True]  # spans nest
    assert out["put_on_loop_thread"] == [False] and out["put_caller_context"] == [True]  # TQ's executor, our context


def test_tqs_own_mooncake_e2e_tests_pass_on_our_backend_name_with_nothing_but_the_install(jobs):
    """TQ's tests/e2e with ``storage_backend: MooncakeStoreObserved`` and no import, hook, plugin or variable of
    ours (see ``Jobs._start_e2e``): they pass, its Ray-worker tests included, and the worker's spans show that
    the worker's storage calls went through our client."""
    rc, output = jobs.e2e_result()
    summary = [line for line in output.splitlines() if " passed" in line and " in " in line]
    assert rc == 0, output[-6000:]
    print(f"TQ e2e on tq-mooncake: {summary[-1] if summary else '?'}")
    passed = {line.rsplit("::", 1)[-1] for line in output.splitlines() if line.startswith("PASSED ")}
    assert {"test_kv_api_inside_remote_worker[sync]", "test_kv_api_inside_remote_worker[async]"} <= passed
    driver = jobs.runs["e2e"].proc.pid
    by_process: dict[int, set[str]] = {}
    for pid, span in spans_by_process(jobs.dir("e2e") / "telemetry"):
        by_process.setdefault(pid, set()).add(span["name"])
    assert {"mooncake.put", "mooncake.get", "mooncake.clear"} <= by_process.pop(driver, set())
    workers = [names for names in by_process.values() if {"mooncake.put", "mooncake.get", "mooncake.clear"} <= names]
    assert workers, by_process  # a Ray worker (another process) put, read and cleared through our client
