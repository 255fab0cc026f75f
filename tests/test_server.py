"""server.py as a scraper and an attacker see it: one client cannot keep scrapers out; TLS, client certificates,
basic auth and certificate rotation from a web configuration file; real Prometheus scraping over TLS with a password."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import resource
import socket
import ssl
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import Authority
from conftest import ExporterProcess, free_port, http_get, parse_exposition, require_binary, wait_until
from feedgen import generate_feed
from opentelemetry.sdk.resources import Resource

from chargy_exporter import healthcheck
from chargy_exporter.kml import parse_kml
from chargy_exporter.metrics import MetricsPipeline
from chargy_exporter.model import FeedStatus, State
from chargy_exporter.prometheus import PrometheusEndpoint
from chargy_exporter.server import MetricsServer
from chargy_exporter.webconfig import WebConfig, load_web_config

PASSWORD = "scrape-me"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@contextlib.contextmanager
def serving(web_config: WebConfig | None = None, idle_timeout: float = 15) -> Iterator[MetricsServer]:
    endpoint = PrometheusEndpoint()
    pipeline = MetricsPipeline(Resource.create({}), on_published=[endpoint.render])
    pipeline.publish(State(parse_kml(generate_feed(stations=10, seed=5).kml), FeedStatus(up=True)))
    server = endpoint.serve("127.0.0.1", 0, idle_timeout, web_config)
    try:
        yield server
    finally:
        server.shutdown()
        pipeline.shutdown()


def web_config(directory: Path, ca: Authority, users: bool = False, client_auth: str | None = None) -> WebConfig:
    server = ca.issue("server")
    tls = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if client_auth:
        tls |= {"client_auth_type": client_auth, "client_ca_file": str(ca.cert)}
    document: dict[str, object] = {"tls_server_config": tls}
    if users:
        document["basic_auth_users"] = {"prometheus": HASH}
    path = directory / "web.yml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_web_config(str(path))


def https_get(port: int, context: ssl.SSLContext, path: str = "/metrics", headers: dict[str, str] | None = None):
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def client_context(ca: Authority, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---- one client cannot keep scrapers out -------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s: CI's slow step runs it
def test_thousands_of_trickling_connections_from_one_address_do_not_keep_scrapers_out():
    """The issue's attack: from 127.0.0.2, 2,200 connections each sending a request line, then a header line every
    3 s, reconnecting when closed; meanwhile every scrape from 127.0.0.1 is answered within 2 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    attackers = 2200
    needed = 2 * attackers + 2048 + 256  # both ends of each connection live in this process
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed) if hard == resource.RLIM_INFINITY else hard, hard))
    stop = threading.Event()
    rounds = [0]
    reconnects = [0]

    def connect() -> socket.socket | None:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            return sock
        except OSError:
            sock.close()
            return None

    def trickle() -> None:
        sockets = [connect() for _ in range(attackers)]
        while not stop.is_set():
            rounds[0] += 1
            for index, sock in enumerate(sockets):
                try:
                    assert sock is not None
                    sock.sendall(b"X-Trickle: 1\r\n")
                except (OSError, AssertionError):  # closed by the server (head deadline, eviction): come back
                    if sock is not None:
                        sock.close()
                    sockets[index] = connect()
                    reconnects[0] += 1
            stop.wait(3)  # the attack's pace, not a wait for a condition
        for sock in sockets:
            if sock is not None:
                sock.close()

    with serving() as server:
        port = server.port
        attacker = threading.Thread(target=trickle, daemon=True)
        attacker.start()
        try:
            wait_until(lambda: rounds[0] >= 2, 120, "the attacker to open its connections and trickle")
            scrapes = 0
            # Until the attacker has come back after the head deadline (every connection renewed at least once).
            while rounds[0] < 6 or reconnects[0] < attackers:
                status, _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)  # the bound under test
                assert status == 200 and parse_exposition(body.decode()).value("chargy_feed_up") == 1
                scrapes += 1
                assert rounds[0] < 60, "the attacker's connections were never closed"
            assert scrapes >= 15
        finally:
            stop.set()
            attacker.join(30)


# ---- TLS, client certificates, basic auth --------------------------------------------------------------------------


def test_basic_auth_over_tls_401_without_the_password_and_healthz_open(tmp_path):
    ca = Authority(tmp_path)
    with serving(web_config(tmp_path, ca, users=True)) as server:
        context = client_context(ca)
        for headers in ({}, basic("prometheus", "wrong"), basic("someone", PASSWORD)):
            status, answer, body = https_get(server.port, context, headers=headers)
            assert status == 401 and answer["WWW-Authenticate"].startswith("Basic ") and b"chargy_" not in body
        assert https_get(server.port, context, "/", basic("prometheus", "wrong"))[0] == 401  # / serves metrics too
        status, _, body = https_get(server.port, context, headers=basic("prometheus", PASSWORD))
        assert status == 200 and parse_exposition(body.decode()).value("chargy_feed_up") == 1
        assert https_get(server.port, context, "/healthz")[:1] == (200,)


