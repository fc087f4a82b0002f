"""How long TransferQueue's async API freezes the caller's event loop while our client retries.

One process: a local Ray, TQ 0.1.11 with ``storage_backend: MooncakeStoreObserved`` (a master started by our
bootstrap), every key's first two ``get`` attempts and first ``clear`` attempt failing with an injected
``TRANSFER_FAIL`` (so each call sleeps in two back-offs, or one, on the client's default retry policy). Each
round writes a new batch with ``tq.async_kv_batch_put``, reads it with ``tq.async_kv_batch_get`` and clears it
with ``tq.async_kv_clear`` while a coroutine ticks every 5 ms on the same loop; the longest gap between ticks
during each call is that call's stall (5 ms is the ticker's own period). Rounds alternate between our manager
(``get_data`` / ``clear_data`` in a worker thread) and TQ's own on-loop ``KVStorageManager`` methods bound to the
same manager, so both run on the same client, store and faults.

    .venv/bin/python bench/loop_stall.py               # 10 rounds of each
    .venv/bin/python bench/loop_stall.py --rounds 20 --samples 256

Not a test: figures vary with the machine's load. Ray, TQ and the master are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import types
import uuid
from typing import Any

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import TensorDict
from transfer_queue.storage.managers.base import KVStorageManager

from tq_mooncake.cluster import LOOPBACK, free_port

FAULTS = {
    "seed": 1,
    "rules": [
        {"code": "TRANSFER_FAIL", "operations": ["get"], "attempts": [1, 2]},
        {"code": "TRANSFER_FAIL", "operations": ["clear"], "attempts": [1]},
    ],
}


def config() -> dict[str, Any]:
    section = {
        "auto_init": True,
        "metadata_server": f"{LOOPBACK}:{free_port()}",
        "master_server_address": f"{LOOPBACK}:{free_port()}",
        "local_hostname": LOOPBACK,
        "protocol": "tcp",
        "global_segment_size": 512 << 20,
        "local_buffer_size": 0,
        "telemetry": {"enabled": False},
        "fault_injection": FAULTS,
        # Every key of every call retries: a budget that does not run dry (the default allows 10% plus 10/s).
        "retry": {"budget_ratio": 10.0, "budget_min_per_s": 100000.0},
    }
    backend = {"storage_backend": "MooncakeStoreObserved", "MooncakeStoreObserved": section}
    return {"controller": {"polling_mode": True}, "backend": backend}


def batch(n: int, seed: int) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "prompt": torch.randint(0, 50_000, (n, 256), generator=gen),
            "logp": torch.randn(n, 256, generator=gen).to(torch.bfloat16),
            "reward": torch.randn(n, generator=gen),
        },
        batch_size=n,
    )


async def one_round(samples: int, seed: int) -> dict[str, float]:
    """Put, get, clear a new batch under a 5 ms ticker; each call's longest tick gap, in ms."""
    ticks: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    keys = [f"r{seed}-{i}" for i in range(samples)]
    data = batch(samples, seed)
    marks = {}
    try:
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        await tq.async_kv_batch_put(keys=keys, partition_id="bench", fields=data)
        t1 = time.perf_counter()
        got = await tq.async_kv_batch_get(keys=keys, partition_id="bench")
        t2 = time.perf_counter()
        await tq.async_kv_clear(keys=keys, partition_id="bench")
        t3 = time.perf_counter()
        await asyncio.sleep(0.02)
        marks = {"put": (t0, t1), "get": (t1, t2), "clear": (t2, t3)}
        for field in data.keys():  # row by row: TQ hands fields back as nested tensors (a 0-d row as shape (1,))
            rows = zip(got[field].unbind(0), data[field].unbind(0), strict=True)
            if not all(a.dtype == b.dtype and torch.equal(a.reshape(b.shape), b) for a, b in rows):
                raise AssertionError(f"field {field} read back different")
    finally:
        stop = True
        await task
    out = {}
    for name, (a, b) in marks.items():
        inside = [a, *(t for t in ticks if a <= t <= b), b]
        out[name] = max(y - x for x, y in zip(inside, inside[1:], strict=False)) * 1e3
        out[f"{name}_s"] = b - a
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each variant (default 10)")
    parser.add_argument("--samples", type=int, default=64, help="samples per batch (default 64)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, namespace=f"loop-stall-{uuid.uuid4().hex[:8]}")
    import tq_mooncake.transferqueue as tqm

    try:
        tq.init(OmegaConf.create(config()))
        manager = tq.get_client().storage_manager
        ours = {"get_data": manager.get_data, "clear_data": manager.clear_data}
        on_loop = {name: types.MethodType(getattr(KVStorageManager, name), manager) for name in ours}
        results: dict[str, list[dict[str, float]]] = {"ours (off the loop)": [], "TQ's methods (on the loop)": []}
        for r in range(args.rounds * 2):
            variant = list(results)[r % 2]
            for name, method in (ours if r % 2 == 0 else on_loop).items():
                setattr(manager, name, method)
            results[variant].append(asyncio.run(one_round(args.samples, seed=r)))
        print(f"{args.rounds} rounds each, {args.samples} samples x 3 fields; first 2 get attempts and first clear")
        print("attempt of every key fail (TRANSFER_FAIL); longest 5 ms ticker gap during the call, ms (median / max)")
        print(f"{'':28} {'put':>15} {'get':>15} {'clear':>15}   get call s (median)")
        for variant, rows in results.items():
            cells = []
            for name in ("put", "get", "clear"):
                gaps = [row[name] for row in rows]
                cells.append(f"{statistics.median(gaps):6.1f} / {max(gaps):6.1f}")
            get_s = statistics.median(row["get_s"] for row in rows)
            print(f"{variant:28} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}   {get_s:.3f}")
    finally:
        try:
            tq.close()
        finally:
            tqm.stop_started_masters()
            ray.shutdown()


if __name__ == "__main__":
    main()
