"""``MooncakeBatchClient``: TransferQueue's storage-client interface over a Mooncake store, with retries.

A call validates its input (nothing is written before the whole batch is known to be valid), cuts the
keys into chunks of ``batch_size``, runs each chunk through the selective-retry loop on a thread pool,
verifies what was read, and returns results in key order, or raises one ``BatchOperationError``
subclass naming every failed key and its code.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from tq_mooncake.telemetry import OTelObserver

from . import codec, plans
from .attempts import ChunkResult, Retrier, StoreCall
from .config import ClientConfig, host_port
from .errors import (
    ERROR_FOR_OUTCOME,
    ClientClosedError,
    ErrorClassifier,
    ErrorCode,
    Operation,
    Outcome,
    StoreSetupError,
    combine_outcomes,
)
from .observer import Observer, OperationScope, OperationSummary
from .retry import Clock, Jitter, RetryBudget

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(what: str, address: str, timeout: float) -> str | None:
    """Why ``address`` does not accept a TCP connection within ``timeout`` s (None if it does or is not
    a plain address). Mooncake's own setup retries an unreachable master for about 90 s."""
    hp = host_port(address)
    if hp is None:
        return None
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        return f"{what} {address!r} is not reachable: {exc}"
    return None


def connect_store(config: ClientConfig) -> Any:
    """A set-up ``MooncakeDistributedStore`` for ``config``; StoreSetupError (naming the addresses) if not.

    The master (and an HTTP metadata server) are probed with a TCP connect first, so an unreachable one
    fails within ``setup_timeout_s`` instead of Mooncake's 90 s of internal retries.
    """
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise ImportError(
            "mooncake.store is not importable: install tq-mooncake[cpu] (mooncake-transfer-engine-non-cuda) "
            "or tq-mooncake[cuda], and Debian's libibverbs1 and librdmacm1"
        ) from exc
    if (
        config.metadata_server != "P2PHANDSHAKE"
        and _is_loopback(config.local_hostname)
        and "MC_TCP_BIND_ADDRESS" not in os.environ
    ):
        # The transfer engine otherwise advertises the first non-loopback NIC, which a loopback-only
        # set-up does not have (../shared/reference/mooncake-store.md §1).
        os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    where = (
        f"master {config.master_server_address!r}, metadata server {config.metadata_server!r}, "
        f"local hostname {config.local_hostname!r}, protocol {config.protocol!r}"
    )
    probes = [("master", config.master_server_address)]
    if config.metadata_server.startswith("http"):
        probes.append(("metadata server", config.metadata_server))
    for what, address in probes:
        problem = unreachable(what, address, config.setup_timeout_s)
        if problem:
            raise StoreSetupError(f"Mooncake store setup failed: {problem} ({where})")
    store = MooncakeDistributedStore()
    try:
        rc = store.setup(
            config.local_hostname,
            config.metadata_server,
            config.global_segment_size,
            config.local_buffer_size,
            config.protocol,
            config.device_name,
            config.master_server_address,
        )
    except Exception as exc:
        raise StoreSetupError(f"Mooncake store setup raised {exc!r} ({where})") from exc
    if rc != 0:
        with contextlib.suppress(Exception):
            store.close()
        raise StoreSetupError(f"Mooncake store setup failed with {ErrorCode.of(rc).describe()} ({where})")
    return store


