"""Fixtures that start real Mooncake processes on loopback and always stop them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tq_mooncake.client import MooncakeBatchClient
from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, start_all, stop_all


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run the long variants of tests/chaos (make chaos)",
    )


@pytest.fixture(scope="session")
def shared_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProcess]:
    """One master (HTTP metadata server on) for the tests that do not break it; keys are unique per test."""
    master = MasterProcess(tmp_path_factory.mktemp("master")).start()
    try:
        yield master
    finally:
        master.stop()


@pytest.fixture
def start_master(tmp_path: Path) -> Iterator[Callable[..., MasterProcess]]:
    """Start a private master: ``start_master(client_ttl=2, http_metadata=True)``. Stopped at teardown."""
    started: list[MasterProcess] = []

    def start(**kwargs: Any) -> MasterProcess:
        master = MasterProcess(tmp_path, **kwargs)
        started.append(master)
        return master.start()

    yield start
    stop_all(started)


@pytest.fixture
def start_storage_nodes(tmp_path: Path) -> Iterator[Callable[..., list[StorageNodeProcess]]]:
    """Start storage processes for a master, side by side: ``start_storage_nodes(master, n, segment="64MB")``;
    tests may kill them. All are stopped at teardown."""
    started: list[StorageNodeProcess] = []

    def start(master: MasterProcess, n: int, segment: str = "64MB") -> list[StorageNodeProcess]:
        nodes = [StorageNodeProcess(master, tmp_path, segment) for _ in range(n)]
        started.extend(nodes)
        start_all(nodes)
        return nodes

    yield start
    stop_all(started)


@pytest.fixture
def start_storage_node(
    start_storage_nodes: Callable[..., list[StorageNodeProcess]],
) -> Callable[..., StorageNodeProcess]:
    """Start one storage process for a master: ``start_storage_node(master, segment="64MB")``."""
    return lambda master, segment="64MB": start_storage_nodes(master, 1, segment)[0]


@pytest.fixture
def closed_at_teardown() -> Iterator[list[MooncakeBatchClient]]:
    """A list of clients closed at the end of the test, one after another: Mooncake's close holds the GIL for
    its 1-2 s, so closing side by side only makes every close slower."""
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
