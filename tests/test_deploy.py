"""The cluster recipe (Dockerfile, docker-compose.yml, deploy/): no Docker engine runs here, so these tests check
what can be checked without one: the files parse, name each other consistently (services, ports, volumes,
mounted files), every image is pinned, every published port is on 127.0.0.1, the commands are valid
``tq-mooncake`` / ``mooncake_master`` invocations, Prometheus accepts its config (Debian's ``promtool``), and the
series the dashboard queries are the Prometheus names of ``telemetry/conventions.py``."""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tq_mooncake.cli import main as cli
from tq_mooncake.dashboard import sources
from tq_mooncake.dashboard.metrics import BUCKET, COUNT, WANTED
from tq_mooncake.dashboard.settings import settings_from
from tq_mooncake.telemetry import conventions as c

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COLLECTOR = ROOT / "deploy" / "otel-collector.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMTOOL = Path("/usr/bin/promtool")
MASTER = "mooncake-master"
COLLECTOR_SERVICE = "otel-collector"
EXTERNAL_IMAGES = {
    "otel-collector": "otel/opentelemetry-collector-contrib",
    "jaeger": "jaegertracing/all-in-one",
    "prometheus": "prom/prometheus",
}
PROMETHEUS_PORT = 9090  # prom/prometheus' --web.listen-address default
JAEGER_UI_PORT = 16686  # jaegertracing/all-in-one: UI and HTTP query API


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _load(path: Path) -> Any:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return _load(COLLECTOR)


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return _load(PROMETHEUS)


