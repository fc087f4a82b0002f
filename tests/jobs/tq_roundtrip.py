"""TransferQueue scenarios for tests/test_transferqueue.py, run as their own process (telemetry is set up once
per process): ``python tq_roundtrip.py CONFIG_JSON OUT_JSON``.

Starts a local Ray; for each scenario, ``tq.init(conf)`` with the backend the config names, puts a TensorDict
of float32, bfloat16 and int64 tensors, a jagged field and a non-tensor field with ``kv_batch_put``, reads it
back with ``kv_batch_get``, compares every value, clears it, ``tq.close()``; writes what each saw to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
import traceback
import uuid
from collections import Counter
from typing import Any

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

import tq_mooncake.transferqueue as tqm  # registers the backend


def batch(n: int) -> TensorDict:
    gen = torch.Generator().manual_seed(7)
    jagged = torch.nested.nested_tensor(
        [torch.arange(1 + i % 13, dtype=torch.float32) + i for i in range(n)], layout=torch.jagged
    )
    return TensorDict(
        {
            "obs": torch.randn(n, 8, generator=gen),
            "logp": torch.randn(n, 4, generator=gen).to(torch.bfloat16),
            "ids": torch.randint(0, 50_000, (n, 3), generator=gen),
            "response": jagged,
            "uid": NonTensorStack(*[f"uid-{i}" for i in range(n)]),
        },
        batch_size=n,
    )


def rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample rows (TQ may hand a regular field back as a nested tensor, so compare row by row)."""
    return list(t.unbind(0))


def compare(put: TensorDict, got: TensorDict) -> list[str]:
    """Names of the fields whose values differ (dtype, shape or content; empty when all equal)."""
    bad = []
    for name in ("obs", "logp", "ids", "response"):
        want, have = rows(put[name]), rows(got[name])
        same = len(want) == len(have) and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, have, strict=True)
        )
        if not same:
            bad.append(name)
    uid = got["uid"]
    if list(uid.tolist() if hasattr(uid, "tolist") else uid) != put["uid"].tolist():
        bad.append("uid")
    return bad


@ray.remote
def read_in_worker(keys: list[str], data: TensorDict) -> dict[str, Any]:
    """In a fresh Ray worker: attach to the running TQ and read the batch back with its own storage client."""
    tq.init()
    got = tq.kv_batch_get(keys=keys, partition_id="train")
    client = tq.get_client().storage_manager.storage_client
    return {"client_type": type(client).__name__, "mismatched_fields": compare(data, got)}


def roundtrip(conf: dict[str, Any], samples: int, in_worker: bool) -> dict[str, Any]:
    """One TQ session on ``conf``: put, get, compare (in a Ray worker too if asked), clear; what it saw."""
    out: dict[str, Any] = {}
    storage_client = None
    try:
        tq.init(OmegaConf.create(conf))
        storage_client = tq.get_client().storage_manager.storage_client
        out["client_type"] = type(storage_client).__name__
        keys = [f"sample-{i}" for i in range(samples)]
        data = batch(samples)
        tq.kv_batch_put(keys=keys, partition_id="train", fields=data)
        got = tq.kv_batch_get(keys=keys, partition_id="train")
        out["mismatched_fields"] = compare(data, got)
        out["fields"] = sorted(got.keys())
        if in_worker:
            out["worker"] = ray.get(read_in_worker.remote(keys, data))
        tq.kv_clear(keys=keys, partition_id="train")
        out["listed_after_clear"] = len(tq.kv_list(partition_id="train").get("train", {}))
        store = getattr(getattr(storage_client, "client", None), "store", None)
        injected = getattr(store, "injected", Counter())
        out["injected"] = {str(k): v for k, v in injected.items()}
        if hasattr(store, "calls"):
            out["store_calls"] = Counter(call.operation.value for call in store.calls)
            out["store_keys"] = dict(Counter(call.operation.value for call in store.calls for _ in call.keys))
        from tq_mooncake import telemetry

        out["telemetry_flushed"] = telemetry.configure().force_flush()
    finally:
        try:
            tq.close()
            # TQ's stock manager (the replace_stock scenario) never closes its storage client: closed here,
            # while its master still runs. Left open, it is destroyed at exit, after its master was stopped,
            # and its unmount RPCs to the gone master hold up the exit of this process for ~20 s.
            if storage_client is not None:
                storage_client.close()
        finally:
            tqm.stop_started_masters()
    return out


def main(config_path: str, out_path: str) -> None:
    """CONFIG_JSON: ``{name: {"conf": TQ config, "samples": n, "read_in_worker": bool}}``, run in that order in
    one Ray session (telemetry is configured by the first that asks, once per process). OUT_JSON gets
    ``{name: what it saw}`` after each; a scenario that raises gets ``{"error": traceback}`` and the rest run."""
    scenarios: dict[str, Any] = json.loads(open(config_path).read())
    results: dict[str, Any] = {}
    # The one documented per-cluster setting: Ray imports (registers) the backend in every worker process.
    runtime_env = {"worker_process_setup_hook": "tq_mooncake.transferqueue.register"}
    ray.init(
        num_cpus=2, include_dashboard=False, namespace=f"tq-mooncake-{uuid.uuid4().hex[:8]}", runtime_env=runtime_env
    )
    try:
        for name, scenario in scenarios.items():
            try:
                results[name] = roundtrip(scenario["conf"], scenario["samples"], scenario["read_in_worker"])
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
