"""The container's HEALTHCHECK (`python -m chargy_exporter.healthcheck`), pointed at real exporter processes.

In a container the check reads /proc/1; here it reads the /proc/PID of an exporter started by the test, or a
made-up /proc tree for the cases no live process gives (a dead port, an init in front of the exporter).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import ExporterProcess, free_port

from chargy_exporter import healthcheck

SECRET = "hc-secret-5f0e9a"
SECRET_URL = f"http://127.0.0.1:9/kml?API-KEY={SECRET}"


def write_process(directory: Path, cmdline: bytes, environ: bytes = b"") -> Path:
    """A /proc/PID-like directory with these raw cmdline and environ contents."""
    directory.mkdir(parents=True)
    (directory / "cmdline").write_bytes(cmdline)
    (directory / "environ").write_bytes(environ)
    return directory


def fake_process(directory: Path, argv: Sequence[str], environ: dict[str, str] | None = None) -> Path:
    """A /proc/PID-like directory: NUL-separated cmdline and environ, as the kernel writes them."""
    cmdline = b"".join(word.encode() + b"\0" for word in argv)
    return write_process(directory, cmdline, b"".join(f"{k}={v}".encode() + b"\0" for k, v in (environ or {}).items()))


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's own command line (the image runs `python -m chargy_exporter.healthcheck`)."""
    return subprocess.run(
        [sys.executable, "-m", "chargy_exporter.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# ---- reading a process -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        # A console script: the kernel puts the shebang's interpreter in front.
        (b"/usr/bin/python3\0/usr/local/bin/chargy-exporter\0--demo\0--port\x009100\0", ["--demo", "--port", "9100"]),
        (b"/venv/bin/python\0-u\0-m\0chargy_exporter\0--port=9100\0", ["--port=9100"]),
        (b"/usr/local/bin/chargy-exporter\0", []),
        # docker run --init: the init's command line carries the exporter's.
        (b"/sbin/docker-init\0--\0chargy-exporter\0--demo\0", ["--demo"]),
    ],
)
def test_exporter_arguments_follow_the_script_or_module(tmp_path: Path, cmdline: bytes, expected: list[str]) -> None:
    assert healthcheck.read_process(write_process(tmp_path / "1", cmdline))[0] == expected


@pytest.mark.parametrize(
    "cmdline",
    [
        b"/bin/sh\0-c\0sleep 1\0",
        b"python\0-m\0chargy_exporter.healthcheck\0",
        b"chargy-exporter-healthcheck\0",
        b"chargy_exporter\0--demo\0-m\0",
        b"",
    ],
)
def test_other_programs_are_not_the_exporter(tmp_path: Path, cmdline: bytes) -> None:
    with pytest.raises(ProcessLookupError):
        healthcheck.read_process(write_process(tmp_path / "1", cmdline))


def test_environ_keeps_values_with_equal_signs(tmp_path: Path) -> None:
    data = b"KML_URL=http://h/k?API-KEY=a=b\0EMPTY=\0PATH=/bin\0=nameless\0"
    environ = healthcheck.read_process(write_process(tmp_path / "1", b"chargy-exporter\0", data))[1]
    assert environ == {"KML_URL": "http://h/k?API-KEY=a=b", "EMPTY": "", "PATH": "/bin"}


# ---- where to ask ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "environ", "url"),
    [
        ([], {}, "http://127.0.0.1:9000/healthz"),  # the image: 0.0.0.0:9000
        ([], {"OTEL_EXPORTER_PROMETHEUS_PORT": "9200"}, "http://127.0.0.1:9200/healthz"),
        (["--port", "9100"], {"OTEL_EXPORTER_PROMETHEUS_PORT": "9000"}, "http://127.0.0.1:9100/healthz"),  # flag wins
        (["--host", "::", "--port=9100"], {}, "http://[::1]:9100/healthz"),
        (["--host", "127.0.0.2"], {"OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0"}, "http://127.0.0.2:9000/healthz"),
        ([], {"OTEL_EXPORTER_PROMETHEUS_HOST": "::1"}, "http://[::1]:9000/healthz"),
    ],
)
def test_health_url_is_where_the_exporter_listens(arguments: list[str], environ: dict[str, str], url: str) -> None:
    assert healthcheck.health_url(arguments, environ) == url


