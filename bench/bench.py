"""Throughput of tq-mooncake against the raw store and TransferQueue 0.1.11's stock client, in one run.

Starts its own ``mooncake_master`` (HTTP metadata server, and/or ``P2PHANDSHAKE``) and one storage process
that holds the data (every client here is a pure client, ``global_segment_size: 0``, so every byte crosses
loopback TCP, as between two machines). For each case (value size x key count, tensors or non-tensors) it
runs, interleaved round by round so that drift hits every path alike:

* ``raw``: ``batch_upsert_from`` / ``batch_get_into`` on one source and one destination block, each
  registered once, 400 keys per call, one call after another (the floor: no per-key Python objects);
* ``raw-checked``: the same with the objects end-to-end checking needs (each payload and its 40-byte trailer with
  a CRC32C, laid out as the client lays them out) and each value's trailer and CRC32C checked on the way back:
  the floor of this client's integrity contract;
* ``ours-off``: ``MooncakeBatchClient`` with telemetry off (``NOOP_OBSERVER``);
* ``ours-on``: ``MooncakeBatchClient`` with telemetry as ``configure()`` sets it up by default: the OpenTelemetry
  SDK, the default sampler (every retried or failed call's trace, 1% of clean ones), spans and metrics exported as
  OTLP JSON lines into a temporary folder (what ``TQ_MOONCAKE_TELEMETRY_DIR`` does);
* ``tq-stock``: TransferQueue 0.1.11's ``MooncakeStoreClient`` (when installed).

Diagnostic paths (``--paths``), each ``ours-off`` with one thing changed: ``ours-all-spans`` (telemetry with
every span kept, always-on sampling), ``ours-sampled`` (``tensor_checksum: false``: new raw tensors above 32 KiB
get a CRC32C of their samples instead of every byte), ``ours-no-routing`` (``node_health: false``), ``ours-fresh``
(``local_buffer_size: 0``: no reused transfer memory, every destination fresh).

Every client (ours and the stock one) has a local buffer of ``--local-buffer-mib`` (512 MiB; the default of
``ClientConfig`` is 1 GiB) and no segment of its own.

Every round checks the data read back against what was written (outside the timed part). Prints the
median milliseconds per call, GB/s, and the ratios the performance targets are about (throughput ratio =
the other path's median time / ours). ``--memory`` instead measures peak resident memory of a 2000 x 1 MiB
round trip in a fresh process.

    .venv/bin/python bench/bench.py [--quick] [--metadata http p2p] [--repeats 7] [--paths ...] [--json out.json]
    .venv/bin/python bench/bench.py --memory [--keys 2000] [--value-kib 1024]
    .venv/bin/python bench/bench.py --profile profile.txt --case "400x64KiB tensor" --repeats 20
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tq_mooncake.client import MooncakeBatchClient, integrity
from tq_mooncake.client.observer import NOOP_OBSERVER
from tq_mooncake.cluster import LOOPBACK, MasterProcess, StorageNodeProcess

GB = 1e9
RAW_SLICE = 400  # keys per raw batch call: one call of 4000 keys fails with TRANSFER_FAIL over TCP here


@dataclass(frozen=True)
class Case:
    value_bytes: int
    keys: int
    kind: str = "tensor"  # "tensor" (separate tensors), "rows" (rows of one batch tensor, as TQ sends a field),
    # or "bytes" (non-tensor values)

    @property
    def name(self) -> str:
        size = f"{self.value_bytes >> 20}MiB" if self.value_bytes >= 1 << 20 else f"{self.value_bytes >> 10}KiB"
        return f"{self.keys}x{size} {self.kind}"

    @property
    def total(self) -> int:
        return self.value_bytes * self.keys


FULL = [
    Case(64 << 10, 400),
    Case(64 << 10, 400, "rows"),
    Case(4 << 10, 4000),
    Case(64 << 10, 1),
    Case(1 << 20, 100),
    Case(4 << 20, 16),
    Case(4 << 10, 400, "bytes"),
]
QUICK = [Case(64 << 10, 400), Case(64 << 10, 400, "rows"), Case(4 << 10, 1000), Case(4 << 10, 100, "bytes")]


@dataclass
class Data:
    keys: list[str]
    values: list[Any]
    block: torch.Tensor | None  # tensors: one contiguous source block the values are rows of


def make_data(case: Case, prefix: str) -> Data:
    keys = [f"{prefix}-{i}" for i in range(case.keys)]
    if case.kind in ("tensor", "rows"):
        block = torch.randint(0, 255, (case.keys, case.value_bytes), dtype=torch.uint8).view(torch.int32)
        rows = list(block.unbind(0))
        return Data(keys, rows if case.kind == "rows" else [r.clone() for r in rows], block)
    return Data(keys, [os.urandom(case.value_bytes) for _ in keys], None)


def check(case: Case, want: Data, got: list[Any]) -> None:
    if len(got) != len(want.values):
        raise AssertionError(f"{case.name}: {len(got)} values back for {len(want.values)} keys")
    for i, (a, b) in enumerate(zip(want.values, got, strict=True)):
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        if not same:
            raise AssertionError(f"{case.name}: value {i} read back differs from what was written")


# ------------------------------------------------------------------------------------------------ paths
class DataPath:
    """One way of writing and reading a case: ``prepare`` (untimed), then timed ``put`` and ``get``."""

    name = ""

    def prepare(self, case: Case, data: Data) -> None: ...
    def put(self) -> None: ...
    def get(self) -> list[Any]: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...


class RawPath(DataPath):
    name = "raw"

    def __init__(self, store: Any) -> None:
        from mooncake.store import ReplicateConfig

        self.store = store
        self.rc = ReplicateConfig()
        self.rc.with_hard_pin = True
        self.registered: list[int] = []

    def _register(self, t: torch.Tensor) -> int:
        ptr = t.data_ptr()
        rc = self.store.register_buffer(ptr, t.numel() * t.element_size())
        if rc != 0:
            raise RuntimeError(f"register_buffer failed: {rc}")
        self.registered.append(ptr)
        return ptr

    slot_extra = 0  # bytes stored after each value (a trailer)
    writes_from_src = True  # else from a staging block of its own: src needs no registration

    def prepare(self, case: Case, data: Data) -> None:
        self._unregister()
        self.case, self.data = case, data
        n, size, slot = case.keys, case.value_bytes, case.value_bytes + self.slot_extra
        if data.block is None:  # bytes: the raw store writes them as they are, from one block
            src = torch.frombuffer(bytearray(b"".join(data.values)), dtype=torch.uint8)
        else:
            src = data.block.view(torch.uint8).reshape(-1)
        self.src = src
        self.dst = torch.empty(n * slot, dtype=torch.uint8)
        base_s = self._register(src) if self.writes_from_src else src.data_ptr()  # one registration per store
        base_d = self._register(self.dst)
        self.keys = [f"{self.name}-{k}" for k in data.keys]
        self.src_ptrs = [base_s + i * size for i in range(n)]
        self.dst_ptrs = [base_d + i * slot for i in range(n)]
        self.sizes = [slot] * n

    def _write(self, ptrs: list[int]) -> None:
        for lo in range(0, len(self.keys), RAW_SLICE):
            hi = lo + RAW_SLICE
            codes = self.store.batch_upsert_from(self.keys[lo:hi], ptrs[lo:hi], self.sizes[lo:hi], self.rc)
            if any(c != 0 for c in codes):
                raise RuntimeError(f"{self.name} put failed: {sorted(set(codes))}")

    def _read(self) -> None:
        for lo in range(0, len(self.keys), RAW_SLICE):
            hi = lo + RAW_SLICE
            got = self.store.batch_get_into(self.keys[lo:hi], self.dst_ptrs[lo:hi], self.sizes[lo:hi])
            if any(n != s for n, s in zip(got, self.sizes[lo:hi], strict=True)):
                raise RuntimeError(f"{self.name} get failed: {sorted(set(got))}")

    def put(self) -> None:
        self._write(self.src_ptrs)

    def get(self) -> list[Any]:
        self._read()
        rows = self.dst.view(self.case.keys, self.case.value_bytes)
        if self.data.block is None:
            return [bytes(r.numpy()) for r in rows]
        return list(rows.view(torch.int32).unbind(0))

    def clear(self) -> None:
        for lo in range(0, len(self.keys), RAW_SLICE):
            self.store.batch_remove(self.keys[lo : lo + RAW_SLICE], True)

    def _unregister(self) -> None:
        for ptr in self.registered:
            self.store.unregister_buffer(ptr)
        self.registered.clear()

    def close(self) -> None:
        self._unregister()  # the store is shared by the raw paths: run_mode closes it after them


class RawCheckedPath(RawPath):
    """The raw store writing and reading objects as end-to-end checking needs them, with none of the client's
    per-key Python: each payload copied with a 40-byte trailer holding its CRC32C into one warm registered block
    and upserted (what the client does for an overwrite of the same size, which every timed round here is), read
    back into one warm block and each value's trailer and CRC32C checked. The floor of the client's integrity
    contract on this machine."""

    name = "raw-checked"
    slot_extra = integrity.TRAILER_SIZE
    writes_from_src = False

    def prepare(self, case: Case, data: Data) -> None:
        super().prepare(case, data)
        self.staging = torch.empty_like(self.dst)
        base_t = self._register(self.staging)
        self.slots = [base_t + i * self.sizes[0] for i in range(case.keys)]
        self.tags = [integrity.key_tag(k) for k in self.keys]

    def put(self) -> None:
        size = self.case.value_bytes
        staging = self.staging.numpy()
        for i, (src, slot) in enumerate(zip(self.src_ptrs, self.slots, strict=True)):
            ctypes.memmove(slot, src, size)
            integrity.pack_for(staging, slot - self.slots[0] + size, self.tags[i], 1, src, size, True)
        self._write(self.slots)

    def get(self) -> list[Any]:
        self._read()
        size, T = self.case.value_bytes, integrity.TRAILER_SIZE
        view = memoryview(self.dst.numpy())
        rows = self.dst.view(self.case.keys, size + T)[:, :size]
        for i in range(self.case.keys):
            if integrity.check(view[i * (size + T) : (i + 1) * (size + T)], self.tags[i], None) != 0:
                raise RuntimeError(f"raw-checked get: value {i} fails its check")
        if self.data.block is None:
            return [bytes(r.numpy()) for r in rows]
        return list(rows.view(torch.int32).unbind(0))


class OursPath(DataPath):
    def __init__(self, name: str, client: MooncakeBatchClient) -> None:
        self.name = name
        self.client = client

    def prepare(self, case: Case, data: Data) -> None:
        self.data = data
        self.keys = [f"{self.name}-{k}" for k in data.keys]
        self.meta = self.client.put(self.keys, data.values)

    def put(self) -> None:
        self.meta = self.client.put(self.keys, self.data.values)

    def get(self) -> list[Any]:
        return self.client.get(self.keys, custom_backend_meta=self.meta)

    def clear(self) -> None:
        self.client.clear(self.keys)

    def close(self) -> None:
        self.client.close()


class StockPath(DataPath):
    name = "tq-stock"

    def __init__(self, config: dict[str, Any]) -> None:
        from transfer_queue.storage.clients.mooncake_client import MooncakeStoreClient

        self.client = MooncakeStoreClient(dict(config))

    def prepare(self, case: Case, data: Data) -> None:
        self.data = data
        self.keys = [f"stock-{k}" for k in data.keys]
        self.shapes = [list(v.shape) if isinstance(v, torch.Tensor) else None for v in data.values]
        self.dtypes = [v.dtype if isinstance(v, torch.Tensor) else None for v in data.values]
        self.put()

    def put(self) -> None:
        self.meta = self.client.put(self.keys, self.data.values)

    def get(self) -> list[Any]:
        return self.client.get(self.keys, shapes=self.shapes, dtypes=self.dtypes, custom_backend_meta=self.meta)

    def clear(self) -> None:
        self.client.clear(self.keys, self.meta)

    def close(self) -> None:
        self.client.close()


def sdk_observer(folder: Path, sampler: Any = None) -> tuple[Any, Callable[[], None]]:
    """OTelObserver on SDK providers that export OTLP JSON lines into ``folder`` (``sampler`` None: the default, as
    ``configure()`` chooses it); and their shutdown."""
    from tq_mooncake.telemetry import OTelObserver
    from tq_mooncake.telemetry.pipeline import build_resource, file_pipeline

    tracer_provider, meter_provider = file_pipeline(folder, build_resource("tq-mooncake-bench"), sampler)

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return OTelObserver(tracer_provider, meter_provider), shutdown


MAIN_PATHS = ["raw", "raw-checked", "ours-off", "ours-on", "tq-stock"]
DIAGNOSTIC_PATHS = ["ours-all-spans", "ours-sampled", "ours-no-routing", "ours-fresh"]


def build_paths(
    names: list[str], config: dict[str, Any], raw_store: Any, tmp: Path, metadata: str
) -> tuple[list[DataPath], list[Callable[[], None]]]:
    """The paths named (in order), and the shutdowns of their telemetry pipelines."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    paths: list[DataPath] = []
    shutdowns: list[Callable[[], None]] = []

    def ours(name: str, overrides: dict[str, Any], observer: Any = NOOP_OBSERVER) -> DataPath:
        return OursPath(name, MooncakeBatchClient({**config, **overrides}, observer=observer))

    for name in names:
        if name == "raw":
            paths.append(RawPath(raw_store))
        elif name == "raw-checked":
            paths.append(RawCheckedPath(raw_store))
        elif name == "ours-off":
            paths.append(ours(name, {}))
        elif name in ("ours-on", "ours-all-spans"):
            sampler = ALWAYS_ON if name == "ours-all-spans" else None
            observer, shutdown = sdk_observer(tmp / f"telemetry-{metadata}-{name}", sampler)
            shutdowns.append(shutdown)
            paths.append(ours(name, {}, observer))
        elif name == "ours-sampled":
            paths.append(ours(name, {"tensor_checksum": False}))
        elif name == "ours-no-routing":
            paths.append(ours(name, {"node_health": False}))
        elif name == "ours-fresh":
            paths.append(ours(name, {"local_buffer_size": 0}))
        elif name == "tq-stock":
            try:
                paths.append(StockPath(config))
            except ImportError:
                print("TransferQueue is not installed: no tq-stock column", file=sys.stderr)
    return paths, shutdowns


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Result:
    metadata: str
    case: str
    total_bytes: int
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # path -> op -> seconds

    def median(self, path: str, op: str) -> float | None:
        t = self.times.get(path, {}).get(op)
        return statistics.median(t) if t else None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_mode(metadata: str, cases: list[Case], args: argparse.Namespace, tmp: Path) -> list[Result]:
    results: list[Result] = []
    largest = max(c.total for c in cases)
    segment = max(256 << 20, (len(args.paths) + 2) * largest + (64 << 20))  # every path's copy of the largest case
    with MasterProcess(tmp, http_metadata=(metadata == "http")) as master:
        master.start()
        with StorageNodeProcess(master, tmp, segment=segment) as node:
            node.start()
            config = master.client_config(global_segment_size=0, local_buffer_size=args.local_buffer_mib << 20)
            from mooncake.store import MooncakeDistributedStore

            raw_store = MooncakeDistributedStore()
            rc = raw_store.setup(LOOPBACK, master.metadata_server, 0, 0, "tcp", "", master.address)
            if rc != 0:
                raise RuntimeError(f"raw store setup failed: {rc}")
            paths, shutdowns = build_paths(args.paths, config, raw_store, tmp, metadata)
            try:
                for case in cases:
                    results.append(run_case(metadata, case, paths, args))
                    print(f"  done: {metadata} {case.name}", file=sys.stderr)
            finally:
                for p in paths:
                    p.close()
                raw_store.close()
                for shutdown in shutdowns:
                    shutdown()
    return results


