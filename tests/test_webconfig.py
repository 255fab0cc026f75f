"""webconfig.py: exporter-toolkit's web configuration file, read and checked; basic auth as a scraper sees it."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import Authority
from loopback import exporter_command

from chargy_exporter.config import load_config
from chargy_exporter.webconfig import BasicAuth, WebConfigError, load_web_config

PASSWORD = "s3cret-pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()  # cost 4: fast tests, same format


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def write(tmp_path: Path, document: object, name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document), encoding="utf-8")
    return path


def test_a_node_exporter_file_loads_with_paths_relative_to_it(tmp_path, ca):
    server = ca.issue("server")
    path = write(tmp_path, {
        "tls_server_config": {"cert_file": server.cert.name, "key_file": server.key.name, "min_version": "TLS13",
                              "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": ca.cert.name,
                              "prefer_server_cipher_suites": True},
        "http_server_config": {"http2": True},
        "basic_auth_users": {"prometheus": HASH},
    })  # fmt: skip
    config = load_web_config(str(path))
    assert config.tls is not None and config.tls.cert_file == server.cert
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert" and config.users == {"prometheus": HASH.encode()}
    assert load_config(["--web.config.file", str(path)], {}).web_config_file == config
    assert load_config([], {"CHARGY_WEB_CONFIG_FILE": str(path)}).web_config_file == config
    assert load_config([], {}).web_config_file is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("tls_server_config: [unclosed", "not YAML"),
        ({"tls_server_confg": {}}, "unknown key web config.tls_server_confg"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "ciphers": "x"}}, "unknown key"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "cipher_suites": ["x"]}},
         "not supported"),
        ({"tls_server_config": {"cert_file": "server.crt"}}, "needs both cert_file and key_file"),
        ({"tls_server_config": {"cert_file": "missing.crt", "key_file": "server.key"}}, "cannot read"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "other.key"}}, "tls_server_config"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS9"}},
         "min_version must be one of"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "client_auth_type": "RequireAndVerifyClientCert"}}, "needs client_ca_file"),
        ({"basic_auth_users": {"prometheus": "plain-text-password"}}, "bcrypt hash"),
        ({"basic_auth_users": {"prometheus": "$2b$10$tooshort"}}, "not a valid bcrypt hash"),
        ({"basic_auth_users": ["prometheus"]}, "must be a mapping"),
    ],
)  # fmt: skip
def test_a_file_that_cannot_be_served_as_written_is_a_one_line_error(tmp_path, ca, document, message):
    ca.issue("server")
    ca.issue("other")
    path = write(tmp_path, document)
    with pytest.raises(WebConfigError, match=message) as raised:
        load_web_config(str(path))
    assert "\n" not in str(raised.value)


def test_the_exporter_refuses_to_start_on_a_bad_file(tmp_path):
    """Exit 2 and one line, never a server that serves plain HTTP instead."""
    missing_files = {"tls_server_config": {"cert_file": "x", "key_file": "y"}}
    for document in ("basic_auth_users: {prometheus: not-a-hash}", missing_files):
        path = write(tmp_path, document)
        result = subprocess.run([*exporter_command(), "--demo", "--web.config.file", str(path)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "--web-config-file" in result.stderr, result.stderr
    assert subprocess.run([*exporter_command(), "--help"], capture_output=True, text=True).stdout.count(
        "--web.config.file"
    )


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(app: BasicAuth, path: str = "/metrics", authorization: str | None = None) -> tuple[str, dict[str, str]]:
    seen: list[tuple[str, dict[str, str]]] = []
    environ = {"PATH_INFO": path, **({"HTTP_AUTHORIZATION": authorization} if authorization is not None else {})}
    app(environ, lambda status, headers: seen.append((status, dict(headers))))
    return seen[0]


def ok_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", header("prometheus", "wrong"), header("nobody", PASSWORD), "Bearer x", "Basic !!!", "Basic " + "A" * 99],
)
def test_missing_or_wrong_credentials_get_401_with_a_basic_challenge(authorization):
    status, headers = call(BasicAuth(ok_app, {"prometheus": HASH.encode()}), authorization=authorization)
    assert status.startswith("401") and headers["WWW-Authenticate"].startswith("Basic ")


def test_without_a_web_config_neither_yaml_nor_bcrypt_is_loaded():
    """They cost ~1.3 MB resident: only a process given --web-config-file pays for them."""
    script = "import sys, chargy_exporter.cli; print(sorted({'yaml', 'bcrypt'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_a_password_is_checked_with_bcrypt_once_and_healthz_stays_open(monkeypatch):
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    app = BasicAuth(ok_app, {"prometheus": HASH.encode()})
    for _ in range(20):
        assert call(app, authorization=header("prometheus", PASSWORD))[0] == "200 OK"
    assert len(checks) == 1  # the scrapes after the first cost a sha256, not a bcrypt check
    assert call(app, authorization=header("prometheus", "other"))[0].startswith("401")  # a wrong one is checked
    assert call(app, path="/healthz")[0] == "200 OK"
