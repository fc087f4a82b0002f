"""TransferQueue scenarios for tests/test_transferqueue.py, run as their own process (telemetry is set up once
per process): ``python tq_roundtrip.py CONFIG_JSON OUT_JSON``.

Starts a local Ray (no ``runtime_env`` hook); for each scenario, ``tq.init(conf)`` with the backend the config
names, puts a TensorDict of float32, bfloat16 and int64 tensors, a jagged field and a non-tensor field with
``kv_batch_put``, reads it back with ``kv_batch_get``, compares every value, clears it, ``tq.close()``; writes what
each saw to OUT_JSON. Mode ``ray_worker`` also reads in a fresh Ray worker; mode ``event_loop`` does it all with
TQ's async API under a 5 ms ticker coroutine. Nothing of tq-mooncake is imported before TQ's backend is in use:
the install's autoload registered it (``registered_at_import`` says so).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from typing import Any

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict
from transfer_queue.storage.managers.base import StorageManagerFactory

# Before anything of ours is imported: did `import transfer_queue` alone register the backend?
REGISTERED_AT_IMPORT = "MooncakeStoreObserved" in StorageManagerFactory._registry
# Set by the async caller; the storage calls report whether they see it (OpenTelemetry's context is a contextvar).
CALLER = contextvars.ContextVar("caller", default=None)


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


@ray.remote(max_calls=1)  # a fresh worker process each time (TQ keeps its session in module globals)
def read_in_worker(keys: list[str], data: TensorDict) -> dict[str, Any]:
    """In a fresh Ray worker: attach to the running TQ and read the batch back with its own storage client."""
    registered = "MooncakeStoreObserved" in StorageManagerFactory._registry  # unpickling this imported TQ
    tq.init()
    got = tq.kv_batch_get(keys=keys, partition_id="train")
    client = tq.get_client().storage_manager.storage_client
    return {"registered": registered, "client_type": type(client).__name__, "mismatched_fields": compare(data, got)}


class Ticker:
    """A coroutine ticking every 5 ms on the caller's loop: the gaps between its ticks are the loop's stalls."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.ticked = threading.Event()  # set on every tick (read by calls running in other threads)
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            self.ticks.append(time.perf_counter())
            self.ticked.set()
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self._stop = True

    def max_gap_ms(self, start: float, end: float) -> float:
        inside = [t for t in self.ticks if start <= t <= end]
        return max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=end - start) * 1e3


def watch_calls(storage_client: Any, ticker: Ticker, loop_thread: int, out: dict[str, Any]) -> None:
    """Wrap the client's ``get`` and ``clear`` (instance attributes: the manager calls them through the
    instance): each records whether it ran on the loop's thread and whether the ticker ticked while it ran (it
    waits up to 5 s for a tick; on the loop's thread none can come), and whether it saw the caller's context."""
    for name in ("get", "clear", "_put"):  # `put` is a property binding `_put` to the caller's context
        method = getattr(storage_client, name)

        def watched(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            ticker.ticked.clear()
            key = _name.lstrip("_")
            try:
                return _method(*args, **kwargs)
            finally:
                out.setdefault(f"{key}_on_loop_thread", []).append(threading.get_ident() == loop_thread)
                out.setdefault(f"{key}_loop_ticked", []).append(ticker.ticked.wait(5.0))
                out.setdefault(f"{key}_caller_context", []).append(CALLER.get() == "async caller")

        setattr(storage_client, name, watched)


async def async_roundtrip(keys: list[str], data: TensorDict, storage_client: Any, out: dict[str, Any]) -> None:
    """Put, get (first two attempts fail), get again (every attempt fails: the error), clear (first attempt
    fails), with TQ's async API while a ticker runs; the loop's longest stall during each."""
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    CALLER.set("async caller")
    watch_calls(storage_client, ticker, threading.get_ident(), out)
    try:
        await asyncio.sleep(0.02)
        marks = [time.perf_counter()]
        await tq.async_kv_batch_put(keys=keys, partition_id="train", fields=data)
        marks.append(time.perf_counter())
        got = await tq.async_kv_batch_get(keys=keys, partition_id="train")
        marks.append(time.perf_counter())
        out["mismatched_fields"] = compare(data, got)
        try:
            await tq.async_kv_batch_get(keys=keys, partition_id="train")
            out["second_get_error"] = None
        except Exception as exc:
            out["second_get_error"] = type(exc).__name__
        marks.append(time.perf_counter())
        await tq.async_kv_clear(keys=keys, partition_id="train")
        marks.append(time.perf_counter())
        await asyncio.sleep(0.02)
    finally:
        ticker.stop()
        await task
    phases = ("put", "get", "failing_get", "clear")
    spans = list(zip(phases, marks, marks[1:], strict=False))
    out["call_s"] = {p: round(b - a, 4) for p, a, b in spans}
    out["max_stall_ms"] = {p: round(ticker.max_gap_ms(a, b), 2) for p, a, b in spans}


def roundtrip(conf: dict[str, Any], samples: int, mode: str) -> dict[str, Any]:
    """One TQ session on ``conf``: put, get, compare, clear (``mode``: ``roundtrip``, ``ray_worker`` also reads
    in a Ray worker, ``event_loop`` uses the async API under a ticker); what it saw."""
    out: dict[str, Any] = {"registered_at_import": REGISTERED_AT_IMPORT}
    storage_client = None
    try:
        tq.init(OmegaConf.create(conf))
        storage_client = tq.get_client().storage_manager.storage_client
        out["client_type"] = type(storage_client).__name__
        out["manager_type"] = type(tq.get_client().storage_manager).__name__
        keys = [f"sample-{i}" for i in range(samples)]
        data = batch(samples)
        if mode == "event_loop":
            asyncio.run(async_roundtrip(keys, data, storage_client, out))
        else:
            tq.kv_batch_put(keys=keys, partition_id="train", fields=data)
            got = tq.kv_batch_get(keys=keys, partition_id="train")
            out["mismatched_fields"] = compare(data, got)
            out["fields"] = sorted(got.keys())
            if mode == "ray_worker":
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
            tq.close()  # closes our client too (the manager does), while its master still runs
            out["closed_with_tq"] = bool(storage_client is not None and storage_client.client.closed)
        finally:
            import tq_mooncake.transferqueue as tqm

            tqm.stop_started_masters()
    return out


def main(config_path: str, out_path: str) -> None:
    """CONFIG_JSON: ``{name: {"conf": TQ config, "samples": n, "mode": str}}``, run in that order in
    one Ray session (telemetry is configured by the first that asks, once per process). OUT_JSON gets
    ``{name: what it saw}`` after each; a scenario that raises gets ``{"error": traceback}`` and the rest run."""
    scenarios: dict[str, Any] = json.loads(open(config_path).read())
    results: dict[str, Any] = {}
    ray.init(num_cpus=2, include_dashboard=False, namespace=f"tq-mooncake-{uuid.uuid4().hex[:8]}")
    try:
        for name, scenario in scenarios.items():
            try:
                results[name] = roundtrip(scenario["conf"], scenario["samples"], scenario["mode"])
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
