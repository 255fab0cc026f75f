"""Command-line flags and environment variables → one validated, immutable `Config`.

Each option has a flag and an environment variable; the flag wins. The URL's API key is a secret: `redact`
removes it from any text before it is logged, raised or shown in `--help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from . import __version__

if TYPE_CHECKING:
    from .otlp_settings import OtlpSettings

PUBLIC_FEED_URL: Final = (
    "https://my.chargy.lu/b2bev-external-services/resources/kml?API-KEY=486ac6e4-93b8-4369-9c6a-28f7c4e1a81f"
)
DEMO_FEED_PATH: Final = Path(__file__).parent / "data" / "sample-feed.kml"
REDACTED: Final = "REDACTED"
# Query parameters whose value is a credential, compared case-insensitively.
# What requests.utils.requote_uri leaves unquoted.
_REQUOTE_SAFE: Final = "!#$%&'()*+,/:;=?@[]~"
_SECRET_PARAMETERS: Final = re.compile(r"^(api[-_]?key|key|token|access[-_]?token|secret|password)$", re.IGNORECASE)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    kml_url: str = PUBLIC_FEED_URL
    host: str = "0.0.0.0"
    port: int = 9000
    refresh_interval: float = 300.0
    fetch_timeout: float = 30.0
    max_feed_bytes: int = 20 * 1024 * 1024
    max_connectors: int = 20_000
    log_level: str = "INFO"
    demo: bool = False
    metrics_exporter: str = "prometheus"  # comma list of prometheus, otlp; or none
    otlp_endpoint: str = ""
    otlp_protocol: str = ""  # grpc or http/protobuf; "" = from OTEL_EXPORTER_OTLP_PROTOCOL, else grpc
    otlp: OtlpSettings | None = None  # resolved OTLP push settings when otlp is enabled
    # Values that must never appear in any output (the API key of kml_url, a password in it).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def redact(self, text: str) -> str:
        return redact_text(text, self.secrets)

    @property
    def redacted_url(self) -> str:
        return self.redact(self.kml_url)


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
    # Longest first so that a secret containing another is replaced whole.
    return tuple(sorted({secret for secret in found if secret}, key=len, reverse=True))


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


# ---- option table ---------------------------------------------------------------------------------------------


def _kml_url(value: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError("an http(s) URL needs a host")
        return value
    if parts.scheme == "file" or parts.scheme == "" or len(parts.scheme) == 1:  # "C:" is a Windows drive
        if not value:
            raise ConfigError("empty")
        return value
    raise ConfigError(f"unsupported URL scheme {parts.scheme!r} (use http, https, file or a path)")


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
        raise ConfigError(f"cannot read the feed file {path}: {error.strerror or error}") from None


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ConfigError("must be between 1 and 65535")
    return port


def _positive_seconds(minimum: float) -> Callable[[str], float]:
    def convert(value: str) -> float:
        seconds = float(value)
        if not seconds >= minimum or seconds == float("inf"):
            raise ConfigError(f"must be a number of seconds ≥ {minimum:g}")
        return seconds

    return convert


def _byte_count(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?[bB]?)?\s*", value)
    if not match:
        raise ConfigError("must be a byte count such as 20000000 or 20MiB")
    multiplier = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[(match.group(2) or "")[:1].lower()]
    count = int(match.group(1)) * multiplier
    if count < 1024:
        raise ConfigError("must be at least 1 KiB")
    return count


def _count(value: str) -> int:
    count = int(value)
    if count < 1:
        raise ConfigError("must be a positive whole number")
    return count


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("must be one of debug, info, warning, error, critical")
    return level


def _metrics_exporters(value: str) -> str:
    names = list(dict.fromkeys(name.strip().lower() for name in value.split(",") if name.strip()))
    for name in names:
        if name not in ("prometheus", "otlp", "none"):
            raise ConfigError(f"unknown exporter {name!r} (use prometheus, otlp or none, comma-separated)")
    if not names:
        raise ConfigError("empty (use prometheus, otlp or none)")
    if "none" in names and len(names) > 1:
        raise ConfigError("none cannot be combined with other exporters")
    return ",".join(names)


def _otlp_protocol(value: str) -> str:
    from .otlp_settings import parse_protocol

    return parse_protocol(value)


def _otlp_endpoint(value: str) -> str:
    endpoint = value.strip()
    if not endpoint:
        raise ConfigError("empty")
    return endpoint


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("must be true or false")


@dataclass(frozen=True)
class _Option:
    flag: str
    env: str
    convert: Callable[[str], Any]
    help: str
    metavar: str | None = None
    is_switch: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


_OPTIONS: Final = (
    _Option("--kml-url", "KML_URL", _kml_url, "feed to read: http(s) URL, file:// URL or path", "URL"),
    _Option("--host", "OTEL_EXPORTER_PROMETHEUS_HOST", str, "address the /metrics endpoint listens on", "ADDR"),
    _Option("--port", "OTEL_EXPORTER_PROMETHEUS_PORT", _port, "port of the /metrics endpoint", "PORT"),
    _Option(
        "--refresh-interval",
        "CHARGY_REFRESH_INTERVAL",
        _positive_seconds(1),
        "seconds between feed refreshes; upstream is asked at most once per interval",
        "SECONDS",
    ),
    _Option(
        "--fetch-timeout", "CHARGY_FETCH_TIMEOUT", _positive_seconds(0.1), "seconds to wait for upstream", "SECONDS"
    ),
    _Option(
        "--max-feed-bytes",
        "CHARGY_MAX_FEED_BYTES",
        _byte_count,
        "largest feed accepted (bytes, or with KiB/MiB/GiB); larger answers are refused",
        "BYTES",
    ),
    _Option(
        "--max-connectors",
        "CHARGY_MAX_CONNECTORS",
        _count,
        "largest number of connectors accepted (memory grows ~16 KB per connector); larger feeds are refused",
        "N",
    ),
    _Option("--log-level", "CHARGY_LOG_LEVEL", _log_level, "debug, info, warning, error or critical", "LEVEL"),
    _Option(
        "--demo",
        "CHARGY_DEMO",
        _boolean,
        "serve the bundled sample feed instead of the network (no internet needed)",
        is_switch=True,
    ),
    _Option(
        "--metrics-exporter",
        "OTEL_METRICS_EXPORTER",
        _metrics_exporters,
        "comma list: prometheus (the /metrics endpoint), otlp (push), or none",
        "LIST",
    ),
    _Option(
        "--otlp-endpoint",
        "CHARGY_OTLP_ENDPOINT",
        _otlp_endpoint,
        "OTLP receiver to push to; enables otlp (else OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT)",
        "URL",
    ),
    _Option(
        "--otlp-protocol",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        _otlp_protocol,
        "grpc or http/protobuf (else OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)",
        "PROTOCOL",
    ),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the option, exit code 2, as argparse does but without the usage block.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = _Parser(
        prog="chargy-exporter",
        description=(
            "Export the live state of Luxembourg's Chargy EV-charging network as Prometheus / OpenTelemetry "
            "metrics. Every option can also be set by the environment variable shown; the flag wins."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in _OPTIONS:
        default = getattr(defaults, option.dest)
        shown = redact_url(default) if option.dest == "kml_url" else default
        help_text = f"{option.help} [env {option.env}; default: {shown}]"
        if option.is_switch:
            parser.add_argument(option.flag, action="store_const", const="true", default=None, help=help_text)
        else:
            parser.add_argument(option.flag, default=None, metavar=option.metavar, help=help_text)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parse flags and environment into a Config; a bad value exits with status 2 and a one-line error."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # how each given option was given, as error messages name it
    for option in _OPTIONS:
        given = getattr(args, option.dest)
        source = option.flag
        if given is None and environ.get(option.env, "").strip():
            given, source = environ[option.env], f"{option.flag} (from {option.env})"
        if given is None:
            continue
        sources[option.dest] = source
        try:
            values[option.dest] = option.convert(given)
        except ValueError as error:
            detail = str(error) if isinstance(error, ConfigError) else f"invalid value {redact_url(str(given))!r}"
            parser.error(f"{source}: {redact_url(detail)}")
    if values.get("demo"):
        if "kml_url" in values:
            # Serving the sample while the user believes they watch their feed would be worse than stopping.
            parser.error(
                f"{sources['demo']} and {sources['kml_url']} cannot be combined: "
                "--demo serves the bundled sample feed instead of a URL; drop one of them"
            )
        values["kml_url"] = DEMO_FEED_PATH.as_uri()
    elif "kml_url" in values:
        try:
            check_feed_file(values["kml_url"])
        except ConfigError as error:
            parser.error(f"{sources['kml_url']}: {redact_url(str(error))}")
    config = Config(**values)
    values["secrets"] = url_secrets(config.kml_url)
    from .otlp_settings import resolve_otlp  # here: otlp_settings imports this module

    try:
        values.update(resolve_otlp(Config(**values), environ))
    except ConfigError as error:
        parser.error(str(error))
    return Config(**values)
