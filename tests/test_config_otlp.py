"""The OTLP options: OTEL_METRICS_EXPORTER, --otlp-* and the OTEL_* variables that are ours to read."""

from __future__ import annotations

import logging

import pytest

from chargy_exporter.config import Config, OtlpSettings, RedactingFilter, load_config


def load(*argv: str, **environ: str) -> Config:
    return load_config(list(argv), environ)


def otlp(*argv: str, **environ: str) -> OtlpSettings:
    config = load(*argv, **environ)
    assert config.otlp is not None
    return config.otlp


def test_prometheus_only_by_default() -> None:
    config = load()
    assert config.metrics_exporter == "prometheus"
    assert config.otlp is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("prometheus", "prometheus"),
        ("otlp", "otlp"),
        ("prometheus,otlp", "prometheus,otlp"),
        (" OTLP , prometheus ,otlp", "otlp,prometheus"),
        ("none", "none"),
    ],
)
def test_metrics_exporter_list(value: str, expected: str) -> None:
    config = load(OTEL_METRICS_EXPORTER=value)
    assert config.metrics_exporter == expected
    assert (config.otlp is not None) == ("otlp" in expected)


def test_flag_wins_over_environment() -> None:
    assert load("--metrics-exporter", "otlp", OTEL_METRICS_EXPORTER="prometheus").metrics_exporter == "otlp"
    assert otlp("--otlp-timeout", "2000", OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TIMEOUT="1000").timeout == 2


def test_otlp_endpoint_flag_enables_push() -> None:
    config = load("--otlp-endpoint", "http://collector:4317")
    assert config.metrics_exporter == "prometheus,otlp"
    assert config.otlp == OtlpSettings(endpoint="http://collector:4317")
    assert load(OTEL_METRICS_EXPORTER="none", CHARGY_OTLP_ENDPOINT="http://c:4317").metrics_exporter == "otlp"


def test_standard_endpoint_variable_alone_does_not_enable_push() -> None:
    config = load(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317")
    assert config.metrics_exporter == "prometheus"
    assert config.otlp is None


def test_defaults_leave_the_endpoint_to_the_sdk() -> None:
    assert otlp(OTEL_METRICS_EXPORTER="otlp") == OtlpSettings(
        protocol="grpc", endpoint=None, timeout=10.0, export_interval=60.0, export_timeout=30.0
    )


@pytest.mark.parametrize(
    ("flag", "protocol", "endpoint"),
    [
        ("http://flag:4318", "http/protobuf", "http://flag:4318/v1/metrics"),  # a bare address: the usual path
        ("http://flag:4318/", "http/protobuf", "http://flag:4318/v1/metrics"),
        ("http://flag:4318/in/path", "http/protobuf", "http://flag:4318/in/path"),
        ("flag:4317", "grpc", "flag:4317"),
        ("https://flag", "grpc", "https://flag"),
    ],
)
def test_endpoint_flag(flag: str, protocol: str, endpoint: str) -> None:
    assert otlp("--otlp-endpoint", flag, "--otlp-protocol", protocol).endpoint == endpoint


@pytest.mark.parametrize(
    ("environ", "protocol", "shown"),
    [
        ({}, "grpc", "http://localhost:4317"),
        ({}, "http/protobuf", "http://localhost:4318/v1/metrics"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "grpc", "http://c:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://v.io/otlp/"}, "http/protobuf", "https://v.io/otlp/v1/metrics"),
        (
            {
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://u:pw@c:4318/custom?k=v",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "x",
            },
            "http/protobuf",
            "http://c:4318/custom",
        ),
    ],
)
def test_the_logs_name_the_endpoint_the_sdk_uses_without_credentials(
    environ: dict[str, str], protocol: str, shown: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert OtlpSettings(protocol=protocol).shown_endpoint == shown


def test_protocol_precedence() -> None:
    generic = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert otlp(**generic).protocol == "http/protobuf"
    assert otlp(**generic, OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="grpc").protocol == "grpc"
    assert otlp("--otlp-protocol", "grpc", **generic).protocol == "grpc"


def test_times_are_milliseconds_and_the_signal_specific_variable_wins() -> None:
    settings = otlp(
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TIMEOUT="1000",
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="2500",
        OTEL_METRIC_EXPORT_INTERVAL="15000",
        OTEL_METRIC_EXPORT_TIMEOUT="600000",  # used as given: a very large feed needs a larger one
    )
    assert (settings.timeout, settings.export_interval, settings.export_timeout) == (2.5, 15.0, 600.0)


def test_header_values_are_secrets_redacted_from_logs() -> None:
    config = load(
        "--otlp-endpoint",
        "https://user:endpoint-password@collector:4317",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20tok-123456789,x-org=1",
        # An entry the SDK cannot parse is logged by it, value included: its words are secrets too.
        OTEL_EXPORTER_OTLP_METRICS_HEADERS="x-ok=fine,broken entry-secret-42",
    )
    assert "tok-123456789" not in repr(config)
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "sent %s to %s; bad: %s", ("Bearer tok-123456789",
        "https://user:endpoint-password@collector:4317", "broken entry-secret-42"), None,
    )  # fmt: skip
    RedactingFilter(config.secrets).filter(record)
    message = record.getMessage()
    for secret in ("tok-123456789", "endpoint-password", "entry-secret-42"):
        assert secret not in message
    # A one-character value is not a credential: it must not blank out every "1" of the logs.
    assert "1" not in config.secrets


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        ((), {"OTEL_METRICS_EXPORTER": "otlp,statsd"}, "--metrics-exporter (from OTEL_METRICS_EXPORTER)"),
        (("--metrics-exporter", "none,otlp"), {}, "--metrics-exporter"),
        (("--otlp-protocol", "http/json"), {"OTEL_METRICS_EXPORTER": "otlp"}, "--otlp-protocol"),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "udp"},
            "--otlp-protocol (from OTEL_EXPORTER_OTLP_PROTOCOL)",
        ),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TIMEOUT": "-5"},
            "--otlp-timeout (from OTEL_EXPORTER_OTLP_TIMEOUT)",
        ),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "soon"},
            "--otlp-export-interval (from OTEL_METRIC_EXPORT_INTERVAL)",
        ),
        (("--otlp-export-interval", "1e12"), {"OTEL_METRICS_EXPORTER": "otlp"}, "--otlp-export-interval"),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_TIMEOUT": "0"},
            "--otlp-export-timeout (from OTEL_METRIC_EXPORT_TIMEOUT)",
        ),
        (("--otlp-endpoint", "http://c:99999"), {}, "--otlp-endpoint"),
        (("--otlp-endpoint", "ftp://c:21"), {}, "--otlp-endpoint"),
        (("--otlp-endpoint", "collector"), {}, "--otlp-endpoint"),  # gRPC without scheme needs a port
        (
            (),
            {"CHARGY_OTLP_ENDPOINT": "c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "--otlp-endpoint (from CHARGY_OTLP_ENDPOINT)",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_option(
    argv: tuple[str, ...], environ: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_config(list(argv), environ)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith(f"chargy-exporter: error: {named}: ")


def test_otlp_settings_are_not_checked_when_push_is_off() -> None:
    # The standard variables may be set for other programs of the same environment.
    assert load(OTEL_EXPORTER_OTLP_TIMEOUT="soon", OTEL_EXPORTER_OTLP_PROTOCOL="udp").otlp is None
