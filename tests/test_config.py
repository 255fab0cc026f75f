"""config.py: flags, environment variables, validation, and the API key kept secret."""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import exporter_command

from chargy_exporter.config import (
    DEMO_FEED,
    DEMO_FEED_PATH,
    PUBLIC_FEED_URL,
    Config,
    RedactingFilter,
    build_parser,
    load_config,
    redact_url,
)

PUBLIC_KEY = "486ac6e4-93b8-4369-9c6a-28f7c4e1a81f"


def test_defaults_work_out_of_the_box():
    config = load_config([], {})
    assert config == Config(secrets=(PUBLIC_KEY,))
    assert (config.kml_url, config.host, config.port, config.refresh_interval) == (
        PUBLIC_FEED_URL,
        "0.0.0.0",
        9000,
        300,
    )


def test_environment_variables_are_read():
    config = load_config(
        [],
        {
            "KML_URL": "http://feed.example/kml?API-KEY=abc",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "9100",
            "CHARGY_REFRESH_INTERVAL": "60",
            "CHARGY_LOG_LEVEL": "debug",
            "CHARGY_MAX_FEED_BYTES": "5MiB",
        },
    )
    assert (config.kml_url, config.host, config.port) == ("http://feed.example/kml?API-KEY=abc", "127.0.0.1", 9100)
    assert (config.refresh_interval, config.log_level, config.max_feed_bytes) == (60, "debug", 5 * 1024 * 1024)
    assert config.secrets == ("abc",)


def test_the_flag_wins_over_the_environment(tmp_path):
    feed = tmp_path / "feed.kml"
    feed.write_bytes(DEMO_FEED_PATH.read_bytes())
    config = load_config(
        ["--port", "9200", "--kml-url", str(feed)], {"OTEL_EXPORTER_PROMETHEUS_PORT": "9100", "KML_URL": "/elsewhere"}
    )
    assert (config.port, config.kml_url) == (9200, str(feed))


def test_demo_reads_the_built_in_network_not_a_url_or_the_network():
    config = load_config(["--demo"], {})
    assert config.demo and config.kml_url == DEMO_FEED == config.redacted_url  # what the logs show as the feed
    assert DEMO_FEED_PATH.read_bytes().startswith(b"<?xml")  # the sample stays bundled for users to read


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        ([], {"OTEL_EXPORTER_PROMETHEUS_PORT": "-1"}, "--port (from OTEL_EXPORTER_PROMETHEUS_PORT): "),
        (["--refresh-interval", "0"], {}, "--refresh-interval"),
        (["--refresh-interval", "nan"], {}, "--refresh-interval"),
        (["--kml-url", "ftp://host/feed"], {}, "--kml-url"),
        (["--kml-url", "http:///nohost"], {}, "--kml-url"),
        ([], {"CHARGY_LOG_LEVEL": "loud"}, "--log-level (from CHARGY_LOG_LEVEL): "),
        (["--max-feed-bytes", "lots"], {}, "--max-feed-bytes"),
        # Every number is bounded: 1e10 s used to kill the refresh thread (refresh interval) or fail every
        # refresh (fetch timeout) instead of stopping at startup.
        (["--refresh-interval", "1e10"], {}, "--refresh-interval: must be from 1 to 86400 seconds"),
        (["--fetch-timeout", "1e10"], {}, "--fetch-timeout: must be from 0.1 to 300 seconds"),
        ([], {"CHARGY_FETCH_TIMEOUT": "0.01"}, "--fetch-timeout (from CHARGY_FETCH_TIMEOUT): must be from 0.1"),
        (["--max-feed-bytes", "2GiB"], {}, "--max-feed-bytes: must be from 1024 to 1073741824 bytes"),
        (["--max-connectors", "0"], {}, "--max-connectors"),
        (["--max-connectors", "1000001"], {}, "--max-connectors"),
    ],
)
def test_a_bad_value_exits_2_with_one_line_naming_the_option(argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(argv, environ)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"chargy-exporter: error: {named}" in error


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--kml-url", "file:///nope.kml"], {}, "--kml-url"),
        (["--kml-url", "/nope.kml"], {}, "--kml-url"),
        (["--kml-url", "relative/nope.kml"], {}, "--kml-url"),
        ([], {"KML_URL": "file:///nope.kml"}, "--kml-url (from KML_URL)"),
    ],
)
def test_a_feed_file_missing_at_startup_is_a_config_error(argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(argv, environ)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith(f"chargy-exporter: error: {named}: ") and "nope.kml" in error
    assert "No such file" in error


def test_a_directory_is_not_a_feed_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(["--kml-url", tmp_path.as_uri()], {})
    assert exited.value.code == 2 and "--kml-url" in capsys.readouterr().err


def test_an_existing_feed_file_is_accepted_as_a_path_or_a_file_url(tmp_path):
    feed = tmp_path / "my feed.kml"
    feed.write_bytes(DEMO_FEED_PATH.read_bytes())
    assert load_config(["--kml-url", str(feed)], {}).kml_url == str(feed)
    assert load_config([], {"KML_URL": feed.as_uri()}).kml_url == feed.as_uri()  # "my%20feed.kml"


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--demo", "--kml-url", "http://feed.example/kml"], {}, ("--demo", "--kml-url")),
        (["--demo"], {"KML_URL": "http://feed.example/kml"}, ("--demo", "--kml-url (from KML_URL)")),
        (["--kml-url", "http://feed.example/kml"], {"CHARGY_DEMO": "true"}, ("--demo (from CHARGY_DEMO)", "--kml-url")),
    ],
)
def test_demo_and_a_feed_url_together_are_an_error_naming_both(argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(argv, environ)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and all(name in error for name in named)


def test_demo_switched_off_leaves_the_feed_url_alone():
    config = load_config([], {"CHARGY_DEMO": "false", "KML_URL": "http://feed.example/kml"})
    assert (config.demo, config.kml_url) == (False, "http://feed.example/kml")


def test_a_missing_feed_file_really_exits_2_before_serving(tmp_path):
    missing = tmp_path / "gone.kml"
    result = subprocess.run(
        [*exporter_command(), "--kml-url", missing.as_uri()], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"chargy-exporter: error: --kml-url: cannot read the feed file "
                                                  f"{missing}: No such file or directory"]  # fmt: skip


def test_redaction_covers_the_key_and_a_password():
    url = "https://user:pa55@my.chargy.lu/kml?API-KEY=SECRETKEY&lang=fr"
    assert redact_url(url) == "https://user:REDACTED@my.chargy.lu/kml?API-KEY=REDACTED&lang=fr"


def test_log_records_are_redacted_even_in_arguments_and_tracebacks():
    config = load_config(["--kml-url", "http://h/kml?api-key=TOPSECRET"], {})
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "GET %s failed", ("http://h/kml?api-key=TOPSECRET",), None
    )
    try:
        raise ValueError("url http://h/kml?api-key=TOPSECRET")
    except ValueError:
        record.exc_info = sys.exc_info()
    RedactingFilter(config.secrets).filter(record)
    assert "TOPSECRET" not in record.getMessage() and "TOPSECRET" not in (record.exc_text or "")
    assert "REDACTED" in record.getMessage()


