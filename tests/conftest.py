"""Shared test fixtures: a feed server on 127.0.0.1, the real exporter process, and exposition parsing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))

from feedgen import generate_feed

# Re-exported: the test modules import these from conftest.
from loopback import (  # noqa: F401
    TEST_API_KEY,
    FeedServer,
    exporter_command,
    free_port,
    memory_kb,
    serve_on_loopback,
    wait_until,
)


def unavailable(message: str, provider: str = ".ci/run") -> NoReturn:
    """Something outside the repository the test needs is missing: skip with the reason; in CI (CI set), fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; {provider} must install it")
    pytest.skip(message)


def require_binary(
    name: str, package: str = "Debian package `prometheus`: apt-get install prometheus", provider: str = ".ci/run"
) -> str:
    """The path of an outside program the test needs: skipped with the reason when missing, failed in CI."""
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} is not installed ({package})", provider)


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


# ---- scraping ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    labels: dict[str, str]
    value: float


@dataclass
class Exposition:
    text: str
    families: dict[str, list[Sample]] = field(default_factory=dict)

    def samples(self, name: str) -> list[Sample]:
        return self.families.get(name, [])

    def value(self, name: str, **labels: str) -> float | None:
        for sample in self.samples(name):
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        return None


def parse_exposition(text: str) -> Exposition:
    exposition = Exposition(text)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exposition.families.setdefault(sample.name, []).append(Sample(dict(sample.labels), sample.value))
    return exposition


def assert_matches_feed(exposition, feed) -> None:
    """Connector by connector: three state series (1 for the current state) and one info series, nothing else."""
    expected_state = {
        (c.connector, c.device, c.station, c.speed, state): 1.0 if c.simplified == state else 0.0
        for c in feed.connectors
        for state in ("available", "charging", "unavailable")
    }
    got_state = {
        (s.labels["connector"], s.labels["device"], s.labels["station"], s.labels["speed"],
         s.labels["chargy_connector_state"]): s.value
        for s in exposition.samples("chargy_connector_state")
    }  # fmt: skip
    assert len(exposition.samples("chargy_connector_state")) == len(got_state) == 3 * len(feed.connectors)
    assert got_state == expected_state
    got_info = {
        (s.labels["connector"], s.labels["device"], s.labels["station"], s.labels["speed"], s.labels["state"]): s.value
        for s in exposition.samples("chargy_connector_detailed_state_info")
    }
    assert got_info == {(c.connector, c.device, c.station, c.speed, c.state): 1.0 for c in feed.connectors}
    assert "otel_metric_overflow" not in exposition.text


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# ---- the real exporter process ------------------------------------------------------------------------------------


class ExporterProcess:
    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None,
        log_path: Path,
        port: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHARGY_", "KML_URL"))}
        full_env.update(env or {})
        self.process = subprocess.Popen(
            [*exporter_command(), "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scrape(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> Exposition:
        status, _, body = http_get(self.base_url + path, headers)
        assert status == 200, f"scrape answered {status}"
        return parse_exposition(body.decode("utf-8"))

    def refresh_now(self) -> None:
        """SIGHUP: the exporter refreshes at once (or right after the refresh under way)."""
        self.process.send_signal(signal.SIGHUP)

    def wait_for(self, predicate: Callable[[Exposition], bool], timeout: float = 30) -> Exposition:
        def check() -> Exposition | None:
            if self.process.poll() is not None:
                raise AssertionError(f"exporter exited with {self.process.returncode}:\n{self.logs()}")
            try:
                exposition = self.scrape()
            except (OSError, AssertionError):
                return None
            return exposition if predicate(exposition) else None

        return wait_until(check, timeout, "condition on /metrics", lambda: f"logs:\n{self.logs()}")

    def wait_for_log(self, text: str, timeout: float = 30, count: int = 1) -> str:
        """The logs once `text` appears in them `count` times."""
        return wait_until(
            lambda: self.logs() if self.logs().count(text) >= count else None,
            timeout,
            f"{count} log line(s) with {text!r}",
            lambda: f"logs:\n{self.logs()}",
        )

    def wait_until_up(self, timeout: float = 30) -> Exposition:
        return self.wait_for(lambda e: e.value("chargy_feed_up") == 1.0, timeout)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def exporter_process(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, port: int | None = None, cwd: Path | None = None
    ) -> ExporterProcess:
        process = ExporterProcess(list(args), env, tmp_path / f"exporter-{len(started)}.log", port, cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def small_feed() -> Any:
    return generate_feed(stations=40, seed=7, odd_shapes=True)
