"""The Grafana dashboard, the rules and the users' PromQL, run against a real Prometheus.

A session-scoped stack: a generated feed served on 127.0.0.1 -> the real chargy-exporter process -> Debian's
`prometheus` (1 s scrape and rule evaluation, our rules file loaded). Every PromQL expression of the dashboard and of
the rules file runs there, and the answers are compared with what the generated feed says.

Outside CI these tests skip when the prometheus binary is missing; with CI set they fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ExporterProcess, FeedServer, free_port, require_binary, wait_until
from feedgen import ExpectedConnector, GeneratedFeed, generate_feed

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "chargy.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "chargy.rules.yml"
STATES = ("available", "charging", "unavailable")
SEED_STATION = "Schuttrange - Parking Eglise"
# The PromQL users run today (shared/README.md), verbatim.
SEED_STATION_QUERY = f'sum by (chargy_connector_state) (chargy_connector_state{{station="{SEED_STATION}"}})'
SEED_NETWORK_QUERY = "sum by (chargy_connector_state) (chargy_connector_state)"
SEED_SHARE_QUERY = (
    'count( sum by (station) (chargy_connector_state{chargy_connector_state="available"}) == 0 ) '
    "/ count( sum by (station) (chargy_connector_state) )"
)
# What Grafana puts in place of its built-in variables, for a dashboard looked at over the last few minutes.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


# --------------------------------------------------------------------------- the dashboard, statically


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def interpolate(expr: str, dashboard: dict[str, Any]) -> str:
    """Replace dashboard variables as Grafana would with their saved values; fail on an unknown variable."""
    values = dict(BUILTIN_VARIABLES)
    for variable in dashboard.get("templating", {}).get("list", []):
        values[variable["name"]] = variable["current"]["value"]

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return str(values[name])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    ref: str
    expr: str  # interpolated
    instant: bool

    @property
    def id(self) -> str:
        return f"{self.panel} [{self.ref}]"


def dashboard_queries() -> list[DashboardQuery]:
    dashboard = load_dashboard()
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append(
                DashboardQuery(
                    panel["title"],
                    target["refId"],
                    interpolate(target["expr"], dashboard),
                    bool(target.get("instant")) and not target.get("range"),
                )
            )
    return queries


def fast_speed_regex() -> str:
    regexes = {m.group(1) for q in dashboard_queries() for m in re.finditer(r'speed=~"([^"]+)"', q.expr)}
    assert len(regexes) == 1, f"the fast-charger panels should share one speed selector: {regexes}"
    return regexes.pop()


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target["expr"].strip(), panel["title"]
    assert {panel["type"] for panel in panels} >= {"timeseries", "stat", "table", "geomap"}


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_dashboard_uses_the_users_promql_verbatim() -> None:
    expressions = {query.expr for query in dashboard_queries()}
    for seed in (SEED_STATION_QUERY, SEED_NETWORK_QUERY, SEED_SHARE_QUERY):
        assert seed in expressions, f"not in the dashboard: {seed}"


def test_geomap_reads_coordinates_from_the_station_info_labels() -> None:
    geomap = next(panel for panel in all_panels(load_dashboard()) if panel["type"] == "geomap")
    assert all(target.get("format") == "table" for target in geomap["targets"])
    assert "chargy_station_info" in geomap["targets"][0]["expr"]
    layer = geomap["options"]["layers"][0]
    assert layer["location"] == {"mode": "coords", "latitude": "latitude", "longitude": "longitude"}
    converted = {
        c["targetField"]: c["destinationType"]
        for t in geomap["transformations"]
        if t["id"] == "convertFieldType"
        for c in t["options"]["conversions"]
    }
    assert converted == {"latitude": "number", "longitude": "number"}, "label values are strings: convert them"


@pytest.mark.parametrize(
    "speed",
    [
        "3.7",
        "7.4",
        "11",
        "22",
        "43",
        "49",
        "49.9",
        "50",
        "50.5",
        "75",
        "99.9",
        "100",
        "150",
        "175",
        "300",
        "350",
        "1000",
        "5",
        "500",
        "0",
        "",
    ],
)
def test_fast_charger_selector_means_50_kw_or_more(speed: str) -> None:
    selected = re.fullmatch(fast_speed_regex(), speed) is not None  # PromQL anchors =~ at both ends
    assert selected == (speed != "" and float(speed) >= 50), f"speed={speed!r}"


# --------------------------------------------------------------------------- the live stack


def build_feed() -> GeneratedFeed:
    """A generated feed, adjusted so that every case the dashboard and the rules distinguish is present."""
    feed = generate_feed(stations=150, seed=11)
    with_connectors = [i for i, s in enumerate(feed.stations) if s.devices]

    def set_connectors(index: int, states: list[str] | None = None, speeds: list[float] | None = None) -> None:
        """Every connector of every device of the station, the given states and speeds in turn."""
        station = feed.stations[index]
        devices = []
        for device in station.devices:
            connectors = list(device.connectors)
            for n in range(len(connectors)):
                if states:
                    connectors[n] = replace(connectors[n], state=states[n % len(states)])
                if speeds:
                    connectors[n] = replace(connectors[n], speed=speeds[n % len(speeds)])
            devices.append(replace(device, connectors=tuple(connectors)))
        feed.stations[index] = replace(station, devices=tuple(devices))

    # The users' example station twice, at two places: names are not unique keys.
    for index in with_connectors[:2]:
        feed.stations[index] = replace(feed.stations[index], name=SEED_STATION)
    set_connectors(with_connectors[0], states=["AVAILABLE", "SUSPENDED_EV"])
    set_connectors(with_connectors[2], states=["OFFLINE", "MAINTENANCE"])  # every connector unavailable
    set_connectors(with_connectors[3], states=["CHARGING", "FAULTED"])  # nothing available, one charging
    set_connectors(with_connectors[4], speeds=[50.0, 49.9])  # the fast-charger boundary
    set_connectors(with_connectors[5], speeds=[175.0, 7.4], states=["AVAILABLE", "CHARGING"])
    feed._kml = None
    return feed


@dataclass
class Stack:
    feed: GeneratedFeed
    exporter: ExporterProcess
    prometheus_url: str

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.prometheus_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                body = json.loads(text)
            except ValueError:
                raise error from None  # not the API's answer (a 503 while Prometheus starts): an OSError, not ready
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, seconds: int = 30) -> list[dict[str, Any]]:
        end = time.time()
        return list(self.api("query_range", query=expr, start=end - seconds, end=end, step=1)["result"])

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """{label values: value} of an instant query; fails on two series with the same label values."""
        result: dict[tuple[str, ...], float] = {}
        for series in self.query(expr):
            key = tuple(series["metric"].get(label, "") for label in labels)
            assert key not in result, f"{expr}: two series for {key}"
            result[key] = float(series["value"][1])
        return result


def _wait(condition: Any, what: str, timeout: float = 60) -> None:
    def check() -> bool:
        try:
            return bool(condition())
        except (AssertionError, OSError):
            return False

    wait_until(check, timeout, what)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus-stack")
    feed = build_feed()
    server = FeedServer()
    server.set_body(feed.kml)
    exporter = ExporterProcess(["--kml-url", server.url, "--refresh-interval", "300"], None, workdir / "exporter.log")
    process: subprocess.Popen[bytes] | None = None
    log = (workdir / "prometheus.log").open("wb")
    try:
        exporter.wait_until_up()

        # One failed refresh, so that the errors-by-reason panel has a series to show.
        def unavailable(handler: Any) -> None:
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        server.set_responder(unavailable)
        exporter.refresh_now()
        exporter.wait_for(lambda e: sum(s.value for s in e.samples("chargy_feed_refresh_errors_total")) > 0)
        server.set_body(feed.kml)
        exporter.refresh_now()
        exporter.wait_until_up()

        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "chargy", "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack = Stack(feed, exporter, f"http://127.0.0.1:{port}")

        def ready() -> bool:
            assert process is not None and process.poll() is None, (workdir / "prometheus.log").read_text()
            groups = stack.api("rules")["groups"]
            evaluated = all(not r["lastEvaluation"].startswith("0001") for g in groups for r in g["rules"])
            # Enough scrapes for increase()/rate() over the dashboard's windows, and every recording rule written.
            samples = stack.query('count_over_time(chargy_feed_up{job="chargy"}[1m])')
            return (
                evaluated
                and bool(samples)
                and float(samples[0]["value"][1]) >= 5
                and all(stack.query(name) for name in recording_rules())
            )

        _wait(ready, "Prometheus to scrape the exporter and evaluate the rules")
        yield stack
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        exporter.stop()
        server.close()


# --------------------------------------------------------------------------- expectations from the feed


def by_station(feed: GeneratedFeed) -> dict[str, Counter[str]]:
    """Connectors per station name and simplified state (names are not unique: same name, same bucket)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for connector in feed.connectors:
        counts[connector.station][connector.simplified] += 1
    return counts


