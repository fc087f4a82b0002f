"""A faulty workload that exports real metrics: what the dashboard's tests, its screenshot and a quick look
at the page run.

    python -m tq_mooncake.dashboard.sample_run --master 127.0.0.1:50051 \\
        --metadata http://127.0.0.1:8080/metadata --operations 40 [--seconds 30] [--ramp] [--wait]

Telemetry is configured from the environment (``TQ_MOONCAKE_TELEMETRY_DIR``, ``TQ_MOONCAKE_PROMETHEUS_PORT``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_SERVICE_NAME``). The client's store fails chosen keys on purpose
(``FaultInjectingStore``): some calls need a retry, some run out of attempts. One JSON line on stdout says
what the injector did (``Tally``); with ``--wait`` the process then waits for a line on stdin before it
exits (and flushes its metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tq_mooncake.client import (
    BatchOperationError,
    ErrorCode,
    FaultInjectingStore,
    FaultRule,
    MooncakeBatchClient,
    Operation,
    Outcome,
    RetriesExhaustedError,
)

RETRY_CODES = (ErrorCode.TRANSFER_FAIL, ErrorCode.TRANSFER_FAIL, ErrorCode.RPC_TIMEOUT)
EXHAUST_CODES = {Operation.PUT: ErrorCode.TRANSFER_FAIL, Operation.GET: ErrorCode.REPLICA_IS_NOT_READY}
MAX_ATTEMPTS = 3
CLIENT_SETTINGS: dict[str, Any] = {
    "batch_size": 10_000,  # one chunk per call: attempt n of a call is its n-th store call
    "retry": {
        "max_attempts": MAX_ATTEMPTS,
        "initial_backoff_s": 0.001,
        "max_backoff_s": 0.004,
        "budget_ratio": 1.0,
        "budget_min_per_s": 1000,
    },
}


@dataclass
class Tally:
    """What happened, counted from the injector's records and the calls' results (not from telemetry)."""

    operations: Counter[str] = field(default_factory=Counter)  # "op/outcome" -> calls
    retried: int = 0  # calls that made more than one store call
    attempts: Counter[int] = field(default_factory=Counter)  # attempt number -> store calls
    key_failures: Counter[str] = field(default_factory=Counter)  # code name -> keys failed on purpose
    failed_keys: int = 0  # keys still failed when their call gave up

    @property
    def total(self) -> int:
        return sum(self.operations.values())

    def outcome(self, outcome: Outcome) -> int:
        return sum(n for k, n in self.operations.items() if k.endswith("/" + outcome.value))

    def to_json(self) -> dict[str, Any]:
        return {
            "operations": dict(self.operations),
            "retried": self.retried,
            "attempts": {str(k): v for k, v in self.attempts.items()},
            "key_failures": dict(self.key_failures),
            "failed_keys": self.failed_keys,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(
            Counter(data["operations"]),
            data["retried"],
            Counter({int(k): v for k, v in data["attempts"].items()}),
            Counter(data["key_failures"]),
            data["failed_keys"],
        )


def fault_plan(operations: int, ramp: bool = False, seed: int = 7) -> list[str | None]:
    """Per call: ``"retry"`` (two keys fail the first attempt), ``"exhaust"`` (one key fails every attempt) or
    None. Without ``ramp``: calls 3, 13, 23, ... and 8, 28, 48, ... exhaust, every 5th other call (0, 5, ...)
    retries; with it the odds grow over the run (from 5% to 35% retrying, 1% to 8% exhausting), seeded."""
    if not ramp:
        return ["exhaust" if i % 10 == 3 or i % 20 == 8 else "retry" if i % 5 == 0 else None for i in range(operations)]
    rng = random.Random(seed)
    plan: list[str | None] = []
    for i in range(operations):
        x, share = rng.random(), i / max(1, operations - 1)
        exhaust, retry = 0.01 + 0.07 * share, 0.05 + 0.30 * share
        plan.append("exhaust" if x < exhaust else "retry" if x < exhaust + retry else None)
    return plan


def make_client(master: str, metadata: str, **kwargs: Any) -> tuple[MooncakeBatchClient, FaultInjectingStore]:
    """A client on ``master`` over a fault-injecting store (keyword arguments go to the client)."""
    holder: list[FaultInjectingStore] = []
    config = {
        "local_hostname": "127.0.0.1",
        "metadata_server": metadata,
        "master_server_address": master,
        "protocol": "tcp",
        "global_segment_size": 64 << 20,
        "local_buffer_size": 0,
        **CLIENT_SETTINGS,
    }

    def wrap(store: Any) -> FaultInjectingStore:
        holder.append(FaultInjectingStore(store, seed=1))
        return holder[0]

    client = MooncakeBatchClient(config, wrap_store=wrap, jitter=lambda: 0.5, **kwargs)
    return client, holder[0]


def run(
    client: MooncakeBatchClient,
    store: FaultInjectingStore,
    plan: list[str | None],
    keys_per_call: int = 20,
    seconds: float = 0.0,
) -> Tally:
    """Alternate put and get calls (a get reads the keys of the last clean put) with the faults of ``plan``,
    spread over ``seconds``; returns what the injector did."""
    import torch

    tally = Tally()
    prefix = uuid.uuid4().hex[:8]
    readable: list[str] = []
    metas: list[Any] = []
    began = time.monotonic()
    for i, fault in enumerate(plan):
        if seconds:
            time.sleep(max(0.0, began + seconds * i / len(plan) - time.monotonic()))
        op = Operation.GET if i % 2 and readable else Operation.PUT
        keys = readable if op is Operation.GET else [f"{prefix}-{i}-{k}" for k in range(keys_per_call)]
        store.clear_rules()
        if fault == "retry":
            code = RETRY_CODES[i % len(RETRY_CODES)]
            store.add_rule(FaultRule(code=int(code), keys=frozenset(keys[:2]), attempts=frozenset({1})))
        elif fault == "exhaust":
            store.add_rule(FaultRule(code=int(EXHAUST_CODES[op]), keys=frozenset(keys[:1])))
        store.injected.clear()
        store.calls.clear()
        outcome, written = Outcome.SUCCESS, metas
        try:
            if op is Operation.PUT:
                written = client.put(keys, [torch.full((16,), float(k)) for k in range(len(keys))])
            else:
                client.get(keys, custom_backend_meta=metas)
        except RetriesExhaustedError as exc:
            outcome, tally.failed_keys = Outcome.EXHAUSTED, tally.failed_keys + len(exc.failed)
        except BatchOperationError as exc:  # not planned; counted as the client reports it
            outcome, tally.failed_keys = exc.outcome, tally.failed_keys + len(exc.failed)
        calls = len(store.calls)
        if outcome is Outcome.SUCCESS and calls > 1:
            outcome = Outcome.SUCCESS_AFTER_RETRY
        if op is Operation.PUT and not outcome.failed:
            readable, metas = keys, written
        tally.operations[f"{op.value}/{outcome.value}"] += 1
        tally.retried += calls > 1
        tally.attempts.update(range(1, calls + 1))
        tally.key_failures.update({code.name: n for code, n in store.injected.items()})
    store.clear_rules()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True, help="master RPC address host:port")
    parser.add_argument("--metadata", required=True, help="metadata server URL (or P2PHANDSHAKE)")
    parser.add_argument("--operations", type=int, default=40, help="client calls to make")
    parser.add_argument("--keys", type=int, default=20, help="keys per call")
    parser.add_argument("--seconds", type=float, default=0.0, help="spread the calls over this long")
    parser.add_argument("--ramp", action="store_true", help="faults grow more frequent over the run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--wait", action="store_true", help="after the run, wait for a line on stdin")
    args = parser.parse_args(argv)

    from tq_mooncake import telemetry

    configured = telemetry.configure()
    client, store = make_client(args.master, args.metadata)
    try:
        tally = run(client, store, fault_plan(args.operations, args.ramp, args.seed), args.keys, args.seconds)
        configured.force_flush()
        out = tally.to_json() | {"pid": os.getpid(), "prometheus_port": configured.prometheus_port}
        print(json.dumps(out), flush=True)
        if args.wait:
            sys.stdin.readline()
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
