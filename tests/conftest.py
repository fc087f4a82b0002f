"""Fixtures that start real Mooncake processes on loopback and always stop them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from in_memory_otel import Otel  # tests/support

from tq_mooncake.client import MooncakeBatchClient
from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, start_all, stop_all


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run the long variants of tests/chaos (make chaos)",
    )


@pytest.fixture(scope="session", autouse=True)
def background_jobs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Slow background work that selected tests will wait for, started before the first test so that it runs
    while the rest of the suite does (which mostly waits on processes, leaving the CPUs idle): for each module
    that defines ``BACKGROUND_JOBS`` (a class built on a folder, with ``start()`` and ``kill()``) and has a
    selected test using the ``jobs`` fixture, one is built and started here; it, or the exception its start raised
    (for those tests to fail with, not the whole session), is this dict's value under the module's name.
    Everything started is killed at the end of the session, whatever happened."""
    started: dict[str, Any] = {}
    try:
        for item in request.session.items:
            module = getattr(item, "module", None)
            jobs_class = getattr(module, "BACKGROUND_JOBS", None)
            if jobs_class is None or module.__name__ in started or "jobs" not in getattr(item, "fixturenames", ()):
                continue
            jobs = jobs_class(tmp_path_factory.mktemp(module.__name__.rpartition(".")[2]))
            try:
                jobs.start()
                started[module.__name__] = jobs
            except Exception as exc:  # noqa: BLE001 - re-raised by the jobs fixture
                jobs.kill()
                started[module.__name__] = exc
        yield started
    finally:
        for jobs in started.values():
            if not isinstance(jobs, Exception):
                jobs.kill()


@pytest.fixture(scope="module")
def jobs(request: pytest.FixtureRequest, background_jobs: dict[str, Any]) -> Iterator[Any]:
    """The requesting module's ``BACKGROUND_JOBS``, as ``background_jobs`` started them; killed at the module's end."""
    started = background_jobs[request.module.__name__]
    if isinstance(started, Exception):
        raise started
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture
def otel() -> Iterator[Otel]:
    """The real SDK with in-memory exporters for one test (``tests/support/in_memory_otel.py``)."""
    started = Otel.start()
    try:
        yield started
    finally:
        started.shutdown()


@pytest.fixture(scope="session")
def shared_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProcess]:
    """One master (HTTP metadata server on) for the tests that do not break it; keys are unique per test."""
    master = MasterProcess(tmp_path_factory.mktemp("master")).start()
    try:
        yield master
    finally:
        master.stop(timeout=0)  # SIGKILL: the fixtures of its clients (session, module) ended before this one


@pytest.fixture(scope="session")
def faulty_run(shared_master: MasterProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One real faulty client process (``dashboard.sample_run``, 40 calls: 14 retried, 6 exhausted) that exported
    its metrics and spans to a folder: ``(folder, what the injector did)``. Read it; copy it to change it."""
    from tq_mooncake.dashboard.screenshot import run_workloads

    folder = tmp_path_factory.mktemp("faulty-run") / "telemetry"
    (result,) = run_workloads(shared_master, folder, [{"service": "faulty-run", "operations": 40}])
    return folder, result


@pytest.fixture
def private_masters() -> Iterator[list[MasterProcess]]:
    """The masters this test started with ``start_master``, SIGKILLed at teardown: nothing is left to stop
    gracefully by then (a TERM costs up to 1 s a master). The fixtures of clients and storage nodes ask for this
    one, so their teardown (closing each client, stopping each node) always comes first."""
    started: list[MasterProcess] = []
    yield started
    stop_all(started, timeout=0)


@pytest.fixture
def start_master(tmp_path: Path, private_masters: list[MasterProcess]) -> Callable[..., MasterProcess]:
    """Start a private master: ``start_master(client_ttl=2, http_metadata=True)``. Stopped at teardown."""

    def start(**kwargs: Any) -> MasterProcess:
        master = MasterProcess(tmp_path, **kwargs)
        private_masters.append(master)
        return master.start()

    return start


@pytest.fixture
def start_storage_nodes(
    tmp_path: Path, private_masters: list[MasterProcess]
) -> Iterator[Callable[..., list[StorageNodeProcess]]]:
    """Start storage processes for a master, side by side: ``start_storage_nodes(master, n, segment="64MB")``;
    tests may kill them. All are stopped at teardown: those of a private master (SIGKILLed next) with SIGKILL,
    the others with TERM, so that they unmount their segments from a master that lives on (the shared one)."""
    started: list[StorageNodeProcess] = []

    def start(master: MasterProcess, n: int, segment: str = "64MB") -> list[StorageNodeProcess]:
        nodes = [StorageNodeProcess(master, tmp_path, segment) for _ in range(n)]
        started.extend(nodes)
        start_all(nodes)
        return nodes

    yield start
    doomed = [node for node in started if any(node.master is master for master in private_masters)]
    stop_all(doomed, timeout=0)
    stop_all([node for node in started if node not in doomed])


@pytest.fixture
def start_storage_node(
    start_storage_nodes: Callable[..., list[StorageNodeProcess]],
) -> Callable[..., StorageNodeProcess]:
    """Start one storage process for a master: ``start_storage_node(master, segment="64MB")``."""
    return lambda master, segment="64MB": start_storage_nodes(master, 1, segment)[0]


@pytest.fixture
def closed_at_teardown(private_masters: list[MasterProcess]) -> Iterator[list[MooncakeBatchClient]]:
    """A list of clients closed at the end of the test, one after another (before any private master stops):
    Mooncake's close holds the GIL for its 1-2 s, so closing side by side only makes every close slower."""
    clients: list[MooncakeBatchClient] = []
    yield clients
    for client in clients:
        client.close()


@pytest.fixture
def make_client(closed_at_teardown: list[MooncakeBatchClient]) -> Callable[..., MooncakeBatchClient]:
    """``make_client(master, wrap_store=None, clock=None, jitter=None, **config)``: a client closed at teardown."""

    def make(master: MasterProcess, *, wrap_store: Any = None, clock: Any = None, jitter: Any = None, **config: Any):
        kwargs: dict[str, Any] = {"wrap_store": wrap_store}
        if clock is not None:
            kwargs["clock"] = clock
        if jitter is not None:
            kwargs["jitter"] = jitter
        client = MooncakeBatchClient(master.client_config(**config), **kwargs)
        closed_at_teardown.append(client)
        return client

    return make


@pytest.fixture(scope="session")
def client(shared_master: MasterProcess) -> Iterator[MooncakeBatchClient]:
    """A client on the shared master that also holds a 64 MiB segment; shared by tests (closing takes ~2 s)."""
    shared = MooncakeBatchClient(shared_master.client_config())
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def keyspace() -> Callable[[int], list[str]]:
    """``keyspace(n)``: n keys no other test uses."""
    prefix = uuid.uuid4().hex[:8]
    return lambda n: [f"{prefix}-{i}@field" for i in range(n)]
