"""Prometheus configuration and rules of the deployment kit, checked by promtool (Debian package `prometheus`).

Outside CI these tests skip when promtool is missing; with CI set they fail, since .ci/run must install it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_binary

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "chargy.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "chargy.rules.test.yml"
# level:metric:operations (https://prometheus.io/docs/practices/rules/); level may be empty for network-wide sums.
RECORDING_NAME = re.compile(r"(?:[a-z_]+:)?[a-z_][a-z0-9_]*:[a-z_][a-z0-9_]*")


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="module")
def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule.get("record") or rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_promtool_accepts_the_demo_prometheus_config_and_its_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # The config's rule_files glob must have found our rules file (and nothing else, e.g. the unit tests).
    assert str(RULES) in result.stdout + result.stderr, result.stdout + result.stderr
    assert "chargy.rules.test.yml" not in result.stdout + result.stderr


def test_promtool_check_rules(promtool: str, rules: dict[str, dict[str, Any]]) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Each change breaks one documented behaviour; the unit tests must notice every one of them.
MUTATIONS = {
    "exporter down fires after 10m": ("for: 10m", "for: 5m"),
    "stale means older than 15 minutes": ("> 900", "> 1800"),
    "stale also when the timestamp is absent": ("unless on(job, instance)", "and on(job, instance)"),
    "feed down waits 15m": ("for: 15m", "for: 30m"),
    "all-unavailable ignores charging stations": (
        '{chargy_connector_state!="unavailable"}',
        '{chargy_connector_state="available"}',
    ),
    "per-station sums keep the state": ("sum by (station, chargy_connector_state)", "sum by (station)"),
    "no-available count is 0, not absent": ("or on() (count(sum by (station) (chargy_connector_state)) * 0)\n  ", ""),
    "memory high above 80% of 256 MiB, not 90%": ("> 0.8 * 256 * 1024 * 1024", "> 0.9 * 256 * 1024 * 1024"),
    "memory high stays quiet below 80% of 256 MiB": ("> 0.8 * 256 * 1024 * 1024", "> 0.7 * 256 * 1024 * 1024"),
    "memory high waits 15m": ("1024 * 1024\n        for: 15m", "1024 * 1024\n        for: 5m"),
    "memory high is the exporter's, not Prometheus'": (
        'process_resident_memory_bytes{job="chargy"}',
        "process_resident_memory_bytes",
    ),
}


@pytest.mark.parametrize("behaviour", MUTATIONS)
def test_promtool_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path, behaviour: str) -> None:
    old, new = MUTATIONS[behaviour]
    text = RULES.read_text(encoding="utf-8")
    assert old in text, f"mutation for {behaviour!r} no longer applies; update MUTATIONS"
    (tmp_path / RULES.name).write_text(text.replace(old, new, 1), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests still pass with {behaviour!r} broken"


def test_recording_rule_names_follow_prometheus_conventions(rules: dict[str, dict[str, Any]]) -> None:
    recorded = [name for name, rule in rules.items() if "record" in rule]
    assert {"station:chargy_connector_state:sum", "chargy_connector_state:sum"} <= set(recorded)
    for name in recorded:
        assert RECORDING_NAME.fullmatch(name), f"{name} is not level:metric:operations"
    assert any("without_available" in name for name in recorded), "no rule for stations without available connector"


def test_alerts_have_the_documented_conditions(rules: dict[str, dict[str, Any]]) -> None:
    expected_for = {
        "ChargyExporterDown": "10m",
        "ChargyFeedStale": "5m",
        "ChargyFeedDown": "15m",
        "ChargyStationAllUnavailable": "1h",
        "ChargyExporterMemoryHigh": "15m",
    }
    alerts = {name: rule for name, rule in rules.items() if "alert" in rule}
    assert set(alerts) == set(expected_for)
    for name, rule in alerts.items():
        assert rule.get("for") == expected_for[name], name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert 'up{job="chargy"} == 0' in alerts["ChargyExporterDown"]["expr"]
    memory = alerts["ChargyExporterMemoryHigh"]
    assert memory["expr"].strip() == 'process_resident_memory_bytes{job="chargy"} > 0.8 * 256 * 1024 * 1024'
    assert memory["labels"]["severity"] == "warning"
    # 256 MiB is the memory limit the shipped deployments set: the alert's threshold moves with it.
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text(encoding="utf-8"))
    [exporter] = deployment["spec"]["template"]["spec"]["containers"]
    assert exporter["resources"]["limits"]["memory"] == "256Mi"
    unit = (ROOT / "deploy" / "systemd" / "chargy-exporter.service").read_text(encoding="utf-8")
    assert re.search(r"^MemoryMax=256M$", unit, re.MULTILINE)
    assert "256 MiB" in memory["annotations"]["description"]
    # The job name the alerts select is the one the demo config scrapes the exporter with.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    assert "chargy" in {job["job_name"] for job in config["scrape_configs"]}
