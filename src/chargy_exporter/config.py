"""Command-line flags and environment variables → one validated, immutable `Config`.

Each option is declared once, in `build_parser`, with the environment variable(s) it falls back to; the flag
wins. The OTLP exporters of the SDK read their own `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers,
compression, TLS, temporality): only what the SDK does not decide in code is an option here. The URL's API key
and the OTLP header values are secrets: `redact` removes them from any text before it is logged or shown.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from . import __version__

PUBLIC_FEED_URL: Final = (
    "https://my.chargy.lu/b2bev-external-services/resources/kml?API-KEY=486ac6e4-93b8-4369-9c6a-28f7c4e1a81f"
)
DEMO_FEED_PATH: Final = Path(__file__).parent / "data" / "sample-feed.kml"
REDACTED: Final = "REDACTED"
GRPC: Final = "grpc"
HTTP_PROTOBUF: Final = "http/protobuf"
# What requests.utils.requote_uri leaves unquoted.
_REQUOTE_SAFE: Final = "!#$%&'()*+,/:;=?@[]~"
# Query parameters whose value is a credential, compared case-insensitively.
_SECRET_PARAMETERS: Final = re.compile(r"^(api[-_]?key|key|token|access[-_]?token|secret|password)$", re.IGNORECASE)
# A shorter header value (or part of one) is not a credential, and redacting it would blank out ordinary text.
_MIN_SECRET_LENGTH: Final = 6
HEADER_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
SDK_VARIABLES: Final = """\
Read by the OpenTelemetry SDK itself (OTLP push; _METRICS_ variants win over the generic ones):
  OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT     receiver when --otlp-endpoint is not given (default
                                            http://localhost:4317, or :4318/v1/metrics for http/protobuf;
                                            the generic one gets /v1/metrics appended for http/protobuf)
  OTEL_EXPORTER_OTLP_[METRICS_]HEADERS      k=v,k2=v2 sent with every export; the values are never logged
  OTEL_EXPORTER_OTLP_[METRICS_]COMPRESSION  gzip or none
  OTEL_EXPORTER_OTLP_[METRICS_]INSECURE     true: plaintext gRPC to a host:port endpoint
  OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE  CA file to trust (also _CLIENT_KEY, _CLIENT_CERTIFICATE)
  OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
                                            cumulative (default), delta or lowmemory
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
                                            the resource (OTLP and target_info); they win over ours
gRPC's own GRPC_VERBOSITY and GRPC_TRACE are honoured too; requests honours HTTPS_PROXY and NO_PROXY."""


@dataclass(frozen=True)
class OtlpSettings:
    """What we tell the SDK's OTLP exporter and reader; the rest it reads from the environment itself."""

    protocol: str = GRPC
    endpoint: str | None = None  # --otlp-endpoint; None: the SDK reads OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT
    # Seconds. The Python SDK reads OTEL_EXPORTER_OTLP_TIMEOUT as seconds, the specification says milliseconds:
    # we read it (as milliseconds) and always pass it, so that 10000 means 10 s as everywhere else.
    timeout: float = 10.0
    export_interval: float = 60.0  # seconds
    export_timeout: float = 30.0  # seconds, per collection and export

    @property
    def shown_endpoint(self) -> str:
        """The receiver, for logs: without userinfo, query or fragment. The SDK keeps the endpoint it resolved
        to itself, so when we do not give one this follows its rules on the same variables."""
        endpoint = self.endpoint or _environment_endpoint(self.protocol, os.environ)
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else f"{host}{port}{parts.path}"


@dataclass(frozen=True)
class Config:
    kml_url: str = PUBLIC_FEED_URL
    demo: bool = False
    host: str = "0.0.0.0"
    port: int = 9000
    refresh_interval: float = 300.0
    fetch_timeout: float = 30.0
    max_feed_bytes: int = 20 * 1024 * 1024
    max_connectors: int = 20_000
    log_level: str = "info"
    metrics_exporter: str = "prometheus"  # comma list of prometheus, otlp; or none
    otlp_endpoint: str | None = None
    otlp_protocol: str = GRPC
    otlp_timeout: float = 10_000.0  # milliseconds, like the OTEL_* variables
    otlp_export_interval: float = 60_000.0
    otlp_export_timeout: float = 30_000.0
    # Values that must never appear in any output (the API key of kml_url, OTLP header values...).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def redact(self, text: str) -> str:
        return redact_text(text, self.secrets)

    @property
    def redacted_url(self) -> str:
        return self.redact(self.kml_url)

    @property
    def otlp(self) -> OtlpSettings | None:
        """The OTLP push settings, None when otlp is not among the exporters."""
        if "otlp" not in self.metrics_exporter.split(","):
            return None
        return OtlpSettings(
            self.otlp_protocol,
            self.otlp_endpoint,
            self.otlp_timeout / 1000,
            self.otlp_export_interval / 1000,
            self.otlp_export_timeout / 1000,
        )


