"""Many threads share one client; close() while calls are in flight ends them with a clear error."""

from __future__ import annotations

import random
import threading

from tq_mooncake.client import (
    BatchOperationError,
    ClientClosedError,
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    Outcome,
)
from tq_mooncake.cluster import wait_until

THREADS = 16


def test_close_while_many_threads_are_mid_call(shared_master, chaos, chaos_client, figures, keyspace, chaos_long):
    fig = figures(f"{THREADS} threads, close() mid-flight")
    master = shared_master
    doomed = keyspace(THREADS)  # these keys always fail: calls holding them are retrying when close() comes
    holder: dict[str, FaultInjectingStore] = {}
    rules = [
        FaultRule(code=ErrorCode.TRANSFER_FAIL, keys=frozenset(doomed)),
        FaultRule(code=ErrorCode.RPC_TIMEOUT, fraction=0.1),
    ]
    client = chaos_client(
        master,
        fig,
        batch_size=4,
        max_workers=4,
        retry={"max_attempts": 100_000, "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "deadline_s": 600},
        wrap_store=lambda s: holder.setdefault("store", FaultInjectingStore(s, rules, seed=3)),
    )
    ledger = chaos.Ledger()
    ended: dict[int, BaseException | None] = {}
    unexpected: list[BaseException] = []

    def work(t: int) -> None:
        rng = random.Random(t)
        n = 0
        try:
            while True:
                keys = [f"{k}-t{t}-{n}" for k in keyspace(11)]
                if n % 3 == 2:
                    keys.append(doomed[t])  # retried until close()
                n += 1
                chaos.checked_put(fig, client, ledger, keys, [chaos.make_value(k, rng) for k in keys])
                chaos.checked_get(fig, client, ledger, ledger.sample(12, rng), rng.random() < 0.5)
        except ClientClosedError as exc:
            ended[t] = exc
        except BaseException as exc:  # noqa: BLE001 - reported below
            unexpected.append(exc)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
    for t in threads:
        t.start()
    store = holder["store"]
    wait_until(lambda: sum(doomed[0] in c.keys for c in store.calls) >= 3 or bool(unexpected), 60, "retries")
    if chaos_long:
        wait_until(lambda: len(store.calls) > 5000 or bool(unexpected), 120, "more load")
    closers = [threading.Thread(target=client.close) for _ in range(2)]  # two at once: idempotent
    for c in closers:
        c.start()
    for t in [*closers, *threads]:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in [*closers, *threads]), "a thread hangs after close()"
    assert not unexpected, unexpected[:3]
    assert client.closed and len(ended) == THREADS
    messages = [str(e) for e in ended.values()]
    assert all("client closed during" in m or "called after close()" in m for m in messages)
    assert any("client closed during" in m for m in messages)  # some really were mid-call
    for cause in fig.raised:  # calls that failed before close() did so with a BatchOperationError
        assert cause in {o.value for o in Outcome if o.failed}, cause
    fig.raised.update(f"closed: {'during call' if 'during' in m else 'after close'}" for m in messages)
    assert fig.wrong == 0 and fig.unnamed == 0, fig.problems
    assert isinstance(ended[0], ClientClosedError) and not isinstance(ended[0], BatchOperationError)
