"""The OpenTelemetry resource of the exporter: who is reporting, on OTLP and in `target_info`."""

from __future__ import annotations

import socket
import uuid

from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)

from . import __version__
from .config import Config

# The namespace the semantic conventions give for a service.instance.id derived as a UUID v5.
INSTANCE_ID_NAMESPACE = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")


def build_resource(config: Config, port: int) -> Resource:
    """Our service name, version and instance id, under what OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME set
    (`Resource.create` alone would let ours win).

    The instance id is stable across restarts, so that a Collector goes on with the same series instead of keeping
    the old instance's until they expire: a UUID v5 of the host name, the port (two exporters on one host) and the
    feed URL without its secrets.
    """
    instance = uuid.uuid5(INSTANCE_ID_NAMESPACE, f"{socket.gethostname()}\n{port}\n{config.redacted_url}")
    ours = {SERVICE_NAME: "chargy-exporter", SERVICE_VERSION: __version__, SERVICE_INSTANCE_ID: str(instance)}
    return Resource.create(ours).merge(OTELResourceDetector().detect())
