"""`python -m chargy_exporter.healthcheck`: the container's HEALTHCHECK, exit 0 when the exporter answers /healthz.

The port and address can be set by a flag (`docker run IMAGE --port 9100`) as well as by the environment, so the
check reads the exporter's own command line and environment (/proc/1 in a container, where the exporter is PID 1)
and resolves them with the exporter's own parser: the check asks exactly where the exporter listens.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Final

from .config import load_config

PROC: Final = Path("/proc")
SCRIPT_NAME: Final = "chargy-exporter"
MODULE_NAME: Final = "chargy_exporter"
TIMEOUT_SECONDS: Final = 3.0  # below the Dockerfile's HEALTHCHECK --timeout
# Addresses that mean "every interface": the check connects to the loopback of the same family instead.
_WILDCARDS: Final = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


class NotTheExporter(LookupError):
    pass


def exporter_arguments(cmdline: bytes) -> list[str]:
    """The exporter's own arguments in a /proc/PID/cmdline (NUL-separated), after its script or `-m` module."""
    words = [word.decode("utf-8", "surrogateescape") for word in cmdline.split(b"\0")]
    if words and words[-1] == "":
        words.pop()  # the terminating NUL
    for index, word in enumerate(words):
        # A console script runs as `python /path/chargy-exporter ARGS` (the kernel adds the shebang's interpreter).
        if PurePosixPath(word).name == SCRIPT_NAME:
            return words[index + 1 :]
        if word == "-m" and words[index + 1 : index + 2] == [MODULE_NAME]:
            return words[index + 2 :]
    raise NotTheExporter(" ".join(words[:2]) or "(no command line)")


def parse_environ(data: bytes) -> dict[str, str]:
    """A /proc/PID/environ (NUL-separated NAME=value) as a dict."""
    environ: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.decode("utf-8", "surrogateescape").partition("=")
        if sep and name:
            environ[name] = value
    return environ


def read_process(process_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The exporter's arguments and environment from a /proc/PID directory; NotTheExporter if it runs something else."""
    arguments = exporter_arguments((process_dir / "cmdline").read_bytes())
    return arguments, parse_environ((process_dir / "environ").read_bytes())


def _processes(proc: Path) -> list[Path]:
    """The /proc/PID directories, PID 1 first, then by PID."""
    pids = [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]
    return [proc / str(pid) for pid in sorted(pids, key=lambda pid: (pid != 1, pid))]


def find_exporter(proc: Path = PROC) -> tuple[list[str], dict[str, str]]:
    """PID 1 (the image's ENTRYPOINT); with an init in front of it (`docker run --init`), the first exporter found."""
    for candidate in _processes(proc):
        try:
            return read_process(candidate)
        except (NotTheExporter, OSError):  # another program, gone, or not readable
            continue
    raise NotTheExporter(f"no chargy-exporter process in {proc}")


def health_url(arguments: Sequence[str], environ: Mapping[str, str]) -> str:
    """Where the exporter's /healthz is, from its arguments and environment as the exporter itself reads them."""
    config = load_config(list(arguments), environ)
    host = _WILDCARDS.get(config.host, config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"http://{host}:{config.port}/healthz"


def probe(url: str, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """None when the URL answers 200, else what went wrong."""
    # No proxy: an HTTP_PROXY set for the feed must not send the loopback check through the proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        return f"{url}: {error}"
    return None if status == 200 else f"{url} answered {status}"


def check(process_dir: Path | None = None, timeout: float = TIMEOUT_SECONDS, proc: Path = PROC) -> tuple[bool, str]:
    """(healthy, one line saying why) for the exporter running as process_dir, by default the one under proc."""
    try:
        arguments, environ = find_exporter(proc) if process_dir is None else read_process(process_dir)
    except NotTheExporter as error:
        return False, f"not the exporter: {error}"
    except OSError as error:
        return False, f"cannot read {process_dir or proc}: {error.strerror or error}"
    try:
        url = health_url(arguments, environ)
    except SystemExit:
        # load_config has printed its (redacted) one-line error; the exporter could not have started with it.
        return False, "the exporter's configuration does not parse"
    problem = probe(url, timeout)
    return (True, f"{url} answered 200") if problem is None else (False, problem)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chargy_exporter.healthcheck",
        description="Exit 0 when the chargy-exporter of this container answers /healthz, 1 otherwise.",
    )
    parser.add_argument(
        "--process",
        type=Path,
        metavar="DIR",
        help="the exporter's /proc/PID directory (default: PID 1, the container's main process, else the first "
        "chargy-exporter process found)",
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, metavar="SECONDS")
    args = parser.parse_args(argv)
    healthy, detail = check(args.process, args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