def run_case(metadata: str, case: Case, paths: list[DataPath], args: argparse.Namespace) -> Result:
    data = make_data(case, f"{metadata}-{case.name.replace(' ', '-')}")
    result = Result(metadata, case.name, case.total)
    for p in paths:
        p.prepare(case, data)
        result.times[p.name] = {"put": [], "get": []}
    # The stock client registers every tensor on every call: with HTTP metadata a big case takes seconds.
    slow = {"tq-stock"} if metadata == "http" and case.keys >= 1000 else set()
    for round_ in range(args.warmup + args.repeats):
        order = paths[round_ % len(paths) :] + paths[: round_ % len(paths)]
        for p in order:
            if p.name in slow and round_ >= args.warmup + min(args.repeats, 3):
                continue
            put_s, _ = timed(p.put)
            get_s, got = timed(p.get)
            check(case, data, got)
            if round_ >= args.warmup:
                result.times[p.name]["put"].append(put_s)
                result.times[p.name]["get"].append(get_s)
    for p in paths:
        p.clear()
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


RATIOS = [
    ("ours-on", "raw"),
    ("raw-checked", "raw"),
    ("ours-on", "raw-checked"),
    ("ours-off", "raw"),
    ("ours-on", "tq-stock"),
    ("ours-on", "ours-off"),
    ("ours-off", "ours-all-spans"),
    ("ours-off", "ours-sampled"),
    ("ours-off", "ours-no-routing"),
    ("ours-off", "ours-fresh"),
]
"""(ours, other) pairs of the ratio table, where both ran: other's time / ours."""


