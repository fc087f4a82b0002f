"""A store filled until NO_AVAILABLE_HANDLE, and error codes injected into a real store at 1%, 10% and 50%
of keys, under a steady load. Every value returned is checked; every failure names its keys."""

from __future__ import annotations

import random
import time

import pytest

from tq_mooncake.client import ErrorCode, FaultInjectingStore, FaultRule


def test_fill_the_segments_until_no_available_handle(
    start_master, start_storage_nodes, chaos, chaos_client, figures, chaos_long
):
    fig = figures("segments full (NO_AVAILABLE_HANDLE)")
    master = start_master(client_ttl=chaos.CLIENT_TTL)
    start_storage_nodes(master, 2, "16MB")
    retry = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}
    client = chaos_client(master, fig, global_segment_size=0, retry=retry)  # hard_pin: true (the default)
    ledger = chaos.Ledger()

    def full() -> bool:
        return fig.codes[ErrorCode.NO_AVAILABLE_HANDLE] > 0

    with chaos.Load(client, fig, ledger, threads=3, tensor_bytes=64 << 10) as load:
        load.wait_for(full, "a put to find the store full", 120)
        refused = fig.codes[ErrorCode.NO_AVAILABLE_HANDLE]
        knocks = 1000 if chaos_long else 100  # keep knocking on a full store
        load.wait_for(lambda: fig.codes[ErrorCode.NO_AVAILABLE_HANDLE] >= refused + knocks, f"{knocks} more refusals")
    assert not load.unexpected, load.unexpected
    assert full()
    # Hard-pinned: a full store refuses new values; it never drops stored ones to make room.
    assert chaos.read_back(fig, client, ledger) == {}
    # Space comes back when keys are cleared.
    gone = ledger.keys()[: len(ledger.keys()) // 2]
    client.clear(gone)
    ledger.forget(gone)
    fig.operations += 1
    fig.keys += len(gone)
    keys = [f"after-clear-{i}-{time.monotonic_ns()}@chaos" for i in range(8)]
    values = [chaos.make_value(k, random.Random(i), 64 << 10) for i, k in enumerate(keys)]
    assert chaos.checked_put(fig, client, ledger, keys, values)
    assert chaos.read_back(fig, client, ledger) == {}
    assert set(fig.codes) == {ErrorCode.NO_AVAILABLE_HANDLE}
    fig.note = (
        f"{fig.codes[ErrorCode.NO_AVAILABLE_HANDLE]} key writes refused with NO_AVAILABLE_HANDLE once full; "
        "nothing stored was evicted; clear() frees space"
    )
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems


def _rules(rate: float) -> list[FaultRule]:
    """Retryable codes on ``rate`` of the keys of every put, get and clear call, on every attempt."""
    shares = [(ErrorCode.TRANSFER_FAIL, 0.5), (ErrorCode.RPC_TIMEOUT, 0.3), (ErrorCode.OBJECT_REPLICA_BUSY, 0.2)]
    rules, untouched = [], 1.0
    for code, share in shares:
        fraction = rate * share / untouched  # of the keys the earlier rules left alone
        rules.append(FaultRule(code=code, fraction=fraction))
        untouched *= 1 - fraction
    return rules


@pytest.mark.parametrize("rate", [0.01, 0.10, 0.50])
def test_injected_error_codes_under_load(shared_master, chaos, chaos_client, figures, chaos_long, rate):
    fig = figures(f"codes injected on {rate:.0%} of keys")
    holder: dict[str, FaultInjectingStore] = {}
    client = chaos_client(
        shared_master,
        fig,
        retry={"max_attempts": 6, "initial_backoff_s": 0.005, "max_backoff_s": 0.05},
        wrap_store=lambda s: holder.setdefault("store", FaultInjectingStore(s, _rules(rate), seed=int(rate * 100))),
    )
    ledger = chaos.Ledger()
    with chaos.Load(client, fig, ledger, threads=4, seed=int(rate * 100)) as load:
        calls = 2000 if chaos_long else 200
        load.wait_for(lambda: load.puts_made >= calls, f"{calls} put calls", timeout=300)
    assert not load.unexpected, load.unexpected
    store = holder["store"]
    injected = sum(store.injected.values())
    seen = sum(len(c.keys) for c in store.calls)
    store.clear_rules()
    assert chaos.read_back(fig, client, ledger) == {}  # nothing written was lost or damaged
    fig.note = f"{injected} of {seen} keys seen by the store failed on purpose ({injected / max(seen, 1):.1%})"
    assert injected > 0
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
