"""The node-loss policy objects without a network: ``NodeHealth`` on a fake clock, ``ReplicaRouter``'s choices,
the ``node_health`` config section, and the telemetry an attempt's ``RoutingReport`` produces."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from tq_mooncake.client import ClientConfig, ErrorCode
from tq_mooncake.client.node_health import NodeHealth, NodeHealthPolicy
from tq_mooncake.client.observer import OperationSummary
from tq_mooncake.client.replica_reader import ReplicaReader
from tq_mooncake.client.replica_routing import ReplicaRouter, RoutingReport
from tq_mooncake.client.replicas import Location
from tq_mooncake.telemetry import conventions as c
from tq_mooncake.telemetry.conventions import Operation, Outcome
from tq_mooncake.testing.clock import FakeClock

pytestmark = pytest.mark.pure

A, B, C, D = "10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3", "10.0.0.4:4"


def _health(**policy: Any) -> tuple[NodeHealth, FakeClock, list[str]]:
    clock = FakeClock()
    ejected: list[str] = []
    health = NodeHealth(NodeHealthPolicy(**policy), clock, on_eject=ejected.append)
    health.seen([A, B, C, D])
    return health, clock, ejected


# ------------------------------------------------------------------------------------------ NodeHealth
def test_consecutive_failures_eject_and_a_success_in_between_resets_the_count():
    health, clock, ejected = _health(consecutive_failures=3)
    assert not health.failure(A) and not health.failure(A)
    health.success(A)
    assert not health.failure(A) and not health.failure(A)
    assert health.failure(A) and ejected == [A]
    assert health.ejected() == {A} and health.is_ejected(A) and health.any_ejected()
    assert health.failure(A)  # still ejected: reported once
    assert ejected == [A]
    assert health.healthy()[0] != A and A not in health.healthy()


def test_ejection_time_grows_with_each_ejection_and_is_capped():
    policy = NodeHealthPolicy(base_ejection_s=5, max_ejection_s=12)
    assert [policy.ejection_s(n) for n in (1, 2, 3, 9)] == [5, 10, 12, 12]
    health, clock, _ = _health(base_ejection_s=5, max_ejection_s=12)
    health.failure(A)
    clock.advance(4.9)
    assert health.is_ejected(A)
    clock.advance(0.2)
    assert not health.is_ejected(A) and health.any_ejected()  # over, but not yet verified
    assert health.expired() == []  # listed before this ejection began only: the master dropped it, forgotten
    assert health.ejected() == frozenset() and not health.any_ejected()


def test_an_expired_ejection_is_probed_again_when_the_master_still_listed_the_endpoint():
    health, clock, ejected = _health(base_ejection_s=5, max_ejection_s=100)
    health.failure(A)
    clock.advance(1)
    health.seen([A])  # listed during the ejection
    clock.advance(5)
    assert health.expired() == [A]
    assert health.expired() == []  # handed out once
    assert health.failure(A) and ejected == [A, A]  # the probe was refused: ejected again, for longer
    clock.advance(9.9)
    assert health.is_ejected(A)
    clock.advance(0.2)
    health.seen([A])
    assert health.expired() == [A]
    health.success(A)  # answered: re-admitted
    assert not health.any_ejected() and A in health.healthy()


def test_a_success_readmits_an_ejected_endpoint_at_once():
    health, clock, _ = _health()
    health.failure(B)
    assert health.is_ejected(B)
    health.success(B)
    assert not health.is_ejected(B) and not health.any_ejected()


def test_the_ejected_share_is_capped_so_a_client_side_fault_cannot_eject_every_node():
    health, clock, ejected = _health(max_ejected_share=0.5)
    for endpoint in (A, B, C, D):
        health.failure(endpoint)
    assert ejected == [A, B] and health.ejected() == {A, B}
    lone = NodeHealth(NodeHealthPolicy(), FakeClock())
    assert not lone.failure(A)  # the only endpoint known: never ejected


def test_the_ejection_count_starts_again_after_a_long_quiet_time():
    health, clock, _ = _health(base_ejection_s=5, max_ejection_s=100)
    health.failure(A)
    health.success(A)
    health.failure(A)  # second ejection: 10 s
    health.success(A)
    clock.advance(10 * 10 + 1)
    health.success(A)
    health.failure(A)
    clock.advance(5.1)
    assert not health.is_ejected(A)  # back to the base time


def test_at_most_max_endpoints_are_remembered():
    health = NodeHealth(NodeHealthPolicy(), FakeClock(), max_endpoints=3)
    health.seen([f"h:{i}" for i in range(10)])
    assert len(health.healthy()) == 3


def test_node_health_is_thread_safe():
    health = NodeHealth(NodeHealthPolicy(max_ejected_share=1.0), FakeClock())
    endpoints = [f"h:{i}" for i in range(8)]
    health.seen(endpoints)

    def hammer() -> None:
        for _ in range(500):
            for e in endpoints:
                health.failure(e)
                health.success(e)
                health.expired()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert health.ejected() == frozenset()


@pytest.mark.parametrize(
    "field, value",
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", True),
        ("base_ejection_s", -1),
        ("max_ejected_share", 1.5),
        ("probe_timeout_s", 0),
        ("read_lease_s", float("nan")),
        ("enabled", "yes"),
    ],
)
def test_bad_policy_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"node_health.{field}"):
        NodeHealthPolicy(**{field: value})
    with pytest.raises(ValueError, match="max_ejection_s"):
        NodeHealthPolicy(base_ejection_s=10, max_ejection_s=5)


# ------------------------------------------------------------------------------------------ config
def test_the_node_health_section_takes_a_switch_or_a_mapping():
    assert ClientConfig.from_dict({}).node_health == NodeHealthPolicy()
    assert ClientConfig.from_dict({"node_health": False}).node_health.enabled is False
    assert ClientConfig.from_dict({"node_health": True}).node_health == NodeHealthPolicy()
    cfg = ClientConfig.from_dict({"node_health": {"base_ejection_s": 2, "max_ejection_s": 20}})
    assert cfg.node_health.base_ejection_s == 2 and cfg.node_health.enabled
    with pytest.raises(ValueError, match="unknown node_health config key"):
        ClientConfig.from_dict({"node_health": {"base_ejection": 2}})
    with pytest.raises(ValueError, match="node_health must be true, false or a mapping"):
        ClientConfig.from_dict({"node_health": "off"})
    with pytest.raises(TypeError, match="NodeHealthPolicy"):
        ClientConfig(node_health={"enabled": False})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ router
class _Store:
    """Answers the router's two questions; nothing else."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.probed: list[str] = []

    def batch_read_replicas(self, *args: Any) -> list[int]:
        raise AssertionError("not called here")

    def probe_endpoint(self, endpoint: str, timeout_s: float) -> bool:
        self.probed.append(endpoint)
        return endpoint not in self.down


