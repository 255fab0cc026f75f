"""`python -m chargy_exporter.healthcheck`, the image's HEALTHCHECK: exit 0 when the exporter answers /healthz.
It asks where the exporter listens: its flags and environment, read from /proc, through the exporter's own parser.
With TLS on (--web-config-file) it asks over TLS without verifying the certificate: it talks to its own container's
loopback, and a certificate for the service's name would not name that address anyway. Under mutual TLS it offers
the exporter's own certificate as its client certificate. /healthz needs no password (the file has only hashes)."""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from .config import load_config

TIMEOUT_SECONDS = 3.0  # below the Dockerfile's HEALTHCHECK --timeout


def read_process(process_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The exporter's arguments and environment from its /proc/PID; ProcessLookupError if that runs something else."""
    words = (process_dir / "cmdline").read_bytes().removesuffix(b"\0").decode("utf-8", "surrogateescape").split("\0")
    for index, word in enumerate(words):
        # After the console script (the kernel puts the shebang's interpreter first) or `-m chargy_exporter`.
        if PurePosixPath(word).name == "chargy-exporter" or words[index - 1 : index + 1] == ["-m", "chargy_exporter"]:
            environ = (process_dir / "environ").read_bytes().decode("utf-8", "surrogateescape").split("\0")
            entries = (entry.partition("=") for entry in environ)
            return words[index + 1 :], {name: value for name, sep, value in entries if name and sep}
    raise ProcessLookupError(f"not the exporter: {' '.join(words[:2]) or '(no command line)'}")


def find_exporter(proc: Path) -> tuple[list[str], dict[str, str]]:
    """PID 1 (the image's ENTRYPOINT), else the first exporter by PID (behind an init: `docker run --init`)."""
    for pid in sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()):
        with contextlib.suppress(OSError):  # another program, gone, or not readable
            return read_process(proc / str(pid))
    raise ProcessLookupError("no chargy-exporter process")


def health_url(arguments: Sequence[str], environ: Mapping[str, str]) -> str:
    return health_request(arguments, environ)[0]


def health_request(arguments: Sequence[str], environ: Mapping[str, str]) -> tuple[str, ssl.SSLContext | None]:
    """The exporter's /healthz URL, and the TLS context to ask it with (None: plain HTTP)."""
    config = load_config(list(arguments), environ)
    tls = config.web_config_file.tls if config.web_config_file else None
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if tls.client_auth_type != "NoClientCert":
            context.load_cert_chain(tls.cert_file, tls.key_file)
    # An address meaning every interface: ask the loopback of the same family.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(config.host, config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{config.port}/healthz", context


def check(
    process_dir: Path | None = None, timeout: float = TIMEOUT_SECONDS, proc: Path = Path("/proc")
) -> tuple[bool, str]:
    """(healthy, one line saying why) for the exporter running as process_dir, by default the one found in proc."""
    try:
        url, context = health_request(*(read_process(process_dir) if process_dir else find_exporter(proc)))
    except OSError as error:
        return False, f"{process_dir or proc}: {error.strerror or error}"
    except SystemExit:  # load_config printed its (redacted) error: the exporter could not have started with it
        return False, "the exporter's configuration does not parse"
    try:  # without proxies: an HTTP_PROXY set for the feed is not for this loopback request
        handlers = [urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)]
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as response:
            return response.status == 200, f"{url} answered {response.status}"
    except (OSError, ValueError) as error:  # an answer other than 2xx included (HTTPError)
        return False, f"{url}: {error}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chargy_exporter.healthcheck", description=__doc__)
    parser.add_argument("--process", type=Path, help="the exporter's /proc/PID (default: PID 1, else the first found)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    healthy, detail = check(args.process, args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
