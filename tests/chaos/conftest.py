"""Chaos helpers: a steady put/get load from several threads, a recorder that checks every value read
against a content hash of what was written, and the table of figures printed at the end of the run.

Every scenario (one test) records a ``ScenarioRow``; ``pytest_terminal_summary`` prints them all. The
checks that make a row green are asserted in the tests themselves: no value returned differs from what
was written, and every key that failed is named by the exception that reported it.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tq_mooncake.client import BatchOperationError, ClientClosedError, ErrorCode, MooncakeBatchClient
from tq_mooncake.cluster import MasterProcess, wait_until
from tq_mooncake.testing import RecordingObserver

# A retry window far beyond the chaos masters' client_ttl (2 s) + 1 s: a dead replica is dropped within it.
PATIENT_RETRY = {"max_attempts": 60, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "deadline_s": 45}
CLIENT_TTL = 2

_ROWS: list[ScenarioRow] = []


# ------------------------------------------------------------------------------------------ figures
@dataclass
class ScenarioRow:
    """What one scenario did. ``wrong`` and ``unnamed`` must stay 0."""

    scenario: str
    operations: int = 0  # client calls (put/get), load and final read-back together
    keys: int = 0  # keys in those calls
    raised: Counter[str] = field(default_factory=Counter)  # calls that raised, by cause
    codes: Counter[ErrorCode] = field(default_factory=Counter)  # the codes the failed keys ended with
    checked: int = 0  # values returned and compared with the hash of what was written
    wrong: int = 0  # values returned that differ from what was written, or are missing
    unnamed: int = 0  # failed keys an exception did not name correctly
    lost: int = 0  # written keys that could not be read back at the end (each named by an exception)
    slowest_s: float = 0.0  # the longest single call (load calls), for the record
    note: str = ""
    problems: list[str] = field(default_factory=list)  # the first few details of wrong/unnamed
    observer: RecordingObserver = field(default_factory=lambda: RecordingObserver(keep=False), repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def recovered(self) -> int:
        """Keys that succeeded after at least one failed attempt (retries), over the scenario's clients."""
        return self.observer.keys_retried_ok

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], ScenarioRow]:
    """``figures(name)``: a new row of the chaos table."""

    def make(name: str) -> ScenarioRow:
        row = ScenarioRow(name)
        _ROWS.append(row)
        return row

    return make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    header = (
        "scenario",
        "ops",
        "keys",
        "recovered by retry",
        "calls raised (by cause)",
        "values checked",
        "wrong/missing",
        "unnamed",
        "lost (named)",
        "slowest call",
    )
    rows = [
        (
            f.scenario,
            str(f.operations),
            str(f.keys),
            str(f.recovered),
            ", ".join(f"{cause} {n}" for cause, n in sorted(f.raised.items())) or "-",
            str(f.checked),
            str(f.wrong),
            str(f.unnamed),
            str(f.lost),
            f"{f.slowest_s:.2f} s",
        )
        for f in _ROWS
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    tr = terminalreporter
    tr.write_sep("=", "chaos: every value returned checked against what was written")
    tr.write_line(line(header))
    tr.write_line("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        tr.write_line(line(r))
    for f in _ROWS:
        if f.note:
            tr.write_line(f"{f.scenario}: {f.note}")
        for p in f.problems:
            tr.write_line(f"{f.scenario}: PROBLEM {p}")


# ------------------------------------------------------------------------------------------ values
_DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.uint8)


def make_value(key: str, rng: random.Random, tensor_bytes: int = 2048) -> Any:
    """A value that embeds its key (a value of another key never hashes equal)."""
    kind = rng.random()
    if kind < 0.6:
        dtype = rng.choice(_DTYPES)
        n = max(1, rng.randint(tensor_bytes // 2, tensor_bytes) // torch.empty((), dtype=dtype).element_size())
        gen = torch.Generator().manual_seed(rng.getrandbits(48))
        t = torch.randint(0, 120, (n,), generator=gen, dtype=torch.int64).to(dtype)
        t[0] = len(key) % 100  # a per-key marker
        return t.reshape(2, n // 2) if n % 2 == 0 and n > 2 else t
    if kind < 0.85:
        return {"key": key, "n": rng.randint(0, 1 << 40), "blob": rng.randbytes(rng.randint(0, 512))}
    return f"{key}:{rng.random()}"


def digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, torch.Tensor):
        h.update(f"tensor|{value.dtype}|{list(value.shape)}|".encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        # Values are compared with the key's marker too, so a neighbour's tensor of the same shape fails.
    else:
        h.update(f"{type(value).__name__}|{value!r}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass
class Written:
    digest: str
    meta: dict[str, Any] | None  # what put returned (None: the put raised, so it is read without it)
    dtype: torch.dtype | None
    shape: list[int] | None


class Ledger:
    """Every key whose put succeeded, with the hash of its value."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.written: dict[str, Written] = {}

    def add(self, key: str, value: Any, meta: dict[str, Any] | None) -> None:
        is_tensor = isinstance(value, torch.Tensor)
        entry = Written(
            digest(value),
            meta,
            value.dtype if is_tensor else None,
            list(value.shape) if is_tensor else None,
        )
        with self._lock:
            self.written[key] = entry

    def sample(self, n: int, rng: random.Random) -> list[str]:
        with self._lock:
            keys = list(self.written)
        return rng.sample(keys, min(n, len(keys)))

    def keys(self) -> list[str]:
        with self._lock:
            return list(self.written)

    def forget(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                self.written.pop(k, None)


# ------------------------------------------------------------------------------------------ checked calls
def _check_error(fig: ScenarioRow, err: BatchOperationError, keys: list[str]) -> None:
    """The exception names every failed key: all of them in ``failed``, the first ten in its message."""
    requested = set(keys)
    ok = set(err.failed) <= requested and err.failed and err.succeeded + len(err.failed) == len(keys)
    message = str(err)
    ok = ok and all(repr(k) in message for k in list(err.failed)[:10])
    if not ok:
        with fig.lock:
            fig.unnamed += 1
            fig.problem(f"{type(err).__name__} does not name its keys: {message[:300]}")


def _took(fig: ScenarioRow, start: float) -> None:
    took = time.monotonic() - start
    with fig.lock:
        fig.slowest_s = max(fig.slowest_s, took)


def _cause(err: BaseException) -> str:
    return err.outcome.value if isinstance(err, BatchOperationError) else type(err).__name__


def checked_put(
    fig: ScenarioRow, client: MooncakeBatchClient, ledger: Ledger, keys: list[str], values: list[Any]
) -> bool:
    """Put; record the keys that were written. True if the call succeeded."""
    with fig.lock:
        fig.operations += 1
        fig.keys += len(keys)
    start = time.monotonic()
    try:
        metas = client.put(keys, values)
    except BatchOperationError as err:
        _took(fig, start)
        _check_error(fig, err, keys)
        with fig.lock:
            fig.raised[_cause(err)] += 1
            fig.codes.update(err.failed.values())
        for k, v in zip(keys, values, strict=True):
            if k not in err.failed:
                ledger.add(k, v, None)
        return False
    _took(fig, start)
    for k, v, m in zip(keys, values, metas, strict=True):
        ledger.add(k, v, m)
    return True


def checked_get(
    fig: ScenarioRow, client: MooncakeBatchClient, ledger: Ledger, keys: list[str], use_meta: bool = True
) -> dict[str, Any] | BatchOperationError:
    """Get ``keys`` (written ones); compare every value returned with its hash. Returns the failure, if any."""
    if not keys:
        return {}
    entries = [ledger.written[k] for k in keys]
    metas = [e.meta if use_meta else None for e in entries]
    shapes = [e.shape for e in entries]
    dtypes = [e.dtype for e in entries]
    with fig.lock:
        fig.operations += 1
        fig.keys += len(keys)
    start = time.monotonic()
    try:
        got = client.get(keys, shapes=shapes, dtypes=dtypes, custom_backend_meta=metas)
    except BatchOperationError as err:
        _took(fig, start)
        _check_error(fig, err, keys)
        with fig.lock:
            fig.raised[_cause(err)] += 1
            fig.codes.update(err.failed.values())
        return err
    _took(fig, start)
    bad = [k for k, e, v in zip(keys, entries, got, strict=False) if v is None or digest(v) != e.digest]
    with fig.lock:
        fig.checked += len(got)
        fig.wrong += len(bad) + abs(len(keys) - len(got))
        for k in bad[:3]:
            fig.problem(f"wrong value for {k!r}")
    return dict(zip(keys, got, strict=False))


def read_back(fig: ScenarioRow, client: MooncakeBatchClient, ledger: Ledger, batch: int = 200) -> dict[str, Any]:
    """Read every written key once more (metadata where put returned it); the lost keys, with their codes."""
    lost: dict[str, Any] = {}
    keys = ledger.keys()
    for lo in range(0, len(keys), batch):
        result = checked_get(fig, client, ledger, keys[lo : lo + batch])
        if isinstance(result, BatchOperationError):
            lost.update(result.failed)
    fig.lost = len(lost)
    return lost


# ------------------------------------------------------------------------------------------ the load
class Load:
    """``threads`` threads, each putting batches of fresh keys and reading back random written keys."""

    def __init__(
        self,
        client: MooncakeBatchClient,
        fig: ScenarioRow,
        ledger: Ledger,
        threads: int = 4,
        batch: int = 16,
        tensor_bytes: int = 2048,
        seed: int = 0,
        reads_per_put: int = 1,
    ) -> None:
        self.client = client
        self.fig = fig
        self.ledger = ledger
        self.batch = batch
        self.tensor_bytes = tensor_bytes
        self.reads_per_put = reads_per_put
        self.prefix = uuid.uuid4().hex[:8]
        self.stop = threading.Event()
        self.unexpected: list[BaseException] = []
        self.puts_made = 0  # put calls made
        self.puts_ok = 0  # put calls that succeeded
        self._threads = [
            threading.Thread(target=self._run, args=(t, random.Random(seed * 1000 + t)), daemon=True)
            for t in range(threads)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def _run(self, tid: int, rng: random.Random) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                keys = [f"{self.prefix}-t{tid}-{n}-{i}@chaos" for i in range(self.batch)]
                n += 1
                values = [make_value(k, rng, self.tensor_bytes) for k in keys]
                ok = checked_put(self.fig, self.client, self.ledger, keys, values)
                with self.fig.lock:
                    self.puts_made += 1
                    self.puts_ok += ok
                for _ in range(self.reads_per_put):
                    if self.stop.is_set():
                        break
                    checked_get(
                        self.fig, self.client, self.ledger, self.ledger.sample(self.batch, rng), rng.random() < 0.8
                    )
        except ClientClosedError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.unexpected.append(exc)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ``predicate`` while the load runs; TimeoutError naming ``what`` after ``timeout`` s, and the load's
        first unexpected exception as soon as there is one."""

        def ready() -> bool:
            if self.unexpected:
                raise self.unexpected[0]
            return predicate()

        wait_until(ready, timeout, what)

    def wait_for_puts(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` puts in all have succeeded."""
        self.wait_for(lambda: self.puts_ok >= n, f"{n} successful puts (made {self.puts_ok})", timeout)

    def wait_for_more_puts(self, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` more puts have succeeded from now on: a fixed amount of work, not a fixed time."""
        self.wait_for_puts(self.puts_ok + n, timeout)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def chaos() -> SimpleNamespace:
    """The helpers, for test modules (which cannot import a conftest under ``--import-mode=importlib``)."""
    return SimpleNamespace(
        CLIENT_TTL=CLIENT_TTL,
        PATIENT_RETRY=PATIENT_RETRY,
        Ledger=Ledger,
        Load=Load,
        checked_get=checked_get,
        checked_put=checked_put,
        digest=digest,
        make_value=make_value,
        read_back=read_back,
    )


@pytest.fixture
def chaos_long(request: pytest.FixtureRequest) -> bool:
    """True under ``--chaos-long`` (``make chaos``): scenarios run longer and with more load."""
    return bool(request.config.getoption("--chaos-long"))


@pytest.fixture
def chaos_client(closed_at_teardown: list[MooncakeBatchClient]) -> Callable[..., MooncakeBatchClient]:
    """``chaos_client(master, fig, wrap_store=None, **config)``: a client whose retries are counted into
    ``fig``; closed at teardown."""

    def make(master: MasterProcess, fig: ScenarioRow, *, wrap_store: Any = None, **config: Any) -> MooncakeBatchClient:
        client = MooncakeBatchClient(master.client_config(**config), observer=fig.observer, wrap_store=wrap_store)
        closed_at_teardown.append(client)
        return client

    return make
