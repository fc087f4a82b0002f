"""Same-key races in Mooncake: concurrent get, put and clear of the SAME keys, every value read checked.

Starts its own ``mooncake_master`` and one or two storage processes on loopback (free ports); this process
is a pure client (``global_segment_size`` 0), so every byte crosses loopback TCP. For ``--duration``
seconds, ``--threads`` threads each pick an operation at random (``--mix get:put:clear``) on ``--batch``
random keys out of ``--keys``, all values ``--value-bytes`` long, either

* ``--mode client``: through ``tq_mooncake.client.MooncakeBatchClient`` (put / get with shapes and dtypes,
  as TQ reads / clear), or
* ``--mode raw``: straight on ``mooncake.store.MooncakeDistributedStore``: ``batch_upsert_from``,
  ``batch_get_into`` (into a buffer pre-filled with a sentinel) and ``batch_remove(force=...)``.

Every value written is self-describing: int64 element ``i`` of the value of key ``k`` written with counter
``s`` is ``5 << 60 | k << 44 | s << 16 | (i & 0xFFFF)``. A value read back is therefore classified as
``right`` (one write of this key), ``stale`` (one write of this key, but one that a later put or clear
finished replacing before the read began), or wrong: ``other_key`` (one write of another key), ``zeros``
(all zero: nobody wrote it), ``untouched`` (raw: the store said it read the bytes but the sentinel is
still there), ``torn_same_key`` (two or more writes of this key), ``torn_other_key`` (elements of other
keys mixed in), ``partial_zeros`` / ``partial_untouched`` (part of the value never written) or
``garbage`` (none of these patterns).

After the race comes the space-leak phase: every key is cleared (retrying leased / being-written keys
until ``--clear-settle-s``), then the master's ``master_key_count``, ``master_allocated_bytes`` and
``master_put_start_discarded_staging_size`` (bytes of preempted writes parked in ``discarded_replicas_``:
allocated, owned by no key) are read and fresh keys are put with the raw store; with ``--heal-wait S`` the
allocated bytes are polled (and a one-key put tried) every ``--heal-poll`` seconds for up to S seconds, to
see whether the space comes back by itself. Everything started is stopped at the end, also on Ctrl-C or an
exception. What the classes and the leak come from: ``docs/mooncake-races.md``.

    .venv/bin/python bench/race.py --duration 30                      # through the client
    .venv/bin/python bench/race.py --mode raw --force --duration 60   # raw store, batch_remove(force=True)
    .venv/bin/python bench/race.py --mode raw --no-force --duration 60
    .venv/bin/python bench/race.py --mode raw --writers-only --writer-threads 2 --duration 60  # no clears
    .venv/bin/python bench/race.py --mode raw --writer-threads 1     # no overlapping writes: no leak
    .venv/bin/python bench/race.py --mode raw --duration 60 --heal-wait 1500 --heal-poll 20   # full: never heals
    .venv/bin/python bench/race.py --mode raw --duration 6 --heal-wait 400 --heal-poll 5 \
        --master-arg=--put_start_release_timeout_sec=60              # below the watermark: heals in ~2 min

Not a test: on a machine shared with other work the counts vary from run to run (they depend on how
often two calls on one key overlap); compare classes, not exact figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tq_mooncake.client import BatchOperationError, ClientConfig, ErrorCode, MooncakeBatchClient
from tq_mooncake.client.config import parse_size
from tq_mooncake.client.observer import NOOP_OBSERVER
from tq_mooncake.client.store import connect_store, replicate_config
from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, start_all, stop_all

MAGIC = 5
SENTINEL = -1  # raw reads land in a buffer of 0xFF bytes: a "successful" read that wrote nothing shows
SEQ_BITS = 28
KEY_BITS = 16
WRONG = (
    "other_key",
    "zeros",
    "untouched",
    "torn_same_key",
    "torn_other_key",
    "partial_zeros",
    "partial_untouched",
    "garbage",
)
CLASSES = ("right", "stale", *WRONG, "short")
NOT_RETURNED = -123456  # client mode: a key that did not fail, in a get that raised (its value is not returned)


# ------------------------------------------------------------------------------------------------ values
def encode_into(out: torch.Tensor, key_id: int, seq: int, idx: torch.Tensor) -> None:
    """Fill the int64 row ``out`` with the value of write ``seq`` of key ``key_id``."""
    base = (MAGIC << 60) | (key_id << 44) | (seq << 16)
    torch.bitwise_or(idx, base, out=out)


@dataclasses.dataclass
class Verdict:
    cls: str
    key_id: int | None = None  # the single writer's key and counter, for the whole-value classes
    seq: int | None = None
    detail: str = ""


def classify(v: torch.Tensor, key_id: int, idx: torch.Tensor) -> Verdict:
    """What the int64 value ``v`` read under ``key_id`` is (see the module docstring)."""
    zeros = v == 0
    if bool(zeros.all()):
        return Verdict("zeros")
    untouched = v == SENTINEL
    if bool(untouched.all()):
        return Verdict("untouched")
    ok = ((v >> 60) == MAGIC) & ((v & 0xFFFF) == idx)
    tags = v >> 16  # magic | key | seq
    if bool(ok.all()):
        first = int(tags[0])
        k, s = (first >> SEQ_BITS) & 0xFFFF, first & ((1 << SEQ_BITS) - 1)
        if bool((tags == first).all()):
            return Verdict("this_key" if k == key_id else "other_key", k, s)
        writes = sorted({((t >> SEQ_BITS) & 0xFFFF, t & ((1 << SEQ_BITS) - 1)) for t in torch.unique(tags).tolist()})
        keys = {w[0] for w in writes}
        detail = f"{len(writes)} writes {writes[:4]}"
        return Verdict("torn_same_key" if keys == {key_id} else "torn_other_key", detail=detail)
    n = v.numel()
    if bool((ok | zeros).all()):
        return Verdict("partial_zeros", detail=f"{int(zeros.sum())}/{n} elements zero")
    if bool((ok | untouched).all()):
        return Verdict("partial_untouched", detail=f"{int(untouched.sum())}/{n} elements unwritten")
    bad = int((~(ok | zeros | untouched)).sum())
    return Verdict("garbage", detail=f"{bad}/{n} elements match no write, e.g. {hex(int(v[~ok][0]) & (2**64 - 1))}")


# ------------------------------------------------------------------------------------------------ bookkeeping
class Book:
    """Per key: the counters handed out, when each successful put and clear started and ended. A value read
    is ``stale`` when a put or clear of its key that began after the value's own put had returned was itself
    over before the read began (so linearizability rules the value out)."""

    KEEP = 4000

    def __init__(self, keys: int) -> None:
        self._lock = threading.Lock()
        self._next = [0] * keys
        self._put_end: list[dict[int, float]] = [{} for _ in range(keys)]  # seq -> when its put returned OK
        self._replaced: list[collections.deque[tuple[float, float]]] = [
            collections.deque(maxlen=self.KEEP) for _ in range(keys)
        ]  # (start, end) of successful puts and clears, in end order

    def next_seq(self, k: int) -> int:
        with self._lock:
            self._next[k] += 1
            if self._next[k] >= 1 << SEQ_BITS:
                raise OverflowError("write counter overflow")
            return self._next[k]

    def issued(self, k: int) -> int:
        with self._lock:
            return self._next[k]

    def put_done(self, k: int, seq: int, start: float, end: float) -> None:
        with self._lock:
            ends = self._put_end[k]
            ends[seq] = end
            if len(ends) > self.KEEP:
                for old in sorted(ends)[: len(ends) - self.KEEP]:
                    del ends[old]
            self._replaced[k].append((start, end))

    def clear_done(self, k: int, start: float, end: float) -> None:
        with self._lock:
            self._replaced[k].append((start, end))

    def stale(self, k: int, seq: int, read_start: float) -> bool:
        with self._lock:
            ends = self._put_end[k]
            written = ends.get(seq)
            if written is None:
                # an unacknowledged write (failed or still running), or one too old to be kept
                return bool(ends) and seq < min(ends)
            for start, end in reversed(self._replaced[k]):
                if end < written:
                    return False
                if end < read_start and start > written:
                    return True
            return False


class Counts:
    """Everything the race counts; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: collections.Counter[str] = collections.Counter()
        self.values_before_full: collections.Counter[str] = collections.Counter()  # before NO_AVAILABLE_HANDLE
        self.calls: collections.Counter[str] = collections.Counter()
        self.keys_ok: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[tuple[str, int]] = collections.Counter()
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: list[dict[str, Any]] = []
        self.first_no_handle: float | None = None

    def value(self, cls: str, example: dict[str, Any] | None = None, keep: int = 8) -> None:
        with self._lock:
            self.values[cls] += 1
            if self.first_no_handle is None:
                self.values_before_full[cls] += 1
            if example is not None and len(self.examples) < keep:
                self.examples.append(example)

    def call(self, op: str, ok_keys: int) -> None:
        with self._lock:
            self.calls[op] += 1
            self.keys_ok[op] += ok_keys

    def code(self, op: str, code: int, t: float) -> None:
        with self._lock:
            self.codes[(op, int(code))] += 1
            if code == ErrorCode.NO_AVAILABLE_HANDLE and self.first_no_handle is None:
                self.first_no_handle = t

    def outcome(self, op: str, what: str) -> None:
        with self._lock:
            self.outcomes[(op, what)] += 1


