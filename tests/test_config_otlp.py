"""The OTLP options: OTEL_METRICS_EXPORTER, --otlp-endpoint and the OTEL_EXPORTER_OTLP_* variables."""

from __future__ import annotations

import logging

import pytest

from chargy_exporter.config import Config, RedactingFilter, load_config
from chargy_exporter.otlp_settings import OtlpSettings, grpc_target, parse_headers


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


def test_otlp_endpoint_flag_enables_push() -> None:
    config = load("--otlp-endpoint", "http://collector:4317")
    assert config.metrics_exporter == "prometheus,otlp"
    assert config.otlp == OtlpSettings(endpoint="http://collector:4317")
    none = load("--otlp-endpoint", "http://collector:4317", OTEL_METRICS_EXPORTER="none")
    assert none.metrics_exporter == "otlp"


def test_standard_endpoint_variable_alone_does_not_enable_push() -> None:
    config = load(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317")
    assert config.metrics_exporter == "prometheus"
    assert config.otlp is None


def test_defaults() -> None:
    settings = otlp(OTEL_METRICS_EXPORTER="otlp")
    assert settings == OtlpSettings(
        protocol="grpc",
        endpoint="http://localhost:4317",
        compression="none",
        timeout=10.0,
        export_interval=60.0,
        export_timeout=30.0,
    )
    http = otlp(OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert http.endpoint == "http://localhost:4318/v1/metrics"


@pytest.mark.parametrize(
    ("environ", "argv", "protocol", "endpoint"),
    [
        # gRPC: every form is used as is.
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, (), "grpc", "http://c:4317"),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://c:4317"}, (), "grpc", "https://c:4317"),
        # http/protobuf: the generic endpoint gets /v1/metrics appended, its path kept (OTLP exporter spec) ...
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, (), "http/protobuf", "http://c:4318/v1/metrics"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, (), "http/protobuf", "http://c:4318/v1/metrics"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://v.io/otlp/"}, (), "http/protobuf", "https://v.io/otlp/v1/metrics"),
        # ... the signal-specific one is used as is and wins ...
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
            (),
            "http/protobuf",
            "http://c:4318/custom",
        ),
        # ... and --otlp-endpoint wins over both; without a path it gets the usual one.
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/custom"},
            ("--otlp-endpoint", "http://flag:4318"),
            "http/protobuf",
            "http://flag:4318/v1/metrics",
        ),
        ({}, ("--otlp-endpoint", "http://flag:4318/in/path"), "http/protobuf", "http://flag:4318/in/path"),
        ({}, ("--otlp-endpoint", "flag:4317"), "grpc", "flag:4317"),
    ],
)
def test_endpoint_rules(environ: dict[str, str], argv: tuple[str, ...], protocol: str, endpoint: str) -> None:
    settings = otlp(*argv, "--otlp-protocol", protocol, **{"OTEL_METRICS_EXPORTER": "prometheus,otlp", **environ})
    assert settings.protocol == protocol
    assert settings.endpoint == endpoint


def test_protocol_precedence() -> None:
    generic = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert otlp(**generic).protocol == "http/protobuf"
    assert otlp(**generic, OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="grpc").protocol == "grpc"
    assert otlp("--otlp-protocol", "grpc", **generic).protocol == "grpc"


def test_signal_specific_variables_win() -> None:
    settings = otlp(
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_HEADERS="a=1",
        OTEL_EXPORTER_OTLP_METRICS_HEADERS="b=2",
        OTEL_EXPORTER_OTLP_COMPRESSION="none",
        OTEL_EXPORTER_OTLP_METRICS_COMPRESSION="gzip",
        OTEL_EXPORTER_OTLP_TIMEOUT="1000",
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="2500",
        OTEL_EXPORTER_OTLP_INSECURE="false",
        OTEL_EXPORTER_OTLP_METRICS_INSECURE="true",
        OTEL_METRIC_EXPORT_INTERVAL="15000",
        OTEL_METRIC_EXPORT_TIMEOUT="5000",
    )
    assert settings.headers == (("b", "2"),)
    assert settings.compression == "gzip"
    assert settings.timeout == 2.5
    assert settings.insecure is True
    assert settings.export_interval == 15.0
    assert settings.export_timeout == 5.0


