"""Flags and environment variables → one validated, immutable `Config`. Each option is declared once, in
`build_parser`, with the variable(s) it falls back to; the flag wins. The API key and OTLP header values are secrets."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from . import __version__
from .webconfig import WebConfig, load_web_config

PUBLIC_FEED_URL: Final = (
    "https://my.chargy.lu/b2bev-external-services/resources/kml?API-KEY=486ac6e4-93b8-4369-9c6a-28f7c4e1a81f"
)
# A small three-station sample of the feed's shape, bundled for users and tests to read; --demo serves demo.py's.
DEMO_FEED_PATH: Final = Path(__file__).parent / "data" / "sample-feed.kml"
DEMO_FEED: Final = "the built-in demo network"  # what logs show as the feed's URL under --demo
GRPC: Final = "grpc"
HTTP_PROTOBUF: Final = "http/protobuf"
# Query parameters whose value is a credential, compared case-insensitively.
_SECRET_PARAMETERS: Final = re.compile(r"^(api[-_]?key|key|token|access[-_]?token|secret|password)$", re.IGNORECASE)
# A shorter header value (or word of one) is not a credential, and redacting it would blank out ordinary text.
_MIN_SECRET_LENGTH: Final = 6
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
        """The receiver, for logs, without userinfo, query or fragment. Without ours, the one the SDK resolves
        from the standard variables (it does not tell), by the OTLP exporter specification's rules."""
        specific = self.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if self.protocol != GRPC:
            base = f"{(base or 'http://localhost:4318').rstrip('/')}/v1/metrics"
        endpoint = specific or base or "http://localhost:4317"
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")  # gRPC's host:port
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=host, query="", fragment="").geturl().removeprefix("//")


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
    web_config_file: WebConfig | None = None  # TLS and basic auth of the HTTP server, read and checked
    # Values that must never appear in any output (the API key of kml_url, OTLP header values...).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def redact(self, text: str) -> str:
        return redact_text(text, self.secrets)

    @property
    def redacted_url(self) -> str:
        return self.redact(self.kml_url)

    @property
    def otlp(self) -> OtlpSettings | None:
        if "otlp" not in self.metrics_exporter.split(","):
            return None
        seconds = [ms / 1000 for ms in (self.otlp_timeout, self.otlp_export_interval, self.otlp_export_timeout)]
        return OtlpSettings(self.otlp_protocol, self.otlp_endpoint, *seconds)


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials of a URL (secret query parameters, the userinfo password) in every form a log may show:
    as written, decoded, as requests re-quotes it (urllib3 logs that form) and fully quoted."""
    parts = urlsplit(url)
    found = [parts.password or "", unquote(parts.password or "")]
    for pair in parts.query.split("&"):
        name, _, raw = pair.partition("=")
        if raw and _SECRET_PARAMETERS.match(unquote_plus(name)):
            value = unquote_plus(raw)
            found += [raw, value, quote(raw, safe="!#$%&'()*+,/:;=?@[]~"), quote(value, safe="")]
    return _longest_first(found)


def header_secrets(environ: Mapping[str, str]) -> list[str]:
    """The OTLP header values the SDK will send, as written and decoded, and their words (`Bearer <token>`).
    From the raw variables rather than from a parse: the SDK logs an entry it cannot parse, value included."""
    found: list[str] = []
    for name in ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        for entry in environ.get(name, "").split(","):
            value = entry.partition("=")[2] if "=" in entry else entry
            for text in (value, unquote(value)):
                found += [part for part in (text.strip(), *text.split()) if len(part) >= _MIN_SECRET_LENGTH]
    return found


def _longest_first(secrets: Sequence[str]) -> tuple[str, ...]:
    # So that a secret containing another is replaced whole.
    return tuple(sorted({secret for secret in secrets if secret}, key=len, reverse=True))


def redact_text(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "REDACTED")
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
            record.msg, record.args = redact_text(record.getMessage(), self._secrets), None
            if record.exc_info:  # the traceback can carry the URL too: format it now, to redact it below
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:  # also when another handler formatted it first: formatters reuse it as it is
                record.exc_text = redact_text(record.exc_text, self._secrets)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info, self._secrets)
        return True


def local_feed_path(url: str) -> Path:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else Path(url)


def _kml_url(text: str) -> str:
    """An http(s) URL, or a file readable now: a typo in a path is a config error, not a refresh failing forever
    (one that disappears later fails refreshes, the last good data kept). Errors never show the URL: it has the key."""
    url = text.strip()
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise argparse.ArgumentTypeError("an http(s) URL needs a host")
        return url
    if not (parts.scheme in ("file", "") or len(parts.scheme) == 1):  # "C:" is a Windows drive
        raise argparse.ArgumentTypeError(f"unsupported URL scheme {parts.scheme!r} (use http, https, file or a path)")
    path = local_feed_path(url)
    try:
        with path.open("rb"):
            return url
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read the feed file {path}: {error.strerror or error}") from None


def _number(low: float, high: float, unit: str, parse: Callable[[str], float] = float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            number = parse(text)
        except ValueError:
            number = math.nan
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{unit}, not {text!r}")
        return number

    return convert


def _bytes(text: str) -> int:
    """A byte count, possibly with a binary suffix: 512K, 5MiB, 1 GB."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:([kmg])i?b?)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(text)
    return int(match[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[(match[2] or "").lower()]


def _choice(*allowed: str, many: bool = False) -> Callable[[str], str]:
    """One of `allowed`, in any case; with `many`, a comma list of them without duplicates, or "none" alone."""

    def convert(text: str) -> str:
        names = dict.fromkeys(name.strip().lower() for name in (text.split(",") if many else [text]) if name.strip())
        if not names or not set(allowed).issuperset(names) or ("none" in names and len(names) > 1):
            listed = f"{', '.join(allowed)}{' (comma-separated)' if many else ''}"
            raise argparse.ArgumentTypeError(f"must be one of {listed}, not {text!r}")
        return ",".join(names)

    return convert


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"must be true or false, not {text!r}")
    return value in ("1", "true", "yes", "on")


def _otlp_endpoint(endpoint: str, protocol: str) -> str:
    """An http(s) URL, or host:port for gRPC; for http/protobuf, a URL without path gets /v1/metrics."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError("invalid port") from None
    host_port = protocol == GRPC and not parts.scheme and port
    if not parts.hostname or not (parts.scheme in ("http", "https") or host_port):
        need = "an http:// or https:// URL" + (" or host:port" if protocol == GRPC else "")
        raise argparse.ArgumentTypeError(f"must be {need} for {protocol}")
    if protocol == HTTP_PROTOBUF and parts.path in ("", "/"):
        return f"{endpoint.rstrip('/')}/v1/metrics"  # a bare collector address: the usual path
    return endpoint


class _Parser(argparse.ArgumentParser):
    """argparse, plus the environment variables of each option (read by `load_config`, the flag winning)."""

    def __init__(self) -> None:
        super().__init__(
            prog="chargy-exporter",
            description="Export the live state of Luxembourg's Chargy EV-charging network as Prometheus /\n"
            "OpenTelemetry metrics. Each option can also be set by the environment variable shown;\nthe flag wins.",
            epilog=SDK_VARIABLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            argument_default=argparse.SUPPRESS,  # a flag not given is absent: the environment, then Config, decide
        )
        self.environment: dict[str, tuple[argparse.Action, tuple[str, ...]]] = {}

    def option(
        self, flag: str, variables: str, convert: Callable[[str], Any] | None, metavar: str, text: str, *aliases: str
    ) -> None:
        """`flag` (or an alias), else the first of `variables` set, else Config's default; no `convert`: a switch."""
        dest = flag.removeprefix("--").replace("-", "_")
        default = getattr(Config(), dest)
        if isinstance(default, float):
            default = f"{default:g}"  # 300.0 as 300
        shown = "off" if default is False else "none" if default is None else redact_url(str(default))
        kind = {"action": "store_true"} if convert is None else {"type": convert, "metavar": metavar}
        described = f"{text} [{' or '.join(variables.split())}; default: {shown}]".replace("%", "%%")
        action = self.add_argument(flag, *aliases, dest=dest, help=described, **kind)
        self.environment[dest] = (action, tuple(variables.split()))

    def error(self, message: str) -> NoReturn:
        # One line naming the option ("argument --port: ..." → "--port: ..."), exit code 2, no usage block.
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def build_parser() -> _Parser:
    parser = _Parser()
    option = parser.option
    seconds, ms = " seconds", " milliseconds"
    option("--kml-url", "KML_URL", _kml_url, "URL", "feed to read: http(s) URL, file:// URL or path")
    demo = "serve a made-up network of the live one's size whose states change (no internet needed)"
    option("--demo", "CHARGY_DEMO", None, "", demo)
    option("--host", "OTEL_EXPORTER_PROMETHEUS_HOST", str.strip, "ADDR", "address of /metrics, / and /healthz")
    option("--port", "OTEL_EXPORTER_PROMETHEUS_PORT", _number(1, 65535, "", int), "PORT", "their port")
    option("--refresh-interval", "CHARGY_REFRESH_INTERVAL", _number(1, 86_400, seconds), "SECONDS",
           "seconds between feed refreshes; the upstream is asked at most once per interval")  # fmt: skip
    option("--fetch-timeout", "CHARGY_FETCH_TIMEOUT", _number(0.1, 300, seconds), "SECONDS",
           "seconds one fetch may take in all, retries included")  # fmt: skip
    option("--max-feed-bytes", "CHARGY_MAX_FEED_BYTES", _number(1024, 1024**3, " bytes", _bytes), "BYTES",
           "largest feed accepted, decompressed (bytes, or with KiB/MiB/GiB)")  # fmt: skip
    option("--max-connectors", "CHARGY_MAX_CONNECTORS", _number(1, 1_000_000, " connectors", int), "N",
           "largest number of connectors accepted (memory: ~5 KB each; ~11 KB with OTLP push exporting every "
           "second)")  # fmt: skip
    levels = ("debug", "info", "warning", "error", "critical")
    option("--log-level", "CHARGY_LOG_LEVEL", _choice(*levels), "LEVEL", ", ".join(levels))
    option("--metrics-exporter", "OTEL_METRICS_EXPORTER", _choice("prometheus", "otlp", "none", many=True), "LIST",
           "comma list: prometheus (the /metrics endpoint), otlp (push); or none")  # fmt: skip
    option("--otlp-endpoint", "CHARGY_OTLP_ENDPOINT", str.strip, "URL",
           "OTLP receiver; enables otlp (http/protobuf: a URL without path gets /v1/metrics)")  # fmt: skip
    option("--otlp-protocol", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL OTEL_EXPORTER_OTLP_PROTOCOL",
           _choice(GRPC, HTTP_PROTOBUF), "PROTOCOL", "grpc or http/protobuf")  # fmt: skip
    option("--otlp-timeout", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT OTEL_EXPORTER_OTLP_TIMEOUT",
           _number(100, 600_000, ms), "MS", "milliseconds one OTLP request may take")  # fmt: skip
    option("--otlp-export-interval", "OTEL_METRIC_EXPORT_INTERVAL", _number(100, 86_400_000, ms), "MS",
           "milliseconds between OTLP pushes")  # fmt: skip
    option("--otlp-export-timeout", "OTEL_METRIC_EXPORT_TIMEOUT", _number(100, 3_600_000, ms), "MS",
           "milliseconds one export may take (100,000 connectors take seconds to encode)")  # fmt: skip
    option("--web-config-file", "CHARGY_WEB_CONFIG_FILE", load_web_config, "FILE",
           "exporter-toolkit web configuration (as node_exporter's --web.config.file): TLS, client certificates, "
           "basic auth", "--web.config.file")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# The standard OTLP variables may be set for other programs of the same environment: read only with otlp on.
_OTLP_ONLY: Final = ("otlp_protocol", "otlp_timeout", "otlp_export_interval", "otlp_export_timeout")


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parse flags (sys.argv by default) and environment into a Config; a bad value exits with status 2 and a
    one-line error naming the option, and the variable it came from."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    values: dict[str, Any] = vars(parser.parse_args(argv))  # the flags given, converted by argparse
    sources = {dest: action.option_strings[0] for dest, (action, _) in parser.environment.items()}

    def check(dest: str, convert: Callable[..., Any], *args: str) -> Any:
        try:
            return convert(*args)
        except argparse.ArgumentTypeError as error:
            parser.error(f"{sources[dest]}: {error}")

    def from_environment(dests: Sequence[str]) -> None:
        for dest in dests:
            action, variables = parser.environment[dest]
            name = next((name for name in variables if environ.get(name, "").strip()), None)
            if dest not in values and name is not None:
                sources[dest] += f" (from {name})"
                values[dest] = check(dest, action.type or _boolean, environ[name])  # type: ignore[arg-type]

    from_environment([dest for dest in parser.environment if dest not in _OTLP_ONLY])
    if values.get("demo"):
        if "kml_url" in values:
            # Serving the sample while the user believes they watch their feed would be worse than stopping.
            parser.error(
                f"{sources['demo']} and {sources['kml_url']} cannot be combined: "
                "--demo serves a built-in network instead of a URL; drop one of them"
            )
        values["kml_url"] = DEMO_FEED
    exporters = [name for name in values.get("metrics_exporter", "prometheus").split(",") if name != "none"]
    if "otlp_endpoint" in values and "otlp" not in exporters:
        exporters.append("otlp")  # as documented; the standard endpoint variables alone do not enable push
    values["metrics_exporter"] = ",".join(exporters) or "none"
    secrets = [*url_secrets(values.get("kml_url", PUBLIC_FEED_URL))]
    if "otlp" in exporters:
        from_environment(_OTLP_ONLY)
        secrets += header_secrets(environ)
    if "otlp_endpoint" in values:
        protocol = values.get("otlp_protocol", GRPC)
        values["otlp_endpoint"] = check("otlp_endpoint", _otlp_endpoint, values["otlp_endpoint"], protocol)
        secrets += url_secrets(values["otlp_endpoint"])
    return Config(**values, secrets=_longest_first(secrets))