def fast(connector: ExpectedConnector) -> bool:
    return connector.speed != "" and float(connector.speed) >= 50


def recording_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]


def rules_by_name() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule.get("record") or rule["alert"]: rule for group in groups for rule in group["rules"]}


def promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- every expression returns data


@pytest.mark.e2e
@pytest.mark.parametrize("query", dashboard_queries(), ids=lambda q: q.id)
def test_dashboard_expression_returns_data(stack: Stack, query: DashboardQuery) -> None:
    result = stack.query(query.expr) if query.instant else stack.query_range(query.expr)
    assert result, f"no data for {query.expr}"
    for series in result:
        points = [series["value"]] if "value" in series else series["values"]
        assert points and all(value not in ("NaN", "+Inf", "-Inf") for _, value in points), series


@pytest.mark.e2e
def test_every_rule_evaluates_without_error_on_real_data(stack: Stack) -> None:
    rules = [rule for group in stack.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(rules_by_name())
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), f"{rule['name']}: {rule.get('lastError')}"
    for name in recording_rules():
        assert stack.query(name), f"recording rule {name} wrote nothing"
        assert stack.query(rules_by_name()[name]["expr"]), f"{name}: its expression returns nothing"


@pytest.mark.e2e
def test_health_alerts_stay_quiet_on_a_healthy_exporter(stack: Stack) -> None:
    health = ("ChargyExporterDown", "ChargyFeedStale", "ChargyFeedDown", "ChargyExporterMemoryHigh")
    for name in health:
        assert stack.query(rules_by_name()[name]["expr"]) == [], f"{name} would fire on a healthy exporter"
    active = {alert["labels"]["alertname"] for alert in stack.api("alerts")["alerts"]}
    assert not active & set(health)