def report(results: list[Result]) -> str:
    lines = [
        "| metadata | case | path | put ms | get ms | put GB/s | get GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for path in r.times:
            put, get = r.median(path, "put"), r.median(path, "get")
            if put is None or get is None:
                continue
            lines.append(
                f"| {r.metadata} | {r.case} | {path} | {put * 1e3:.2f} | {get * 1e3:.2f} | "
                f"{r.total_bytes / put / GB:.2f} | {r.total_bytes / get / GB:.2f} |"
            )
    pairs = [(a, b) for a, b in RATIOS if any(r.median(a, "put") and r.median(b, "put") for r in results)]
    head = " | ".join(f"{a} vs {b} put | get" for a, b in pairs)
    lines += [
        "",
        "Throughput ratios (time of the second path / time of the first; >= 1 means the first is at least as fast):",
        "",
        f"| metadata | case | {head} |",
        "|---|---|" + "---|---|" * len(pairs),
    ]
    for r in results:
        cells = []
        for a, b in pairs:
            cells += [ratio(r.median(b, "put"), r.median(a, "put")), ratio(r.median(b, "get"), r.median(a, "get"))]
        lines.append(f"| {r.metadata} | {r.case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ profile
def profile(args: argparse.Namespace, cases: list[Case], tmp: Path) -> str:
    """pyinstrument's text profile of ``rounds`` put+get rounds of the first case on ``ours-on`` (HTTP metadata)."""
    from pyinstrument import Profiler

    case = cases[0]
    with MasterProcess(tmp) as master:
        master.start()
        with StorageNodeProcess(master, tmp, segment=max(256 << 20, 3 * case.total)) as node:
            node.start()
            observer, shutdown = sdk_observer(tmp / "telemetry-profile")
            config = master.client_config(global_segment_size=0, local_buffer_size=args.local_buffer_mib << 20)
            client = MooncakeBatchClient(config, observer=observer)
            path = OursPath("ours-on", client)
            try:
                data = make_data(case, "profile")
                path.prepare(case, data)
                for _ in range(args.warmup):
                    path.put()
                    check(case, data, path.get())
                profiler = Profiler(interval=0.0002)
                profiler.start()
                for _ in range(args.repeats):
                    path.put()
                    path.get()
                profiler.stop()
            finally:
                path.close()
                shutdown()
    header = f"pyinstrument: {args.repeats} x (put + get) of {case.name}, ours-on, HTTP metadata\n"
    return header + profiler.output_text(unicode=False, color=False)


# ------------------------------------------------------------------------------------------------ memory
def memory_child(keys: int, value_kib: int) -> None:
    """In a fresh process: peak RSS of writing ``keys`` x ``value_kib`` KiB tensors and reading them back."""
    with tempfile.TemporaryDirectory(prefix="tq-bench-mem-") as tmp:
        total = keys * value_kib * 1024
        with MasterProcess(Path(tmp)) as master:
            master.start()
            with StorageNodeProcess(master, Path(tmp), segment=total + (256 << 20)) as node:
                node.start()
                client = MooncakeBatchClient(master.client_config(global_segment_size=0), observer=NOOP_OBSERVER)
                try:
                    names = [f"mem-{i}" for i in range(keys)]
                    base = rss_peak()
                    values = [torch.full((value_kib * 256,), float(i)) for i in range(keys)]
                    meta = client.put(names, values)
                    del values  # the source is gone before the read: the round trip holds one copy at a time
                    got = client.get(names, custom_backend_meta=meta)
                    ok = all(bool((g == float(i)).all()) for i, g in enumerate(got))
                    peak = rss_peak()
                finally:
                    client.close()
    print(json.dumps({"data_bytes": total, "baseline_rss": base, "peak_rss": peak, "ok": ok}))


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(args: argparse.Namespace) -> dict[str, Any]:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench; "
    code += f"bench.memory_child({args.keys}, {args.value_kib})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    over = (out["peak_rss"] - out["baseline_rss"]) / out["data_bytes"]
    out["peak_over_baseline_per_data"] = round(over, 3)
    print(
        f"{args.keys} x {args.value_kib} KiB round trip: data {out['data_bytes'] / GB:.2f} GB, "
        f"RSS before the data {out['baseline_rss'] / GB:.2f} GB, peak {out['peak_rss'] / GB:.2f} GB: "
        f"peak - baseline = {over:.2f} x the data (target <= 1.5); values checked: {out['ok']}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    parser.add_argument("--metadata", nargs="+", choices=["http", "p2p"], default=["http", "p2p"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-stock", action="store_true", help="leave TQ's stock client out")
    parser.add_argument(
        "--paths", nargs="+", choices=MAIN_PATHS + DIAGNOSTIC_PATHS, default=MAIN_PATHS, help="paths to run, in order"
    )
    parser.add_argument("--local-buffer-mib", type=int, default=512, help="each client's local buffer")
    parser.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of a round trip instead")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile of ours-on (first case) here")
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--value-kib", type=int, default=1024)
    args = parser.parse_args()
    if args.no_stock:
        args.paths = [p for p in args.paths if p != "tq-stock"]
    logging.basicConfig(level=logging.WARNING)
    if args.memory:
        out = memory(args)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return
    cases = QUICK if args.quick else FULL
    if args.case:
        cases = [c for c in cases if any(part in c.name for part in args.case)]
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="tq-bench-") as tmp:
            args.profile.write_text(profile(args, cases, Path(tmp)))
        print(f"profile written to {args.profile}")
        return
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tq-bench-") as tmp:
        for metadata in args.metadata:
            results += run_mode(metadata, cases, args, Path(tmp))
    print(f"\n{args.repeats} measured rounds after {args.warmup} warm-up, paths interleaved; medians.\n")
    print(report(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                [{"metadata": r.metadata, "case": r.case, "bytes": r.total_bytes, "times": r.times} for r in results],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