# ---- secrets --------------------------------------------------------------------------------------------------


def url_secrets(url: str) -> tuple[str, ...]:
    """The credential values carried by a URL: secret query parameters and a userinfo password."""
    parts = urlsplit(url)
    found = [value for name, value in parse_qsl(parts.query, keep_blank_values=False) if _SECRET_PARAMETERS.match(name)]
    # Also as written in the URL and as requests re-quotes it (urllib3 logs that form): "a%2Fb", "a+b", "a b".
    for pair in parts.query.split("&"):
        name, _, raw = pair.partition("=")
        if raw and _SECRET_PARAMETERS.match(unquote_plus(name)):
            found.extend((raw, quote(raw, safe=_REQUOTE_SAFE), quote(unquote_plus(raw), safe="")))
    if parts.password:
        found.extend((parts.password, unquote(parts.password)))
    return _longest_first(found)


def header_secrets(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The OTLP header values the SDK will send, as written and decoded, and their words (`Bearer <token>`).

    From the raw variables rather than from a parse: the SDK logs an entry it cannot parse, value included.
    """
    found: list[str] = []
    for name in HEADER_VARIABLES:
        for entry in environ.get(name, "").split(","):
            key, equals, value = entry.partition("=")
            for text in {value if equals else key, unquote(value if equals else key)}:
                found.extend(part for part in (text.strip(), *text.split()) if len(part) >= _MIN_SECRET_LENGTH)
    return _longest_first(found)


def _longest_first(secrets: Sequence[str]) -> tuple[str, ...]:
    # So that a secret containing another is replaced whole.
    return tuple(sorted({secret for secret in secrets if secret}, key=len, reverse=True))


def redact_text(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_url(url: str) -> str:
    return redact_text(url, url_secrets(url))


class RedactingFilter(logging.Filter):
    """Replaces secrets in every log record, including those of requests/urllib3 which log full URLs."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = redact_text(message, self._secrets)
            if redacted != message or record.exc_info:
                record.msg, record.args = redacted, None
            if record.exc_info:
                # The formatted traceback can carry the URL too: format it now, and redact it below.
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            # Also when another handler formatted it first: formatters reuse exc_text as it is.
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text, self._secrets)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info, self._secrets)
        return True


# ---- feed location --------------------------------------------------------------------------------------------


def local_feed_path(url: str) -> Path | None:
    """The file a `file://` URL or a plain path names; None for http(s)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    return Path(unquote(parts.path) if parts.scheme == "file" else url)


def check_feed_file(url: str) -> None:
    """A feed file must be readable at startup: a typo in a path is a config error, not a refresh failing forever.

    A file that disappears later is a refresh error (`file`); the last good data is kept.
    """
    path = local_feed_path(url)
    if path is None:
        return
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read the feed file {path}: {error.strerror or error}") from None


def _environment_endpoint(protocol: str, environ: Mapping[str, str]) -> str:
    """The endpoint the SDK exporter resolves from the OTLP variables (OTLP exporter specification)."""
    if specific := environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        return specific
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if protocol == GRPC:
        return base or "http://localhost:4317"
    return f"{(base or 'http://localhost:4318').rstrip('/')}/v1/metrics"


# ---- value types: each raises ArgumentTypeError with the reason, which argparse shows as is -------------------


def _kml_url(value: str) -> str:
    # The message never repeats the value: it may carry the API key.
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise argparse.ArgumentTypeError("an http(s) URL needs a host")
    elif not (parts.scheme in ("file", "") or len(parts.scheme) == 1):  # "C:" is a Windows drive
        raise argparse.ArgumentTypeError(f"unsupported URL scheme {parts.scheme!r} (use http, https, file or a path)")
    if not value:
        raise argparse.ArgumentTypeError("empty")
    return value


def _number(low: float, high: float, unit: str, whole: bool = False) -> Callable[[str], Any]:
    """A number of `unit` within [low, high]; with `whole`, an int, and KiB/MiB/GiB suffixes for bytes."""

    def convert(text: str) -> float | int:
        match = re.fullmatch(r"\s*([^\skKmMgG]+)\s*(?:([kKmMgG])i?[bB]?)?\s*", text) if unit == " bytes" else None
        multiplier = 1024 ** " kmg".index(match.group(2).lower()) if match and match.group(2) else 1
        try:
            number = (int if whole else float)(match.group(1) if match else text) * multiplier
        except ValueError:
            number = math.nan
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be from {_plain(low)} to {_plain(high)}{unit}, not {text!r}")
        return number

    return convert


def _plain(value: object) -> str:
    """300.0 → "300", 0.1 → "0.1", 1073741824 → "1073741824": numbers as one would type them."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def _choice(*allowed: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            hint = " (http/json is not supported)" if value == "http/json" else ""
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}{hint}, not {text!r}")
        return value

    return convert


