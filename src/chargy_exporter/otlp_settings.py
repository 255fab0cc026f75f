"""OTLP push settings: the OpenTelemetry environment variables and our flags, resolved and validated up front.

The SDK does not read `OTEL_EXPORTER_OTLP_PROTOCOL` when exporters are built in code, and reads the rest only
when the program runs: resolving everything here makes a bad value a one-line error naming the variable (exit
status 2) at start-up, like every other option.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from .config import ConfigError, url_secrets

if TYPE_CHECKING:
    from .config import Config

GRPC: Final = "grpc"
HTTP_PROTOBUF: Final = "http/protobuf"
PROTOCOLS: Final = (GRPC, HTTP_PROTOBUF)
DEFAULT_GRPC_ENDPOINT: Final = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT: Final = "http://localhost:4318/v1/metrics"
METRICS_PATH: Final = "v1/metrics"
TEMPORALITIES: Final = ("cumulative", "delta", "lowmemory")  # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
_MIN_REDACTED_LENGTH: Final = 6


# ---- settings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OtlpSettings:
    protocol: str = GRPC
    # gRPC: a URL (http:// = plaintext, https:// = TLS) or host:port; HTTP: the full URL requests are POSTed to.
    endpoint: str = DEFAULT_GRPC_ENDPOINT
    insecure: bool = False  # gRPC only, for an endpoint without scheme
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    compression: str = "none"  # or "gzip"
    timeout: float = 10.0  # seconds, per request
    certificate: str | None = None  # PEM file of the CA to trust for TLS
    export_interval: float = 60.0  # seconds
    export_timeout: float = 30.0  # seconds, per collection and export
    # cumulative, delta or lowmemory: checked here; the SDK exporter reads the variable itself and the reader
    # follows it (delta: counters as deltas; lowmemory: synchronous counters only, which we do not have).
    temporality: str = "cumulative"

    @property
    def secrets(self) -> tuple[str, ...]:
        """For the log redaction: header values and their token parts (`Bearer <token>`); too short a value
        would blank out ordinary text, and we never log a header anyway."""
        found = set(url_secrets(self.endpoint))
        for _, value in self.headers:
            found.update(part for part in (value, *value.split()) if len(part) >= _MIN_REDACTED_LENGTH)
        return tuple(found)

    @property
    def shown_endpoint(self) -> str:
        """The endpoint for logs: without userinfo, query or fragment."""
        parts = urlsplit(self.endpoint if "://" in self.endpoint else f"//{self.endpoint}")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        scheme = f"{parts.scheme}://" if parts.scheme else ""
        return f"{scheme}{host}{port}{parts.path}"


class _Environment:
    """OTEL_* variables: blank means unset; the `_METRICS_` variant of an exporter variable wins."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str) -> tuple[str, str] | None:
        value = self._environ.get(name, "").strip()
        return (name, value) if value else None

    def signal(self, suffix: str) -> tuple[str, str] | None:
        return self.get(f"OTEL_EXPORTER_OTLP_METRICS_{suffix}") or self.get(f"OTEL_EXPORTER_OTLP_{suffix}")


def resolve_otlp(config: Config, environ: Mapping[str, str]) -> dict[str, Any]:
    """Config values decided by the OTLP options: the final exporter list, `otlp` settings, secrets.

    `--otlp-endpoint` adds `otlp` to the exporters; the standard endpoint variables alone do not (as with the
    SDK, `OTEL_METRICS_EXPORTER` decides). Raises ConfigError naming the offending option.
    """
    exporters = [name for name in config.metrics_exporter.split(",") if name and name != "none"]
    if config.otlp_endpoint and "otlp" not in exporters:
        exporters.append("otlp")
    values: dict[str, Any] = {"metrics_exporter": ",".join(exporters) or "none", "otlp": None}
    if "otlp" not in exporters:
        return values
    env = _Environment(environ)

    protocol = config.otlp_protocol
    if not protocol:
        given = env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = _checked(given, parse_protocol) if given else GRPC

    insecure_given = env.signal("INSECURE")
    insecure = _checked(insecure_given, _parse_boolean) if insecure_given else False
    endpoint = _endpoint(config, env, protocol)
    headers_given = env.signal("HEADERS")
    compression_given = env.signal("COMPRESSION")
    timeout_given = env.signal("TIMEOUT")
    certificate_given = env.signal("CERTIFICATE")
    interval_given = env.get("OTEL_METRIC_EXPORT_INTERVAL")
    export_timeout_given = env.get("OTEL_METRIC_EXPORT_TIMEOUT")
    temporality_given = env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
    settings = OtlpSettings(
        protocol=protocol,
        endpoint=endpoint,
        insecure=insecure,
        headers=_checked(headers_given, parse_headers) if headers_given else (),
        compression=_checked(compression_given, _parse_compression) if compression_given else "none",
        timeout=_checked(timeout_given, _milliseconds) if timeout_given else 10.0,
        certificate=_checked(certificate_given, _readable_file) if certificate_given else None,
        export_interval=_checked(interval_given, _milliseconds) if interval_given else 60.0,
        export_timeout=_checked(export_timeout_given, _milliseconds) if export_timeout_given else 30.0,
        temporality=_checked(temporality_given, _parse_temporality) if temporality_given else "cumulative",
    )
    secrets = {*config.secrets, *settings.secrets}
    values.update(otlp=settings, secrets=tuple(sorted(secrets, key=len, reverse=True)))
    return values


