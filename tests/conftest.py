"""Fixtures that start real Mooncake processes on loopback and always stop them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tq_mooncake.client import MooncakeBatchClient
from tq_mooncake.cluster import MasterProcess, StorageNodeProcess


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
    for master in started:
        master.stop()


@pytest.fixture
def start_storage_node(tmp_path: Path) -> Iterator[Callable[..., StorageNodeProcess]]:
    """Start a storage process for a master: ``start_storage_node(master, segment="64MB")``; tests may kill it."""
    started: list[StorageNodeProcess] = []

    def start(master: MasterProcess, segment: str = "64MB") -> StorageNodeProcess:
        node = StorageNodeProcess(master, tmp_path, segment)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., MooncakeBatchClient]]:
    """``make_client(master, wrap_store=None, clock=None, jitter=None, **config)``: a client closed at teardown."""
    clients: list[MooncakeBatchClient] = []

    def make(master: MasterProcess, *, wrap_store: Any = None, clock: Any = None, jitter: Any = None, **config: Any):
        kwargs: dict[str, Any] = {"wrap_store": wrap_store}
        if clock is not None:
            kwargs["clock"] = clock
        if jitter is not None:
            kwargs["jitter"] = jitter
        client = MooncakeBatchClient(master.client_config(**config), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


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
