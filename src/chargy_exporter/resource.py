"""The OpenTelemetry resource of the exporter: who is reporting, on OTLP and in `target_info`.

`service.instance.id` is stable across restarts: a UUID v5 (in the namespace the semantic conventions give for
it) of the host name, the listen port and the feed URL without its secrets. A restarted exporter goes on with
the same series at a Collector, instead of leaving the old instance's series behind until they expire; two
exporters on one host differ by their port. `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` win over all of it.
"""

from __future__ import annotations

import socket
import uuid
from typing import Final

from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)

from . import __version__
from .config import Config

SERVICE: Final = "chargy-exporter"
# The namespace the semantic conventions prescribe for a service.instance.id derived as a UUID v5.
INSTANCE_ID_NAMESPACE: Final = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")


def instance_id(host_name: str, port: int, redacted_feed_url: str) -> str:
    """The same inputs give the same id; the feed URL must come without its secrets (`Config.redacted_url`)."""
    return str(uuid.uuid5(INSTANCE_ID_NAMESPACE, f"{host_name}\n{port}\n{redacted_feed_url}"))


def build_resource(config: Config, port: int) -> Resource:
    """Our service name, version and stable instance id, then whatever OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME set over them (`Resource.create` alone would let ours win)."""
    ours = {
        SERVICE_NAME: SERVICE,
        SERVICE_VERSION: __version__,
        SERVICE_INSTANCE_ID: instance_id(socket.gethostname(), port, config.redacted_url),
    }
    return Resource.create(ours).merge(OTELResourceDetector().detect())
