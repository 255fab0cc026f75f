"""deploy/systemd/chargy-exporter.service, checked by systemd's own tools (Debian package `systemd`).

`systemd-analyze verify` loads the unit as systemd would and reports every bad directive; `systemd-analyze security
--offline=true` rates its sandbox without a running systemd. No test starts the unit: CI machines run no systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "chargy-exporter.service"
INSTALLED_AT = "/opt/chargy-exporter/bin/chargy-exporter"  # the pip install the unit documents
BEST_RATING = 2.0  # systemd-analyze calls 0.0-2.0 "OK" (2.1-4.9 "MEDIUM", and so on)


def systemd_analyze() -> str:
    return require_binary("systemd-analyze", "Debian package `systemd`: apt-get install systemd")


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a program that exists here.

    `systemd-analyze verify` fails on an ExecStart binary that does not exist, and /opt/chargy-exporter is the
    user's install, not this machine's; everything else of the unit is verified as shipped.
    """
    stand_in = shutil.which("true")
    assert stand_in
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_AT}\n" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_AT}\n", f"ExecStart={stand_in}\n"), encoding="utf-8")
    return unit


def test_systemd_analyze_verify_reports_nothing(runnable_unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_security_rates_it_ok() -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= BEST_RATING and match[2] == "OK", match[0]


def test_it_runs_the_pip_install_sandboxed_with_the_key_in_an_environment_file() -> None:
    unit = directives()
    assert unit["ExecStart"] == [INSTALLED_AT]
    # "-": a missing file is no error (the public feed URL is the default); no key anywhere in the unit itself.
    assert unit["EnvironmentFile"] == ["-/etc/chargy-exporter/env"]
    assert "KML_URL" not in "".join(v for values in unit.values() for v in values)
    expected = {
        "DynamicUser": "yes", "Restart": "on-failure", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "MemoryMax": "256M",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
    }  # fmt: skip
    assert {key: unit.get(key, [None])[-1] for key in expected} == expected
    assert "PYTHONMALLOC=malloc" in unit["Environment"][-1].split()  # as the image: less memory (README)
    # Memory pressure before the kill: MemoryHigh below MemoryMax.
    assert int(unit["MemoryHigh"][-1].rstrip("M")) < int(unit["MemoryMax"][-1].rstrip("M"))