# ------------------------------------------------------------------------------------------------ store paths
class Path_:
    """One thread's way of calling the store: ``put`` / ``get`` / ``clear`` of key ids, returning per-key codes
    (``get`` also the values, int64 rows, for the keys it read)."""

    def put(self, ids: list[int], seqs: list[int]) -> list[int]: ...
    def get(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]: ...
    def clear(self, ids: list[int]) -> list[int]: ...
    def close(self) -> None: ...


def key_name(k: int) -> str:
    return f"race-{k}"


class RawPath(Path_):
    """``batch_upsert_from`` / ``batch_get_into`` / ``batch_remove`` on registered per-thread buffers."""

    def __init__(self, store: Any, rc: Any, batch: int, n: int, idx: torch.Tensor, force: bool) -> None:
        self.store, self.rc, self.n, self.idx, self.force = store, rc, n, idx, force
        self.src = torch.empty((batch, n), dtype=torch.int64)
        self.dst = torch.empty((batch, n), dtype=torch.int64)
        self.size = n * 8
        self.registered: list[int] = []
        for t in (self.src, self.dst):
            rc_ = store.register_buffer(t.data_ptr(), t.numel() * 8)
            if rc_ != 0:
                raise RuntimeError(f"register_buffer failed: {rc_}")
            self.registered.append(t.data_ptr())

    def put(self, ids: list[int], seqs: list[int]) -> list[int]:
        for j, (k, s) in enumerate(zip(ids, seqs, strict=True)):
            encode_into(self.src[j], k, s, self.idx)
        ptrs = [self.src[j].data_ptr() for j in range(len(ids))]
        return list(self.store.batch_upsert_from([key_name(k) for k in ids], ptrs, [self.size] * len(ids), self.rc))

    def get(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        rows = self.dst[: len(ids)]
        rows.fill_(SENTINEL)
        got = self.store.batch_get_into(
            [key_name(k) for k in ids], [self.dst[j].data_ptr() for j in range(len(ids))], [self.size] * len(ids)
        )
        codes, values = [], []
        for j, n in enumerate(got):
            if n == self.size:
                codes.append(0)
                values.append(self.dst[j])
            elif n >= 0:
                codes.append(0)
                values.append(None)  # short read: counted as such
            else:
                codes.append(int(n))
                values.append(None)
        return codes, values

    def clear(self, ids: list[int]) -> list[int]:
        return [int(c) for c in self.store.batch_remove([key_name(k) for k in ids], self.force)]

    def close(self) -> None:
        for ptr in self.registered:
            with contextlib.suppress(Exception):
                self.store.unregister_buffer(ptr)
        self.registered.clear()


class ClientPath(Path_):
    """``MooncakeBatchClient`` put / get (shapes and dtypes, TQ's way) / clear; a failed call gives each failed
    key its code (the values of a get that raised are not returned, so they are not counted)."""

    def __init__(self, client: MooncakeBatchClient, n: int, idx: torch.Tensor, counts: Counts) -> None:
        self.client, self.n, self.idx, self.counts = client, n, idx, counts

    def _codes(self, op: str, names: list[str], call: Callable[[], Any]) -> tuple[list[int], Any]:
        try:
            return [0] * len(names), call()
        except BatchOperationError as exc:
            self.counts.outcome(op, type(exc).__name__)
            return [int(exc.failed.get(name, 0)) for name in names], None

    def put(self, ids: list[int], seqs: list[int]) -> list[int]:
        values = [torch.empty(self.n, dtype=torch.int64) for _ in ids]
        for v, k, s in zip(values, ids, seqs, strict=True):
            encode_into(v, k, s, self.idx)
        names = [key_name(k) for k in ids]
        return self._codes("put", names, lambda: self.client.put(names, values))[0]

    def get(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        names = [key_name(k) for k in ids]
        codes, got = self._codes(
            "get", names, lambda: self.client.get(names, shapes=[[self.n]] * len(ids), dtypes=[torch.int64] * len(ids))
        )
        if got is None:
            return [c if c != 0 else NOT_RETURNED for c in codes], [None] * len(ids)
        return codes, [g.reshape(-1) if g.numel() == self.n else None for g in got]

    def clear(self, ids: list[int]) -> list[int]:
        names = [key_name(k) for k in ids]
        return self._codes("clear", names, lambda: self.client.clear(names))[0]


# ------------------------------------------------------------------------------------------------ the race
@dataclasses.dataclass
class Settings:
    keys: int
    batch: int
    n: int
    weights: tuple[int, int, int]


def worker(
    path: Path_,
    cfg: Settings,
    weights: tuple[int, int, int],
    book: Book,
    counts: Counts,
    stop: threading.Event,
    t0: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    idx = torch.arange(cfg.n, dtype=torch.int64) & 0xFFFF
    ops = rng.choices(("get", "put", "clear"), weights=weights, k=1 << 16)
    i = 0
    while not stop.is_set():
        op = ops[i % len(ops)]
        i += 1
        ids = rng.sample(range(cfg.keys), cfg.batch)
        start = time.monotonic()
        try:
            if op == "put":
                seqs = [book.next_seq(k) for k in ids]
                codes = path.put(ids, seqs)
                end = time.monotonic()
                for k, s, c in zip(ids, seqs, codes, strict=True):
                    if c == 0:
                        book.put_done(k, s, start, end)
            elif op == "clear":
                codes = path.clear(ids)
                end = time.monotonic()
                for k, c in zip(ids, codes, strict=True):
                    if c == 0:
                        book.clear_done(k, start, end)
                codes = [0 if c == ErrorCode.OBJECT_NOT_FOUND else c for c in codes]
            else:
                codes, values = path.get(ids)
                for k, c, v in zip(ids, codes, values, strict=True):
                    if c == 0:
                        judge(k, v, idx, book, counts, start, t0)
        except Exception as exc:  # a store call raising is itself a finding: count it, go on
            counts.outcome(op, f"{type(exc).__name__}: {exc}"[:120])
            continue
        counts.call(op, sum(1 for c in codes if c == 0))
        for c in codes:
            if c != 0:
                counts.code(op, c, time.monotonic() - t0)


def judge(
    k: int, v: torch.Tensor | None, idx: torch.Tensor, book: Book, counts: Counts, start: float, t0: float
) -> None:
    if v is None:
        counts.value("short")
        return
    verdict = classify(v, k, idx)
    cls = verdict.cls
    if cls == "this_key":
        assert verdict.seq is not None
        if verdict.seq > book.issued(k):
            cls, verdict.detail = "garbage", f"counter {verdict.seq} never handed out"
        else:
            cls = "stale" if book.stale(k, verdict.seq, start) else "right"
    example = None
    if cls in WRONG:
        example = {
            "t_s": round(start - t0, 3),
            "key": k,
            "class": cls,
            "writer": None if verdict.key_id is None else [verdict.key_id, verdict.seq],
            "detail": verdict.detail,
        }
    counts.value(cls, example)


class Sampler(threading.Thread):
    """The master's allocated bytes and key count every ``every`` seconds."""

    def __init__(self, master: MasterProcess, every: float, t0: float) -> None:
        super().__init__(daemon=True, name="race-sampler")
        self.master, self.every, self.t0 = master, every, t0
        self.samples: list[tuple[float, int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            with contextlib.suppress(OSError):
                m = master_metrics(self.master)
                self.samples.append((time.monotonic() - self.t0, m["allocated"], m["keys"], m["discarded"]))


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.MULTILINE)


def master_metrics(master: MasterProcess) -> dict[str, int]:
    """``master_allocated_bytes``, ``master_key_count``, ``master_total_capacity_bytes`` and the bytes parked in
    the master's ``discarded_replicas_`` (``master_put_start_discarded_staging_size``: buffers of preempted
    writes, allocated but owned by no key until their expiry), summed over labels."""
    sums: collections.Counter[str] = collections.Counter()
    for name, _, value in _SAMPLE.findall(master.metrics_text()):
        with contextlib.suppress(ValueError):
            sums[name] += int(float(value))
    return {
        "allocated": sums["master_allocated_bytes"],
        "keys": sums["master_key_count"],
        "capacity": sums["master_total_capacity_bytes"],
        "discarded": sums["master_put_start_discarded_staging_size"],
        "discard_cnt": sums["master_put_start_discard_cnt"],
        "release_cnt": sums["master_put_start_release_cnt"],
    }


# ------------------------------------------------------------------------------------------------ the leak
def clear_all(store: Any, names: list[str], force: bool, settle_s: float) -> dict[str, Any]:
    """``batch_remove`` every name until each is gone (0 or OBJECT_NOT_FOUND) or ``settle_s`` passes (a
    non-forced remove waits out read leases; REPLICA_IS_NOT_READY waits for a write to end)."""
    start = time.monotonic()
    left = list(names)
    last: collections.Counter[int] = collections.Counter()
    rounds = 0
    while left:
        rounds += 1
        codes = store.batch_remove(left, force)
        last = collections.Counter(int(c) for c in codes if c not in (0, ErrorCode.OBJECT_NOT_FOUND))
        left = [n for n, c in zip(left, codes, strict=True) if c not in (0, ErrorCode.OBJECT_NOT_FOUND)]
        if not left or time.monotonic() - start > settle_s:
            break
        time.sleep(0.5)
    return {"left": len(left), "codes": dict(last), "seconds": round(time.monotonic() - start, 1), "rounds": rounds}


def probe_puts(store: Any, rc: Any, names: list[str], n: int, idx: torch.Tensor) -> collections.Counter[int]:
    """Put fresh values under ``names`` with the raw store; the codes (0 = written)."""
    src = torch.empty((len(names), n), dtype=torch.int64)
    for j in range(len(names)):
        encode_into(src[j], (1 << KEY_BITS) - 1, j + 1, idx)
    codes = store.batch_upsert_from(names, [src[j].data_ptr() for j in range(len(names))], [n * 8] * len(names), rc)
    return collections.Counter(int(c) for c in codes)


def leak_phase(
    master: MasterProcess, store: Any, rc: Any, args: argparse.Namespace, n: int, idx: torch.Tensor
) -> dict[str, Any]:
    names = [key_name(k) for k in range(args.keys)]
    before = master_metrics(master)
    cleared = clear_all(store, names, args.force, args.clear_settle_s)
    after = master_metrics(master)
    probes = [f"race-probe-{i}" for i in range(args.keys)]
    put_codes = probe_puts(store, rc, probes, n, idx)
    clear_all(store, probes, True, 5)
    out: dict[str, Any] = {
        "before_clear": before,
        "clear": cleared,
        "after_clear": after,
        "probe_puts": {str(ErrorCode.of(c).describe()): v for c, v in sorted(put_codes.items())},
        "probe_puts_ok": put_codes.get(0, 0),
        "probe_puts_total": len(probes),
        "heal": [],
    }
    if args.heal_wait > 0:
        try:
            heal_watch(master, store, rc, args, n, idx, out)
        except KeyboardInterrupt:
            out["heal_interrupted"] = True
    return out


def heal_watch(
    master: MasterProcess, store: Any, rc: Any, args: argparse.Namespace, n: int, idx: torch.Tensor, out: dict
) -> None:
    """Poll the allocated bytes (and try a one-key put) until the space is back or ``--heal-wait`` passes."""
    start = time.monotonic()
    print(f"watching the allocated bytes for up to {args.heal_wait:.0f} s ...", file=sys.stderr, flush=True)
    while True:
        m = master_metrics(master)
        codes = probe_puts(store, rc, ["race-heal-probe"], n, idx)
        clear_all(store, ["race-heal-probe"], True, 5)
        t = round(time.monotonic() - start, 1)
        out["heal"].append(
            {
                "t_s": t,
                "allocated": m["allocated"],
                "discarded": m["discarded"],
                "keys": m["keys"],
                "put_ok": codes.get(0, 0),
            }
        )
        print(
            f"  [{t:6.0f} s] allocated {mib(m['allocated'])} (discarded {mib(m['discarded'])}) keys {m['keys']} "
            f"put ok {codes.get(0, 0)}",
            file=sys.stderr,
            flush=True,
        )
        if m["allocated"] == 0 and codes.get(0, 0):
            out["healed_after_s"] = t
            break
        left = args.heal_wait - (time.monotonic() - start)
        if left <= 0:
            break
        time.sleep(min(args.heal_poll, left))


# ------------------------------------------------------------------------------------------------ report
def mib(b: int) -> str:
    return f"{b / (1 << 20):.1f} MiB"


def describe(code: int) -> str:
    if code == NOT_RETURNED:
        return "(ok, but the call raised)"
    name = ErrorCode.of(code).describe()
    return name if not name.startswith("UNKNOWN") else f"code {code}"


def report(
    args: argparse.Namespace,
    counts: Counts,
    elapsed: float,
    meta: dict[str, Any],
    samples: Sequence[tuple[float, int, int, int]],
    leak: dict[str, Any] | None,
) -> str:
    lines = [
        f"race: mode {args.mode}, {args.threads} threads, {args.keys} keys x {args.value_bytes} B, batch "
        f"{args.batch}, mix get:put:clear {':'.join(map(str, meta['weights']))}"
        + (f" ({args.writer_threads} put-only threads)" if args.writer_threads else "")
        + f", {elapsed:.0f} s, "
        f"{args.storage_nodes} storage node(s) x {args.segment}, replica_num {args.replica_num}",
        f"clear: {meta['clear']}",
        "",
        f"{'values read':<28}{sum(counts.values.values()):>10}",
    ]
    total = sum(counts.values.values()) or 1
    for cls in CLASSES:
        tag = "wrong: " if cls in WRONG else ""
        n = counts.values.get(cls, 0)
        if n or cls in ("right", "stale", "other_key", "zeros", "torn_same_key", "torn_other_key"):
            lines.append(f"  {tag + cls:<26}{n:>10}  {100 * n / total:6.3f} %")
    wrong = sum(counts.values.get(c, 0) for c in WRONG)
    lines.append(f"  {'wrong, all classes':<26}{wrong:>10}  {100 * wrong / total:6.3f} %")
    if counts.first_no_handle is not None:
        pre = counts.values_before_full
        pre_wrong = sum(pre.get(c, 0) for c in WRONG)
        lines.append(
            f"  before the first NO_AVAILABLE_HANDLE ({counts.first_no_handle:.0f} s): {sum(pre.values())} read, "
            f"{pre_wrong} wrong " + str({c: pre[c] for c in WRONG if pre.get(c)})
        )
    lines += [
        "",
        "calls (keys ok):  "
        + ", ".join(f"{op} {counts.calls.get(op, 0)} ({counts.keys_ok.get(op, 0)})" for op in ("get", "put", "clear")),
    ]
    if counts.codes:
        lines.append("per-key error codes:")
        for (op, code), n in sorted(counts.codes.items(), key=lambda x: (x[0][0], -x[1])):
            lines.append(f"  {op:<6}{describe(code):<40}{n:>10}")
    if counts.outcomes:
        lines.append("exceptions:")
        for (op, what), n in sorted(counts.outcomes.items()):
            lines.append(f"  {op:<6}{what:<60}{n:>8}")
    if counts.examples:
        lines.append("first wrong values:")
        lines += [f"  {json.dumps(e)}" for e in counts.examples]
    lines += ["", "space (master metrics):"]
    if samples:
        step = max(1, len(samples) // 12)
        lines.append(
            "  during the race (t s: allocated / of it discarded, keys): "
            + "; ".join(f"{t:.0f}: {mib(a)} / {mib(d)}, {k}" for t, a, k, d in samples[::step])
        )
    live = args.keys * args.value_bytes * args.replica_num
    lines.append(f"  live data at most {mib(live)} ({args.keys} keys x {args.value_bytes} B x {args.replica_num})")
    first = counts.first_no_handle
    lines.append("  first NO_AVAILABLE_HANDLE: " + (f"t = {first:.1f} s" if first is not None else "never"))
    if leak is not None:
        a, c = leak["after_clear"], leak["clear"]
        lines.append(
            f"  after clearing every key ({'forced' if args.force else 'not forced'}; {c['seconds']} s, "
            f"{c['left']} left {c['codes'] or ''}): master_key_count {a['keys']}, master_allocated_bytes "
            f"{a['allocated']} ({mib(a['allocated'])} of {mib(a['capacity'])}), of it parked in discarded_replicas_ "
            f"{mib(a['discarded'])} ({a['discard_cnt'] - a['release_cnt']} entries; {a['discard_cnt']} parked, "
            f"{a['release_cnt']} released so far)"
        )
        lines.append(
            f"  raw puts of {leak['probe_puts_total']} fresh keys after that: {leak['probe_puts_ok']} ok "
            f"{leak['probe_puts']}"
        )
        if leak["heal"]:
            h = leak["heal"]
            healed = leak.get("healed_after_s")
            lines.append(
                f"  heal watch: {len(h)} polls over {h[-1]['t_s']:.0f} s, allocated {mib(h[0]['allocated'])} -> "
                f"{mib(h[-1]['allocated'])}; "
                + (f"healed (0 bytes allocated, put ok) after {healed:.0f} s" if healed is not None else "not healed")
            )
            step = max(1, len(h) // 10)
            lines.append(
                "    " + "; ".join(f"{p['t_s']:.0f} s: {mib(p['allocated'])} put {p['put_ok']}" for p in h[::step])
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30, help="seconds of racing (default 30)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--keys", type=int, default=16, help="distinct keys raced on (default 16)")
    p.add_argument("--value-bytes", default="64KiB", help="bytes per value, a multiple of 8 (default 64KiB)")
    p.add_argument("--batch", type=int, default=4, help="keys per call (default 4)")
    p.add_argument("--mode", choices=("client", "raw"), default="client")
    p.add_argument(
        "--force",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="raw: batch_remove(force=...); client: the clear_force config key if the client has one "
        "(its clear() is forced otherwise). Default --force",
    )
    p.add_argument("--writers-only", action="store_true", help="no clears: get and put only")
    p.add_argument("--mix", default="2:1:1", help="weights of get:put:clear per call (default 2:1:1)")
    p.add_argument(
        "--writer-threads",
        type=int,
        default=0,
        help="W > 0: the first W threads only put, the others only get and clear (default 0: all mix)",
    )
    p.add_argument("--storage-nodes", type=int, choices=(1, 2), default=1)
    p.add_argument("--segment", default="256MB", help="memory of each storage node (default 256MB)")
    p.add_argument("--replica-num", type=int, default=1)
    p.add_argument(
        "--master-arg",
        action="append",
        default=[],
        help="extra mooncake_master flag, e.g. --master-arg=--put_start_release_timeout_sec=60",
    )
    p.add_argument("--no-leak-phase", action="store_true", help="skip the clear-everything-then-put phase")
    p.add_argument(
        "--clear-settle-s",
        type=float,
        default=15,
        help="leak phase: keep retrying removes that fail (leases, writes) this long (default 15)",
    )
    p.add_argument(
        "--heal-wait",
        type=float,
        default=0,
        help="leak phase: poll the allocated bytes for up to this many seconds (default 0: not)",
    )
    p.add_argument("--heal-poll", type=float, default=10, help="seconds between heal polls (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--store-logs",
        action="store_true",
        help="let Mooncake's own log lines through to stderr (default: into client-stderr.log in the log folder)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--log-dir", type=Path, help="keep the processes' logs here (default: a temp folder)")
    args = p.parse_args(argv)
    args.value_bytes = parse_size("--value-bytes", args.value_bytes)
    if args.value_bytes <= 0 or args.value_bytes % 8:
        p.error("--value-bytes must be a positive multiple of 8")
    if args.value_bytes // 8 > 1 << 16:
        p.error("--value-bytes at most 512KiB (the element index has 16 bits)")
    if not 1 <= args.batch <= args.keys:
        p.error("--batch must be between 1 and --keys")
    if args.keys >= (1 << KEY_BITS) - 1:
        p.error("--keys too large")
    try:
        weights = tuple(int(w) for w in args.mix.split(":"))
        assert len(weights) == 3 and min(weights) >= 0 and sum(weights) > 0
    except (ValueError, AssertionError):
        p.error("--mix must be three non-negative integers get:put:clear")
    if args.writers_only:
        weights = (weights[0], weights[1], 0)
    args.weights = weights
    if not 0 <= args.writer_threads <= args.threads or (
        args.writer_threads and args.writer_threads == args.threads and weights[1] == 0
    ):
        p.error("--writer-threads must be between 0 and --threads")
    return args


def thread_weights(args: argparse.Namespace, i: int) -> tuple[int, int, int]:
    """get:put:clear weights of thread ``i``: with ``--writer-threads W`` the first W threads only put and
    the others never do; otherwise every thread follows ``--mix``."""
    get, put, clear = args.weights
    if not args.writer_threads:
        return args.weights
    return (0, 1, 0) if i < args.writer_threads else (get, 0, clear)


def client_clear_setting(force: bool) -> tuple[dict[str, Any], str]:
    """The config entries that make the client's clear forced or not, and how it is described."""
    fields = {f.name for f in dataclasses.fields(ClientConfig)}
    if "clear_force" in fields:
        return {"clear_force": force}, f"client clear(), config clear_force={force}"
    note = "client clear() = batch_remove(force=True) (the client has no clear_force key)"
    if not force:
        note += "; --no-force has no effect in client mode"
    return {}, note


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n = args.value_bytes // 8
    idx = torch.arange(n, dtype=torch.int64) & 0xFFFF
    master = MasterProcess(tmp, extra_args=args.master_arg)
    nodes = [StorageNodeProcess(master, tmp, segment=args.segment) for _ in range(args.storage_nodes)]
    procs: list[Any] = [master, *nodes]
    client: MooncakeBatchClient | None = None
    store: Any = None
    paths: list[Path_] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    sampler: Sampler | None = None
    try:
        master.start()
        start_all(nodes)
        base = master.client_config(global_segment_size=0, local_buffer_size=0, replica_num=args.replica_num)
        counts, book = Counts(), Book(args.keys)
        if args.mode == "client":
            extra, clear_note = client_clear_setting(args.force)
            client = MooncakeBatchClient({**base, **extra}, observer=NOOP_OBSERVER)
            store = client.store
            paths = [ClientPath(client, n, idx, counts) for _ in range(args.threads)]
        else:
            store = connect_store(ClientConfig.from_dict(base))
            clear_note = f"raw batch_remove(force={args.force})"
        rc = replicate_config(ClientConfig.from_dict(base))
        if args.mode == "raw":
            paths = [RawPath(store, rc, args.batch, n, idx, args.force) for _ in range(args.threads)]
        cfg = Settings(args.keys, args.batch, n, args.weights)
        t0 = time.monotonic()
        sampler = Sampler(master, 2.0, t0)
        sampler.start()
        for i, path in enumerate(paths):
            weights = thread_weights(args, i)
            th = threading.Thread(
                target=worker,
                args=(path, cfg, weights, book, counts, stop, t0, args.seed * 1000 + i),
                daemon=True,
                name=f"race-{i}",
            )
            threads.append(th)
            th.start()
        interrupted = False
        print(f"racing for {args.duration:.0f} s ({args.mode}, {clear_note}) ...", file=sys.stderr, flush=True)
        try:
            stop.wait(args.duration)
        except KeyboardInterrupt:
            interrupted = True
        stop.set()
        for th in threads:
            th.join(timeout=60)
        elapsed = time.monotonic() - t0
        sampler.stop.set()
        stuck = [th.name for th in threads if th.is_alive()]
        leak = None
        if not interrupted and not stuck and not args.no_leak_phase:
            leak = leak_phase(master, store, rc, args, n, idx)
        meta = {"weights": args.weights, "clear": clear_note}
        text = report(args, counts, elapsed, meta, sampler.samples, leak)
        if stuck:
            text += f"\nthreads still in a store call after 60 s: {stuck}"
        if interrupted:
            text += "\ninterrupted: figures so far, no leak phase"
        if leak is not None and leak.get("heal_interrupted"):
            text += "\ninterrupted during the heal watch"
            interrupted = True
        print(text)
        return {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "elapsed_s": elapsed,
            "values": dict(counts.values),
            "values_before_full": dict(counts.values_before_full),
            "calls": dict(counts.calls),
            "keys_ok": dict(counts.keys_ok),
            "codes": [{"op": op, "code": code, "count": v} for (op, code), v in counts.codes.items()],
            "exceptions": [{"op": op, "what": w, "count": v} for (op, w), v in counts.outcomes.items()],
            "examples": counts.examples,
            "first_no_available_handle_s": counts.first_no_handle,
            "samples": sampler.samples,
            "leak": leak,
            "interrupted": interrupted,
        }
    finally:
        stop.set()
        if sampler is not None:
            sampler.stop.set()
        if all(not th.is_alive() for th in threads):  # the binding crashes on calls after close()
            for path in paths:
                path.close()
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close()
                elif store is not None:
                    store.close()
        stop_all(procs)


@contextlib.contextmanager
def store_logs_to(path: Path) -> Iterator[None]:
    """Send what is written to file descriptor 2 (Mooncake's glog lines: one per failed upsert, thousands a
    minute here) to ``path``; ``sys.stderr`` (this script's progress lines) stays on the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    old_stderr = sys.stderr
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = terminal
        try:
            yield
        finally:
            sys.stderr = old_stderr
            os.dup2(saved, 2)
            os.close(saved)
            terminal.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.ExitStack() as stack:
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            tmp = args.log_dir
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tq-race-")))
        if not args.store_logs:
            stack.enter_context(store_logs_to(tmp / "client-stderr.log"))
        try:
            out = run(args, tmp)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 130 if out.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
