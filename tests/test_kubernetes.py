"""deploy/kubernetes: the kustomize base and its components, rendered by `kubectl kustomize` as `kubectl apply -k`
would, checked against the Kubernetes schemas of a current release (kubernetes-validate, which ships them: no
network), the two Prometheus Operator objects against their documented fields, and the generated objects against
their one source (deploy/prometheus/rules/, deploy/grafana/dashboards/). The last test plays the rendered Deployment
with `podman kube play` on the image CI builds (marker `image`, CI's image step).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path, PurePosixPath
from typing import Any

import bcrypt
import kubernetes_validate
import pytest
import yaml
from certs import Authority
from conftest import ExporterProcess, free_port, http_get, parse_exposition, require_binary, unavailable, wait_until
from feedgen import generate_feed
from loopback import FeedServer

from chargy_exporter.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes"
COMPONENTS = BASE / "components"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "chargy.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chargy.json"
PODMAN = ROOT / ".ci" / "podman"
BUILD = ROOT / ".ci" / "build-image.sh"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
TAG = "localhost/chargy-exporter:kube-test"
KUBERNETES_RELEASE = "1.33.0"  # the oldest release kubernetes-validate's floor (pyproject.toml) has schemas of
START_TIMEOUT = 120.0  # 2 shared cores, podman's own start-up; the test waits for conditions, not for the clock
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Prometheus' duration syntax, as the Operator's CRDs validate it (monitoring.coreos.com/v1 `Duration`).
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl", "kubectl, with kustomize built in (comes with these machines)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def overlay(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """What a user's overlay of the base with these components renders (kustomize wants relative paths)."""
    base = os.path.relpath(BASE, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "components": [f"{base}/components/{name}" for name in components]})
    )
    return kustomize(tmp_path)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [obj for obj in objects if obj["kind"] == kind]
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [exporter] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(exporter)


def environment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container(objects).get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize(BASE)


# ---- the objects are valid --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "components",
    [(), ("live-feed",), ("otlp",), ("live-feed", "otlp"), ("web-config",), ("live-feed", "otlp", "web-config")],
)
def test_every_object_validates_against_the_kubernetes_schemas(tmp_path: Path, components: tuple[str, ...]) -> None:
    objects = overlay(tmp_path, *components)
    assert {obj["kind"] for obj in objects} == {"Deployment", "Service", "ConfigMap", *OPERATOR_KINDS}
    for obj in objects:
        if obj["kind"] not in OPERATOR_KINDS:
            # strict: an unknown or misspelt field fails too. Raises ValidationError, with the path of the fault.
            kubernetes_validate.validate(obj, KUBERNETES_RELEASE, strict=True)
    assert "API-KEY" not in json.dumps(objects).upper(), "a key in the manifests"


def test_the_schemas_are_those_of_a_current_release_and_reject_a_bad_object(rendered: list[dict[str, Any]]) -> None:
    assert tuple(int(part) for part in kubernetes_validate.latest_version().split(".")[:2]) >= (1, 33)
    broken = json.loads(json.dumps(one(rendered, "Deployment")))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_RELEASE, strict=True)


def _check_fields(obj: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    assert isinstance(obj, dict), f"{where}: not an object"
    assert required <= set(obj), f"{where}: missing {sorted(required - set(obj))}"
    assert set(obj) <= allowed, f"{where}: fields the CRD does not have: {sorted(set(obj) - allowed)}"


def _check_strings(mapping: dict[str, Any], where: str) -> None:
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()), f"{where}: not strings"


