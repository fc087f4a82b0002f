"""Retry storm: every key fails, and the shared retry budget bounds the extra store calls."""

from __future__ import annotations

import threading
import time

from tq_mooncake.client import BatchOperationError, ErrorCode, FaultInjectingStore, FaultRule

RATIO, FLOOR_PER_S, MAX_ATTEMPTS = 0.2, 10.0, 10


def test_retry_budget_bounds_a_retry_storm(shared_master, chaos_client, figures, keyspace, chaos_long):
    fig = figures("retry storm: 100% of keys fail")
    master = shared_master
    holder: dict[str, FaultInjectingStore] = {}
    start = time.monotonic()  # the budget's reserve starts full when the client is made
    client = chaos_client(
        master,
        fig,
        batch_size=4,
        retry={
            "max_attempts": MAX_ATTEMPTS,
            "initial_backoff_s": 0.001,
            "max_backoff_s": 0.004,
            "budget_ratio": RATIO,
            "budget_min_per_s": FLOOR_PER_S,
        },
        wrap_store=lambda s: holder.setdefault(
            "store", FaultInjectingStore(s, [FaultRule(code=ErrorCode.TRANSFER_FAIL, operations={"put"})])
        ),
    )
    store = holder["store"]
    calls = 8000 if chaos_long else 2000  # put calls in all (a few seconds: deposits expiring would only tighten)
    made = 0
    chunks = 0
    lock = threading.Lock()
    unexpected: list[BaseException] = []

    def storm(t: int) -> None:
        nonlocal chunks, made
        keys = keyspace(8)
        n = 0
        while True:
            batch = [f"{k}-t{t}-{n}" for k in keys]
            n += 1
            with lock:
                if made >= calls:
                    return
                made += 1
                chunks += 2  # 8 keys in chunks of 4: two first attempts per call
                fig.operations += 1
                fig.keys += len(batch)
            try:
                client.put(batch, ["v"] * len(batch))
                unexpected.append(AssertionError("a put succeeded though every key fails"))
            except BatchOperationError as err:
                with lock:
                    fig.raised[err.outcome.value] += 1
                if set(err.failed) != set(batch):
                    unexpected.append(AssertionError(f"not every key named: {err}"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=storm, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.monotonic() - start
    assert not unexpected, unexpected[:3]
    calls = len(store.calls_for("put"))
    retries = calls - chunks
    bound = RATIO * chunks + FLOOR_PER_S * elapsed + max(FLOOR_PER_S, 1.0)  # ratio, floor, reserve held at start
    amplification = calls / chunks
    fig.note = (
        f"amplification {amplification:.3f} store calls per first attempt ({calls} calls for {chunks} first "
        f"attempts in {elapsed:.1f} s; {retries} retries, bound {bound:.0f} = {RATIO} x first attempts + "
        f"{FLOOR_PER_S:g}/s floor + reserve; without the budget: up to {MAX_ATTEMPTS})"
    )
    assert retries <= bound, fig.note
    assert retries > 0  # the floor still lets a few through
    assert fig.raised["budget_denied"] > 0
