"""A realistic RL batch through TransferQueue's public kv API, on three storage backends, in one run.

What is measured: for a verl-style PPO batch (default 512 samples, ``--samples``), the wall time of
``tq.kv_batch_put(keys, partition_id, fields=batch)``, ``tq.kv_batch_get(keys, partition_id)`` and
``tq.kv_clear(keys, partition_id)`` as a TQ user calls them, on each storage backend:

* ``SimpleStorage``: TQ's own default backend (its default config: two storage-unit Ray actors, over ZMQ);
* ``MooncakeStore``: TQ 0.1.11's stock Mooncake backend (``MooncakeStoreClient``);
* ``MooncakeStoreObserved``: ours, with telemetry on as a user runs it: the section's ``telemetry`` has a
  ``telemetry_dir`` in this run's temporary folder, so spans and metrics are exported there as OTLP JSON lines
  (default sampling: every retried or failed operation kept, 1 in 100 clean ones; metrics always).

The batch (seeded; the same in every process): jagged int64 ``prompts`` (64..1024 tokens) and ``responses``
(16..2048), a jagged int64 ``attention_mask`` over prompt + response, a jagged bool ``response_mask``, bf16
``rollout_log_probs`` and float32 ``old_log_probs`` (jagged like the responses), float32 scalar ``rewards``
(a 1-D field), and two string fields (``uid``, ``data_source``, as tensordict ``NonTensorStack``). Its bytes
(tensor payloads plus UTF-8 strings) give the MB/s.

Set-up: the benchmark starts one ``mooncake_master`` (HTTP metadata server, TQ's default; ``--metadata p2p`` for
``P2PHANDSHAKE``; ``--client_ttl=30`` as TQ's bootstrap) and one storage process that holds all the data
(``tq_mooncake.cluster``), both on 127.0.0.1. Both Mooncake backends get the same section: ``auto_init: false``
(TQ's stock bootstrap would ``pkill`` every ``mooncake_master`` on the machine), ``protocol: tcp``,
``local_hostname: 127.0.0.1``, ``local_buffer_size`` TQ's default (1 GiB), and they are pure clients
(``global_segment_size: 0``), so every byte crosses loopback TCP to the storage process, as between two
machines. Ours also gets the ``telemetry`` section; nothing else differs.

TQ keeps its session in module globals and its controller is a named Ray actor in the fixed namespace
``transfer_queue``, so one Ray cluster can hold only one TQ at a time, and ``tq.close()`` + ``tq.init()`` costs
about 8 s (SimpleStorage, measured here) and starts cold. So each backend runs in its own worker process (its
own local Ray, ``num_cpus=4`` logical, since TQ's controller and each SimpleStorage unit ask for one CPU; Ray on
the loopback address), which does ``tq.init`` once, builds the batch, and then runs one round whenever the
driver tells it over a pipe. Round r runs every backend once, the order rotating each round, so drift hits all
alike; the idle workers wait meanwhile. Keys are fresh every round (``r<round>-<i>``), as a trainer writes new
samples each step and clears them at its end; every round uses partition ``train``.

Every round, outside the timed part, checks every field read back against what was written, row by row
(dtype, shape, content; TQ hands fields back as nested tensors or lists), that the partition lists no keys
after the clear, and, for the Mooncake backends, that the master holds no keys any more. TQ's KV backends hand
a 1-D field's rows back with shape ``(1,)`` instead of ``()`` (TQ's ``extract_field_schema`` unsqueezes 1-D
fields by design); the check accepts exactly that, and the report says where it happened.

Prints the batch, a markdown table of median milliseconds and MB/s per backend, and ratio tables (ratio = the
other backend's median time / ours; >= 1 means ours is at least as fast). ``--json PATH`` also writes every raw
time. Every process it starts (master, storage process, workers and their Ray) is stopped at the end, also on
an error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/tq_batch.py [--samples 512] [--repeats 7] [--warmup 2] [--metadata http|p2p]
        [--backends SimpleStorage MooncakeStore MooncakeStoreObserved] [--json out.json] [--keep-logs]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SIMPLE, STOCK, OURS = "SimpleStorage", "MooncakeStore", "MooncakeStoreObserved"
BACKENDS = (SIMPLE, STOCK, OURS)
MOONCAKE = (STOCK, OURS)
PARTITION = "train"
LOOPBACK = "127.0.0.1"
OPS = ("put", "get", "clear")
MB = 1e6
PROMPT_LEN = (64, 1024)
RESPONSE_LEN = (16, 2048)
VOCAB = 151_936  # Qwen2's vocabulary size
DATA_SOURCES = ("openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval", "codeparrot/apps", "lighteval/aime24")
START_TIMEOUT_S = 240.0
ROUND_TIMEOUT_S = 600.0
SCALAR_NOTE = "rows of the 1-D field {name!r} came back with shape (1,), written as () (TQ's KV schema)"


# ------------------------------------------------------------------------------------------------ the batch
def make_batch(samples: int, seed: int) -> Any:
    """A verl-style PPO batch of ``samples`` rows as a TensorDict (the same for the same seed, in any process)."""
    import torch
    from tensordict import NonTensorStack, TensorDict

    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(PROMPT_LEN[0], PROMPT_LEN[1] + 1, (samples,), generator=gen).tolist()
    response_lens = torch.randint(RESPONSE_LEN[0], RESPONSE_LEN[1] + 1, (samples,), generator=gen).tolist()

    def jagged(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.nested.nested_tensor(rows, layout=torch.jagged)

    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in prompt_lens]
    responses = [torch.randint(0, VOCAB, (n,), generator=gen) for n in response_lens]
    attention = [torch.ones(p + r, dtype=torch.int64) for p, r in zip(prompt_lens, response_lens, strict=True)]
    response_mask = [torch.rand(n, generator=gen) > 0.1 for n in response_lens]  # tool-output tokens masked out
    rollout_lp = [-torch.rand(n, generator=gen).mul(8).to(torch.bfloat16) for n in response_lens]
    old_lp = [-torch.rand(n, generator=gen).mul(8) for n in response_lens]
    rewards = torch.randint(0, 2, (samples,), generator=gen).to(torch.float32)
    uid_bits = torch.randint(0, 1 << 62, (samples, 2), generator=gen).tolist()
    source = torch.randint(0, len(DATA_SOURCES), (samples,), generator=gen).tolist()
    return TensorDict(
        {
            "prompts": jagged(prompts),
            "responses": jagged(responses),
            "attention_mask": jagged(attention),
            "response_mask": jagged(response_mask),
            "rollout_log_probs": jagged(rollout_lp),
            "old_log_probs": jagged(old_lp),
            "rewards": rewards,
            "uid": NonTensorStack(*[f"{a:016x}{b:016x}" for a, b in uid_bits]),
            "data_source": NonTensorStack(*[DATA_SOURCES[i] for i in source]),
        },
        batch_size=samples,
    )


def as_list(value: Any) -> list[Any]:
    """The per-sample items of a non-tensor field (a NonTensorStack, a tensordict list, or a list)."""
    return list(value.tolist() if hasattr(value, "tolist") else value)


def field_bytes(batch: Any) -> dict[str, int]:
    """Payload bytes per field: tensor elements (the values of a jagged one), or UTF-8 bytes of the strings."""
    import torch

    out = {}
    for name in batch.keys():
        value = batch.get(name)
        if isinstance(value, torch.Tensor):
            flat = value.values() if value.is_nested else value
            out[name] = flat.numel() * flat.element_size()
        else:
            out[name] = sum(len(str(s).encode()) for s in as_list(value))
    return out


def describe_fields(batch: Any) -> dict[str, str]:
    import torch

    out = {}
    for name in batch.keys():
        value = batch.get(name)
        if isinstance(value, torch.Tensor):
            layout = "jagged" if value.is_nested else "dense"
            out[name] = f"{layout} {str(value.dtype).removeprefix('torch.')}"
        else:
            out[name] = "str"
    return out


def compare(want: Any, got: Any) -> tuple[list[str], set[str]]:
    """``(problems, notes)``: every field of ``want`` checked against ``got`` row by row (dtype, shape,
    content). A 1-D field's rows may come back with shape ``(1,)`` (TQ's KV schema): allowed, and noted."""
    import torch

    problems: list[str] = []
    notes: set[str] = set()
    extra = sorted(set(got.keys()) - set(want.keys()))
    if extra:
        problems.append(f"unexpected fields {extra}")
    for name in want.keys():
        if name not in got.keys():
            problems.append(f"{name}: missing")
            continue
        expected, actual = want.get(name), got.get(name)
        if not isinstance(expected, torch.Tensor):
            if isinstance(actual, torch.Tensor) or as_list(actual) != as_list(expected):
                problems.append(f"{name}: strings differ")
            continue
        if not isinstance(actual, torch.Tensor):
            problems.append(f"{name}: came back as {type(actual).__name__}, not a tensor")
            continue
        rows, back = expected.unbind(0), actual.unbind(0)
        if len(rows) != len(back):
            problems.append(f"{name}: {len(back)} rows back for {len(rows)}")
            continue
        for i, (a, b) in enumerate(zip(rows, back, strict=True)):
            if a.dim() == 0 and b.shape == (1,):
                notes.add(SCALAR_NOTE.format(name=name))
                b = b.reshape(())
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                problems.append(
                    f"{name}: row {i} differs (wrote {a.dtype} {tuple(a.shape)}, read {b.dtype} {tuple(b.shape)})"
                )
                break
    return problems, notes


# ------------------------------------------------------------------------------------------------ worker
LOCAL_BUFFER = 1 << 30
"""Both Mooncake backends' ``local_buffer_size``: TQ's default (its config.yaml)."""


def backend_conf(spec: dict[str, Any]) -> dict[str, Any]:
    """The TQ config of ``spec["backend"]``: SimpleStorage as TQ ships it; the Mooncake ones on the shared store."""
    backend = spec["backend"]
    conf: dict[str, Any] = {"backend": {"storage_backend": backend}}
    if backend in MOONCAKE:
        section: dict[str, Any] = {
            "auto_init": False,
            "metadata_server": spec["metadata_server"],
            "master_server_address": spec["master_server_address"],
            "local_hostname": LOOPBACK,
            "protocol": "tcp",
            "device_name": "",
            "global_segment_size": 0,
            "local_buffer_size": LOCAL_BUFFER,
        }
        if backend == OURS:
            section["telemetry"] = {"telemetry_dir": spec["telemetry_dir"]}
        conf["backend"][backend] = section
    return conf


def telemetry_summary(folder: Path) -> dict[str, Any]:
    """Files, bytes, exported spans and metric exports in ``folder`` (OTLP JSON lines)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    spans = metric_lines = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if "resourceSpans" in doc:
                    spans += sum(
                        len(scope.get("spans", [])) for rs in doc["resourceSpans"] for scope in rs.get("scopeSpans", [])
                    )
                if "resourceMetrics" in doc:
                    metric_lines += 1
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "spans": spans,
        "metric_exports": metric_lines,
    }


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this process when the driver dies (Linux), so it still closes TQ and Ray."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit("the driver is gone")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def worker_main(spec: dict[str, Any]) -> None:
    """One backend's TQ session: ``tq.init`` once, then a round per command read from stdin, replies on stdout."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent(spec["parent_pid"])
    # The replies go to the real stdout; anything else printing to fd 1 (Ray, Mooncake's C++ logs) goes to stderr.
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**msg: Any) -> None:
        reply_stream.write(json.dumps(msg) + "\n")
        reply_stream.flush()

    import ray

    ray_started = tq_started = False
    try:
        import transfer_queue as tq
        from omegaconf import OmegaConf

        started = time.perf_counter()
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace=f"tq-batch-{spec['backend']}",
            object_store_memory=512 << 20,
            _temp_dir=spec["ray_dir"],
        )
        ray_started = True
        ray_s = time.perf_counter() - started
        started = time.perf_counter()
        tq.init(OmegaConf.create(backend_conf(spec)))
        tq_started = True
        init_s = time.perf_counter() - started
        client = tq.get_client().storage_manager
        batch = make_batch(spec["samples"], spec["seed"])
        sizes = field_bytes(batch)
        reply(
            event="ready",
            ray_s=ray_s,
            init_s=init_s,
            manager=type(client).__name__,
            storage_client=type(client.storage_client).__name__ if hasattr(client, "storage_client") else "-",
            field_bytes=sizes,
            fields=describe_fields(batch),
        )
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            try:
                reply(event="round", **run_round(tq, batch, cmd["round"], spec["samples"]))
            except Exception:
                reply(event="error", traceback=traceback.format_exc())
    except Exception:
        reply(event="error", traceback=traceback.format_exc())
    finally:
        try:
            if tq_started:
                tq.close()
        finally:
            if ray_started:
                ray.shutdown()
        summary: dict[str, Any] = {}
        if spec["backend"] == OURS:
            with contextlib.suppress(Exception):
                from tq_mooncake import telemetry

                telemetry.configure().shutdown()  # the backend's pipeline (configured once per process): flush it
            summary = telemetry_summary(Path(spec["telemetry_dir"]))
        with contextlib.suppress(OSError):
            reply(event="bye", telemetry=summary)


def run_round(tq: Any, batch: Any, round_: int, samples: int) -> dict[str, Any]:
    """Put, get, clear the batch under fresh keys (timed); check what came back and that nothing is left."""
    keys = [f"r{round_}-{i}" for i in range(samples)]
    times: dict[str, float] = {}
    gc.collect()
    start = time.perf_counter()
    tq.kv_batch_put(keys=keys, partition_id=PARTITION, fields=batch)
    times["put"] = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    got = tq.kv_batch_get(keys=keys, partition_id=PARTITION)
    times["get"] = time.perf_counter() - start
    problems, notes = compare(batch, got)
    del got
    gc.collect()
    start = time.perf_counter()
    tq.kv_clear(keys=keys, partition_id=PARTITION)
    times["clear"] = time.perf_counter() - start
    left = len(tq.kv_list(partition_id=PARTITION).get(PARTITION, {}))
    if left:
        problems.append(f"the partition still lists {left} keys after kv_clear")
    return {"times": times, "problems": problems, "notes": sorted(notes)}


# ------------------------------------------------------------------------------------------------ driver
class Worker:
    """A worker process for one backend (its own session, so a Ctrl-C reaches only the driver, which stops it)."""

    def __init__(self, spec: dict[str, Any], log_path: Path, env: dict[str, str]) -> None:
        self.backend = spec["backend"]
        self.log_path = log_path
        self.log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        self.ready: dict[str, Any] = {}
        self.bye: dict[str, Any] = {}

    def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        """The worker's next reply; RuntimeError (with its log's tail) if it exits or says nothing in time."""
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            what = "said nothing" if not readable else f"exited ({self.proc.poll()})"
            raise RuntimeError(f"the {self.backend} worker {what}; its log ends:\n{self.log_tail()}")
        return json.loads(line)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, grace_s: float = 60.0) -> None:
        """Ask it to close TQ and Ray (``quit``, then the end of its stdin) if it started, then TERM (it closes them
        too), then KILL its whole process group (its Ray processes are in it)."""
        try:
            if self.proc.poll() is None and self.ready:  # else it is still starting: TERM stops it sooner
                with contextlib.suppress(OSError, ValueError):
                    self.send(cmd="quit")
                with contextlib.suppress(OSError, ValueError):
                    assert self.proc.stdin is not None
                    self.proc.stdin.close()
                with contextlib.suppress(Exception):
                    end = time.monotonic() + grace_s
                    while not self.bye and time.monotonic() < end:
                        msg = self.recv(max(0.1, end - time.monotonic()))
                        if msg.get("event") == "bye":
                            self.bye = msg
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=15)
            for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                if self.proc.poll() is None or _group_alive(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.proc.pid, sig)
                    end = time.monotonic() + wait_s
                    while (self.proc.poll() is None or _group_alive(self.proc.pid)) and time.monotonic() < end:
                        time.sleep(0.1)
        finally:
            with contextlib.suppress(OSError):
                self.log.close()
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if stream is not None:
                        stream.close()


def _group_alive(pgid: int) -> bool:
    """Whether any process (a reaped leader's Ray processes, say) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def master_key_count(master: Any) -> int | None:
    """``master_key_count`` from the master's Prometheus text (None if it cannot be read)."""
    with contextlib.suppress(Exception):
        found = re.search(r"^master_key_count(?:\{[^}]*\})? (\S+)$", master.metrics_text(), re.MULTILINE)
        if found:
            return int(float(found.group(1)))
    return None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(other: float | None, ours: float | None) -> str:
    return f"{other / ours:.2f}" if other and ours else "-"


def report(results: dict[str, Any]) -> str:
    total = results["batch"]["bytes"]
    fields = results["batch"]["fields"]
    lines = [
        f"Batch: {results['config']['samples']} samples x {len(fields)} fields "
        f"({results['config']['samples'] * len(fields)} TQ values per put), {total / MB:.2f} MB "
        f"(tensor payloads + UTF-8 strings)",
        "",
        "| field | kind | MB |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {kind} | {results['batch']['field_bytes'][name] / MB:.3f} |" for name, kind in fields.items()
    ]
    cfg = results["config"]
    lines += [
        "",
        f"Store: {cfg['metadata']} metadata, one storage process, pure clients; {cfg['warmup']} warm-up + "
        f"{cfg['repeats']} measured rounds, backends interleaved (order rotates each round); medians.",
        "",
        "| backend | put ms | get ms | clear ms | put MB/s | get MB/s |",
        "|---|---|---|---|---|---|",
    ]
    med: dict[str, dict[str, float | None]] = {}
    for backend in cfg["backends"]:
        if backend in results["failed"]:
            lines.append(f"| {backend} | failed | | | | |")
            continue
        times = results["times"][backend]
        med[backend] = {op: median(times[op]) for op in OPS}
        put, get, clear = (med[backend][op] for op in OPS)
        if put is None or get is None or clear is None:
            lines.append(f"| {backend} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {backend} | {put * 1e3:.1f} | {get * 1e3:.1f} | {clear * 1e3:.1f} | "
            f"{total / put / MB:.0f} | {total / get / MB:.0f} |"
        )
    if OURS in med and any(b in med for b in (STOCK, SIMPLE)):
        lines += [
            "",
            "Ours vs the others (the other's median time / ours; >= 1 means ours is at least as fast):",
            "",
            "| ours (MooncakeStoreObserved) vs | put | get | clear |",
            "|---|---|---|---|",
        ]
        for other, label in ((STOCK, "MooncakeStore (TQ's stock)"), (SIMPLE, "SimpleStorage")):
            if other in med:
                lines.append(f"| {label} | " + " | ".join(ratio(med[other][op], med[OURS][op]) for op in OPS) + " |")
    return "\n".join(lines)


def details(results: dict[str, Any]) -> str:
    """Start-up times, spreads, notes, telemetry and failures (to stderr)."""
    lines = []
    for backend, info in results["workers"].items():
        if info.get("ready"):
            r = info["ready"]
            lines.append(
                f"{backend}: Ray start {r['ray_s']:.1f} s, tq.init {r['init_s']:.1f} s, manager {r['manager']}, "
                f"storage client {r['storage_client']}"
            )
    for backend, times in results["times"].items():
        spread = [f"{op} {min(times[op]) * 1e3:.1f}-{max(times[op]) * 1e3:.1f}" for op in OPS if times[op]]
        if spread:
            lines.append(f"{backend} range over {len(times['put'])} measured rounds (ms): {', '.join(spread)}")
    for backend, notes in results["notes"].items():
        for note in notes:
            lines.append(f"{backend}: {note}")
    for backend, left in results["store_keys_left"].items():
        if any(left):
            lines.append(f"{backend}: the master still held keys after kv_clear: {left}")
    if results["telemetry"]:
        t = results["telemetry"]
        lines.append(
            f"{OURS} telemetry: {t.get('files', 0)} files, {t.get('bytes', 0) / 1e3:.1f} kB, "
            f"{t.get('spans', 0)} spans, {t.get('metric_exports', 0)} metric exports"
        )
    for backend, why in results["failed"].items():
        lines.append(f"{backend} FAILED: {why}")
    return "\n".join(lines)


@contextlib.contextmanager
def store(args: argparse.Namespace, tmp: Path, segment: int) -> Iterator[Any]:
    """A master and one storage process (only when a Mooncake backend runs); stopped on the way out."""
    if not set(args.backends) & set(MOONCAKE):
        yield None
        return
    from tq_mooncake.cluster import MasterProcess, StorageNodeProcess

    with MasterProcess(tmp, client_ttl=30, http_metadata=args.metadata == "http") as master:
        master.start()
        with StorageNodeProcess(master, tmp, segment=segment) as node:
            node.start()
            yield master


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from tq_mooncake.cluster import LOOPBACK as CLUSTER_LOOPBACK

    assert CLUSTER_LOOPBACK == LOOPBACK
    backends: list[str] = list(dict.fromkeys(args.backends))
    results: dict[str, Any] = {
        "config": {
            "samples": args.samples,
            "seed": args.seed,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "metadata": "HTTP" if args.metadata == "http" else "P2PHANDSHAKE",
            "backends": backends,
            "keys": "fresh per round: r<round>-<i>",
            "partition": PARTITION,
        },
        "times": {b: {op: [] for op in OPS} for b in backends},
        "warmup_times": {b: {op: [] for op in OPS} for b in backends},
        "order": [],
        "notes": {},
        "failed": {},
        "workers": {},
        "store_keys_left": {},
        "telemetry": {},
    }
    # Segment: a few copies of the batch (about 33 KB a sample) and slack; one backend's batch lives there at a time.
    segment = max(512 << 20, 8 * 40_000 * args.samples)
    env = dict(
        os.environ,
        MC_TCP_BIND_ADDRESS=LOOPBACK,  # the transfer engines advertise loopback
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's single-machine mode: node address 127.0.0.1
        PYTHONUNBUFFERED="1",
    )
    workers: dict[str, Worker] = {}
    with store(args, tmp, segment) as master:
        try:
            for i, backend in enumerate(backends):
                spec = {
                    "backend": backend,
                    "samples": args.samples,
                    "seed": args.seed,
                    "parent_pid": os.getpid(),
                    "ray_dir": str(tmp / f"r{i}"),
                    "telemetry_dir": str(tmp / "telemetry"),
                }
                if master is not None:
                    spec["metadata_server"] = master.metadata_server
                    spec["master_server_address"] = master.address
                workers[backend] = Worker(spec, tmp / f"worker-{backend}.log", env)
            for backend, worker in workers.items():  # they start side by side
                msg = worker.recv(START_TIMEOUT_S)
                if msg["event"] != "ready":
                    results["failed"][backend] = "start-up: " + msg.get("traceback", str(msg)).strip()[-2000:]
                    continue
                worker.ready = msg
                results["workers"][backend] = {"ready": msg}
                print(f"  ready: {backend} (Ray {msg['ray_s']:.1f} s, tq.init {msg['init_s']:.1f} s)", file=sys.stderr)
            sizes = [w.ready["field_bytes"] for w in workers.values() if w.ready]
            if not sizes:
                raise RuntimeError("no backend started")
            if any(s != sizes[0] for s in sizes):
                raise RuntimeError("the workers built different batches")
            results["batch"] = {
                "bytes": sum(sizes[0].values()),
                "field_bytes": sizes[0],
                "fields": next(w.ready["fields"] for w in workers.values() if w.ready),
            }
            for round_ in range(args.warmup + args.repeats):
                live = [b for b in backends if b in workers and workers[b].ready and b not in results["failed"]]
                if not live:
                    break
                shift = round_ % len(live)
                order = live[shift:] + live[:shift]
                results["order"].append(order)
                for backend in order:
                    worker = workers[backend]
                    worker.send(cmd="round", round=round_)
                    msg = worker.recv(ROUND_TIMEOUT_S)
                    if msg["event"] != "round":
                        results["failed"][backend] = (
                            f"round {round_}: " + msg.get("traceback", str(msg)).strip()[-2000:]
                        )
                        continue
                    if msg["problems"]:
                        results["failed"][backend] = f"round {round_}: read back wrong: {msg['problems']}"
                        continue
                    bucket = "times" if round_ >= args.warmup else "warmup_times"
                    for op in OPS:
                        results[bucket][backend][op].append(msg["times"][op])
                    for note in msg["notes"]:
                        results["notes"].setdefault(backend, [])
                        if note not in results["notes"][backend]:
                            results["notes"][backend].append(note)
                    if backend in MOONCAKE and master is not None:
                        results["store_keys_left"].setdefault(backend, []).append(master_key_count(master))
                done = "warm-up" if round_ < args.warmup else "measured"
                print(f"  round {round_ + 1}/{args.warmup + args.repeats} ({done}): {' '.join(order)}", file=sys.stderr)
        finally:
            for worker in workers.values():  # before the store: they are its clients
                worker.stop()
            if OURS in workers:
                results["telemetry"] = workers[OURS].bye.get("telemetry", {})
            results["warnings"] = {b: warnings_in(w.log_path) for b, w in workers.items()}
    return results


def warnings_in(log: Path, limit: int = 10) -> list[str]:
    """The distinct WARNING / ERROR lines of a worker's log (colours, actor prefixes, timestamps and numbers
    stripped), at most ``limit``."""
    seen: list[str] = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            text = re.sub(r"\x1b\[[0-9;]*m", "", line)
            text = re.sub(r"^\(\w+ pid=\d+\)\s*", "", text)
            text = re.sub(r"\s*\[repeated \d+x across cluster\].*$", "", text)
            if not re.search(r"\b(WARNING|ERROR)\b|^[EW]\d{4} ", text):
                continue
            text = re.sub(r"^[\d\-: ,.]+(- )?", "", text)
            text = re.sub(r"\d+", "N", text).strip()[:160]
            if text not in seen:
                seen.append(text)
    return seen[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples in the batch (default 512)")
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the batch's seed (default 0)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="a subset, in order")
    parser.add_argument("--metadata", choices=("http", "p2p"), default="http", help="Mooncake metadata (default http)")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary folder (logs, telemetry)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.samples < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--samples and --repeats must be >= 1, --warmup >= 0")
    signal.signal(signal.SIGTERM, _on_sigterm)  # a TERM stops everything as a Ctrl-C does
    tmp = Path(tempfile.mkdtemp(prefix="tq-batch-"))
    started = time.monotonic()
    try:
        results = run(args, tmp)
    except KeyboardInterrupt:
        print("interrupted: every process this run started was stopped", file=sys.stderr)
        sys.exit(130)
    finally:
        if args.keep_logs:
            print(f"logs and telemetry kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    print(report(results))
    print()
    print(details(results))
    for backend, lines in results.get("warnings", {}).items():
        for line in lines:
            print(f"{backend} log: {line}", file=sys.stderr)
    print(f"wall time {results['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if results["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