def test_the_service_monitor_has_the_documented_fields_and_selects_the_metrics_port(
    rendered: list[dict[str, Any]],
) -> None:
    monitor, service = one(rendered, "ServiceMonitor"), one(rendered, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    _check_fields(monitor, {"apiVersion", "kind", "metadata", "spec"}, {"apiVersion", "kind", "metadata", "spec"}, "")
    spec = monitor["spec"]
    _check_fields(spec, {"selector", "endpoints", "jobLabel", "namespaceSelector"}, {"selector", "endpoints"}, "spec")
    _check_fields(spec["selector"], {"matchLabels", "matchExpressions"}, set(), "spec.selector")
    _check_strings(spec["selector"]["matchLabels"], "spec.selector.matchLabels")
    for endpoint in spec["endpoints"]:
        _check_fields(endpoint, {"port", "path", "interval", "scrapeTimeout", "scheme"}, {"port"}, "endpoint")
        assert all(isinstance(endpoint[key], str) for key in endpoint)
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    # It selects our Service, and that Service our pods, on the port the container names `metrics`.
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["metrics"]
    assert container(rendered)["ports"] == [{"name": "metrics", "containerPort": 9000, "protocol": "TCP"}]
    # The Operator names the job after the Service: the alert rules select job="chargy".
    assert service["metadata"]["name"] == "chargy" and 'job="chargy"' in RULES.read_text(encoding="utf-8")


def test_the_prometheus_rule_has_the_documented_fields(rendered: list[dict[str, Any]]) -> None:
    rule = one(rendered, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    _check_fields(rule["spec"], {"groups"}, {"groups"}, "spec")
    for group in rule["spec"]["groups"]:
        _check_fields(group, {"name", "interval", "rules", "limit"}, {"name", "rules"}, "group")
        for item in group["rules"]:
            where = f"{group['name']}/{item.get('record') or item.get('alert')}"
            _check_fields(item, {"record", "alert", "expr", "for", "labels", "annotations"}, {"expr"}, where)
            assert ("record" in item) != ("alert" in item), f"{where}: exactly one of record and alert"
            assert isinstance(item["expr"], str)
            assert DURATION.match(item.get("for", "0")), f"{where}: for"
            _check_strings(item.get("labels", {}), where)
            _check_strings(item.get("annotations", {}), where)


# ---- one source: the compose stack's rules and dashboard ----------------------------------------------------------


def test_the_prometheus_rule_holds_exactly_the_rules_file(rendered: list[dict[str, Any]]) -> None:
    source = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert one(rendered, "PrometheusRule")["spec"] == source, (
        "deploy/kubernetes/prometheusrule.yaml is out of date: run python3 deploy/kubernetes/sync.py"
    )


def test_the_dashboard_config_map_holds_exactly_the_dashboard(rendered: list[dict[str, Any]]) -> None:
    config_map = one(rendered, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's label
    assert list(config_map["data"]) == ["chargy.json"]
    assert json.loads(config_map["data"]["chargy.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8")), (
        "deploy/kubernetes/dashboards/chargy.json is out of date: run python3 deploy/kubernetes/sync.py"
    )


def test_the_generated_files_are_what_sync_writes() -> None:
    # Byte for byte (comments included), so that sync.py's output is what is committed.
    result = subprocess.run(
        [sys.executable, str(BASE / "sync.py"), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout == "", (
        f"run python3 deploy/kubernetes/sync.py and commit what it writes:\n{result.stdout}{result.stderr}"
    )


# ---- what the Deployment does -------------------------------------------------------------------------------------


def test_the_pod_is_hardened_and_sized_from_the_measurements(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1001, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert pod["automountServiceAccountToken"] is False
    exporter = container(rendered)
    assert exporter["securityContext"] == {
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }  # fmt: skip
    assert exporter["resources"] == {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}


def test_both_probes_ask_healthz_which_a_feed_outage_does_not_fail(rendered: list[dict[str, Any]]) -> None:
    exporter = container(rendered)
    for probe in ("livenessProbe", "readinessProbe"):
        assert exporter[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe


@pytest.mark.e2e
def test_what_the_probes_ask_still_answers_while_the_feed_is_down(
    exporter_process: Callable[..., ExporterProcess], feed_server: FeedServer
) -> None:
    # A pod whose feed is down keeps serving the last good data: neither restarted nor taken out of the Service.
    feed_server.set_body(generate_feed(stations=10, seed=15).kml)
    exporter = exporter_process("--kml-url", feed_server.url, "--refresh-interval", "1")
    served = exporter.wait_until_up().samples("chargy_connector_state")
    feed_server.set_responder(failing)
    exporter.refresh_now()
    down = exporter.wait_for(lambda exposition: exposition.value("chargy_feed_up") == 0.0)
    assert http_get(exporter.base_url + "/healthz")[0] == 200
    assert down.samples("chargy_connector_state") == served


def failing(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(503)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def test_the_base_runs_the_demo_and_the_components_take_the_key_and_otlp_from_secrets(tmp_path: Path) -> None:
    assert environment(kustomize(BASE)) == {"CHARGY_DEMO": "true"}
    (tmp_path / "live").mkdir()
    assert environment(overlay(tmp_path / "live", "live-feed")) == {
        "KML_URL": {"secretKeyRef": {"name": "chargy-exporter-feed", "key": "KML_URL", "optional": True}},
    }
    (tmp_path / "otlp").mkdir()
    otlp = environment(overlay(tmp_path / "otlp", "otlp"))
    assert otlp.pop("OTEL_EXPORTER_OTLP_HEADERS") == {
        "secretKeyRef": {"name": "chargy-exporter-otlp", "key": "OTEL_EXPORTER_OTLP_HEADERS", "optional": True}
    }
    assert otlp == {
        "CHARGY_DEMO": "true",
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.monitoring.svc:4317",
    }


# ---- components/web-config: TLS and basic auth ----------------------------------------------------------------------

WEB_CONFIG_EXAMPLE = ROOT / "deploy" / "web-config.example.yml"
SECRET_REFERENCE = {"name", "key"}  # a SecretKeySelector of the Operator's CRD, required: no `optional: true`


@pytest.fixture(scope="module")
def with_web_config(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return overlay(tmp_path_factory.mktemp("web-config"), "web-config")


def web_config_argument(exporter: dict[str, Any]) -> str:
    arguments = exporter.get("args", [])
    [path] = [arg.split("=", 1)[1] for arg in arguments if arg.startswith("--web-config-file=")]
    assert arguments == [f"--web-config-file={path}"], "the component adds this one argument, nothing else"
    return str(path)


def test_web_config_mounts_its_secrets_read_only_and_passes_the_file(
    with_web_config: list[dict[str, Any]], rendered: list[dict[str, Any]]
) -> None:
    for obj in with_web_config:
        if obj["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_RELEASE, strict=True)
    exporter, pod = container(with_web_config), one(with_web_config, "Deployment")["spec"]["template"]["spec"]
    path = PurePosixPath(web_config_argument(exporter))
    [mount] = [mount for mount in exporter["volumeMounts"] if path.is_relative_to(mount["mountPath"])]
    assert mount["readOnly"] is True and "subPath" not in mount, "subPath mounts miss a renewed certificate"
    [volume] = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    # Only Secrets, none optional: without them the pod must not start (rather than serve plain HTTP).
    assert set(volume) == {"name", "projected"}
    sources = volume["projected"]["sources"]
    assert all(set(source) == {"secret"} and not source["secret"].get("optional") for source in sources)
    secrets = {source["secret"]["name"]: source["secret"].get("items") for source in sources}
    assert secrets == {
        "chargy-exporter-web-config": [{"key": "web-config.yml", "path": path.name}],
        "chargy-exporter-tls": None,  # every key: tls.crt and tls.key as cert-manager writes them, ca.crt
    }
    # The example names the TLS files relative to itself: they are in the same projected folder.
    example = yaml.safe_load(WEB_CONFIG_EXAMPLE.read_text(encoding="utf-8"))["tls_server_config"]
    assert (example["cert_file"], example["key_file"]) == ("tls.crt", "tls.key")
    # Nothing else of the Deployment changes.
    changed = json.loads(json.dumps(one(with_web_config, "Deployment")))
    changed_pod = changed["spec"]["template"]["spec"]
    del changed_pod["volumes"]
    [changed_exporter] = changed_pod["containers"]
    del changed_exporter["args"], changed_exporter["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        del changed_exporter[probe]["httpGet"]["scheme"]
    assert changed == one(rendered, "Deployment")


def test_web_config_probes_ask_healthz_over_https(with_web_config: list[dict[str, Any]]) -> None:
    # The kubelet does not verify the certificate; /healthz needs no password (the file holds only hashes).
    exporter = container(with_web_config)
    for probe in ("livenessProbe", "readinessProbe"):
        assert exporter[probe]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTPS"}, probe


def test_web_config_service_monitor_scrapes_https_with_ca_and_credentials_from_secrets(
    with_web_config: list[dict[str, Any]], rendered: list[dict[str, Any]]
) -> None:
    monitor, service = one(with_web_config, "ServiceMonitor"), one(with_web_config, "Service")
    [endpoint] = monitor["spec"]["endpoints"]
    [base_endpoint] = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert {key: value for key, value in endpoint.items() if key not in {"scheme", "tlsConfig", "basicAuth"}} == (
        base_endpoint
    )
    assert endpoint["scheme"] == "https"  # the CRD's enum: http, https
    tls = endpoint["tlsConfig"]
    _check_fields(
        tls, {"ca", "serverName", "cert", "keySecret", "minVersion", "maxVersion"}, {"ca", "serverName"}, "tlsConfig"
    )
    assert set(tls["ca"]) == {"secret"}, "tlsConfig.ca: one of secret and configMap"
    assert set(tls["ca"]["secret"]) == SECRET_REFERENCE
    # The CA of the certificate the pod serves: the same Secret, cert-manager's ca.crt.
    assert tls["ca"]["secret"] == {"name": "chargy-exporter-tls", "key": "ca.crt"}
    # Prometheus scrapes the pod's address: it checks the certificate for the Service's name instead.
    assert tls["serverName"] == f"{service['metadata']['name']}.monitoring.svc"
    _check_fields(endpoint["basicAuth"], {"username", "password"}, {"username", "password"}, "basicAuth")
    for field in ("username", "password"):
        reference = endpoint["basicAuth"][field]
        assert set(reference) == SECRET_REFERENCE and all(isinstance(value, str) for value in reference.values())
        assert reference == {"name": "chargy-exporter-scrape-auth", "key": field}


def test_web_config_puts_no_secret_value_in_the_manifests(with_web_config: list[dict[str, Any]]) -> None:
    assert "Secret" not in {obj["kind"] for obj in with_web_config}, "Secrets are the user's, not the manifests'"
    text = yaml.safe_dump_all(with_web_config)
    for value in ("PRIVATE KEY", "BEGIN CERTIFICATE", "stringData", "basic_auth_users", "web-config.yml:"):
        assert value not in text, f"{value!r} in the rendered manifests"
    assert not re.search(r"\$2[abxy]?\$\d\d\$", text), "a bcrypt hash in the rendered manifests"


def test_web_config_arguments_parse_over_what_the_secrets_project(
    with_web_config: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The exporter's own parser, given the rendered arguments and environment, over a folder laid out as the
    projected volume is: web-config.yml (the example, hash filled in) next to the TLS Secret's keys."""
    exporter = container(with_web_config)
    [mount] = exporter["volumeMounts"]
    (tmp_path / "ca").mkdir()
    authority = Authority(tmp_path / "ca")
    issued = authority.issue("chargy")
    (tmp_path / "tls.crt").write_bytes(issued.cert.read_bytes())
    (tmp_path / "tls.key").write_bytes(issued.key.read_bytes())
    (tmp_path / "ca.crt").write_bytes(authority.cert.read_bytes())
    hashed = bcrypt.hashpw(b"scrape password", bcrypt.gensalt(rounds=4)).decode()
    example = WEB_CONFIG_EXAMPLE.read_text(encoding="utf-8")
    (tmp_path / "web-config.yml").write_text(example.replace("<bcrypt hash of the password>", hashed))
    arguments = [arg.replace(mount["mountPath"], str(tmp_path)) for arg in exporter["args"]]
    environ = {name: value for name, value in environment(with_web_config).items() if isinstance(value, str)}
    web = load_config(arguments, environ).web_config_file
    assert web is not None and web.tls is not None
    assert (web.tls.cert_file, web.tls.key_file) == (tmp_path / "tls.crt", tmp_path / "tls.key")
    assert set(web.users) == {"prometheus"}


# ---- the rendered Deployment runs -----------------------------------------------------------------------------------


def podman(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require_binary("podman", "Debian package `podman`", provider=".ci/image.sh")
    # podman kube play starts each pod's infra container from a pause image it builds with catatonit.
    require_binary("catatonit", "Debian package `catatonit`", provider=".ci/image.sh")
    if podman("image", "exists", BASE_IMAGE).returncode != 0:
        unavailable(f"no {BASE_IMAGE} image (run .ci/base-image.sh, as root)", provider=".ci/base-image.sh")
    result = subprocess.run([str(BUILD), TAG, "--layers=false"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"the image does not build:\n{result.stdout[-6000:]}{result.stderr[-6000:]}"
    yield TAG
    podman("rmi", "--force", TAG)


@pytest.mark.image
def test_podman_plays_the_rendered_deployment_and_it_serves_the_demo(
    image: str, rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """`podman kube play` of the Deployment exactly as rendered, but for three things podman needs here: the image
    CI built (never pulled), the port published on 127.0.0.1, and no probes.

    podman 4.3 turns an httpGet probe into a `curl` run inside the container (the image has no curl) and loses a
    named port (it asks port 0), so the test does what the kubelet does instead: an HTTP GET of each probe's path
    on its port, resolved by name in the container's ports, from outside the container.
    """
    deployment = json.loads(json.dumps(one(rendered, "Deployment")))
    deployment["metadata"]["name"] = f"chargy-kube-{uuid.uuid4().hex[:8]}"
    [played] = deployment["spec"]["template"]["spec"]["containers"]
    probes = {name: played.pop(name) for name in ("livenessProbe", "readinessProbe")}
    host_port = free_port()
    played.update(image=image, imagePullPolicy="Never")
    played["ports"][0].update(hostPort=host_port, hostIP="127.0.0.1")
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    # kube play has no --ulimit: podman's default limits exceed these machines' hard limits.
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n', encoding="utf-8")
    env = {"CONTAINERS_CONF": str(conf)}

    played_result = podman("kube", "play", str(manifest), env=env)
    try:
        assert played_result.returncode == 0, played_result.stdout + played_result.stderr
        name = f"{deployment['metadata']['name']}-pod-0-{played['name']}"

        def logs() -> str:
            result = podman("logs", name)
            return result.stdout + result.stderr

        def answer(path: str) -> bytes | None:
            try:
                status, _, body = http_get(f"http://127.0.0.1:{host_port}{path}", timeout=5)
            except OSError:
                return None
            return body if status == 200 else None

        def served() -> Any:
            body = answer("/metrics")
            exposition = parse_exposition(body.decode("utf-8")) if body else None
            return exposition if exposition and exposition.value("chargy_feed_up") == 1.0 else None

        exposition = wait_until(served, START_TIMEOUT, "/metrics with chargy_feed_up 1", logs)
        connectors = {s.labels["connector"] for s in exposition.samples("chargy_connector_state")}
        assert connectors and exposition.value("chargy_connectors") == len(connectors)

        ports = {port["name"]: port["containerPort"] for port in played["ports"]}
        for probe_name, probe in probes.items():
            port = probe["httpGet"]["port"]
            assert ports.get(port, port) == 9000, probe_name  # the port the hostPort publishes
            assert answer(probe["httpGet"]["path"]) is not None, f"{probe_name} fails\n{logs()}"

        # The pod's security context reached the exporter (PID 1 of its container).
        status = podman("exec", name, "cat", "/proc/1/status").stdout
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        facts = {key: fields[key].split()[0] for key in ("Uid", "Gid", "CapEff", "NoNewPrivs", "Seccomp")}
        assert facts == {"Uid": "1001", "Gid": "0", "CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
        inspected = json.loads(podman("inspect", name).stdout)[0]
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    finally:
        down = podman("kube", "down", str(manifest), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert podman("pod", "exists", f"{deployment['metadata']['name']}-pod-0").returncode != 0