def _router(down: set[str], local: str | None = None) -> tuple[ReplicaRouter, _Store, FakeClock]:
    clock = FakeClock()
    store = _Store(down)
    health = NodeHealth(NodeHealthPolicy(), clock)
    health.seen([A, B, C, D])
    return ReplicaRouter(store, health, local, clock), store, clock


def test_the_router_blames_the_replica_mooncake_picks_and_reads_another():
    router, store, _ = _router({A})
    locs = [Location(A, 1, 10), Location(B, 2, 10)]
    assert router.chosen(locs).endpoint == A
    report = RoutingReport()
    assert router.confirm([A, B, A], report) == {A}
    assert store.probed == [A, B] and report.down == {A} and report
    assert router.health.is_ejected(A)
    assert router.alternative(locs, {A}) == Location(B, 2, 10)
    assert not router.unreachable(locs)
    assert router.unreachable([Location(A, 1, 10)])
    assert not router.unreachable([])


def test_the_clients_own_replica_is_chosen_first_and_never_probed():
    router, store, _ = _router(set(), local=C)
    locs = [Location(A, 1, 10), Location(C, 3, 10)]
    assert router.chosen(locs).endpoint == C
    assert router.alternative(locs, set()).endpoint == C
    router.confirm([C], RoutingReport())
    assert store.probed == []