@pytest.mark.e2e
def test_all_unavailable_alert_is_pending_for_exactly_the_dead_stations(stack: Stack) -> None:
    expected = {
        name
        for name, counts in by_station(stack.feed).items()
        if counts["unavailable"] and not counts["available"] and not counts["charging"]
    }
    assert expected, "the feed should hold a station with every connector unavailable"
    expr = rules_by_name()["ChargyStationAllUnavailable"]["expr"]
    assert {key[0] for key in stack.values(expr, "station")} == expected
    pending = {
        alert["labels"]["station"]
        for alert in stack.api("alerts")["alerts"]
        if alert["labels"]["alertname"] == "ChargyStationAllUnavailable"
    }
    assert pending == expected
    assert all(alert["state"] == "pending" for alert in stack.api("alerts")["alerts"]), "fired before its hour"


# --------------------------------------------------------------------------- the users' PromQL gives the feed's numbers


@pytest.mark.e2e
def test_seed_station_example_counts_both_placemarks_of_the_name(stack: Stack) -> None:
    expected = by_station(stack.feed)[SEED_STATION]
    assert sum(1 for s in stack.feed.expected_stations if s.name == SEED_STATION) == 2
    got = stack.values(SEED_STATION_QUERY, "chargy_connector_state")
    assert got == {(state,): float(expected[state]) for state in STATES}


@pytest.mark.e2e
def test_seed_station_example_works_for_every_station_name(stack: Stack) -> None:
    """Accents, apostrophes, `&` and double quotes in names: the same query for every station of the feed."""
    for name, expected in by_station(stack.feed).items():
        query = f"sum by (chargy_connector_state) (chargy_connector_state{{station={promql_string(name)}}})"
        got = stack.values(query, "chargy_connector_state")
        assert got == {(state,): float(expected[state]) for state in STATES}, name


@pytest.mark.e2e
def test_seed_network_example_gives_the_feed_counts(stack: Stack) -> None:
    expected = stack.feed.counts_by_state()
    assert stack.values(SEED_NETWORK_QUERY, "chargy_connector_state") == {
        (state,): float(expected[state]) for state in STATES
    }


@pytest.mark.e2e
def test_seed_share_example_gives_the_share_of_stations_without_available_connector(stack: Stack) -> None:
    stations = by_station(stack.feed)
    without = sum(1 for counts in stations.values() if counts["available"] == 0)
    assert 0 < without < len(stations)
    assert stack.values(SEED_SHARE_QUERY)[()] == pytest.approx(without / len(stations))


# --------------------------------------------------------------------------- rules and panels give the feed's numbers