def test_plain_http_to_a_tls_port_gets_no_metrics(tmp_path):
    ca = Authority(tmp_path)
    with serving(web_config(tmp_path, ca)) as server, socket.create_connection(("127.0.0.1", server.port), 10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        assert b"chargy_" not in received and not received.startswith(b"HTTP/1.1 200")
        assert https_get(server.port, client_context(ca))[0] == 200  # and the server still serves TLS


def test_mutual_tls_a_client_with_a_certificate_gets_metrics_one_without_is_refused(tmp_path):
    ca = Authority(tmp_path)
    with serving(web_config(tmp_path, ca, client_auth="RequireAndVerifyClientCert")) as server:
        client = ca.issue("scraper", client=True)
        status, _, body = https_get(server.port, client_context(ca, client.cert, client.key))
        assert status == 200 and b"chargy_feed_up" in body
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(server.port, client_context(ca))
        stranger = Authority(tmp_path / "..", "other CA").issue("stranger", client=True)  # signed by another CA
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(server.port, client_context(ca, stranger.cert, stranger.key))


def test_a_certificate_replaced_on_disk_is_served_without_restart(tmp_path):
    ca = Authority(tmp_path)
    config = web_config(tmp_path, ca)
    assert config.tls is not None

    def served_serial() -> int:
        with (
            socket.create_connection(("127.0.0.1", server.port), 10) as sock,
            client_context(ca).wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return Authority.serial_of_der(der)

    with serving(config) as server:
        before = served_serial()
        renewed = ca.issue("server")  # the same two files, rewritten as cert-manager or certbot do
        assert renewed.cert == config.tls.cert_file
        after = ca.serial_of(renewed.cert.read_bytes())
        wait_until(lambda: served_serial() == after, 30, "the new certificate to be served")
        assert before != after


# ---- the real process, with real Prometheus ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow  # a real Prometheus: ~6 s
def test_prometheus_scrapes_over_tls_with_basic_auth_and_the_healthcheck_still_works(tmp_path, feed_server):
    prometheus = require_binary("prometheus")
    ca = Authority(tmp_path)
    config = web_config(tmp_path, ca, users=True)
    feed_server.set_body(generate_feed(stations=10, seed=9).kml)
    exporter = ExporterProcess(["--kml-url", feed_server.url, "--web.config.file", str(config.path)], None,
                               tmp_path / "exporter.log")  # fmt: skip
    process = None
    try:
        wait_until(lambda: exporter.logs().count("serving https://"), 30, "the exporter to serve", exporter.logs)
        healthy, detail = healthcheck.check(Path(f"/proc/{exporter.process.pid}"))
        assert healthy, detail
        (tmp_path / "password").write_text(PASSWORD, encoding="utf-8")
        port = free_port()
        scrape = {
            "job_name": "chargy",
            "scheme": "https",
            "tls_config": {"ca_file": str(ca.cert)},
            "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")},
            "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}],
        }
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}), encoding="utf-8"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def feed_up_in_prometheus() -> bool:
            assert process is not None and process.poll() is None, (tmp_path / "prometheus.log").read_text()
            query = urllib.parse.quote('chargy_feed_up{job="chargy"} * on() up{job="chargy"}')
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                return False
            return bool(result) and result[0]["value"][1] == "1"

        wait_until(feed_up_in_prometheus, 60, "Prometheus to scrape the exporter over TLS with basic auth")
    finally:
        if process is not None:
            process.terminate()
            process.wait(20)
        exporter.stop()


def test_a_port_in_use_is_an_oserror_with_tls_too(tmp_path):
    ca = Authority(tmp_path)
    config = web_config(tmp_path, ca)
    with serving(config) as server, pytest.raises(OSError):
        PrometheusEndpoint().serve("127.0.0.1", server.port, web_config=config)


def test_shutdown_closes_tls_connections_mid_handshake_and_the_port(tmp_path):
    ca = Authority(tmp_path)
    with serving(web_config(tmp_path, ca)) as server:
        sockets = [socket.create_connection(("127.0.0.1", server.port), 10) for _ in range(50)]
        try:
            server.shutdown()
            for sock in sockets:  # closed by the server: EOF or reset, not a hang
                with contextlib.suppress(ConnectionError):
                    assert sock.recv(1) == b""
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("127.0.0.1", server.port))
        finally:
            for sock in sockets:
                sock.close()
