"""``tq-mooncake`` (``tq_mooncake.cli``): the verbs, their --help, and the dashboard's command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tq_mooncake.cli import main as cli
from tq_mooncake.dashboard.launch import dashboard_command
from tq_mooncake.dashboard.settings import parse_settings

SCRIPT = Path(sys.executable).with_name("tq-mooncake")


@pytest.mark.parametrize("verb", [[], ["dashboard"], ["storage-node"]])
def test_every_verb_has_help(verb):
    done = subprocess.run([str(SCRIPT), *verb, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    if verb == ["dashboard"]:
        assert "--prometheus URL" in done.stdout and "--dir DIR" in done.stdout
    if verb == ["storage-node"]:
        assert "--segment" in done.stdout and "--master" in done.stdout


def test_the_dashboard_runs_streamlit_headless_on_loopback_with_the_source_flags(tmp_path):
    settings = parse_settings(["--dir", str(tmp_path), "--window", "1h", "--alert-retry-rate", "0.2"], {})
    command = dashboard_command(settings, port=8600)
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"] and Path(command[4]).name == "app.py"
    options = dict(zip(command[5::2], command[6::2], strict=False))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8600"
    assert options["--server.headless"] == "true" and options["--browser.gatherUsageStats"] == "false"
    app_args = command[command.index("--") + 1 :]
    assert parse_settings(app_args, {}) == settings  # the script reads back exactly what was asked
    prometheus = parse_settings(["--prometheus", "http://127.0.0.1:9090"], {"TQ_MOONCAKE_TELEMETRY_DIR": "/data"})
    assert prometheus.prometheus == "http://127.0.0.1:9090" and prometheus.folder == "/data"
    assert parse_settings([], {}).folder == "telemetry-data"


def test_unknown_options_are_refused():
    with pytest.raises(SystemExit) as exc:
        cli.main(["dashboard", "--no-such-flag"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["no-such-verb"])


def test_a_batch_count_below_one_is_refused():
    for value in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--batches", value, "--no-dashboard"])
        assert exc.value.code == 2