def _exporters(text: str) -> str:
    names = list(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in ("prometheus", "otlp", "none")]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise argparse.ArgumentTypeError(f"must be prometheus, otlp (comma-separated) or none, not {text!r}")
    return ",".join(names)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"must be true or false, not {text!r}")
    return value in ("1", "true", "yes", "on")


def _otlp_endpoint(endpoint: str, protocol: str) -> str:
    """--otlp-endpoint checked for the protocol; for http/protobuf, a URL without path gets /v1/metrics."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError("invalid port") from None
    if parts.scheme not in ("http", "https") and (parts.scheme or protocol == HTTP_PROTOBUF):
        need = "an http:// or https:// URL" + (" or host:port" if protocol == GRPC else "")
        raise argparse.ArgumentTypeError(f"must be {need} for {protocol}")
    if not parts.hostname or (not parts.scheme and not port):
        raise argparse.ArgumentTypeError("needs a host, and a port unless it is a URL")
    if protocol == HTTP_PROTOBUF and parts.path in ("", "/"):
        return f"{endpoint.rstrip('/')}/v1/metrics"  # a bare collector address: the usual path
    return endpoint


# ---- the options ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, plus the environment variables of each option (read by `load_config`, the flag winning)."""

    def __init__(self) -> None:
        super().__init__(
            prog="chargy-exporter",
            description="Export the live state of Luxembourg's Chargy EV-charging network as Prometheus /\n"
            "OpenTelemetry metrics. Each option can also be set by the environment variable shown;\nthe flag wins.",
            epilog=SDK_VARIABLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.environment: dict[str, tuple[argparse.Action, tuple[str, ...]]] = {}

    def option(self, flag: str, variables: str, convert: Callable[[str], Any] | None, metavar: str, text: str) -> None:
        """`flag`, falling back to the space-separated `variables` (the first set wins), then to Config's default."""
        dest = flag.removeprefix("--").replace("-", "_")
        default = getattr(Config(), dest)
        shown = "off" if default is False else "none" if default is None else redact_url(_plain(default))
        switch = {"action": "store_const", "const": True} if convert is None else {"type": convert, "metavar": metavar}
        action = self.add_argument(
            flag,
            default=None,  # None: not given; load_config then looks at the environment, then at Config's default
            help=f"{text} [{' or '.join(variables.split())}; default: {shown}]".replace("%", "%%"),
            **switch,  # type: ignore[arg-type]
        )
        self.environment[dest] = (action, tuple(variables.split()))

    def error(self, message: str) -> NoReturn:
        # One line naming the option ("argument --port: ..." → "--port: ..."), exit code 2, no usage block.
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def build_parser() -> _Parser:
    parser = _Parser()
    option = parser.option
    option("--kml-url", "KML_URL", _kml_url, "URL", "feed to read: http(s) URL, file:// URL or path")
    option("--demo", "CHARGY_DEMO", None, "", "serve the bundled sample feed instead (no internet needed)")
    option("--host", "OTEL_EXPORTER_PROMETHEUS_HOST", str.strip, "ADDR", "address of /metrics, / and /healthz")
    option("--port", "OTEL_EXPORTER_PROMETHEUS_PORT", _number(1, 65535, "", True), "PORT", "their port")
    seconds = " seconds"
    option("--refresh-interval", "CHARGY_REFRESH_INTERVAL", _number(1, 86_400, seconds), "SECONDS",
           "seconds between feed refreshes; the upstream is asked at most once per interval")  # fmt: skip
    option("--fetch-timeout", "CHARGY_FETCH_TIMEOUT", _number(0.1, 300, seconds), "SECONDS",
           "seconds one fetch may take in all, retries included")  # fmt: skip
    option("--max-feed-bytes", "CHARGY_MAX_FEED_BYTES", _number(1024, 1024**3, " bytes", True), "BYTES",
           "largest feed accepted, decompressed (bytes, or with KiB/MiB/GiB)")  # fmt: skip
    option("--max-connectors", "CHARGY_MAX_CONNECTORS", _number(1, 1_000_000, " connectors", True), "N",
           "largest number of connectors accepted (memory grows ~16 KB per connector)")  # fmt: skip
    levels = ("debug", "info", "warning", "error", "critical")
    option("--log-level", "CHARGY_LOG_LEVEL", _choice(*levels), "LEVEL", ", ".join(levels))
    option("--metrics-exporter", "OTEL_METRICS_EXPORTER", _exporters, "LIST",
           "comma list: prometheus (the /metrics endpoint), otlp (push); or none")  # fmt: skip
    option("--otlp-endpoint", "CHARGY_OTLP_ENDPOINT", str.strip, "URL",
           "OTLP receiver; enables otlp (http/protobuf: a URL without path gets /v1/metrics)")  # fmt: skip
    option("--otlp-protocol", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL OTEL_EXPORTER_OTLP_PROTOCOL",
           _choice(GRPC, HTTP_PROTOBUF), "PROTOCOL", "grpc or http/protobuf")  # fmt: skip
    ms = " milliseconds"
    option("--otlp-timeout", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT OTEL_EXPORTER_OTLP_TIMEOUT",
           _number(100, 600_000, ms), "MS", "milliseconds one OTLP request may take")  # fmt: skip
    option("--otlp-export-interval", "OTEL_METRIC_EXPORT_INTERVAL", _number(100, 86_400_000, ms), "MS",
           "milliseconds between OTLP pushes")  # fmt: skip
    option("--otlp-export-timeout", "OTEL_METRIC_EXPORT_TIMEOUT", _number(100, 3_600_000, ms), "MS",
           "milliseconds one collection and push may take (100,000 connectors take seconds)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# The standard OTLP variables may be set for other programs of the same environment: read only with otlp on.
_OTLP_ONLY: Final = ("otlp_protocol", "otlp_timeout", "otlp_export_interval", "otlp_export_timeout")


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parse flags and environment into a Config; a bad value exits with status 2 and a one-line error."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # how each option was given, as error messages name it

    def resolve(dest: str) -> None:
        action, variables = parser.environment[dest]
        flag, values[dest] = action.option_strings[0], args[dest]
        sources[dest] = flag
        given = next(((name, environ[name]) for name in variables if environ.get(name, "").strip()), None)
        if values[dest] is None and given is not None:
            sources[dest] = f"{flag} (from {given[0]})"
            try:
                # Every option has a type but the --demo switch, whose variable is a boolean.
                convert: Callable[[str], Any] = action.type or _boolean  # type: ignore[assignment]
                values[dest] = convert(given[1])
            except argparse.ArgumentTypeError as error:
                parser.error(f"{sources[dest]}: {error}")
        if values[dest] is None:
            del values[dest]

    for dest in [dest for dest in parser.environment if dest not in _OTLP_ONLY]:
        resolve(dest)
    if values.get("demo"):
        if "kml_url" in values:
            # Serving the sample while the user believes they watch their feed would be worse than stopping.
            parser.error(
                f"{sources['demo']} and {sources['kml_url']} cannot be combined: "
                "--demo serves the bundled sample feed instead of a URL; drop one of them"
            )
        values["kml_url"] = DEMO_FEED_PATH.as_uri()
    exporters = [name for name in values.get("metrics_exporter", "prometheus").split(",") if name != "none"]
    if "otlp_endpoint" in values and "otlp" not in exporters:
        exporters.append("otlp")  # as documented; the standard endpoint variables alone do not enable push
    values["metrics_exporter"] = ",".join(exporters) or "none"
    secrets = [*url_secrets(values.get("kml_url", PUBLIC_FEED_URL))]
    if "otlp" in exporters:
        for dest in _OTLP_ONLY:
            resolve(dest)
        secrets += header_secrets(environ)
    try:
        check_feed_file(values.get("kml_url", PUBLIC_FEED_URL))
    except argparse.ArgumentTypeError as error:
        parser.error(f"{sources['kml_url']}: {error}")
    if "otlp_endpoint" in values:
        try:
            values["otlp_endpoint"] = _otlp_endpoint(values["otlp_endpoint"], values.get("otlp_protocol", GRPC))
        except argparse.ArgumentTypeError as error:
            parser.error(f"{sources['otlp_endpoint']}: {error}")
        secrets += url_secrets(values["otlp_endpoint"])
    return Config(**values, secrets=_longest_first(secrets))
