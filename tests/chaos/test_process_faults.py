"""Real process faults under a steady load: a storage process SIGKILLed, one SIGSTOPped and resumed, the
master restarted. Every value returned is checked against what was written; every failure names its keys."""

from __future__ import annotations

import signal
import time

from tq_mooncake.client import ErrorCode


def _cluster(start_master, start_storage_node, nodes: int = 3, segment: str = "64MB"):
    master = start_master(client_ttl=2)
    return master, [start_storage_node(master, segment) for _ in range(nodes)]


def test_kill_a_storage_process_under_load(start_master, start_storage_node, chaos, chaos_client, figures, chaos_long):
    fig = figures("SIGKILL storage node (replica_num 2)")
    master, nodes = _cluster(start_master, start_storage_node)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    ledger = chaos.Ledger()
    with chaos.Load(client, fig, ledger, threads=4) as load:
        load.wait_for_puts(10)
        nodes[0].kill()  # SIGKILL: its replicas answer TRANSFER_FAIL until the master drops it
        time.sleep(chaos.CLIENT_TTL + 3 + (20 if chaos_long else 0))
    assert not load.unexpected, load.unexpected
    lost = chaos.read_back(fig, client, ledger)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert lost == {}, f"keys lost although every key had a second replica: {list(lost)[:10]}"
    assert fig.checked > 0


def test_stop_a_storage_process_for_a_while_under_load(
    start_master, start_storage_node, chaos, chaos_client, figures, chaos_long
):
    stopped_s = chaos.CLIENT_TTL + 2 + (15 if chaos_long else 0)  # past client_ttl: the master drops it
    fig = figures(f"SIGSTOP storage node {stopped_s} s, then SIGCONT")
    master, nodes = _cluster(start_master, start_storage_node)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    ledger = chaos.Ledger()
    try:
        with chaos.Load(client, fig, ledger, threads=4) as load:
            load.wait_for_puts(10)
            nodes[0].kill(signal.SIGSTOP)
            time.sleep(stopped_s)
            nodes[0].kill(signal.SIGCONT)
            time.sleep(2)
    finally:
        nodes[0].kill(signal.SIGCONT)
    assert not load.unexpected, load.unexpected
    lost = chaos.read_back(fig, client, ledger)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert lost == {}, f"keys lost although every key had a second replica: {list(lost)[:10]}"


def test_restart_the_master_under_load(start_master, start_storage_node, chaos, chaos_client, figures, chaos_long):
    fig = figures("master restart")
    master, nodes = _cluster(start_master, start_storage_node, nodes=2)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    before, after = chaos.Ledger(), chaos.Ledger()
    with chaos.Load(client, fig, before, threads=4) as load:
        load.wait_for_puts(10)
    assert not load.unexpected, load.unexpected
    master.restart()
    with chaos.Load(client, fig, after, threads=4, seed=1) as load:
        load.wait_for_puts(10, timeout=60)
        time.sleep(2 + (15 if chaos_long else 0))
    assert not load.unexpected, load.unexpected
    # Mooncake keeps object metadata in the master's memory: what was written before the restart is gone,
    # and says so, key by key.
    lost_before = chaos.read_back(fig, client, before)
    assert set(lost_before) == set(before.keys())
    assert set(lost_before.values()) == {ErrorCode.OBJECT_NOT_FOUND}
    assert chaos.read_back(fig, client, after) == {}
    fig.lost = len(lost_before)
    fig.note = f"{len(lost_before)} keys written before the restart are gone (OBJECT_NOT_FOUND, each named)"
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
