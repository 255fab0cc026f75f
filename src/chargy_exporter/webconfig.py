"""exporter-toolkit's web configuration file (`--web.config.file` of every Go exporter): TLS, optionally with client
certificates, and basic auth with bcrypt-hashed passwords. Read and checked whole at start (a mistake is an error,
never a server silently serving plain HTTP); certificates are re-read when their files change."""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

WsgiApp = Callable[..., Iterable[bytes]]

MAX_FILE_BYTES: Final = 1024 * 1024
MAX_USERS: Final = 1000
MAX_AUTHORIZATION: Final = 1024  # characters of an Authorization header read
RELOAD_INTERVAL: Final = 1.0  # seconds between looks at the certificate files
# Checked against for an unknown user, so that an answer takes as long whether the user exists or not.
_DUMMY_HASH: Final = b"$2b$10$OKBNWllNc4zy.VRlPbqiwO7jBjmUPsU6hkiT7HLphDx7Xq.lUaBBy"
_BCRYPT_HASH: Final = re.compile(r"\$2[abxy]?\$[0-3][0-9]\$[./A-Za-z0-9]{53}")
_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# client_auth_type → (verify mode, whether client_ca_file is needed). Go's RequireAnyClientCert (a certificate, not
# verified) has no OpenSSL equivalent in Python's ssl module.
_CLIENT_AUTH: Final = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_OPTIONAL, False),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
_TLS_KEYS: Final = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
_IGNORED: Final = {"prefer_server_cipher_suites", "http2"}  # Go ignores the first too; we only speak HTTP/1.1
_NOT_SUPPORTED: Final = {"cipher_suites", "curve_preferences", "client_allowed_sans", "cert", "key", "client_ca",
                         "headers"}  # fmt: skip


class WebConfigError(argparse.ArgumentTypeError, ValueError):
    """A web configuration that cannot be served as written; the message is one line, the option's error as it is."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"  # exporter-toolkit's default
    max_version: str = "TLS13"

    @property
    def files(self) -> list[Path]:
        return [path for path in (self.cert_file, self.key_file, self.client_ca_file) if path]

    def context(self) -> ssl.SSLContext:
        """A server context from the files as they are now: OSError or ssl.SSLError when they do not make one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version, context.maximum_version = _VERSIONS[self.min_version], _VERSIONS[self.max_version]
        context.load_cert_chain(self.cert_file, self.key_file)
        context.verify_mode = _CLIENT_AUTH[self.client_auth_type][0]
        if self.client_ca_file:
            context.load_verify_locations(self.client_ca_file)
        return context


class Certificates:
    """The server context, rebuilt when a file's modification time, size or inode changes (cert-manager, certbot);
    until the new files make one (the key written after the certificate), the old one is served."""

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        self._stamp = self._stamps()
        self._context = settings.context()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stamps(self) -> list[tuple[int, int, int]] | None:
        try:
            return [(stat.st_mtime_ns, stat.st_size, stat.st_ino) for stat in map(os.stat, self._settings.files)]
        except OSError:  # a file missing: a change too, and the context it makes fails, the old one kept
            return None

    def __call__(self) -> ssl.SSLContext:
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_INTERVAL:
                self._checked = time.monotonic()
                if (stamp := self._stamps()) != self._stamp:
                    try:
                        self._context, self._stamp = self._settings.context(), stamp
                        log.info("TLS certificate files changed: re-read")
                    except (OSError, ssl.SSLError, ValueError) as error:
                        log.warning("cannot read the changed TLS files (still serving the previous ones): %s", error)
            return self._context


class BasicAuth:
    """WSGI middleware: a request needs one of `users`' passwords (bcrypt hashes), except /healthz, which tells
    nothing but "up" (the image's HEALTHCHECK and probes cannot know a password: the file has only hashes)."""

    def __init__(self, app: WsgiApp, users: dict[str, bytes]) -> None:
        self._app, self._users = app, users
        # Per user, the sha256 of the password last verified: a scrape costs a hash, not a ~100 ms bcrypt check.
        # Bounded by the users of the file; only a correct password gets in.
        self._verified: dict[str, bytes] = {}
        self._bcrypt = threading.BoundedSemaphore(1)  # wrong passwords in a flood take one core at most

    def check(self, authorization: str) -> bool | None:
        """True: a user's password; False: not; None: not checked now (another bcrypt check under way)."""
        scheme, _, encoded = authorization[:MAX_AUTHORIZATION].strip().partition(" ")
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if scheme.lower() != "basic" or not sep:
            return False
        digest = hashlib.sha256(password.encode()).digest()
        if hmac.compare_digest(self._verified.get(user, b""), digest):
            return True
        if not self._bcrypt.acquire(blocking=False):
            return None
        import bcrypt  # loaded by load_web_config already: see there

        try:
            ok = bcrypt.checkpw(password.encode(), self._users.get(user, _DUMMY_HASH)) and user in self._users
        finally:
            self._bcrypt.release()
        if ok:
            self._verified[user] = digest
        return ok

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        allowed = environ.get("PATH_INFO") == "/healthz" or self.check(environ.get("HTTP_AUTHORIZATION", ""))
        if allowed:
            return self._app(environ, start_response)
        if allowed is None:
            status, headers, body = "503 Service Unavailable", [("Retry-After", "1")], b"busy checking passwords\n"
        else:
            challenge = ("WWW-Authenticate", 'Basic realm="chargy-exporter"')
            status, headers, body = "401 Unauthorized", [challenge], b"unauthorized\n"
        headers += [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]