def test_a_traceback_formatted_before_our_filter_is_redacted_too():
    """Another handler's filter may have formatted the traceback and dropped exc_info (pytest's capture did)."""
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise ValueError("url http://h/kml?api-key=TOPSECRET")
    except ValueError:
        record.exc_info = sys.exc_info()
    RedactingFilter(("another-secret",)).filter(record)
    RedactingFilter(("TOPSECRET",)).filter(record)
    assert "TOPSECRET" not in logging.Formatter().format(record)


def test_help_documents_every_option_its_variables_and_real_defaults_and_hides_the_key():
    result = subprocess.run([*exporter_command(), "--help"], capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for dest, (action, variables) in build_parser().environment.items():
        assert action.option_strings[0] in text and all(name in text for name in variables), dest
    for default in ("API-KEY=REDACTED]", "CHARGY_REFRESH_INTERVAL; default: 300]", "CHARGY_LOG_LEVEL; default: info]",
                    "CHARGY_FETCH_TIMEOUT; default: 30]", "OTEL_EXPORTER_PROMETHEUS_PORT; default: 9000]"):  # fmt: skip
        assert default in text
    # The variables the SDK reads itself are named too, with what they do.
    for variable in ("OTEL_EXPORTER_OTLP_[METRICS_]HEADERS", "OTEL_EXPORTER_OTLP_[METRICS_]COMPRESSION",
                     "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_RESOURCE_ATTRIBUTES"):  # fmt: skip
        assert variable in text
    assert PUBLIC_KEY not in result.stdout and "default: ]" not in text


def test_the_command_line_error_path_really_exits_2():
    result = subprocess.run([*exporter_command(), "--port", "none"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--port" in result.stderr


def test_max_connectors_option():
    assert load_config(["--max-connectors", "50000"], {}).max_connectors == 50_000
    assert load_config([], {"CHARGY_MAX_CONNECTORS": "3000"}).max_connectors == 3000
    assert load_config([], {}).max_connectors == 20_000


def test_bounds_are_inclusive():
    config = load_config(["--refresh-interval", "86400", "--fetch-timeout", "0.1", "--max-feed-bytes", "1GiB"], {})
    assert (config.refresh_interval, config.fetch_timeout, config.max_feed_bytes) == (86_400, 0.1, 1024**3)
    assert load_config(["--port", "65535", "--max-connectors", "1000000"], {}).max_connectors == 1_000_000


def test_the_readme_configuration_table_is_one_table_listing_every_option():
    """A blank line inside a Markdown table ends it: GitHub showed the second half as plain text."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n#", 1)[0]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| flag |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    assert table[1].startswith("|---")
    rest = "\n".join(lines[first + len(table) :])
    assert not re.search(r"^\|", rest, re.MULTILINE), "a second table (or a row cut off) after the first one"
    for action, variables in build_parser().environment.values():
        flag = action.option_strings[0]
        assert any(f"`{flag}`" in row and all(f"`{name}`" in row for name in variables) for row in table), flag
