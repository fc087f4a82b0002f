"""The dashboard in Debian's headless Chromium: a real client process with injected faults exports metrics,
``tq-mooncake dashboard``'s command serves them on a free loopback port, and the tiles the browser shows
equal what the injector did; the storage nodes view shows its table. Uses the same code path as the README's
screenshot."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tq_mooncake.cluster import wait_until
from tq_mooncake.dashboard.launch import RunningApp
from tq_mooncake.dashboard.sample_run import Tally
from tq_mooncake.dashboard.screenshot import (
    CHROMEDRIVER,
    CHROMIUM,
    chromium,
    open_dashboard,
    read_tiles,
    screenshot,
)
from tq_mooncake.dashboard.store_health import parse_master_metrics
from tq_mooncake.dashboard.tiles import percent
from tq_mooncake.telemetry.conventions import Outcome

HOSTILE = "<img src=x onerror=window.__xss=1><script>window.__xss=1</script>"


def hostile_line(t_ns: int, name: str = "mooncake.client.keys", result: str = "ok", value: int = 5) -> str:
    """A process whose host name is markup (it must show up as text only) adding ``value`` to a put counter."""
    dp = {
        "attributes": [
            {"key": "mooncake.operation", "value": {"stringValue": "put"}},
            {
                "key": "mooncake.outcome" if name.endswith("operations") else "mooncake.result",
                "value": {"stringValue": result},
            },
        ],
        "startTimeUnixNano": str(t_ns - 10**9),
        "timeUnixNano": str(t_ns),
        "asInt": str(value),
    }
    metric = {"name": name, "sum": {"dataPoints": [dp], "aggregationTemporality": 2}}
    res = {"attributes": [{"key": "host.name", "value": {"stringValue": HOSTILE}}]}
    return json.dumps({"resourceMetrics": [{"resource": res, "scopeMetrics": [{"metrics": [metric]}]}]})


PAGE_JS = """
const metrics = {};
for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
  const label = m.querySelector('[data-testid="stMetricLabel"]');
  const value = m.querySelector('[data-testid="stMetricValue"]');
  if (label && value) metrics[label.innerText.trim()] = value.innerText.trim();
}
return {
  headings: Array.from(document.querySelectorAll("h3"), h => h.innerText.trim()),
  tables: document.querySelectorAll('[data-testid="stDataFrame"]').length,
  metrics: metrics,
  text: document.body.innerText,
};
"""
"""The page's h3 headings, its number of tables and its metrics (label -> value), in one WebDriver round trip."""


def node_line(t_ns: int) -> str:
    """The same process: 5 confirmed failures of a storage endpoint whose address is markup (text only, too)."""
    attrs = {"mooncake.operation": "get", "server.address": HOSTILE, "server.port": "12345"}
    dp = {
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()],
        "startTimeUnixNano": str(t_ns - 10**9),
        "timeUnixNano": str(t_ns),
        "asInt": "5",
    }
    metric = {"name": "mooncake.client.node.failures", "sum": {"dataPoints": [dp], "aggregationTemporality": 2}}
    res = {"attributes": [{"key": "host.name", "value": {"stringValue": HOSTILE}}]}
    return json.dumps({"resourceMetrics": [{"resource": res, "scopeMetrics": [{"metrics": [metric]}]}]})


def test_the_browser_shows_the_retry_and_exhaustion_rates_the_injector_caused(shared_master, faulty_run, tmp_path):
    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), "run `make setup` (chromium, chromium-driver)"
    folder = tmp_path / "telemetry"
    shutil.copytree(faulty_run[0], folder)  # this test adds files
    result = faulty_run[1]
    tally = Tally.from_json(result)
    assert tally.total == 40 and tally.retried == 14 and tally.outcome(Outcome.EXHAUSTED) == 6
    metrics_file = next(folder.glob("metrics-*.jsonl"))
    newest = max(int(dp["timeUnixNano"]) for dp in _points(metrics_file))
    (folder / "metrics-hostile-1.jsonl").write_text(hostile_line(newest) + "\n" + node_line(newest) + "\n")

    app_args = ["--dir", str(folder), "--refresh", "2", "--master-metrics", shared_master.metrics_url]
    with RunningApp(app_args, tmp_path / "dashboard.log") as app:
        assert app.command[app.command.index("--server.address") + 1] == "127.0.0.1"
        with chromium(tmp_path / "chromium-profile") as driver:
            tiles = open_dashboard(driver, app.url)
            # 10 clean calls more, appended while the page is open: auto-refresh picks them up
            with open(folder / "metrics-hostile-1.jsonl", "a") as f:
                f.write(hostile_line(time.time_ns(), "mooncake.client.operations", "success", 10) + "\n")
            wait_until(lambda: read_tiles(driver).get("Retry rate") == "28.0%", 30, "the page to refresh itself")
            # per host, storage nodes, recent failures and the newest one's attempts
            wait_until(lambda: driver.execute_script(PAGE_JS)["tables"] == 4, 30, "the page's four tables")
            page = driver.execute_script(PAGE_JS)
            master = parse_master_metrics(shared_master.metrics_text(), time.time())
            shot = screenshot(driver, tmp_path / "dashboard.png")
            xss = driver.execute_script("return window.__xss === undefined ? null : window.__xss")
            scripts = driver.execute_script(
                "return Array.from(document.scripts).filter(s => s.textContent.includes('__xss')).length"
            )

    assert tiles["Retry rate"] == percent(tally.retried / tally.total) == "35.0%"  # 14 / 40, then 14 / 50: 28.0%
    assert tiles["Exhaustion rate"] == percent(tally.outcome(Outcome.EXHAUSTED) / tally.total) == "15.0%"
    assert "Storage nodes" in page["headings"]  # and its table: the second one, after the per-host table
    assert page["metrics"]["Confirmed failures"] == "5" and page["metrics"]["Ejected now"] == "0"  # the client: 0
    assert xss is None and scripts == 0  # host and endpoint names were shown as text, never run
    # store health: the master's own figures, beside the client's
    assert {"Store health", "Retry rate and storage segments", "Recent failures"} <= set(page["headings"])
    assert page["metrics"]["Segments"] == f"{master.segments:,.0f}" and page["metrics"]["Keys"] == f"{master.keys:,.0f}"
    # recent failures: the 6 exhausted calls; the newest one's timeline opened, with its 3 attempts
    assert "6 call(s) in the window" in page["text"]
    assert page["metrics"]["Outcome"] == "exhausted" and page["metrics"]["Attempts"] == "3"
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _points(path: Path) -> list[dict]:
    return [
        dp
        for line in path.read_text().splitlines()
        for rm in json.loads(line)["resourceMetrics"]
        for sm in rm["scopeMetrics"]
        for metric in sm["metrics"]
        for dp in metric.get("sum", metric.get("histogram", {})).get("dataPoints", [])
    ]