@dataclass(frozen=True)
class WebConfig:
    path: Path
    tls: TlsSettings | None = None
    users: dict[str, bytes] = field(default_factory=dict)

    def wrap(self, app: WsgiApp) -> tuple[WsgiApp, Callable[[], ssl.SSLContext] | None]:
        """The app behind basic auth if there are users, and the TLS context source if TLS is on."""
        return BasicAuth(app, self.users) if self.users else app, Certificates(self.tls) if self.tls else None


def _mapping(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where} must be a mapping")
    for key in value:
        if key in _NOT_SUPPORTED:
            raise WebConfigError(f"{where}.{key} is not supported by chargy-exporter")
        if key not in known | _IGNORED:
            raise WebConfigError(f"unknown key {where}.{key}")
    return value


def _text(section: dict[str, Any], key: str, where: str, allowed: Iterable[str] | None = None) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        listed = f"one of {', '.join(allowed)}" if allowed is not None else "a string"
        raise WebConfigError(f"{where}.{key} must be {listed}, not {value!r}")
    return value


def load_web_config(text: str) -> WebConfig:
    """The file at `text`, checked: every key known, every file readable, the certificate and key a pair."""
    # Imported here, only when a web configuration is given: ~1.3 MB resident for everyone else.
    import bcrypt  # noqa: F401
    import yaml

    path = Path(text.strip())
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise WebConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        document = yaml.safe_load(raw)
    except OSError as error:
        raise WebConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise WebConfigError(f"{path}: not YAML: {' '.join(str(error).split())}") from None
    top = _mapping(document, "web config", {"tls_server_config", "basic_auth_users", "http_server_config"})
    _mapping(top.get("http_server_config"), "http_server_config", set())
    tls = _tls(_mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS), path.parent)
    users = _mapping(top.get("basic_auth_users"), "basic_auth_users", set(top.get("basic_auth_users") or ()))
    if len(users) > MAX_USERS:
        raise WebConfigError(f"basic_auth_users: more than {MAX_USERS} users")
    for user, hashed in users.items():
        if not isinstance(user, str) or not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise WebConfigError(f"basic_auth_users.{user} must be a bcrypt hash ($2...)")
        if not _BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"basic_auth_users.{user}: not a valid bcrypt hash")
    return WebConfig(path, tls, {user: hashed.encode() for user, hashed in users.items()})


def _tls(section: dict[str, Any], base: Path) -> TlsSettings | None:
    if not section:
        return None
    where = "tls_server_config"
    cert, key, ca = (_text(section, name, where) for name in ("cert_file", "key_file", "client_ca_file"))
    if not cert or not key:
        raise WebConfigError(f"{where} needs both cert_file and key_file")
    client_auth = _text(section, "client_auth_type", where, _CLIENT_AUTH) or "NoClientCert"
    if _CLIENT_AUTH[client_auth][1] and not ca:
        raise WebConfigError(f"{where}.client_auth_type {client_auth} needs client_ca_file")
    low = _text(section, "min_version", where, _VERSIONS) or "TLS12"
    high = _text(section, "max_version", where, _VERSIONS) or "TLS13"
    # Relative paths are relative to the file's directory, as exporter-toolkit reads them.
    settings = TlsSettings(base / cert, base / key, base / ca if ca else None, client_auth, low, high)
    for file in settings.files:
        try:
            file.open("rb").close()
        except OSError as error:
            raise WebConfigError(f"{where}: cannot read {file}: {error.strerror or error}") from None
    try:
        settings.context()
    except (OSError, ssl.SSLError) as error:
        raise WebConfigError(f"{where}: {getattr(error, 'strerror', None) or error}") from None
    return settings
