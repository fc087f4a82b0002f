"""The dashboard in a real browser: start the app on a free loopback port, open it in Debian's headless
Chromium (Selenium with ``/usr/bin/chromedriver``; no browser is ever downloaded), wait for the tiles, read
them and save a screenshot. The browser test and the README's picture use this same code:

    python -m tq_mooncake.dashboard.screenshot --out docs/dashboard.png

starts a ``mooncake_master`` on loopback with two storage processes and the dashboard (polling the master's metrics
endpoint), opens the page, runs two faulty workloads (``sample_run``, faults growing over the run) that export to a
temp folder, kills one storage process half-way, and saves a screenshot of the whole page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tq_mooncake.cluster import MasterProcess, StorageNodeProcess, start_all, stop_all, wait_until

from .launch import RunningApp

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
TILE_LABELS = ("Operations/s", "Retry rate", "Exhaustion rate", "Key failures/s", "p50 latency", "p99 latency")


@contextlib.contextmanager
def chromium(user_data_dir: Path, width: int = 1600, height: int = 2000) -> Iterator[Any]:
    """A Selenium driver for Debian's headless Chromium with a fresh profile in ``user_data_dir``; quit on exit.
    Fails (never downloads) when ``/usr/bin/chromium`` or ``/usr/bin/chromedriver`` is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).is_file():
            raise FileNotFoundError(
                f"{binary} is missing: run `make setup` (Debian packages chromium, chromium-driver)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def read_tiles(driver: Any) -> dict[str, str]:
    """Tile label -> the value it shows, for the tiles on the page now."""
    from selenium.webdriver.common.by import By

    tiles = {}
    for metric in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        label = metric.find_elements(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]')
        value = metric.find_elements(By.CSS_SELECTOR, '[data-testid="stMetricValue"]')
        if label and value:
            tiles[label[0].text.strip()] = value[0].text.strip()
    return tiles


def _settled(driver: Any, charts: int) -> bool:
    """Every tile shown, ``charts`` charts drawn, the table drawn, and no script run in progress."""
    from selenium.webdriver.common.by import By

    if set(TILE_LABELS) - set(read_tiles(driver)):
        return False
    drawn = driver.find_elements(
        By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg'
    )
    grids = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"] canvas')
    running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] button')
    return len(drawn) >= charts and bool(grids) and not running


def open_dashboard(driver: Any, url: str, timeout: float = 60.0, charts: int = 4) -> dict[str, str]:
    """Load ``url``, wait (polling) until the page has settled, and return its tiles."""
    driver.get(url)
    wait_until(lambda: _settled(driver, charts), timeout, "the dashboard's tiles and charts", interval=0.2)
    return read_tiles(driver)


def fit_page(driver: Any, charts: int, width: int = 1600, timeout: float = 60.0) -> None:
    """Make the window as tall as the page's content (Streamlit scrolls inside its own container, so a screenshot
    holds only the window), then wait until it has settled again."""
    height = driver.execute_script(
        "const c = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
        "return c ? c.scrollHeight : document.body.scrollHeight;"
    )
    driver.set_window_size(width, int(height) + 200)
    wait_until(lambda: _settled(driver, charts), timeout, "the resized page", interval=0.2)


def screenshot(driver: Any, out: Path) -> Path:
    """Save what the browser shows as a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out)):
        raise RuntimeError(f"could not save a screenshot to {out}")
    return out


def run_workloads(master: MasterProcess, folder: Path, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``sample_run`` processes side by side, exporting into ``folder``; each spec gives ``service``,
    ``operations``, ``seconds``, ``ramp``, ``seed`` (and optionally ``env``). Returns their JSON tallies."""
    procs = []
    for spec in specs:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TQ_MOONCAKE_"))}
        env.update(TQ_MOONCAKE_TELEMETRY_DIR=str(folder), OTEL_SERVICE_NAME=spec.get("service", "demo"))
        env["OTEL_METRIC_EXPORT_INTERVAL"] = "1000"
        env.update(spec.get("env", {}))
        args = [sys.executable, "-m", "tq_mooncake.dashboard.sample_run", "--master", master.address]
        args += ["--metadata", master.metadata_server, "--operations", str(spec.get("operations", 40))]
        args += ["--seconds", str(spec.get("seconds", 0)), "--seed", str(spec.get("seed", 7))]
        args += ["--ramp"] if spec.get("ramp") else []
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"sample_run exited with {proc.returncode}:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def make_screenshot(out: Path, seconds: float = 120.0, window: str = "all") -> dict[str, str]:
    """The README's picture: a master (``client_ttl`` 2 s) with two storage processes, the dashboard on them, two
    ramping workloads over ``seconds`` with one storage process killed half-way, then a screenshot of the page."""
    with tempfile.TemporaryDirectory(prefix="tq-dashboard-") as tmp:
        work = Path(tmp)
        folder = work / "telemetry"
        folder.mkdir()
        with MasterProcess(work, client_ttl=2).start() as master:
            nodes = [StorageNodeProcess(master, work, "64MB") for _ in range(2)]
            start_all(nodes)
            app_args = ["--dir", str(folder), "--window", window, "--refresh", "2"]
            app_args += ["--master-metrics", master.metrics_url]
            try:
                with RunningApp(app_args, work / "dashboard.log") as app, chromium(work / "chromium") as driver:
                    driver.get(app.url)  # the page starts the dashboard's poller of the master
                    ops = int(seconds * 4)
                    specs = [
                        {"service": "trainer", "operations": ops, "seconds": seconds, "ramp": True, "seed": 3},
                        {"service": "rollout", "operations": ops // 2, "seconds": seconds, "ramp": False, "seed": 5},
                    ]
                    done: list[Any] = []

                    def workloads() -> None:
                        try:
                            done.append(run_workloads(master, folder, specs))
                        except BaseException as exc:  # noqa: BLE001 - raised again below, on this thread
                            done.append(exc)

                    runner = threading.Thread(target=workloads)
                    runner.start()
                    runner.join(seconds / 2)
                    nodes[0].kill()  # SIGKILL: the master drops its segment after client_ttl
                    runner.join()
                    if isinstance(done[0], BaseException):
                        raise done[0]
                    tiles = open_dashboard(driver, app.url, charts=8)
                    fit_page(driver, charts=8)
                    screenshot(driver, out)
            finally:
                stop_all(nodes)
    return tiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the dashboard screenshot (docs/dashboard.png).")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the sample workloads run")
    parser.add_argument("--window", default="all", help="the dashboard's time window")
    args = parser.parse_args(argv)
    began = time.monotonic()
    tiles = make_screenshot(args.out, args.seconds, args.window)
    print(json.dumps({"out": str(args.out), "tiles": tiles, "seconds": round(time.monotonic() - began, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
