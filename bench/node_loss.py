"""A storage process SIGKILLed under load: what callers see, with node-loss handling on (default) and off.

Starts its own ``mooncake_master`` (``--client_ttl`` as TQ sets it, 30 s) and storage processes on loopback
(free ports); the client is the default config (it holds a segment of its own, as TQ's clients do) with
``replica_num`` 2, unless told otherwise. Three scenarios, one after the other, each on fresh processes:

* ``replicated``: ``--keys`` keys written; readers and a writer run for ``--window`` seconds; one storage process
  is killed ``--before`` seconds in. Reported: failed calls, the first read after the kill, p50/p99 call latency
  before the kill and after it, every value read checked against what was written.
* ``single``: ``replica_num`` 1, two storage processes; keys written, one process killed; then the time until
  ``get`` raises, and whether it names exactly the keys that lived on the dead process; then a ``put`` of
  ``--keys`` new keys right after (how many fail).
* ``replacement``: after a kill, a new storage process starts; how long until a put lands on it.

    .venv/bin/python bench/node_loss.py                     # node-loss handling on (the default)
    .venv/bin/python bench/node_loss.py --node-health off   # the same with it off, for comparison
    .venv/bin/python bench/node_loss.py --only single

Not a test: figures vary from run to run on a shared machine. Everything started is stopped at the end, also on
Ctrl-C or an exception.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tq_mooncake.client import BatchOperationError, MooncakeBatchClient
from tq_mooncake.cluster.processes import MasterProcess, StorageNodeProcess, start_all, stop_all


def _value(i: int, round_: int, nbytes: int) -> torch.Tensor:
    """A raw int64 tensor (as TQ stores), every element naming its key and write."""
    return torch.full((nbytes // 8,), (round_ << 32) | i, dtype=torch.int64)


class Cluster:
    def __init__(self, folder: Path, nodes: int, client_ttl: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.master = MasterProcess(folder, client_ttl=client_ttl).start()
        self.nodes = [StorageNodeProcess(self.master, folder, "256MB") for _ in range(nodes)]
        self.folder = folder
        start_all(self.nodes)

    def add_node(self) -> StorageNodeProcess:
        node = StorageNodeProcess(self.master, self.folder, "256MB")
        self.nodes.append(node)
        return node.start()

    def stop(self) -> None:
        stop_all([*self.nodes, self.master])


def _client(cluster: Cluster, args: argparse.Namespace, **overrides: Any) -> MooncakeBatchClient:
    config = cluster.master.client_config(**{"global_segment_size": args.own_segment, "replica_num": 2, **overrides})
    config["node_health"] = args.node_health == "on"
    return MooncakeBatchClient(config)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def replicated(args: argparse.Namespace, folder: Path) -> None:
    cluster = Cluster(folder / "replicated", 2, args.client_ttl)
    client = _client(cluster, args)
    try:
        keys = [f"r{i}" for i in range(args.keys)]
        metas = client.put(keys, [_value(i, 0, args.value_bytes) for i in range(args.keys)])
        for _ in range(3):
            client.get(keys, custom_backend_meta=metas)
        lock = threading.Lock()
        calls: list[tuple[float, float, str, bool]] = []  # (start, seconds, op, ok)
        wrong = [0]
        checked = [0]
        kill_at: list[float] = []
        stop = threading.Event()

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                pick = sorted(rng.choice(args.keys, size=args.batch, replace=False).tolist())
                t = time.monotonic()
                ok = True
                try:
                    got = client.get([keys[i] for i in pick], custom_backend_meta=[metas[i] for i in pick])
                    for i, v in zip(pick, got, strict=True):
                        wrong[0] += not torch.equal(v, _value(i, 0, args.value_bytes))
                        checked[0] += 1
                except BatchOperationError:
                    ok = False
                with lock:
                    calls.append((t, time.monotonic() - t, "get", ok))

        def writer() -> None:
            n = 0
            while not stop.is_set():
                batch = [f"w{n}_{j}" for j in range(args.batch)]
                t = time.monotonic()
                ok = True
                try:
                    client.put(batch, [_value(j, n, args.value_bytes) for j in range(args.batch)])
                except BatchOperationError:
                    ok = False
                with lock:
                    calls.append((t, time.monotonic() - t, "put", ok))
                if ok:
                    client.clear(batch)
                n += 1

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(args.readers)]
        threads.append(threading.Thread(target=writer))
        for th in threads:
            th.start()
        time.sleep(args.before)
        kill_at.append(time.monotonic())
        cluster.nodes[0].kill()
        first = time.monotonic()
        try:
            client.get(keys, custom_backend_meta=metas)
            first_read = f"ok in {(time.monotonic() - first) * 1e3:.1f} ms ({len(keys)} keys)"
        except BatchOperationError as exc:
            first_read = f"raised after {(time.monotonic() - first) * 1e3:.0f} ms: {str(exc)[:120]}"
        time.sleep(max(0.0, args.window - args.before))
        stop.set()
        for th in threads:
            th.join()
        before = [d for t, d, op, _ in calls if t + d < kill_at[0]]
        after = [d for t, d, op, _ in calls if t + d >= kill_at[0]]
        failed = [(op, t - kill_at[0]) for t, d, op, ok in calls if not ok]
        print("## replicated: replica_num 2, two storage processes, one SIGKILLed under load")
        print(f"node_health {args.node_health}; {args.readers} readers + 1 writer, batches of {args.batch}")
        print(f"first full read after the kill: {first_read}")
        print(f"calls: {len(calls)}; failed: {len(failed)} {failed[:6]}")
        print(
            f"latency before the kill: p50 {_pct(before, 0.5) * 1e3:.1f} ms, p99 {_pct(before, 0.99) * 1e3:.1f} ms "
            f"({len(before)} calls); after: p50 {_pct(after, 0.5) * 1e3:.1f} ms, p99 {_pct(after, 0.99) * 1e3:.1f} ms "
            f"(max {max(after, default=0) * 1e3:.0f} ms, {len(after)} calls)"
        )
        for op in ("get", "put"):
            slow = sorted((d for t, d, o, _ in calls if o == op and t + d >= kill_at[0]), reverse=True)[:3]
            print(f"slowest {op} calls after the kill: {', '.join(f'{d * 1e3:.0f} ms' for d in slow)}")
        print(f"values checked: {checked[0]}, wrong: {wrong[0]}")
        print(f"ejected endpoints: {sorted(client.health.ejected())}")
    finally:
        client.close()
        cluster.stop()


def single(args: argparse.Namespace, folder: Path) -> None:
    cluster = Cluster(folder / "single", 2, args.client_ttl)
    client = _client(cluster, args, replica_num=1, global_segment_size=0)
    try:
        keys = [f"s{i}" for i in range(args.keys)]
        metas = client.put(keys, [_value(i, 0, args.value_bytes) for i in range(args.keys)])
        dead = cluster.nodes[0].name
        where = client.store.batch_get_replica_desc(keys)
        lost = {
            k
            for k, reps in where.items()
            if all(r.get_memory_descriptor().buffer_descriptor.transport_endpoint == dead for r in reps)
        }
        client.get(keys, custom_backend_meta=metas)
        cluster.nodes[0].kill()
        print("## single: replica_num 1, a pure client, two storage processes, one SIGKILLed")
        print(f"node_health {args.node_health}; {len(lost)} of {len(keys)} keys lived on the killed process")
        t = time.monotonic()
        try:
            client.get(keys, custom_backend_meta=metas)
            print(f"get after the kill: no error ({(time.monotonic() - t) * 1e3:.0f} ms)")
        except BatchOperationError as exc:
            named = set(exc.failed)
            codes = sorted({c.name for c in exc.failed.values()})
            print(
                f"get after the kill raised {type(exc).__name__} after {(time.monotonic() - t) * 1e3:.0f} ms, "
                f"naming {len(named)} keys {codes}; exactly the lost ones: {named == lost}"
            )
        for label in ("right after", "again"):
            new = [f"n{label[0]}{i}" for i in range(args.keys)]
            t = time.monotonic()
            try:
                client.put(new, [_value(i, 1, args.value_bytes) for i in range(args.keys)])
                print(f"put of {len(new)} new keys {label}: all written in {(time.monotonic() - t) * 1e3:.0f} ms")
            except BatchOperationError as exc:
                print(
                    f"put of {len(new)} new keys {label}: {len(exc.failed)} failed after "
                    f"{(time.monotonic() - t) * 1e3:.0f} ms"
                )
        t = time.monotonic()
        try:
            client.get(keys, custom_backend_meta=metas)
        except BatchOperationError as exc:
            print(f"a second get of the lost keys: {len(exc.failed)} named in {(time.monotonic() - t) * 1e3:.0f} ms")
    finally:
        client.close()
        cluster.stop()


def replacement(args: argparse.Namespace, folder: Path) -> None:
    cluster = Cluster(folder / "replacement", 2, args.client_ttl)
    client = _client(cluster, args, replica_num=1, global_segment_size=0)
    try:
        client.put(["warm"], [b"x"])
        keys = [f"p{i}" for i in range(64)]
        metas = client.put(keys, [_value(i, 0, 4096) for i in range(64)])
        client.get(keys, custom_backend_meta=metas)
        cluster.nodes[0].kill()
        with contextlib.suppress(BatchOperationError):  # the lost keys fail (REPLICA_UNREACHABLE)
            client.get(keys, custom_backend_meta=metas)
        new = cluster.add_node()
        joined = time.monotonic()
        n = 0
        while time.monotonic() - joined < 60:
            batch = [f"q{n}_{i}" for i in range(32)]
            n += 1
            try:
                client.put(batch, [_value(i, n, 4096) for i in range(32)])
            except BatchOperationError:
                continue
            where = client.store.batch_get_replica_desc(batch)
            eps = {r.get_memory_descriptor().buffer_descriptor.transport_endpoint for v in where.values() for r in v}
            if new.name in eps:
                print("## replacement: a new storage process joins after a kill")
                print(f"first put landing on the new process: {time.monotonic() - joined:.2f} s after it mounted")
                return
            time.sleep(0.05)
        print("## replacement: no put landed on the new process within 60 s")
    finally:
        client.close()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-health", choices=("on", "off"), default="on")
    parser.add_argument("--only", choices=("replicated", "single", "replacement"))
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--value-bytes", type=int, default=64 << 10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--before", type=float, default=2.0)
    parser.add_argument("--client-ttl", type=int, default=30)
    parser.add_argument("--own-segment", type=int, default=1 << 30, help="the client's own segment (bytes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tq-node-loss-") as tmp:
        for name, run in (("replicated", replicated), ("single", single), ("replacement", replacement)):
            if args.only in (None, name):
                run(args, Path(tmp))
                print()


if __name__ == "__main__":
    main()