def test_degraded_probes_expired_ejections_and_the_lease_bound_holds():
    router, store, clock = _router({A})
    assert not router.degraded()
    router.confirm([A], RoutingReport())
    assert router.degraded()
    clock.advance(1)
    router.health.seen([A])
    clock.advance(NodeHealthPolicy().base_ejection_s)
    store.probed.clear()
    assert router.degraded()  # probed again at expiry, refused: ejected again
    assert store.probed == [A]
    queried = clock()
    clock.advance(NodeHealthPolicy().read_lease_s)
    assert router.lease_held(queried)
    clock.advance(0.001)
    assert not router.lease_held(queried)


def test_steered_writes_prefer_healthy_endpoints_and_ask_no_more_replicas_than_there_are():
    router, _, _ = _router({A, B})
    base = type("Cfg", (), {"with_hard_pin": True, "replica_num": 3})()
    router.confirm([A], RoutingReport())
    cfg = router.steered(base, 3)
    assert sorted(cfg.preferred_segments) == sorted([B, C, D]) and cfg.replica_num == 3 and cfg.with_hard_pin
    router.confirm([B], RoutingReport())  # a second ejection of four is allowed (share 0.5)
    cfg = router.steered(base, 3)
    assert sorted(cfg.preferred_segments) == [C, D] and cfg.replica_num == 2
    empty = ReplicaRouter(_Store(set()), NodeHealth(NodeHealthPolicy(), FakeClock()))
    assert empty.steered(base, 3) is base


def test_a_store_without_direct_reads_or_a_switched_off_policy_makes_the_router_inactive():
    health = NodeHealth(NodeHealthPolicy(), FakeClock())
    assert not ReplicaRouter(object(), health).active
    off = NodeHealth(NodeHealthPolicy(enabled=False), FakeClock())
    assert not ReplicaRouter(_Store(set()), off).active


# ------------------------------------------------------------------------------------------ reader
class _Engine:
    def __init__(self, rc: int = 0, read_rc: int = 0, probe: Any = 0) -> None:
        self.rc, self.read_rc, self.probe_answer = rc, read_rc, probe
        self.reads: list[tuple[str, list[int]]] = []
        self.registered: list[list[int]] = []
        self.release = threading.Event()

    def initialize(self, *args: Any) -> int:
        return self.rc

    def send_probe(self, endpoint: str) -> int:
        if self.probe_answer == "hang":
            self.release.wait(10)
        return 0 if self.probe_answer == "hang" else self.probe_answer

    def batch_register_memory(self, ptrs: list[int], sizes: list[int]) -> int:
        self.registered.append(list(ptrs))
        return 0

    def batch_unregister_memory(self, ptrs: list[int]) -> int:
        self.registered.remove(list(ptrs))
        return 0

    def batch_transfer_sync_read(self, endpoint: str, dst: list[int], src: list[int], sizes: list[int]) -> int:
        self.reads.append((endpoint, list(src)))
        return self.read_rc if endpoint != D else -1


def test_the_reader_batches_per_endpoint_and_fails_only_that_endpoints_keys():
    engine = _Engine()
    reader = ReplicaReader(ClientConfig(), lambda: engine)
    got = reader.batch_read_replicas(["k1", "k2", "k3"], [A, D, A], [100, 200, 300], [1, 2, 3], [10, 20, 30])
    assert got == [10, int(ErrorCode.TRANSFER_FAIL), 30]
    assert sorted(engine.reads) == [(A, [1, 3]), (D, [2])] and engine.registered == []


def test_a_reader_that_cannot_set_up_answers_unknown_and_internal_error():
    reader = ReplicaReader(ClientConfig(), lambda: _Engine(rc=-1))
    assert reader.probe(A, 0.1) is None
    assert reader.batch_read_replicas(["k"], [A], [1], [1], [1]) == [int(ErrorCode.INTERNAL_ERROR)]


