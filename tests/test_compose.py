"""deploy/compose.yaml, the Dockerfile and the configs they mount agree with each other.

No Docker here: the files are parsed and cross-checked (mounted paths exist, ports are unique,
images are pinned, every address one service uses is a service and a port the other one listens
on), Prometheus's and Alertmanager's configs are checked by promtool and amtool in the layout
the containers see, and the image's HEALTHCHECK command is run against a real socket.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COLLECTOR_CONFIG = ROOT / "otel-collector.yaml"
BUILDER_MANIFEST = DEPLOY / "otelcol" / "builder-config.yaml"
SEED_PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE_PROMETHEUS = DEPLOY / "compose" / "prometheus.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")

# `streambus serve`'s defaults (README.md, streambus/config.py).
BROKER_PORT_DEFAULT = 9092
BROKER_METRICS_PORT_DEFAULT = 9090
RAFT_PORT_DEFAULT = 9193

# The three brokers of the cluster, node N as service streambus-N.
BROKERS = ["streambus-1", "streambus-2", "streambus-3"]


# ------------------------------------------------------------------------------------ helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]

_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment: the defaults."""
    return _COMPOSE_VAR.sub(lambda m: m.group(3) or "", value)


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): interpolate(str(value)) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/", "~"))

    @property
    def host_path(self) -> Path:
        # Relative bind sources are relative to the compose file's directory.
        return (COMPOSE_FILE.parent / self.source).resolve()


def mounts(service: str) -> list[Mount]:
    found = []
    for volume in SERVICES[service].get("volumes", []):
        if isinstance(volume, dict):
            found.append(Mount(str(volume["source"]), str(volume["target"])))
        else:
            source, target, *_mode = str(volume).split(":")
            found.append(Mount(source, target))
    return found


@dataclass(frozen=True)
class Port:
    host: int | None
    container: int
    protocol: str


def ports(service: str) -> list[Port]:
    found = []
    for entry in SERVICES[service].get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            found.append(
                Port(
                    int(published) if published is not None else None,
                    int(entry["target"]),
                    entry.get("protocol", "tcp"),
                )
            )
            continue
        # Unquoted "a:b" is a YAML 1.1 base-60 integer: compose files quote port mappings.
        assert isinstance(entry, str), f"{service}: quote the port mapping {entry!r}"
        mapping, _, protocol = entry.partition("/")
        parts = mapping.split(":")
        assert all(p.isdigit() for p in parts[-2:]), f"{service}: unsupported mapping {entry!r}"
        host = int(parts[-2]) if len(parts) >= 2 else None
        found.append(Port(host, int(parts[-1]), protocol or "tcp"))
    return found


def container_ports(service: str) -> set[int]:
    return {port.container for port in ports(service)}


def image_tag(service: str) -> tuple[str, str]:
    image = SERVICES[service]["image"]
    name, sep, tag = image.rpartition(":")
    assert sep, f"{service}: image {image!r} has no tag"
    return name, tag


def option(command: list[str], flag: str) -> str | None:
    """The value of --flag=value or --flag value in a container command."""
    for index, arg in enumerate(command):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(command):
            return command[index + 1]
    return None


def command(service: str) -> list[str]:
    value = SERVICES[service].get("command", [])
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


_COLLECTOR_VAR = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def collector_config() -> dict[str, Any]:
    """otel-collector.yaml with ${env:NAME:-default} resolved as in the otel-collector service."""
    env = environment("otel-collector")
    text = COLLECTOR_CONFIG.read_text(encoding="utf-8")
    resolved = _COLLECTOR_VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), text)
    config: dict[str, Any] = yaml.safe_load(resolved)
    return config


def scrape_targets(config: dict[str, Any], job: str) -> list[str]:
    for scrape in config["scrape_configs"]:
        if scrape["job_name"] == job:
            return [t for static in scrape["static_configs"] for t in static["targets"]]
    raise AssertionError(f"no scrape job {job!r}")


def scrape_job(config: dict[str, Any], job: str) -> dict[str, Any]:
    return next(s for s in config["scrape_configs"] if s["job_name"] == job)