class _Registrations:
    """Memory registered with the transfer engine for one chunk. Over TCP registration is bookkeeping
    only, so it is skipped; other protocols (RDMA) register each region and unregister it at the end."""

    def __init__(self, store: Any, enabled: bool) -> None:
        self._store = store
        self._enabled = enabled
        self._ptrs: list[int] = []

    def add(self, ptr: int, size: int) -> None:
        if not self._enabled or size == 0:
            return
        rc = self._store.register_buffer(ptr, size)
        if rc != 0:
            raise RuntimeError(f"register_buffer failed with {ErrorCode.of(rc).describe()}")
        self._ptrs.append(ptr)

    def release(self) -> None:
        for ptr in self._ptrs:
            rc = self._store.unregister_buffer(ptr)
            if rc != 0:
                logger.warning("unregister_buffer failed with %s", ErrorCode.of(rc).describe())
        self._ptrs.clear()


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
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_s, clock=clock)
        self._observer = observer or OTelObserver(tracer_provider, meter_provider, budget_tokens=self.budget.available)
        self._clock = clock
        raw_store = store if store is not None else connect_store(self.config)
        self._store = wrap_store(raw_store) if wrap_store is not None else raw_store
        self._replicate = self._replicate_config()
        self._closing = threading.Event()
        self._retrier = Retrier(retry.policy(), self.budget, ErrorClassifier(), jitter, self._closing, sleep)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.max_workers, thread_name_prefix="tq-mooncake"
        )
        self._register = self.config.protocol != "tcp"
        self._state = threading.Condition()
        self._in_flight = 0
        self._closed = False

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

    def _replicate_config(self) -> Any:
        from mooncake.store import ReplicateConfig

        rc = ReplicateConfig()
        rc.replica_num = self.config.replica_num
        rc.with_hard_pin = self.config.hard_pin
        return rc

    # ------------------------------------------------------------------------------------ interface
    def put(self, keys: list[str], values: list[Any]) -> list[dict[str, Any]]:
        """Write (insert or overwrite) every value; returns per-key metadata for ``get``'s ``custom_backend_meta``.

        Tensors are written zero-copy from their memory; other values as checksummed frames.
        Raises ValueError/TypeError for bad input (before anything is written) and a
        ``BatchOperationError`` subclass if some keys could not be written.
        """
        with self._call("put"):
            keys = plans.validate_keys(keys)
            values = plans.check_parallel(keys, "values", values)
            assert values is not None
            cfg = self.config
            items = [
                plans.prepare_put(k, v, cfg.allow_pickle, cfg.max_value_bytes)
                for k, v in zip(keys, values, strict=True)
            ]

            def chunk_call(lo: int, hi: int, regs: _Registrations) -> StoreCall:
                for item in items[lo:hi]:
                    regs.add(item.ptr, item.size)

                def call(pending: list[int]) -> tuple[Sequence[int], int]:
                    sel = [items[lo + p] for p in pending]
                    codes = self._store.batch_upsert_from(
                        [keys[lo + p] for p in pending], [i.ptr for i in sel], [i.size for i in sel], self._replicate
                    )
                    return codes, sum(i.size for i, c in zip(sel, codes, strict=False) if c == 0)

                return call

            self._run(Operation.PUT, keys, chunk_call)
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
                )
                for i, k in enumerate(keys)
            ]
            results: list[Any] = [None] * len(keys)

            def chunk_call(lo: int, hi: int, regs: _Registrations) -> StoreCall:
                dest: dict[int, tuple[int, int, Any]] = {}  # position -> (ptr, size, holder)
                for pos in range(lo, hi):
                    size = read_plans[pos].size
                    if size is not None:
                        dest[pos] = self._allocate(read_plans[pos], size, regs)

                def call(pending: list[int]) -> tuple[Sequence[int], int]:
                    return self._read(keys, read_plans, results, dest, regs, [lo + p for p in pending])

                return call

            self._run(Operation.GET, keys, chunk_call)
            return results

    def clear(self, keys: list[str], custom_backend_meta: list[Any] | None = None) -> None:
        """Remove every key (forced: read leases do not block it); keys that do not exist are fine."""
        with self._call("clear"):
            keys = plans.validate_keys(keys)
            plans.check_parallel(keys, "custom_backend_meta", custom_backend_meta)

            def chunk_call(lo: int, hi: int, regs: _Registrations) -> StoreCall:
                def call(pending: list[int]) -> tuple[Sequence[int], int]:
                    return self._store.batch_remove([keys[lo + p] for p in pending], True), 0

                return call

            self._run(Operation.CLEAR, keys, chunk_call)

    # ------------------------------------------------------------------------------------ internals
    def _allocate(self, plan: plans.ReadPlan, size: int, regs: _Registrations) -> tuple[int, int, Any]:
        ptr, holder = plans.allocate(plan, size)
        regs.add(ptr, size)
        return ptr, size, holder

    def _read(
        self,
        keys: list[str],
        read_plans: list[plans.ReadPlan],
        results: list[Any],
        dest: dict[int, tuple[int, int, Any]],
        regs: _Registrations,
        positions: list[int],
    ) -> tuple[list[int], int]:
        """One read attempt on ``positions``: per-position codes and the bytes read."""
        codes = [0] * len(positions)
        reading: list[int] = []  # indexes into positions
        for j, pos in enumerate(positions):
            if read_plans[pos].size is None:  # a frame of unknown size: ask the store, every attempt
                size = self._store.get_size(keys[pos])
                if size < 0:
                    codes[j] = size
                    continue
                if size == 0 or size > self.config.max_value_bytes:
                    codes[j] = ErrorCode.SIZE_MISMATCH
                    continue
                if pos not in dest or dest[pos][1] != size:
                    dest[pos] = self._allocate(read_plans[pos], size, regs)
            reading.append(j)
        if not reading:
            return codes, 0
        got = self._store.batch_get_into(
            [keys[positions[j]] for j in reading],
            [dest[positions[j]][0] for j in reading],
            [dest[positions[j]][1] for j in reading],
        )
        if len(got) != len(reading):
            return [ErrorCode.INTERNAL_ERROR] * len(positions), 0
        nbytes = 0
        for j, n in zip(reading, got, strict=True):
            pos = positions[j]
            _, size, holder = dest[pos]
            if n < 0:
                codes[j] = n
            elif n != size:
                codes[j] = ErrorCode.SIZE_MISMATCH
            else:
                try:
                    results[pos] = plans.finish(read_plans[pos], holder, self.config.allow_pickle)
                    nbytes += n
                except codec.CodecError as exc:
                    codes[j] = exc.code
        return codes, nbytes

    def _run(
        self,
        operation: Operation,
        keys: list[str],
        chunk_call: Callable[[int, int, _Registrations], StoreCall],
    ) -> None:
        """Run ``operation`` on ``keys`` chunk by chunk; raise one error for every key that failed."""
        size = self.config.batch_size
        bounds = [(lo, min(lo + size, len(keys))) for lo in range(0, len(keys), size)]
        scope = self._observer.operation(operation, len(keys))
        deadline = self._retrier.policy.deadline(self._clock)

        def run_one(index: int) -> ChunkResult:
            lo, hi = bounds[index]
            regs = _Registrations(self._store, self._register)
            try:
                call = chunk_call(lo, hi, regs)
                return self._retrier.run_chunk(operation, call, hi - lo, index, deadline, scope)
            finally:
                regs.release()

        if len(bounds) <= 1:
            outcomes = [self._settle(lambda: run_one(0))] if bounds else []
        else:
            futures = [self._executor.submit(run_one, i) for i in range(len(bounds))]
            concurrent.futures.wait(futures)
            outcomes = [self._settle(f.result) for f in futures]
        self._finish(operation, keys, bounds, outcomes, scope)

    @staticmethod
    def _settle(result: Callable[[], ChunkResult]) -> ChunkResult | BaseException:
        try:
            return result()
        except BaseException as exc:  # re-raised by _finish once every chunk is done
            return exc

    def _finish(
        self,
        operation: Operation,
        keys: list[str],
        bounds: list[tuple[int, int]],
        outcomes: list[ChunkResult | BaseException],
        scope: OperationScope,
    ) -> None:
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        done = [o for o in outcomes if isinstance(o, ChunkResult)]
        failed: dict[str, ErrorCode] = {}
        for (lo, hi), res in zip(bounds, outcomes, strict=True):
            if isinstance(res, ChunkResult):
                for pos in sorted(res.failed):
                    failed[keys[lo + pos]] = res.failed[pos]
            else:  # a chunk that raised counts all its keys as failed
                for pos in range(lo, hi):
                    failed[keys[pos]] = ErrorCode.INTERNAL_ERROR
        # A chunk that raised (the client closed under it, or an unexpected error) is not retryable.
        outcome = combine_outcomes([r.outcome for r in done] + [Outcome.NON_RETRYABLE] * len(errors))
        attempts = sum(r.attempts for r in done)
        retried_ok = sum(r.retried_ok for r in done)
        summary = OperationSummary(
            outcome=outcome,
            attempts=attempts,
            keys_ok=len(keys) - len(failed) - retried_ok,
            keys_retried_ok=retried_ok,
            keys_failed=len(failed),
            retry_delay_s=sum(r.backoff_s for r in done),
            nbytes=sum(r.nbytes for r in done),
        )
        scope.end(summary)
        if errors:
            raise errors[0]
        if failed:
            raise ERROR_FOR_OUTCOME[outcome](
                operation, failed, len(keys) - len(failed), max((r.attempts for r in done), default=0)
            )
