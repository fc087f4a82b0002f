"""``MooncakeBatchClient``: TransferQueue's storage-client interface over a Mooncake store, with retries.

A call validates its input (nothing is written before the whole batch is known to be valid), cuts the
keys into chunks of ``batch_size``, runs each chunk's store call (``chunks.py``) through the selective-retry
loop (``attempts.py``) on a thread pool, and merges how the chunks ended (``merge.py``): it returns results
in key order, or raises one ``BatchOperationError`` subclass naming every failed key and its code.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from tq_mooncake.telemetry import OTelObserver
from tq_mooncake.telemetry.conventions import Operation

from . import integrity, plans
from .attempts import ChunkAborted, ChunkCall, ChunkResult, Retrier
from .chunks import ClearChunk, GetChunk, PutChunk, held_now
from .codes import ErrorClassifier
from .config import ClientConfig
from .errors import ClientClosedError
from .key_locks import KeyLocks
from .merge import chunk_bounds, merge
from .node_health import NodeHealth
from .observer import Observer
from .replica_reader import ReplicaReader, ReplicaReadingStore
from .replica_routing import ReplicaRouter
from .retry import Clock, Jitter
from .store import Registrations, connect_store, replicate_config
from .transfer_memory import TransferMemory
from .written_keys import WrittenKeys

logger = logging.getLogger(__name__)

CLEAR_BATCH_KEYS = 8192
"""Keys per ``batch_remove`` (``clear``'s chunk) at least: TQ's 4,608-key clear took 18 ms in 12 chunks, 10 ms in one
(the raw call alone: 8 ms)."""

ChunkFactory = Callable[[int, int, Registrations], ChunkCall]
"""Builds the store call of the chunk of keys ``[lo, hi)``, registering its memory with the ``Registrations``."""


class MooncakeBatchClient:
    """A batch key-value client over ``mooncake.store.MooncakeDistributedStore``; thread-safe.

    Args:
        config: TQ's Mooncake section (see ``ClientConfig``), or a ``ClientConfig``.
        observer: receives every call and attempt; defaults to an ``OTelObserver`` on ``tracer_provider`` /
            ``meter_provider`` (OpenTelemetry's global providers when not given: no-op until an SDK is set,
            e.g. by ``tq_mooncake.telemetry.configure()``). Pass ``NOOP_OBSERVER`` to turn telemetry off.
        tracer_provider, meter_provider: OpenTelemetry providers for the default observer (not with ``observer``).
        store: an already set-up store to use instead of connecting (the client then owns and closes it).
        wrap_store: applied to the store before use, e.g. ``lambda s: FaultInjectingStore(s, rules)``.
        clock, jitter, sleep: injectable time source, randomness and backoff sleep for the retry loop
            (the default sleep wakes when the client closes).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | ClientConfig | None = None,
        *,
        observer: Observer | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        store: Any = None,
        wrap_store: Callable[[Any], Any] | None = None,
        clock: Clock = time.monotonic,
        jitter: Jitter = random.random,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if observer is not None and (tracer_provider is not None or meter_provider is not None):
            raise TypeError("pass either observer or tracer_provider/meter_provider, not both")
        self.config = config if isinstance(config, ClientConfig) else ClientConfig.from_dict(config)
        retry = self.config.retry
        self.budget = retry.budget(clock)
        self.health = NodeHealth(self.config.node_health, clock, on_eject=self._ejected)
        self._observer = observer or OTelObserver(
            tracer_provider,
            meter_provider,
            budget_tokens=self.budget.available,
            ejected_nodes=self.health.ejected_count,
        )
        self._clock = clock
        raw_store = store if store is not None else connect_store(self.config)
        if self.config.node_health.enabled and _is_mooncake_store(raw_store):
            raw_store = ReplicaReadingStore(raw_store, ReplicaReader(self.config))
        self._store = wrap_store(raw_store) if wrap_store is not None else raw_store
        local = self._store.get_hostname() if self.config.global_segment_size > 0 else None
        self._router = ReplicaRouter(
            self._store,
            self.health,
            local if isinstance(local, str) else None,
            clock,
            endpoints_are_segments=self.config.metadata_server != "P2PHANDSHAKE",
        )
        self._replicate = replicate_config(self.config)
        self._closing = threading.Event()
        self._retrier = Retrier(retry.policy(), self.budget, ErrorClassifier(), jitter, self._closing, sleep)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.max_workers, thread_name_prefix="tq-mooncake"
        )
        self._register = self.config.registers_memory
        self._memory = TransferMemory(self._store, self.config.local_buffer_size, self._register)
        self._state = threading.Condition()
        self._warned_at = -math.inf
        self._writing = KeyLocks()
        self._written = WrittenKeys()
        self._in_flight = 0
        self._closed = False

    def _ejected(self, endpoint: str) -> None:
        logger.warning(
            "storage endpoint %s does not answer: routing around it (replicas elsewhere, writes steered)", endpoint
        )
        report = getattr(self._observer, "node_ejected", None)
        if report is not None:
            report(endpoint)

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def store(self) -> Any:
        """The (possibly wrapped) store the client calls."""
        return self._store

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the client: calls in flight end with ``ClientClosedError`` at their next attempt (a store
        call already running is let finish), then the store is closed. Idempotent."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            while self._in_flight:
                self._state.wait()
        self._executor.shutdown(wait=True)
        self._memory.close()
        self._store.close()

    def __enter__(self) -> MooncakeBatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _call(self, name: str) -> Iterator[None]:
        with self._state:
            if self._closed:
                raise ClientClosedError(f"{name}() called after close()")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._state:
                self._in_flight -= 1
                self._state.notify_all()

    # ------------------------------------------------------------------------------------ interface
    def put(self, keys: list[str], values: list[Any]) -> list[dict[str, Any]]:
        """Write (insert or overwrite) every value; returns per-key metadata for ``get``'s ``custom_backend_meta``.

        Tensors are written zero-copy from their memory; other values as checksummed frames.
        Raises ValueError/TypeError for bad input (before anything is written) and a
        ``BatchOperationError`` subclass if some keys could not be written.
        """
        with self._call("put"):
            keys = plans.validate_keys(keys)
            values = plans.check_parallel(keys, "values", values, required=True)
            cfg = self.config
            items = [
                plans.prepare_put(k, v, cfg.allow_pickle, cfg.max_value_bytes)
                for k, v in zip(keys, values, strict=True)
            ]
            write_id = integrity.new_write_id()
            for item in items:
                item.meta["wid"] = write_id
            checksum, asked = cfg.tensor_checksum, cfg.replica_num
            chunks: dict[int, PutChunk] = {}  # first key's position -> its chunk
            held: list[Any] = []  # what each key holds now

            def query() -> None:  # one query for every chunk, inside the operation (its time is the call's)
                held.extend(held_now(self._store, keys, self._written, self._router))

            def write(lo: int, hi: int, regs: Registrations) -> PutChunk:
                chunk = PutChunk(
                    self._store,
                    keys[lo:hi],
                    items[lo:hi],
                    held[lo:hi],
                    self._replicate,
                    regs,
                    write_id,
                    checksum,
                    asked,
                    self._router,
                    self._written,
                    self._memory,
                )
                chunks[lo] = chunk
                return chunk

            def under_replicated() -> int:
                """Record each written key's replica count in its metadata; the keys stored with fewer than asked."""
                short = 0
                for lo, chunk in chunks.items():
                    for pos, count in chunk.replicas.items():
                        items[lo + pos].meta["replicas"] = count
                        short += count is not None and count < asked
                if short:
                    self._warn_under_replicated(short, len(keys), asked)
                return short

            # The call's keys are held from the query of what they hold until every chunk has written: another put
            # of one of them through this client waits (see KeyLocks), so the answer still holds when it is used.
            with self._writing.holding(keys), _releasing(chunks):
                self._run(Operation.PUT, keys, write, under_replicated, query)
            return [item.meta for item in items]

    def get(
        self,
        keys: list[str],
        shapes: list[Any] | None = None,
        dtypes: list[Any] | None = None,
        custom_backend_meta: list[Any] | None = None,
    ) -> list[Any]:
        """Read every key, in key order: a CPU tensor where a dtype is known (from ``dtypes`` or the
        metadata ``put`` returned), the decoded value otherwise.

        Sizes are checked against ``shapes``/``dtypes``/metadata and frames against their checksum; a
        mismatch fails the key (never returns data). Raises like ``put``.
        """
        with self._call("get"):
            keys = plans.validate_keys(keys)
            shapes = plans.check_parallel(keys, "shapes", shapes)
            dtypes = plans.check_parallel(keys, "dtypes", dtypes)
            metas = plans.check_parallel(keys, "custom_backend_meta", custom_backend_meta)
            read_plans = [
                plans.plan_get(
                    k,
                    shapes[i] if shapes else None,
                    dtypes[i] if dtypes else None,
                    metas[i] if metas else None,
                    max_value_bytes=self.config.max_value_bytes,
                )
                for i, k in enumerate(keys)
            ]
            write_ids = [integrity.expected_write_id(k, m) for k, m in zip(keys, metas, strict=True)] if metas else None
            cfg = self.config
            chunks: dict[int, GetChunk] = {}  # first key's position -> its chunk

            def read(lo: int, hi: int, regs: Registrations) -> GetChunk:
                chunk = GetChunk(
                    self._store,
                    keys[lo:hi],
                    read_plans[lo:hi],
                    regs,
                    cfg.allow_pickle,
                    cfg.max_value_bytes,
                    write_ids[lo:hi] if write_ids else None,
                    self._router,
                    self._memory,
                )
                chunks[lo] = chunk
                return chunk

            with _releasing(chunks):
                self._run(Operation.GET, keys, read)
            return [value for lo in sorted(chunks) for value in chunks[lo].values]

    def clear(self, keys: list[str], custom_backend_meta: list[Any] | None = None) -> None:
        """Remove every key; keys that do not exist are fine. With ``clear_force`` (the default) a key read in the last
        lease TTL (the master's ``--default_kv_lease_ttl``, 10 s) is removed too; without, it fails with the
        retryable ``OBJECT_HAS_LEASE`` until its lease ends."""
        with self._call("clear"):
            keys = plans.validate_keys(keys)
            plans.check_parallel(keys, "custom_backend_meta", custom_backend_meta)
            force = self.config.clear_force
            self._written.forget(keys)
            # A removal moves no data (one metadata RPC): batch_size bounds transfers, not it.
            chunk_keys = max(self.config.batch_size, CLEAR_BATCH_KEYS)
            self._run(
                Operation.CLEAR,
                keys,
                lambda lo, hi, regs: ClearChunk(self._store, keys[lo:hi], force),
                chunk_keys=chunk_keys,
            )

    # ------------------------------------------------------------------------------------ scheduling
    def _warn_under_replicated(self, short: int, total: int, asked: int) -> None:
        """Log that ``short`` of ``total`` keys got fewer than ``asked`` replicas: the first time, then at most once
        a minute (the metric ``mooncake.client.keys.under_replicated`` counts every one)."""
        now = time.monotonic()
        if now - self._warned_at < 60.0:
            return
        self._warned_at = now
        logger.warning(
            "put stored %d of %d key(s) with fewer than replica_num=%d replicas: the store has fewer segments "
            "with room than replicas asked for (the metadata's 'replicas' says how many each key got)",
            short,
            total,
            asked,
        )

    def _run(
        self,
        operation: Operation,
        keys: list[str],
        make_chunk: ChunkFactory,
        under_replicated: Callable[[], int] | None = None,
        prepare: Callable[[], None] | None = None,
        chunk_keys: int | None = None,
    ) -> None:
        """Run ``operation`` on ``keys`` chunk by chunk (on the thread pool when there are several); report the
        call to the observer and raise one error for every key that failed. ``under_replicated`` (puts) counts
        the keys written with fewer replicas than asked, once every chunk has ended; ``prepare`` runs once the call is
        observed, before any chunk (a put's query of what its keys hold); ``chunk_keys`` is the chunk size (default
        ``batch_size``)."""
        bounds = chunk_bounds(len(keys), chunk_keys or self.config.batch_size)
        scope = self._observer.operation(operation, len(keys))
        deadline = self._retrier.policy.deadline(self._clock)
        if prepare is not None:
            prepare()

        def run_one(index: int) -> ChunkResult | ChunkAborted:
            """How chunk ``index`` ended; an exception it raised is kept (raised by the call once every chunk is
            done) with how far its retry loop got."""
            lo, hi = bounds[index]
            regs = Registrations(self._store, self._register)
            partial: ChunkResult | None = None
            try:
                call = make_chunk(lo, hi, regs)
                partial = ChunkResult()
                return self._retrier.run_chunk(operation, call, hi - lo, index, deadline, scope, partial)
            except BaseException as exc:
                return ChunkAborted(exc, partial)
            finally:
                regs.release()

        if len(bounds) <= 1:
            ended = [run_one(0)] if bounds else []
        else:
            futures = [self._executor.submit(run_one, i) for i in range(len(bounds))]
            ended = [f.result() for f in futures]
        result = merge(operation, keys, bounds, ended)
        summary = result.summary
        if under_replicated is not None:
            summary = dataclasses.replace(summary, keys_under_replicated=under_replicated())
        scope.end(summary)
        if result.error is not None:
            raise result.error


@contextlib.contextmanager
def _releasing(chunks: Mapping[int, GetChunk | PutChunk]) -> Iterator[None]:
    """On an exception, release every chunk's memory before it propagates (its traceback holds the chunks)."""
    try:
        yield
    except BaseException:
        for chunk in chunks.values():
            chunk.release()
        raise


def _is_mooncake_store(store: Any) -> bool:
    """Whether ``store`` is Mooncake's own store (direct replica reads need its transfer engine's peers)."""
    return type(store).__module__.split(".", 1)[0] == "mooncake"