@pytest.mark.parametrize(
    ("value", "expected"), [("cumulative", "cumulative"), ("DELTA", "delta"), (" LowMemory ", "lowmemory")]
)
def test_temporality_preference(value: str, expected: str) -> None:
    settings = otlp(OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=value)
    assert settings.temporality == expected
    assert otlp(OTEL_METRICS_EXPORTER="otlp").temporality == "cumulative"


def test_export_timeout_is_the_users() -> None:
    """OTEL_METRIC_EXPORT_TIMEOUT is used as given, small or large (a very large feed needs a larger one)."""
    assert otlp(OTEL_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_TIMEOUT="1500").export_timeout == 1.5
    assert otlp(OTEL_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_TIMEOUT="600000").export_timeout == 600.0


def test_headers_are_parsed_and_decoded() -> None:
    assert parse_headers("Authorization=Bearer%20abc%3D,x-scope-orgid = tenant-1,") == (
        ("authorization", "Bearer abc="),
        ("x-scope-orgid", "tenant-1"),
    )


def test_header_values_are_secrets_redacted_from_logs() -> None:
    config = load(
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20tok-123456789,x-org=1",
        OTEL_EXPORTER_OTLP_ENDPOINT="https://user:endpoint-password@collector:4317",
    )
    assert "tok-123456789" not in repr(config)
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "sent %s to %s", ("Bearer tok-123456789", config.otlp.endpoint), None
    )
    RedactingFilter(config.secrets).filter(record)
    message = record.getMessage()
    assert "tok-123456789" not in message
    assert "endpoint-password" not in message
    # A one-character value is not a credential: it must not blank out every "1" of the logs.
    assert "1" not in config.secrets


def test_grpc_targets() -> None:
    assert grpc_target("http://c:4317", insecure=False) == ("c:4317", False)
    assert grpc_target("https://c", insecure=True) == ("c:443", True)
    assert grpc_target("c:4317", insecure=False) == ("c:4317", True)
    assert grpc_target("c:4317", insecure=True) == ("c:4317", False)
    assert grpc_target("http://[::1]:4317", insecure=False) == ("[::1]:4317", False)


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        ((), {"OTEL_METRICS_EXPORTER": "otlp,statsd"}, "--metrics-exporter (from OTEL_METRICS_EXPORTER)"),
        (("--metrics-exporter", "none,otlp"), {}, "--metrics-exporter"),
        (("--otlp-protocol", "http/json"), {"OTEL_METRICS_EXPORTER": "otlp"}, "--otlp-protocol"),
        ((), {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ((), {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TIMEOUT": "-5"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ((), {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ((), {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_TIMEOUT": "0"}, "OTEL_METRIC_EXPORT_TIMEOUT"),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "deltas"},
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        ),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "zstd"},
            "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION",
        ),
        ((), {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_INSECURE": "maybe"}, "OTEL_EXPORTER_OTLP_INSECURE"),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c:21"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            (),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (("--otlp-endpoint", "http://c:99999"), {}, "--otlp-endpoint"),
        (
            ("--otlp-protocol", "http/protobuf"),
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "collector:4318"},
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
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
    assert f"error: {named}: " in error


@pytest.mark.parametrize("headers", ["authorization", "=secret-value-42", "bad header=secret-value-42"])
def test_bad_headers_never_show_a_value(headers: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_config([], {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_HEADERS": f"x-ok=fine,{headers}"})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "OTEL_EXPORTER_OTLP_HEADERS: header 2 " in error
    assert "secret-value-42" not in error
    assert "fine" not in error


def test_otlp_settings_are_not_checked_when_push_is_off() -> None:
    # The standard variables may be set for other programs of the same environment.
    assert load(OTEL_EXPORTER_OTLP_TIMEOUT="soon").otlp is None