@pytest.mark.e2e
def test_recording_rules_match_the_feed(stack: Stack) -> None:
    stations = by_station(stack.feed)
    assert stack.values("station:chargy_connector_state:sum", "station", "chargy_connector_state") == {
        (name, state): float(counts[state]) for name, counts in stations.items() for state in STATES
    }
    network = stack.feed.counts_by_state()
    assert stack.values("chargy_connector_state:sum", "chargy_connector_state") == {
        (state,): float(network[state]) for state in STATES
    }
    assert stack.values("station:chargy_connectors:count", "station") == {
        (name,): float(sum(counts.values())) for name, counts in stations.items()
    }
    without = sum(1 for counts in stations.values() if counts["available"] == 0)
    assert stack.values("chargy_stations_without_available_connector:count") == {(): float(without)}
    assert stack.values("chargy_stations_without_available_connector:ratio")[()] == pytest.approx(
        without / len(stations)
    )


def panel_targets(title: str) -> dict[str, str]:
    dashboard = load_dashboard()
    panel = next(panel for panel in all_panels(dashboard) if panel["title"] == title)
    return {target["refId"]: interpolate(target["expr"], dashboard) for target in panel["targets"]}


@pytest.mark.e2e
def test_station_table_lists_every_station_with_its_counts(stack: Stack) -> None:
    targets = panel_targets("Stations: connectors by state (now)")
    columns = {"A": "available", "B": "charging", "C": "unavailable"}
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for ref, expr in targets.items():
        for (station,), value in stack.values(expr, "station").items():
            rows[station][columns.get(ref, "connectors")] = value
    expected = {
        name: {**{state: float(counts[state]) for state in STATES}, "connectors": float(sum(counts.values()))}
        for name, counts in by_station(stack.feed).items()
    }
    assert dict(rows) == expected


@pytest.mark.e2e
def test_geomap_places_every_placemark_with_the_available_count_of_its_name(stack: Stack) -> None:
    (expr,) = panel_targets("Stations by available connectors").values()
    markers = []
    for series in stack.query(expr):
        labels = series["metric"]
        markers.append(
            (
                labels["station"],
                labels["address"],
                float(labels["latitude"]),
                float(labels["longitude"]),
                float(series["value"][1]),
            )
        )
    counts = by_station(stack.feed)
    expected = [
        (s.name, s.address, s.latitude, s.longitude, float(counts[s.name]["available"]))
        for s in stack.feed.expected_stations
    ]
    assert len(markers) == len(expected), "one marker per Placemark, stations without connectors included"
    for got, want in zip(sorted(markers), sorted(expected), strict=True):
        assert got[:2] == want[:2] and got[4] == want[4], (got, want)
        assert got[2] == pytest.approx(want[2], abs=1e-6) and got[3] == pytest.approx(want[3], abs=1e-6), (got, want)


@pytest.mark.e2e
def test_fast_charger_panels_show_exactly_the_50_kw_connectors(stack: Stack) -> None:
    connectors = [c for c in stack.feed.connectors if fast(c)]
    assert {"50", "175"} <= {c.speed for c in connectors} and "49.9" not in {c.speed for c in connectors}
    table = panel_targets("Fast-charging connectors (now)")["A"]
    assert set(stack.values(table, "connector", "speed", "chargy_connector_state")) == {
        (c.connector, c.speed, c.simplified) for c in connectors
    }
    series = panel_targets("Fast-charging connectors by state")["A"]
    counts = Counter(c.simplified for c in connectors)
    got = stack.values(series, "chargy_connector_state")
    assert got == {(state,): float(counts[state]) for state in STATES}


@pytest.mark.e2e
def test_exporter_health_panels(stack: Stack) -> None:
    assert stack.values("chargy_feed_up", "job") == {("chargy",): 1.0}
    (age,) = stack.values("time() - chargy_feed_last_success_timestamp_seconds").values()
    assert 0 <= age < 30, "data age of a feed refreshed every second"
    errors = panel_targets("Feed refresh errors by reason")["A"]
    reasons = {key[0] for key in stack.values(errors, "reason")}
    exposed = {s.labels["reason"] for s in stack.exporter.scrape().samples("chargy_feed_refresh_errors_total")}
    assert reasons == exposed and reasons, "the panel lists the reasons the exporter counts"
    stations = panel_targets("Network size")
    assert stack.values(stations["A"]) == {(): float(len(stack.feed.expected_stations))}
    assert stack.values(stations["C"]) == {(): float(len(stack.feed.connectors))}
