"""The container image, built from the Dockerfile as it is and run the way the README tells users to run it.

Built once per module with podman (.ci/build-image.sh; every podman call goes through .ci/podman, which holds the
options these machines need) on the base image .ci/base-image.sh provides. Run by CI's image step:
`.ci/image.sh`, i.e. `.ci/base-image.sh` then `pytest -m image`. Without podman or the base image the tests are
skipped, and fail in CI. Published ports are on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Exposition, free_port, http_get, parse_exposition, require_binary, unavailable, wait_until

from chargy_exporter.demo import DemoNetwork
from chargy_exporter.kml import parse_kml

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
PODMAN = ROOT / ".ci" / "podman"
BUILD = ROOT / ".ci" / "build-image.sh"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
TAG = "localhost/chargy-exporter:test"
SECRET = "image-secret-7c1d2b94e0"
# Deadlines are generous (2 shared cores, podman's own start-up); the tests wait for conditions, not for the clock.
START_TIMEOUT = 90.0
BUILD_TIMEOUT = 1200.0
STOP_LIMIT = 2.0  # what the issue asks of `podman stop`
EXTRA_LAYERS_LIMIT = 80 * 1024 * 1024  # the exporter and its dependencies over the base image (32 MB measured)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    return result


@dataclass
class Container:
    name: str
    host_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", self.name).stdout)[0])

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """`podman healthcheck run`: runs the image's HEALTHCHECK command now; exit 0 = healthy."""
        return podman("healthcheck", "run", self.name, timeout=60, check=False)

    def _answer(self, path: str) -> bytes | None:
        if not self.running():
            raise AssertionError(f"the container exited:\n{self.logs()}")
        try:
            status, _, body = http_get(self.base_url + path, timeout=5)
        except OSError:
            return None
        return body if status == 200 else None

    def wait_for(self, path: str) -> bytes:
        return wait_until(lambda: self._answer(path), START_TIMEOUT, f"{self.base_url}{path} answering 200", self.logs)

    def wait_until_healthy(self) -> None:
        def healthy() -> bool:
            if not self.running():
                raise AssertionError(f"the container exited:\n{self.logs()}")
            return self.healthcheck().returncode == 0

        wait_until(healthy, START_TIMEOUT, "podman healthcheck run reporting healthy", self.details)

    def details(self) -> str:
        health = self.inspect()["State"].get("Healthcheck") or self.inspect()["State"].get("Health")
        return f"health: {json.dumps(health, indent=1)}\nlogs:\n{self.logs()}"


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require_binary("podman", "Debian package `podman`", provider=".ci/base-image.sh")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        unavailable(f"no {BASE_IMAGE} image (run .ci/base-image.sh, as root)", provider=".ci/base-image.sh")
    # --layers=false: no intermediate images pile up in the machine's storage, and the image goes at the end.
    result = subprocess.run(
        [str(BUILD), TAG, "--layers=false"], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"the image does not build:\n{result.stdout[-6000:]}{result.stderr[-6000:]}"
    yield TAG
    podman("rmi", "--force", TAG, check=False)


@pytest.fixture(scope="module")
def run(image: str) -> Iterator[Callable[..., Container]]:
    """Starts containers of the image as the README's `docker run` does, removed at the end of the module."""
    started: list[Container] = []

    def start(*arguments: str, env: dict[str, str] | None = None, container_port: int = 9000) -> Container:
        container = Container(f"chargy-test-{uuid.uuid4().hex[:10]}", free_port())
        environment = [f"--env={key}={value}" for key, value in (env or {}).items()]
        podman(
            "run", "--detach", "--name", container.name, "--pull=never",
            # The README's hardening: read-only root (and, as with Docker, no writable tmpfs either), no capabilities,
            # uid 1001 in group 0.
            "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL", "--user", "1001:0",
            "--publish", f"127.0.0.1:{container.host_port}:{container_port}",
            *environment, image, *arguments,
        )  # fmt: skip
        started.append(container)
        return container

    yield start
    for container in started:
        podman("rm", "--force", "--time", "0", container.name, check=False)


@pytest.fixture(scope="module")
def demo(run: Callable[..., Container]) -> Container:
    """The image with its defaults and the demo network, serving."""
    container = run("--demo")
    container.wait_for("/healthz")
    return container


# ---- the tests ---------------------------------------------------------------------------------------------------


def test_metrics_serve_the_demo_network(demo: Container) -> None:
    snapshot = parse_kml(DemoNetwork().document())  # the demo's first refresh: the same from its seed everywhere
    expected = {(row.station.name, row.device.name, row.connector.name, row.connector.state) for row in snapshot.rows()}

    def scraped() -> Exposition | None:
        exposition = parse_exposition(demo.wait_for("/metrics").decode("utf-8"))
        return exposition if exposition.value("chargy_feed_up") == 1.0 else None

    exposition = wait_until(scraped, START_TIMEOUT, "chargy_feed_up 1 on /metrics", demo.logs)
    current = {
        (s.labels["station"], s.labels["device"], s.labels["connector"], s.labels["chargy_connector_state"])
        for s in exposition.samples("chargy_connector_state")
        if s.value == 1.0
    }
    assert expected and current == expected


def test_runs_as_1001_with_a_read_only_root_and_no_capabilities(demo: Container) -> None:
    config = demo.inspect()
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    # What the exporter (PID 1) actually has, seen from inside.
    script = textwrap.dedent(
        """
        import os
        status = dict(line.split(":", 1) for line in open("/proc/1/status"))
        print(*(status[key].split()[0] for key in ("Uid", "Gid", "CapEff", "CapBnd")))
        for path in ("/", "/tmp", "/var/tmp", "/run", os.path.expanduser("~")):
            try:
                open(os.path.join(path, "probe"), "w").close()
                print("writable", path)
            except OSError:
                pass
        """
    )
    result = podman("exec", demo.name, "python", "-c", script)
    lines = result.stdout.split("\n")
    assert lines[0].split() == ["1001", "0", "0000000000000000", "0000000000000000"], result.stdout
    assert not [line for line in lines[1:] if line], "the root filesystem is not read-only"


def test_healthcheck_reports_healthy(demo: Container) -> None:
    demo.wait_until_healthy()


def test_healthcheck_follows_a_port_set_by_flag(run: Callable[..., Container]) -> None:
    # The image sets OTEL_EXPORTER_PROMETHEUS_PORT=9000; the flag moves the exporter, and the check must follow.
    container = run("--demo", "--port", "9100", container_port=9100)
    assert b"chargy_connector_state" in container.wait_for("/metrics")
    container.wait_until_healthy()


def test_stop_ends_it_within_2_seconds_with_status_0(run: Callable[..., Container]) -> None:
    container = run("--demo")
    container.wait_for("/healthz")
    started = time.monotonic()
    podman("stop", "--time", "10", container.name, timeout=60)  # a hang shows as a long stop, not as a kill at 2 s
    elapsed = time.monotonic() - started
    state = container.inspect()["State"]
    assert state["ExitCode"] == 0, container.logs()
    assert elapsed < STOP_LIMIT, f"podman stop took {elapsed:.1f} s\n{container.logs()}"


def test_no_secret_in_the_logs_when_the_feed_is_unreachable(run: Callable[..., Container]) -> None:
    # Nothing listens on port 9 in the container: every refresh fails, and logs the failure with the URL.
    container = run(
        "--refresh-interval", "1", "--log-level", "debug",
        env={"KML_URL": f"http://127.0.0.1:9/b2bev-external-services/resources/kml?API-KEY={SECRET}"},
    )  # fmt: skip
    container.wait_for("/healthz")

    def refreshes_failed() -> bool:
        return container.logs().count("feed refresh failed") >= 2

    wait_until(refreshes_failed, START_TIMEOUT, "two failed refreshes logged", container.logs)
    container.wait_until_healthy()  # the HEALTHCHECK's output is kept by podman too
    podman("stop", "--time", "10", container.name, timeout=60)
    logs = container.logs()
    assert SECRET not in logs, logs
    assert SECRET not in json.dumps(container.inspect()["State"])  # healthcheck log included


def test_image_keeps_nothing_of_the_build_and_reports_its_size(image: str, record_property: Any) -> None:
    # The build mounts the host's pip configuration and CA bundle (.ci/build-image.sh): none of it may stay.
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        build_only = ("/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip", "/root/pip-host", "/usr/pip.conf")
        for path in (*build_only, "/tmp/dist", "/build", "/dist"):
            if os.path.lexists(path):
                print("left:", path)
        pip = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
        print(pip.stdout)
        """
    )
    result = podman("run", "--rm", "--pull=never", "--user", "0", "--entrypoint", "python", image, "-c", script)
    assert "left:" not in result.stdout, result.stdout
    assert [line for line in result.stdout.splitlines() if line and not line.startswith(":env:")] == [], result.stdout

    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert SECRET not in json.dumps(inspected) and "API-KEY" not in json.dumps(inspected).upper()
    assert inspected["Config"]["User"] == "1001:0"
    assert "PYTHONMALLOC=malloc" in inspected["Config"]["Env"]  # less memory held between refreshes (README)
    base = json.loads(podman("image", "inspect", BASE_IMAGE).stdout)[0]
    size, added = int(inspected["Size"]), int(inspected["Size"]) - int(base["Size"])
    record_property("image_size_bytes", size)
    print(f"image size: {size / 1e6:.0f} MB ({added / 1e6:.0f} MB over {BASE_IMAGE})")
    assert added < EXTRA_LAYERS_LIMIT, f"the image adds {added / 1e6:.0f} MB to its base"