def _checked(given: tuple[str, str], convert: Callable[[str], Any]) -> Any:
    name, value = given
    try:
        return convert(value)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None
    except ValueError:
        raise ConfigError(f"{name}: invalid value") from None


def _endpoint(config: Config, env: _Environment, protocol: str) -> str:
    if config.otlp_endpoint:
        name, endpoint = "--otlp-endpoint", config.otlp_endpoint
        if protocol == HTTP_PROTOBUF and "://" in endpoint and urlsplit(endpoint).path in ("", "/"):
            endpoint = f"{endpoint.rstrip('/')}/{METRICS_PATH}"  # a bare collector address: the usual path
    elif specific := env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        name, endpoint = specific  # used as is (OTLP exporter spec)
    elif generic := env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        name, endpoint = generic
        if protocol == HTTP_PROTOBUF:  # the spec: the signal path is appended to the base URL, path kept
            parts = urlsplit(endpoint)
            endpoint = parts._replace(path=f"{parts.path.rstrip('/')}/{METRICS_PATH}").geturl()
    else:
        return DEFAULT_HTTP_ENDPOINT if protocol == HTTP_PROTOBUF else DEFAULT_GRPC_ENDPOINT
    try:
        if protocol == GRPC:
            grpc_target(endpoint, insecure=False)
        else:
            _http_url(endpoint)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None
    return endpoint


def parse_protocol(value: str) -> str:
    protocol = value.strip().lower()
    if protocol not in PROTOCOLS:
        hint = " (http/json is not supported)" if protocol == "http/json" else ""
        raise ConfigError(f"must be grpc or http/protobuf{hint}")
    return protocol


def parse_headers(value: str) -> tuple[tuple[str, str], ...]:
    """`key1=value1,key2=value2` (W3C baggage format, values percent-encoded). Errors never show a value."""
    headers: list[tuple[str, str]] = []
    for position, entry in enumerate(value.split(","), start=1):
        if not entry.strip():
            continue
        key, equals, raw = entry.partition("=")
        key = key.strip().lower()
        if not equals or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", key):
            raise ConfigError(f"header {position} is not key=value with a valid header name")
        header_value = unquote(raw.strip())
        if re.search(r"[\x00-\x1f\x7f]", header_value):
            raise ConfigError(f"the value of header {key!r} contains control characters")
        headers.append((key, header_value))
    return tuple(headers)


def _parse_compression(value: str) -> str:
    compression = value.strip().lower()
    if compression not in ("gzip", "none"):
        raise ConfigError("must be gzip or none")
    return compression


def _parse_temporality(value: str) -> str:
    temporality = value.strip().lower()
    if temporality not in TEMPORALITIES:
        raise ConfigError("must be cumulative, delta or lowmemory")
    return temporality


def _parse_boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ConfigError("must be true or false")
    return lowered == "true"


def _milliseconds(value: str) -> float:
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = math.nan
    if not 0 < milliseconds < math.inf:
        raise ConfigError(f"must be a positive number of milliseconds, not {value!r}")
    return milliseconds / 1000


def _readable_file(value: str) -> str:
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ConfigError("not a readable file")
    return value


def grpc_target(endpoint: str, insecure: bool) -> tuple[str, bool]:
    """(gRPC target host:port, use TLS) for an OTLP/gRPC endpoint: a URL or host:port."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"unsupported scheme {parts.scheme!r} (use http://, https:// or host:port)")
        secure = parts.scheme == "https"
        default_port = 443 if secure else 80
    else:
        parts = urlsplit(f"//{endpoint}")
        secure, default_port = not insecure, 0
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError("invalid port") from None
    if not parts.hostname:
        raise ConfigError("needs a host")
    if not port:
        raise ConfigError("needs a port (host:port) or a URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", secure


def _http_url(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ConfigError("must be an http:// or https:// URL for http/protobuf")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError("invalid port") from None
    if not parts.hostname:
        raise ConfigError("needs a host")
    return endpoint
