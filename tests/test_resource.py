"""The OpenTelemetry resource: a service.instance.id that survives restarts, and the user's variables winning."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from otlp_receivers import GrpcReceiver

from chargy_exporter import __version__
from chargy_exporter.config import Config, OtlpSettings, load_config
from chargy_exporter.otlp import OtlpPush
from chargy_exporter.resource import build_resource

FEED = "https://feed.example/b2bev-external-services/resources/kml?API-KEY=secret-key-0123456789"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME", "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS"):
        monkeypatch.delenv(name, raising=False)


def config(url: str = FEED) -> Config:
    return load_config(["--kml-url", url], {})


def instance_id(config: Config, port: int) -> str:
    return str(build_resource(config, port).attributes["service.instance.id"])


def test_defaults() -> None:
    attributes = build_resource(config(), 9000).attributes
    assert attributes["service.name"] == "chargy-exporter"
    assert attributes["service.version"] == __version__
    assert uuid.UUID(str(attributes["service.instance.id"])).version == 5


def test_the_instance_id_depends_on_the_port_and_the_feed_but_not_on_its_secret() -> None:
    first = instance_id(config(), 9000)
    assert instance_id(config(), 9000) == first
    assert instance_id(config(), 9001) != first  # a second exporter on the same host
    assert instance_id(config(FEED.replace("feed.example", "other.example")), 9000) != first
    # Another API key for the same feed: the same instance (the key is not an input, so it cannot leak through).
    assert instance_id(config(FEED.replace("secret-key", "new-secret-key")), 9000) == first


def test_the_instance_id_is_the_same_in_another_process() -> None:
    """What a restart sees: nothing random, nothing of the process (str hashes are salted per process)."""
    script = (
        "import sys; from chargy_exporter.config import load_config; from chargy_exporter.resource import "
        "build_resource; print(build_resource(load_config(['--kml-url', sys.argv[1]], {}), 9000)"
        ".attributes['service.instance.id'])"
    )
    done = subprocess.run([sys.executable, "-c", script, FEED], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == instance_id(config(), 9000)


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=lu-1,deployment.environment=prod")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chargy-lu")
    attributes = build_resource(config(), 9000).attributes
    assert attributes["service.instance.id"] == "lu-1"
    assert attributes["service.name"] == "chargy-lu"
    assert attributes["deployment.environment"] == "prod"
    assert attributes["service.version"] == __version__


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    receiver = GrpcReceiver()
    yield receiver
    receiver.close()


def test_the_instance_id_arrives_at_a_receiver_unchanged_after_a_restart(grpc_receiver: GrpcReceiver) -> None:
    """Two pipelines one after the other (a restart, in-process) push the same service.instance.id."""
    from chargy_exporter.metrics import MetricsPipeline

    def pushed_instance_id() -> str:
        push = OtlpPush(OtlpSettings(endpoint=grpc_receiver.endpoint, export_interval=math.inf))
        pipeline = MetricsPipeline(build_resource(config(), 9000), readers=[push.make_reader])
        try:
            assert push.force_flush()
        finally:
            pipeline.shutdown(timeout_millis=2_000)
        return str(grpc_receiver.resource_attributes()["service.instance.id"])

    first = pushed_instance_id()
    assert pushed_instance_id() == first == instance_id(config(), 9000)