def test_a_silent_endpoint_fails_its_probe_within_the_timeout_and_is_not_probed_twice_at_once():
    engine = _Engine(probe="hang")
    reader = ReplicaReader(ClientConfig(), lambda: engine)
    assert reader.probe(A, 0.05) is False
    assert reader.probe(A, 5) is False  # the first probe still hangs: no second thread on it
    engine.release.set()
    refused = ReplicaReader(ClientConfig(), lambda: _Engine(probe=-102))
    assert refused.probe(B, 1) is False
    assert ReplicaReader(ClientConfig(), lambda: _Engine()).probe(B, 1) is True


# ------------------------------------------------------------------------------------------ telemetry
def test_an_attempts_routing_report_becomes_span_attributes_and_per_endpoint_metrics(otel):
    observer = otel.observer(ejected_nodes=lambda: 1)
    scope = observer.operation(Operation.GET, 4)
    attempt = scope.attempt(0, 1, 4, 0.0)
    attempt.end(Counter(), 100, RoutingReport(down={A}, fallbacks=Counter({A: 3}), unreachable=1))
    observer.node_ejected(A)
    scope.end(OperationSummary(Outcome.SUCCESS, 1, 4, 0, 0, 0.0, 100))
    (span,) = [s for s in otel.finished() if s.name == "mooncake.get.attempt"]
    assert span.attributes[c.SERVER_ADDRESS] == "10.0.0.1" and span.attributes[c.SERVER_PORT] == 1
    assert span.attributes[c.NODES_DOWN] == 1 and span.attributes[c.KEYS_FALLBACK] == 3
    assert span.attributes[c.KEYS_UNREACHABLE] == 1 and c.STEERED not in span.attributes
    got = otel.metrics()
    where = {(c.SERVER_ADDRESS, "10.0.0.1"), (c.SERVER_PORT, 1)}
    assert got[c.FALLBACKS_METRIC] == {frozenset({*where, (c.OPERATION, "get")}): 3}
    assert got[c.NODE_FAILURES_METRIC] == {frozenset({*where, (c.OPERATION, "get")}): 1}
    assert got[c.EJECTIONS_METRIC] == {frozenset(where): 1}
    assert got[c.EJECTED_METRIC] == {frozenset(): 1}


def test_endpoint_attributes_split_host_and_port_and_tolerate_odd_names():
    assert c.endpoint_attributes("127.0.0.1:80") == ((c.SERVER_ADDRESS, "127.0.0.1"), (c.SERVER_PORT, 80))
    assert c.endpoint_attributes("[::1]:9") == ((c.SERVER_ADDRESS, "::1"), (c.SERVER_PORT, 9))
    assert c.endpoint_attributes("memory") == ((c.SERVER_ADDRESS, "memory"),)
    assert not RoutingReport()


def test_under_p2p_handshake_writes_are_steered_only_to_the_clients_own_segment():
    """Under P2PHANDSHAKE a replica's endpoint is not its segment's name: only the client's own segment
    (``get_hostname()``) can be named; a pure client only asks for fewer replicas."""
    base = type("Cfg", (), {"with_hard_pin": False, "replica_num": 2})()
    health = NodeHealth(NodeHealthPolicy(), FakeClock())
    health.seen([A, B, C])
    own = ReplicaRouter(_Store({A}), health, "10.0.0.9:7", FakeClock(), endpoints_are_segments=False)
    own.confirm([A], RoutingReport())
    cfg = own.steered(base, 2)
    assert list(cfg.preferred_segments) == ["10.0.0.9:7"] and cfg.replica_num == 1
    pure = ReplicaRouter(_Store(set()), health, None, FakeClock(), endpoints_are_segments=False)
    cfg = pure.steered(base, 3)
    assert list(cfg.preferred_segments) == [] and cfg.replica_num == 2
