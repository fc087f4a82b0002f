"""A faulty run against a real master, with the file pipeline ``configure()`` builds (``file_pipeline``): rotated,
bounded files; every retried call's whole trace kept, clean ones sampled; the metrics complete, read back by the
dashboard's file source across rotated and logrotated files."""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch

from tq_mooncake.client import ErrorCode, FaultInjectingStore, FaultRule, MooncakeBatchClient
from tq_mooncake.dashboard.failures import SHOWN_OUTCOMES
from tq_mooncake.dashboard.sources import FileSource
from tq_mooncake.dashboard.trace_files import TraceFileSource
from tq_mooncake.telemetry import conventions as c
from tq_mooncake.telemetry.pipeline import build_resource, file_pipeline, telemetry_files
from tq_mooncake.telemetry.rotating_file import Retention, backups_of

CALLS = 150  # puts, then as many gets
CLEAN_RATIO = 0.2


def spans_in(folder: Path) -> list[dict]:
    """Every span of every trace file in ``folder`` (active, rotated and logrotated), with attributes as a dict."""
    out = []
    for path in folder.glob("traces-*"):
        for line in path.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for s in ss["spans"]:
                        attrs = {a["key"]: next(iter(a["value"].values())) for a in s.get("attributes", [])}
                        out.append({**s, "attributes": attrs})
    return out


def test_a_faulty_run_keeps_every_retried_calls_trace_in_bounded_files_and_every_call_in_metrics(
    shared_master, tmp_path
):
    folder = tmp_path / "telemetry"
    retention = Retention(max_file_bytes=64 << 10, max_backups=100, max_total_bytes=16 << 20)  # nothing expires
    tracer_provider, meter_provider = file_pipeline(
        folder,
        resource=build_resource("bounded-run"),
        metric_export_interval_s=3600,  # exported when the test flushes: every 10 calls
        retention=retention,
        clean_trace_ratio=CLEAN_RATIO,
    )
    trace_file, metrics_file = telemetry_files(folder)
    stores: list[FaultInjectingStore] = []
    client = MooncakeBatchClient(
        shared_master.client_config(retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002}, batch_size=4),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        wrap_store=lambda s: stores.append(FaultInjectingStore(s, seed=5)) or stores[0],
    )
    try:
        stores[0].add_rule(FaultRule(code=int(ErrorCode.TRANSFER_FAIL), fraction=0.03, attempts=frozenset({1})))
        metas = []
        for i in range(CALLS):
            keys = [f"bounded-{i}-{j}" for j in range(8)]
            metas.append((keys, client.put(keys, [torch.full((16,), float(i)) for _ in keys])))
            if i % 10 == 9:
                tracer_provider.force_flush()
                meter_provider.force_flush()
            if i == CALLS // 2:
                os.rename(trace_file, trace_file.with_name(trace_file.name + ".1"))  # logrotate, no signal
        for i, (keys, meta) in enumerate(metas):
            got = client.get(keys, custom_backend_meta=meta)
            assert all(torch.equal(g, torch.full((16,), float(i))) for g in got)
            if i % 10 == 9:
                meter_provider.force_flush()
    finally:
        client.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    # bounded: rotated by size, the logrotated file left where logrotate put it, writing resumed at the path
    assert backups_of(trace_file) and backups_of(metrics_file)
    assert trace_file.with_name(trace_file.name + ".1").stat().st_size > 0 and trace_file.stat().st_size > 0
    for path in folder.iterdir():  # a file holds at most max_file_bytes, or one line (never split) that is bigger
        assert path.stat().st_size <= retention.max_file_bytes or path.read_text().count("\n") == 1, path.name

    # metrics: every call, read back by the dashboard across the rotated files
    snapshot = FileSource(folder).load(0, math.inf)
    outcomes: Counter[tuple[str, str]] = Counter()
    for inc in snapshot.increments:
        if inc.metric == c.OPERATIONS_METRIC:
            outcomes[(inc.attr(c.OPERATION), inc.attr(c.OUTCOME))] += inc.value
    assert sum(outcomes.values()) == 2 * CALLS and snapshot.skipped_lines == 0
    retried_calls = sum(n for (_, outcome), n in outcomes.items() if outcome != "success")
    assert retried_calls >= 5, outcomes  # the faults fired

    # spans: each retried call whole (its operation span and every attempt), clean ones at about the ratio
    spans = spans_in(folder)
    ops = [s for s in spans if s["name"] in ("mooncake.put", "mooncake.get")]
    children: dict[str, int] = defaultdict(int)
    for s in spans:
        if s["name"].endswith(".attempt"):
            children[s["parentSpanId"]] += 1
    kept_retried = Counter(
        (s["attributes"][c.DB_OPERATION_NAME], s["attributes"][c.OUTCOME])
        for s in ops
        if s["attributes"][c.OUTCOME] != "success"
    )
    assert kept_retried == {k: v for k, v in outcomes.items() if k[1] != "success"}  # 100% kept
    for s in ops:
        assert children[s["spanId"]] == int(s["attributes"][c.ATTEMPTS]), s["attributes"]
    assert len(children) == len(ops)  # no attempt without its operation span
    # the dashboard's recent calls: the same, whole, read across the rotated and logrotated span files
    calls = TraceFileSource(folder).load(0, math.inf, SHOWN_OUTCOMES).calls
    assert Counter((call.operation, call.outcome) for call in calls) == kept_retried
    assert all(call.complete and len(call.attempts) == call.attempt_count for call in calls)
    clean_calls = 2 * CALLS - retried_calls
    clean_kept = sum(1 for s in ops if s["attributes"][c.OUTCOME] == "success")
    assert 0.08 * clean_calls < clean_kept < 0.35 * clean_calls, (clean_kept, clean_calls)