# ---- against real exporters --------------------------------------------------------------------------------------


@pytest.fixture
def running(exporter_process: Callable[..., ExporterProcess]) -> Callable[..., ExporterProcess]:
    """Starts an exporter on the demo feed and waits until it serves."""

    def start(*args: str, env: dict[str, str] | None = None) -> ExporterProcess:
        process = exporter_process("--demo", *args, env=env)
        process.wait_until_up(timeout=60)
        return process

    return start


def test_healthy_when_the_exporter_answers(running: Callable[..., ExporterProcess]) -> None:
    exporter = running()
    healthy, detail = healthcheck.check(Path(f"/proc/{exporter.process.pid}"))
    assert healthy, detail
    assert detail == f"http://127.0.0.1:{exporter.port}/healthz answered 200"


def test_port_set_by_flag_wins_over_the_environment(running: Callable[..., ExporterProcess]) -> None:
    # The image sets OTEL_EXPORTER_PROMETHEUS_PORT=9000; `docker run IMAGE --port N` moves the exporter to N.
    exporter = running(env={"OTEL_EXPORTER_PROMETHEUS_PORT": str(free_port())})
    result = run_module("--process", f"/proc/{exporter.process.pid}")
    assert result.returncode == 0, result.stderr
    assert f":{exporter.port}/healthz" in result.stdout


def test_unhealthy_once_the_exporter_has_stopped(running: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    exporter = running()
    # The stopped process's /proc entry goes with it: keep a copy of what the check reads.
    process_dir = tmp_path / "proc" / "1"
    process_dir.mkdir(parents=True)
    for name in ("cmdline", "environ"):
        (process_dir / name).write_bytes(Path(f"/proc/{exporter.process.pid}/{name}").read_bytes())
    assert healthcheck.check(process_dir)[0]
    assert exporter.stop() == 0
    healthy, detail = healthcheck.check(process_dir, timeout=5)
    assert not healthy
    assert f"127.0.0.1:{exporter.port}" in detail


def test_dead_port_exits_1_and_never_shows_the_key(tmp_path: Path) -> None:
    process_dir = fake_process(
        tmp_path / "1",
        ["/usr/bin/python3", "/usr/local/bin/chargy-exporter", "--port", str(free_port())],
        {"KML_URL": SECRET_URL, "OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0"},
    )
    result = run_module("--process", str(process_dir), "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: http://127.0.0.1:")
    assert SECRET not in result.stdout + result.stderr


def test_a_configuration_that_does_not_parse_is_unhealthy_without_the_key(tmp_path: Path) -> None:
    process_dir = fake_process(tmp_path / "1", ["chargy-exporter", "--port", "none", "--kml-url", SECRET_URL])
    result = run_module("--process", str(process_dir))
    assert result.returncode == 1
    assert "does not parse" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_not_the_exporter_is_unhealthy(tmp_path: Path) -> None:
    process_dir = fake_process(tmp_path / "1", ["/bin/sleep", "infinity"])
    assert healthcheck.check(process_dir) == (False, f"{process_dir}: not the exporter: /bin/sleep infinity")
    assert healthcheck.check(tmp_path / "404")[0] is False


def test_an_init_in_front_of_the_exporter_is_looked_past(
    running: Callable[..., ExporterProcess], tmp_path: Path
) -> None:
    exporter = running()
    proc = tmp_path / "proc"
    fake_process(proc / "1", ["/sbin/tini"])  # an init without the exporter's command line in its own
    fake_process(proc / "2", ["/bin/sh"])
    live = Path(f"/proc/{exporter.process.pid}")
    fake_process(proc / "7", live.joinpath("cmdline").read_bytes().decode().split("\0")[:-1])
    (proc / "self").mkdir()
    assert healthcheck.check(proc=proc) == (True, f"http://127.0.0.1:{exporter.port}/healthz answered 200")
    assert healthcheck.check(proc=tmp_path / "empty-proc-with-nothing")[0] is False
