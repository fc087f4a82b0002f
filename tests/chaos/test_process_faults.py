"""Real process faults under a steady load: a storage process SIGKILLed, one SIGSTOPped and resumed, the
master restarted. Every value returned is checked against what was written; every failure names its keys."""

from __future__ import annotations

import signal

from tq_mooncake.client import ErrorCode


def _cluster(start_master, start_storage_nodes, nodes: int = 3, segment: str = "64MB"):
    master = start_master(client_ttl=2)
    return master, start_storage_nodes(master, nodes, segment)


def _wait_for_the_master_to_drop(load, master, node) -> None:
    """Until the master no longer counts ``node``'s segment as mounted (``client_ttl`` after its last heartbeat:
    from then on reads and writes go to the live segments), while the load runs."""
    load.wait_for(lambda: node.name not in master.mounted_segments(), f"the master to drop {node.name}")


def test_kill_a_storage_process_under_load(start_master, start_storage_nodes, chaos, chaos_client, figures, chaos_long):
    fig = figures("SIGKILL storage node (replica_num 2)")
    master, nodes = _cluster(start_master, start_storage_nodes)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    ledger = chaos.Ledger()
    with chaos.Load(client, fig, ledger, threads=4) as load:
        load.wait_for_puts(10)
        assert nodes[0].name in master.mounted_segments()
        nodes[0].kill()  # SIGKILL: its replicas answer TRANSFER_FAIL until the master drops it
        _wait_for_the_master_to_drop(load, master, nodes[0])
        load.wait_for_more_puts(400 if chaos_long else 20, timeout=300)  # and the load goes on past it
    assert not load.unexpected, load.unexpected
    lost = chaos.read_back(fig, client, ledger)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert lost == {}, f"keys lost although every key had a second replica: {list(lost)[:10]}"
    assert fig.checked > 0


def test_kill_a_storage_process_at_tqs_client_ttl_with_the_default_config(
    start_master, start_storage_nodes, chaos, chaos_client, figures, chaos_long
):
    """TQ's master (``--client_ttl=30``) lists the dead process's replicas for the whole scenario: the default
    config (node health on, default retries) must carry every call through with no failure."""
    fig = figures("SIGKILL storage node, client_ttl 30, default config (replica_num 2)")
    master = start_master(client_ttl=30)
    nodes = start_storage_nodes(master, 2)
    client = chaos_client(master, fig, replica_num=2)
    ledger = chaos.Ledger()
    with chaos.Load(client, fig, ledger, threads=4) as load:
        load.wait_for_puts(10)
        nodes[0].kill()
        load.wait_for(lambda: nodes[0].name in client.health.ejected(), "the client to eject the killed process")
        load.wait_for_more_puts(300 if chaos_long else 30)
    assert nodes[0].name in master.mounted_segments()  # all of it inside client_ttl: the master still lists it
    assert not load.unexpected, load.unexpected
    lost = chaos.read_back(fig, client, ledger)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert not fig.raised, fig.raised  # no call failed
    assert lost == {} and fig.checked > 0


def test_stop_a_storage_process_for_a_while_under_load(
    start_master, start_storage_nodes, chaos, chaos_client, figures, chaos_long
):
    fig = figures("SIGSTOP storage node until dropped, then SIGCONT")
    master, nodes = _cluster(start_master, start_storage_nodes)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    ledger = chaos.Ledger()
    try:
        with chaos.Load(client, fig, ledger, threads=4) as load:
            load.wait_for_puts(10)
            nodes[0].kill(signal.SIGSTOP)  # frozen: its heartbeats stop, so the master drops it after client_ttl
            _wait_for_the_master_to_drop(load, master, nodes[0])
            if chaos_long:
                load.wait_for_more_puts(300, timeout=300)
            nodes[0].kill(signal.SIGCONT)
            load.wait_for_more_puts(20)  # the load goes on with the resumed process back
    finally:
        nodes[0].kill(signal.SIGCONT)
    assert not load.unexpected, load.unexpected
    lost = chaos.read_back(fig, client, ledger)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert lost == {}, f"keys lost although every key had a second replica: {list(lost)[:10]}"


def test_restart_the_master_under_load(start_master, start_storage_nodes, chaos, chaos_client, figures, chaos_long):
    fig = figures("master restart")
    master, nodes = _cluster(start_master, start_storage_nodes, nodes=2)
    client = chaos_client(master, fig, global_segment_size=0, replica_num=2, retry=chaos.PATIENT_RETRY)
    before, after = chaos.Ledger(), chaos.Ledger()
    with chaos.Load(client, fig, before, threads=4) as load:
        load.wait_for_puts(10)
    assert not load.unexpected, load.unexpected
    master.restart()
    with chaos.Load(client, fig, after, threads=4, seed=1) as load:
        load.wait_for_puts(30 + (400 if chaos_long else 0), timeout=300)
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