# --- the Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        assert self.args.startswith("["), f"{self.keyword} should use the exec (JSON) form"
        value = json.loads(self.args)
        assert isinstance(value, list)
        return [str(v) for v in value]


def dockerfile() -> list[Instruction]:
    instructions = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines are dropped, inside continuations too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return instructions


def instructions(keyword: str) -> list[Instruction]:
    return [i for i in dockerfile() if i.keyword == keyword]


def healthcheck_command() -> list[str]:
    (check,) = instructions("HEALTHCHECK")
    _options, sep, cmd = check.args.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    return Instruction("CMD", cmd.strip()).exec_form()


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins;
    a rule matching a parent directory applies to everything under it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
                if pattern.startswith("/", i):
                    out += "/?"
                    i += 1
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, regex(pattern)))
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


# -------------------------------------------------------------------------------- the tests


def test_every_service_is_an_image_or_a_build() -> None:
    assert set(SERVICES) == {
        *BROKERS,
        "otel-collector",
        "jaeger",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    for name, service in SERVICES.items():
        assert ("image" in service) != ("build" in service), name


def test_bind_mounted_paths_exist() -> None:
    binds = [(name, m) for name in SERVICES for m in mounts(name) if m.is_bind]
    assert binds
    for name, mount in binds:
        assert mount.host_path.exists(), f"{name}: {mount.source} does not exist"
        assert mount.host_path.is_relative_to(ROOT), f"{name}: {mount.source} is outside the repo"
    named = {m.source for name in SERVICES for m in mounts(name) if not m.is_bind}
    assert named <= set(COMPOSE.get("volumes") or {}), "named volumes must be declared"
    for broker in BROKERS:
        build = SERVICES[broker]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_host_ports_are_unique_and_each_broker_publishes_its_own() -> None:
    published = [(port.host, name) for name in SERVICES for port in ports(name) if port.host]
    hosts = [host for host, _ in published]
    assert len(hosts) == len(set(hosts)), f"host ports used twice: {sorted(published)}"
    for node, broker in enumerate(BROKERS, start=1):
        env = environment(broker)
        kafka = int(env.get("STREAMBUS_PORT", BROKER_PORT_DEFAULT))
        metrics = int(env.get("STREAMBUS_METRICS_PORT", BROKER_METRICS_PORT_DEFAULT))
        by_container = {port.container: port.host for port in ports(broker)}
        assert set(by_container) == {kafka, metrics}, broker
        # A broker tells clients its advertised host and its listener port, so the Kafka port
        # is published on the host under the same number; the ports of `make cluster`.
        assert by_container[kafka] == kafka == node * 10000 + BROKER_PORT_DEFAULT, broker
        assert by_container[metrics] == node * 10000 + BROKER_METRICS_PORT_DEFAULT, broker
        # The Raft port stays inside the compose network: it must never face the internet.
        assert RAFT_PORT_DEFAULT not in by_container, broker
    # Prometheus listens on its own 9090 inside its container, published elsewhere (9090 on
    # the host is a single broker's default /metrics port).
    (prometheus,) = ports("prometheus")
    assert prometheus.container == 9090
    assert prometheus.host != 9090


def quorum(broker: str) -> list[tuple[int, str, int]]:
    """STREAMBUS_CONTROLLER_QUORUM of a broker as (node id, host, Raft port) voters."""
    voters = []
    for entry in environment(broker)["STREAMBUS_CONTROLLER_QUORUM"].split(","):
        node, _, address = entry.partition("@")
        host, sep, port = address.partition(":")
        voters.append((int(node), host, int(port) if sep else RAFT_PORT_DEFAULT))
    return voters


def test_the_brokers_form_one_cluster() -> None:
    node_ids = [int(environment(broker)["STREAMBUS_NODE_ID"]) for broker in BROKERS]
    assert node_ids == [1, 2, 3]
    expected = [(n, broker, RAFT_PORT_DEFAULT) for n, broker in zip(node_ids, BROKERS, strict=True)]
    for broker in BROKERS:
        # Every voter is a broker service, named with its own node id, on the same list.
        assert quorum(broker) == expected, broker
        assert "STREAMBUS_RAFT_PORT" not in environment(broker)
    # One secret for all, from the environment, with a default to try the stack out.
    secrets = {environment(broker)["STREAMBUS_CLUSTER_SECRET"] for broker in BROKERS}
    assert len(secrets) == 1
    assert all(len(secret) >= 16 for secret in secrets)
    for broker in BROKERS:
        raw = SERVICES[broker]["environment"]["STREAMBUS_CLUSTER_SECRET"]
        variable = _COMPOSE_VAR.fullmatch(raw)
        assert variable is not None, raw
        assert variable.group(1) == "STREAMBUS_CLUSTER_SECRET"
    # Each broker its own data volume, advertising a host clients on the host machine reach.
    volumes = [[m.source for m in mounts(broker) if m.target == "/data"] for broker in BROKERS]
    assert all(len(v) == 1 for v in volumes)
    assert len({v[0] for v in volumes}) == len(BROKERS)
    assert all(not Mount(v[0], "/data").is_bind for v in volumes)
    for broker in BROKERS:
        assert environment(broker)["STREAMBUS_ADVERTISED_HOST"] == "localhost"


def test_images_are_pinned_to_versions() -> None:
    for name, service in SERVICES.items():
        if "image" not in service:
            continue
        _image, tag = image_tag(name)
        assert tag != "latest", name
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {tag!r} is not a release version"
    (base,) = instructions("FROM")
    name, _, tag = base.args.split()[0].partition(":")
    assert name == "python"
    assert re.fullmatch(r"3\.11\.\d+-slim-[a-z]+", tag), f"FROM {base.args}: pin a patch release"


def test_collector_image_is_the_release_the_builder_manifest_pins() -> None:
    manifest = load_yaml(BUILDER_MANIFEST)
    version = manifest["dist"]["version"]
    match = re.search(r"^# builder_version: v(\S+)$", BUILDER_MANIFEST.read_text(), re.MULTILINE)
    assert match is not None
    assert match.group(1) == version
    image, tag = image_tag("otel-collector")
    assert image == "otel/opentelemetry-collector-contrib"
    assert tag == version


def test_collector_runs_the_repos_config() -> None:
    config_path = option(command("otel-collector"), "--config")
    assert config_path is not None
    (mount,) = [m for m in mounts("otel-collector") if m.target == config_path]
    assert mount.host_path == COLLECTOR_CONFIG


@pytest.mark.parametrize("broker", BROKERS)
def test_broker_sends_otlp_to_a_collector_receiver(broker: str) -> None:
    env = environment(broker)
    assert "otlp" in env["OTEL_TRACES_EXPORTER"].split(",")
    url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert url.hostname in SERVICES, f"{url.hostname} is not a compose service"
    assert url.hostname == "otel-collector"
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    receiver = {"grpc": "grpc", "http/protobuf": "http"}[protocol]
    listen = collector_config()["receivers"]["otlp"]["protocols"][receiver]["endpoint"]
    listen_host, listen_port = host_port(listen)
    assert url.port == listen_port, (
        f"the broker sends to {url.port}, the collector listens on {listen}"
    )
    # Inside a container, a loopback listener is unreachable from the other containers.
    assert listen_host in ("", "0.0.0.0", "[::]"), listen


def test_collector_ports_are_its_listeners() -> None:
    config = collector_config()
    listeners = {
        host_port(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1],
        host_port(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1],
        host_port(config["exporters"]["prometheus"]["endpoint"])[1],
        host_port(config["extensions"]["health_check"]["endpoint"])[1],
    }
    assert container_ports("otel-collector") == listeners == {4317, 4318, 8889, 13133}


def test_collector_forwards_traces_to_jaeger() -> None:
    exporter = collector_config()["exporters"]["otlp_grpc"]["endpoint"]
    host, port = host_port(exporter)
    assert host == "jaeger"
    assert host in SERVICES
    assert port == 4317  # Jaeger's OTLP/gRPC port
    assert environment("jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"


def test_prometheus_scrapes_every_broker_and_the_collector() -> None:
    compose_config = load_yaml(COMPOSE_PROMETHEUS)
    seed = load_yaml(SEED_PROMETHEUS)

    # Each broker once, and nothing else in the job: StreamBusBrokerMissing counts its targets.
    expected = []
    for broker in BROKERS:
        env = environment(broker)
        metrics_port = int(env.get("STREAMBUS_METRICS_PORT", BROKER_METRICS_PORT_DEFAULT))
        assert metrics_port in container_ports(broker)
        expected.append(f"{broker}:{metrics_port}")
    assert scrape_targets(compose_config, "streambus") == expected
    assert len(scrape_targets(seed, "streambus")) == len(BROKERS)
    # The seed's job otherwise unchanged: dashboards and alerts select on it.
    ours, theirs = scrape_job(compose_config, "streambus"), scrape_job(seed, "streambus")
    assert {k: v for k, v in ours.items() if k != "static_configs"} == {
        k: v for k, v in theirs.items() if k != "static_configs"
    }
    assert [s.get("labels") for s in ours["static_configs"]] == [
        s.get("labels") for s in theirs["static_configs"]
    ]
    assert compose_config["rule_files"] == seed["rule_files"]

    collector = collector_config()
    exporter_port = host_port(collector["exporters"]["prometheus"]["endpoint"])[1]
    assert scrape_targets(compose_config, "otel-collector") == [f"otel-collector:{exporter_port}"]
    reader = collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]
    internal = f"otel-collector:{reader['prometheus']['port']}"
    assert scrape_targets(compose_config, "otel-collector-internal") == [internal]

    # Both the brokers' /metrics and the collector's exporter are scraped: a broker must not
    # also push its metrics over OTLP, or each series would be stored twice.
    for broker in BROKERS:
        exporters = environment(broker).get("OTEL_METRICS_EXPORTER", "prometheus").split(",")
        assert "otlp" not in [e.strip() for e in exporters], broker


def test_prometheus_sends_alerts_to_alertmanager() -> None:
    config = load_yaml(COMPOSE_PROMETHEUS)
    targets = [
        target
        for manager in config["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert 9093 in container_ports("alertmanager")


def test_prometheus_mounts_make_its_config_complete() -> None:
    """The config file Prometheus is told to read is mounted, and so is every rule file."""
    cmd = command("prometheus")
    config_path = PurePosixPath(option(cmd, "--config.file") or "/etc/prometheus/prometheus.yml")
    by_target = {PurePosixPath(m.target): m for m in mounts("prometheus") if m.is_bind}
    assert by_target[config_path].host_path == COMPOSE_PROMETHEUS
    for rule_file in load_yaml(COMPOSE_PROMETHEUS)["rule_files"]:
        assert config_path.parent / rule_file in by_target, f"{rule_file} is not mounted"
    assert by_target[config_path.parent / "alerts.yml"].host_path == (
        DEPLOY / "prometheus" / "alerts.yml"
    )
    listen = option(cmd, "--web.listen-address") or ":9090"
    assert host_port(listen)[1] == 9090


def test_grafana_provisioning_points_at_the_prometheus_service() -> None:
    by_target = {m.target: m for m in mounts("grafana") if m.is_bind}
    assert by_target["/etc/grafana/provisioning"].host_path == DEPLOY / "grafana" / "provisioning"

    datasources = [
        source
        for path in sorted(DATASOURCES.glob("*.y*ml"))
        for source in load_yaml(path)["datasources"]
        if source["type"] == "prometheus"
    ]
    assert datasources
    prometheus_port = host_port(option(command("prometheus"), "--web.listen-address") or ":9090")
    for source in datasources:
        url = urlsplit(source["url"])
        assert url.hostname == "prometheus"
        assert url.hostname in SERVICES
        assert url.port == prometheus_port[1]
        assert url.port in container_ports("prometheus")

    # The dashboard provider's directory is where the dashboards are mounted.
    for path in sorted(DASHBOARD_PROVIDERS.glob("*.y*ml")):
        for provider in load_yaml(path)["providers"]:
            mount = by_target[provider["options"]["path"]]
            assert mount.host_path == DEPLOY / "grafana" / "dashboards"
            assert list(mount.host_path.glob("*.json"))


def test_dockerfile_exposes_the_ports_compose_maps() -> None:
    exposed = {int(p.split("/")[0]) for i in instructions("EXPOSE") for p in i.args.split()}
    assert exposed == {BROKER_PORT_DEFAULT, BROKER_METRICS_PORT_DEFAULT}
    for broker in BROKERS:
        # The image's default ports, but for the Kafka port each broker moves to the one it
        # publishes (see test_host_ports_are_unique_and_each_broker_publishes_its_own).
        env = environment(broker)
        assert "STREAMBUS_METRICS_PORT" not in env
        assert container_ports(broker) == {int(env["STREAMBUS_PORT"]), BROKER_METRICS_PORT_DEFAULT}


def test_dockerfile_runs_streambus_serve_as_a_user_on_the_data_volume() -> None:
    (entrypoint,) = instructions("ENTRYPOINT") or [Instruction("ENTRYPOINT", "[]")]
    (cmd,) = instructions("CMD")
    argv = entrypoint.exec_form() + cmd.exec_form()
    assert argv[:2] == ["streambus", "serve"]
    assert option(argv, "--data-dir") == "/data"
    volumes = [v for i in instructions("VOLUME") for v in i.args.strip("[]").split()]
    assert [v.strip('",') for v in volumes] == ["/data"]
    for broker in BROKERS:
        assert any(m.target == "/data" for m in mounts(broker)), broker
    (user,) = instructions("USER")
    assert user.args.split(":")[0] not in ("root", "0")
    # `streambus` is the console script pyproject.toml installs.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["streambus"] == "streambus.cli:main"


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sources = [src for i in instructions("COPY") for src in i.args.split()[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"COPY {source}, but .dockerignore excludes it"
    packages = {
        path.name
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
        for path in ROOT.glob(pattern)
        if (path / "__init__.py").exists()
    }
    assert packages == {"streambus", "telemetry"}
    assert packages <= set(sources)
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(sources)
    assert not dockerignored("streambus/cli.py")
    for private in (".git", ".venv/bin/python", ".tools/otelcol", "tests/test_compose.py"):
        assert dockerignored(private), private
    assert dockerignored("streambus/__pycache__/cli.cpython-311.pyc")


def test_healthcheck_runs_with_the_python_of_the_image() -> None:
    """The HEALTHCHECK is plain Python: exit 0 when the Kafka port accepts, non-zero when not."""
    argv = healthcheck_command()
    assert argv[0] == "python"

    def check(port: int) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, *argv[1:]],
            env={"STREAMBUS_PORT": str(port)},
            capture_output=True,
            timeout=30,
            check=False,
        )

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted = check(port)
        assert accepted.returncode == 0, accepted.stderr
    refused = check(port)
    assert refused.returncode != 0
    assert b"ConnectionRefusedError" in refused.stderr


def test_compose_variables_have_defaults() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    uncommented = "\n".join(
        line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#")
    )
    for match in _COMPOSE_VAR.finditer(uncommented):
        assert match.group(2) == ":-", f"{match.group(0)} has no default"
    assert "$" not in _COMPOSE_VAR.sub("", uncommented)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool comes with `make install`")
def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    """promtool checks the config as the container sees it: every bind mount of the prometheus
    service copied to its container path under tmp_path (rule_files resolve the same way)."""
    assert PROMTOOL is not None
    for mount in mounts("prometheus"):
        if mount.is_bind:
            destination = tmp_path / mount.target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mount.host_path, destination)
    config = option(command("prometheus"), "--config.file") or "/etc/prometheus/prometheus.yml"
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / config.lstrip("/"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


@pytest.mark.skipif(AMTOOL is None, reason="amtool comes with the prometheus-alertmanager package")
def test_amtool_accepts_the_compose_alertmanager_config() -> None:
    assert AMTOOL is not None
    config = option(command("alertmanager"), "--config.file")
    (mount,) = [m for m in mounts("alertmanager") if m.target == config]
    result = subprocess.run(
        [AMTOOL, "check-config", str(mount.host_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