def _our_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run our image (built from the Dockerfile)."""
    return {name: s for name, s in services.items() if "build" in s}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict."""
    out = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"expected --flag=value, got {arg!r}"
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _exposed(service: dict[str, Any]) -> set[int]:
    """Container ports a service declares: ``expose`` and the container side of ``ports``."""
    ports = {int(p) for p in service.get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(source, target)`` of every short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target = entry.split(":")[:2]
        out.append((source, target))
    return out


def _depends(service: dict[str, Any]) -> list[str]:
    depends = service.get("depends_on", [])
    return list(depends) if isinstance(depends, (list, dict)) else []


def _master_flags(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return _flags(_command(services[MASTER]))


# ------------------------------------------------------------------------------------------------ parsing


def test_every_file_parses_and_compose_has_the_services(services: dict[str, dict[str, Any]]) -> None:
    assert _load(COLLECTOR)["service"] and _load(PROMETHEUS)["scrape_configs"]
    assert {
        MASTER,
        "storage-node-1",
        "storage-node-2",
        "workload",
        COLLECTOR_SERVICE,
        "jaeger",
        "prometheus",
        "dashboard",
    } <= set(services)


def test_depends_on_names_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency in _depends(service):
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
            assert dependency != name
    assert set(_depends(services["storage-node-1"])) == {MASTER}
    assert {"storage-node-1", "storage-node-2", COLLECTOR_SERVICE} <= set(_depends(services["workload"]))


def test_mounted_files_exist_and_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    bind_mounts = 0
    for name, service in services.items():
        for source, _ in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file(), f"{name} mounts {source}, which is not a file in the repository"
                bind_mounts += 1
            else:
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    assert bind_mounts >= 2
    targets = {target for source, target in _mounts(services[COLLECTOR_SERVICE]) if source.startswith(".")}
    assert any(f"--config={t}" in _command(services[COLLECTOR_SERVICE]) for t in targets)


# ------------------------------------------------------------------------------------------------ images, ports


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    version = PYPROJECT["project"]["version"]
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.fullmatch(r"v?\d+(\.\d+){1,3}", tag), f"{name}: {image!r} is not a version tag"
        if "build" in service:
            assert image == f"tq-mooncake:{version}", f"{name} should build tq-mooncake:{version}"
        else:
            assert repo == EXTERNAL_IMAGES[name], f"{name} runs {repo}"


def test_every_published_port_is_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            assert isinstance(entry, str), f'{name}: use the "127.0.0.1:HOST:CONTAINER" form, not {entry!r}'
            match = re.fullmatch(r"127\.0\.0\.1:(\d+):(\d+)", entry)
            assert match, f"{name} publishes {entry!r}, not bound to 127.0.0.1"
            published[int(match[1])] = name
    assert published[JAEGER_UI_PORT] == "jaeger" and published[PROMETHEUS_PORT] == "prometheus"
    assert published[8501] == "dashboard"


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_installs_the_extras_and_pins_torch(services: dict[str, dict[str, Any]]) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert re.search(r"apt-get install [^\n]*libibverbs1 librdmacm1", text)
    assert re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", text)
    assert '.[cpu,telemetry,dashboard]"' in text
    assert re.search(r"^ENTRYPOINT \[\"tq-mooncake\"\]$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the collector (uid 10001) and our user share the telemetry volume
    assert users[-1].split(":")[0] == "10001"
    assert "chown 10001:10001 /telemetry" in " ".join(services["telemetry-volume"]["entrypoint"])


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them(services: dict[str, dict[str, Any]]) -> None:
    text = DOCKERFILE.read_text()
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    build_commands = {
        v.rsplit(".", 1)[0].replace(".", "/") + ".py" for v in PYPROJECT["tool"]["setuptools"]["cmdclass"].values()
    }
    assert package_dirs | build_commands | {"pyproject.toml", "README.md"} <= copied
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "telemetry-data"} <= ignored
    assert not copied & ignored
    for name, service in _our_services(services).items():
        assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "Dockerfile", name


# ------------------------------------------------------------------------------------------------ mooncake_master


def test_master_flags_are_known_to_the_binary_and_bind_the_container_network(
    services: dict[str, dict[str, Any]],
) -> None:
    master = services[MASTER]
    assert master["entrypoint"] == ["mooncake_master"]
    flags = _master_flags(services)
    binary = Path(sys.executable).with_name("mooncake_master")
    assert binary.exists(), "mooncake_master is not installed in this environment (the cpu extra)"
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    known = set(re.findall(r"^\s+-(\w+) \(", help_text.stdout + help_text.stderr, re.M))
    assert len(known) > 50, "could not read mooncake_master --help"
    assert set(flags) <= known, f"flags mooncake_master does not know: {sorted(set(flags) - known)}"
    assert flags["rpc_address"] == "0.0.0.0" and flags["http_metadata_server_host"] == "0.0.0.0"
    assert flags["enable_http_metadata_server"] == "true"
    assert int(flags["client_ttl"]) > 0
    assert {int(flags["rpc_port"]), int(flags["http_metadata_server_port"])} <= _exposed(master)
    health = " ".join(master["healthcheck"]["test"])
    assert f"127.0.0.1:{flags['metrics_port']}/health" in health


# ------------------------------------------------------------------------------------------------ tq-mooncake commands


def _run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``cli.main(argv)`` with its parsing and passthrough rules, stopping before the verb runs."""
    seen: list[tuple[argparse.Namespace, list[str]]] = []

    def capture(args: argparse.Namespace, rest: list[str]) -> int:
        seen.append((args, rest))
        return 0

    for runner in ("_run_demo", "_run_workload", "_run_dashboard", "_run_storage_node"):
        monkeypatch.setattr(cli, runner, capture)
    assert cli.main(argv) == 0
    return seen[0]


def test_cli_parsing_helper_rejects_a_renamed_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        _run_cli(monkeypatch, ["workload", "--master-address", "x:1"])
    with pytest.raises(SystemExit):
        _run_cli(monkeypatch, ["dashboard", "--prometheus-url", "http://x"])


def test_storage_nodes_point_at_the_master(
    monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]
) -> None:
    from tq_mooncake.client import store
    from tq_mooncake.cluster import storage_node

    flags = _master_flags(services)
    configs = []

    class Stop(Exception):
        pass

    def fake_connect(config: Any) -> None:
        configs.append(config)
        raise Stop

    monkeypatch.setattr(store, "connect_store", fake_connect)
    for name in ("storage-node-1", "storage-node-2"):
        command = _command(services[name])
        assert "entrypoint" not in services[name] and command[0] == "storage-node"
        args, rest = _run_cli(monkeypatch, command)
        assert args.verb == "storage-node" and not args.help
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            with pytest.raises(Stop):  # the storage node's own parser accepted every flag
                storage_node.main(rest)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        config = configs[-1]
        assert config.master_server_address == f"{MASTER}:{flags['rpc_port']}"
        assert config.metadata_server == f"http://{MASTER}:{flags['http_metadata_server_port']}/metadata"
        assert config.local_hostname == name  # other containers reach its segment by service name
        assert config.global_segment_size > 0


def test_workload_command_and_its_otlp_endpoint(
    monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[str, Any]], collector: dict[str, Any]
) -> None:
    workload = services["workload"]
    args, rest = _run_cli(monkeypatch, _command(workload))
    flags = _master_flags(services)
    assert args.verb == "workload" and rest == []
    assert args.master == f"{MASTER}:{flags['rpc_port']}"
    assert args.metadata == f"http://{MASTER}:{flags['http_metadata_server_port']}/metadata"
    assert args.host == "workload" and args.replica_num == 2
    assert args.fault_rate > 0 and args.exhaust_rate > 0 and args.duration is None

    env = workload["environment"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    http_receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint.scheme == "http" and endpoint.path in ("", "/")
    assert endpoint.hostname == COLLECTOR_SERVICE and endpoint.port == _host_port(http_receiver)[1]
    assert endpoint.port in _exposed(services[COLLECTOR_SERVICE])
    # configure(service_name=--service-name) wins over OTEL_SERVICE_NAME: keep them equal
    assert env["OTEL_SERVICE_NAME"] == args.service_name
    assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]) > 0


def test_dashboard_command_reads_the_prometheus_and_jaeger_services(
    monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]
) -> None:
    dashboard = services["dashboard"]
    args, rest = _run_cli(monkeypatch, _command(dashboard))
    assert args.verb == "dashboard" and rest == []
    url = urlsplit(settings_from(args, environ={}).prometheus or "")
    assert url.hostname == "prometheus" and url.port == PROMETHEUS_PORT
    assert PROMETHEUS_PORT in _exposed(services["prometheus"])
    assert not any(a.startswith("--web.listen-address") for a in _command(services["prometheus"]))
    assert args.address == "0.0.0.0"  # inside its container; published on 127.0.0.1 only
    assert f"127.0.0.1:{args.port}:{args.port}" in dashboard["ports"]
    assert "prometheus" in _depends(dashboard)
    # recent failures from Jaeger's query API, by service name; links to the UI where the browser reaches it
    settings = settings_from(args, environ={})
    api, ui = urlsplit(settings.jaeger or ""), urlsplit(settings.jaeger_ui or "")
    assert (api.hostname, api.port) == ("jaeger", JAEGER_UI_PORT) and "jaeger" in _depends(dashboard)
    assert (ui.hostname, ui.port) == ("127.0.0.1", JAEGER_UI_PORT)
    assert f"127.0.0.1:{JAEGER_UI_PORT}:{JAEGER_UI_PORT}" in services["jaeger"]["ports"]


# ------------------------------------------------------------------------------------------------ collector


def test_collector_pipelines_use_defined_components(collector: dict[str, Any]) -> None:
    pipelines = collector["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind, components in used.items():
            for component in pipeline.get(kind, []):
                assert component in (collector.get(kind) or {}), f"pipeline {name}: {kind[:-1]} {component} undefined"
                components.add(component)
        assert pipeline["processors"][0] == "memory_limiter" and "batch" in pipeline["processors"]
    for kind, components in used.items():
        assert set(collector[kind]) == components, f"{kind} defined but unused: {set(collector[kind]) - components}"
    assert {e.split("/")[0] for e in pipelines["traces"]["exporters"]} == {"otlp", "file"}
    assert {e.split("/")[0] for e in pipelines["metrics"]["exporters"]} == {"prometheus", "file"}


def test_collector_endpoints_name_compose_services_and_ports(
    collector: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert _host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert _host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)
    assert {4317, 4318} <= _exposed(services[COLLECTOR_SERVICE])

    (trace_exporter,) = [e for e in collector["service"]["pipelines"]["traces"]["exporters"] if e.startswith("otlp")]
    jaeger = collector["exporters"][trace_exporter]
    host, port = _host_port(jaeger["endpoint"])
    assert host == "jaeger" and port == 4317 and port in _exposed(services[host])
    assert jaeger["tls"]["insecure"] is True
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert trace_exporter.split("/")[0] == "otlp" and host in _depends(services[COLLECTOR_SERVICE])


def test_file_exporters_write_json_lines_to_the_shared_volume(
    collector: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    files = {name: e for name, e in collector["exporters"].items() if name.split("/")[0] == "file"}
    assert {e["path"] for e in files.values()} == {"/telemetry/metrics.jsonl", "/telemetry/traces.jsonl"}
    assert all(e.get("format", "json") == "json" and "compression" not in e for e in files.values())
    collector_volumes = dict(_mounts(services[COLLECTOR_SERVICE]))
    dashboard_volumes = dict(_mounts(services["dashboard"]))
    shared = {v for v in collector_volumes if not v.startswith(".")} & set(dashboard_volumes)
    assert shared, "the collector and the dashboard share no volume"
    (volume,) = shared
    for exporter in files.values():
        assert Path(exporter["path"]).parent == Path(collector_volumes[volume])


# ------------------------------------------------------------------------------------------------ Prometheus


def test_promtool_accepts_the_prometheus_config() -> None:
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: run `make setup` (Debian package prometheus)"
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_collector_exporter(
    prometheus: dict[str, Any], collector: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    exporter_port = _host_port(collector["exporters"]["prometheus"]["endpoint"])[1]
    assert set(_scrape_jobs(prometheus)) == {COLLECTOR_SERVICE, MASTER}
    job = _scrape_jobs(prometheus)[COLLECTOR_SERVICE]
    assert _targets(job) == [f"{COLLECTOR_SERVICE}:{exporter_port}"]
    assert exporter_port in _exposed(services[COLLECTOR_SERVICE])
    # The dashboard keys series by (job, instance) and joins target_info on them: the exporter's labels must
    # survive the scrape, and target_info must not be replaced by resource labels on every series.
    assert job["honor_labels"] is True
    assert collector["exporters"]["prometheus"].get("enable_target_info", True) is True
    interval = job.get("scrape_interval", prometheus["global"]["scrape_interval"])
    assert re.fullmatch(r"\d+s", interval) and int(interval[:-1]) <= 15


def test_prometheus_scrapes_the_masters_metrics_port(
    prometheus: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """The dashboard's store health in Prometheus mode reads what this job scrapes from the master."""
    flags = _master_flags(services)
    job = _scrape_jobs(prometheus)[MASTER]
    assert _targets(job) == [f"{MASTER}:{flags['metrics_port']}"]
    assert int(flags["metrics_port"]) in _exposed(services[MASTER]) and flags["metrics_host"] == "0.0.0.0"
    assert job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http"
    assert not job.get("honor_labels", False)  # the master sets no job/instance: Prometheus' own label it
    interval = job.get("scrape_interval", prometheus["global"]["scrape_interval"])
    assert re.fullmatch(r"\d+s", interval) and int(interval[:-1]) <= 15


def _scrape_jobs(prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert len(jobs) == len(prometheus["scrape_configs"]), "two scrape jobs share a name"
    return jobs


def _targets(job: dict[str, Any]) -> list[str]:
    return [t for static in job.get("static_configs", []) for t in static["targets"]]


def _prometheus_name(metric: str) -> str:
    """The Prometheus exporters' translation of an OTel metric name (telemetry/CONVENTIONS.md)."""
    name = metric.replace(".", "_")
    unit = c.UNITS[metric]
    suffix = {"s": "seconds", "By": "bytes"}.get(unit, "")
    if suffix and not name.endswith(f"_{suffix}"):
        name += f"_{suffix}"
    counters = set(c.UNITS) - set(c.HISTOGRAMS) - set(c.GAUGES)
    return name + "_total" if metric in counters else name


def test_dashboard_queries_the_prometheus_names_of_the_conventions(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {}
    for wanted in WANTED:
        metric, _, part = wanted.partition("#")
        series = _prometheus_name(metric) + {"": "", BUCKET[1:]: "_bucket", COUNT[1:]: "_count"}[part]
        expected[series] = wanted
    assert sources.PROMETHEUS_SERIES == expected
    conventions_md = (ROOT / "telemetry" / "CONVENTIONS.md").read_text()
    for metric in c.UNITS:
        assert f"`{_prometheus_name(metric)}" in conventions_md, metric

    queries: list[str] = []

    def fake_query_range(self: sources.PrometheusSource, query: str, *_: Any) -> list[dict[str, Any]]:
        queries.append(query)
        return []

    monkeypatch.setattr(sources.PrometheusSource, "query_range", fake_query_range)
    sources.PrometheusSource("http://prometheus:9090").load(0.0, 60.0)
    (query,) = queries
    names = set(re.fullmatch(r'\{__name__=~"(.+)"\}', query)[1].split("|"))  # type: ignore[index]
    assert names == set(expected) | {"target_info"}
    assert sources.PROMETHEUS_LABELS.keys() >= {_label(k) for k in c.METRIC_ATTRIBUTES[c.ATTEMPTS_METRIC]}


def _label(attribute: str) -> str:
    return attribute.replace(".", "_")
