#!/usr/bin/env bash
# CI STAND-IN, not a real python:3.11-slim. CI machines have no container registry, so the Dockerfile's base image
# `docker.io/library/python:3.11-slim` is recreated locally from Debian packages: debootstrap of bookworm (the
# release with Python 3.11) from the host's own Debian mirror, with python3, pip, venv and ca-certificates;
# `python`/`pip` in /usr/local/bin as in the official image; pip allowed to install system-wide; imported with
# `podman import` under the official name, so that `podman build` uses it as it is and never tries to pull.
#
# Installs what it needs (podman, runc, debootstrap) when missing. Cached: does nothing when the image exists
# (`.ci/podman rmi docker.io/library/python:3.11-slim` to rebuild it). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly IMAGE=docker.io/library/python:3.11-slim
readonly SUITE=bookworm
readonly PACKAGES=python3,python3-pip,python3-venv,ca-certificates

if [[ $(id -u) -ne 0 ]]; then
  echo "base-image.sh: run as root (debootstrap and rootful podman)" >&2
  exit 1
fi

install_tools() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman containernetworking-plugins iptables)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [[ ${#missing[@]} -eq 0 ]] && return
  echo "base-image.sh: installing ${missing[*]}"
  # Another apt may be running on a shared machine: wait for the dpkg lock instead of failing.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # runc named explicitly so apt does not pick crun (podman depends on crun | runc), which these machines cannot use.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" runc >/dev/null
}

# The first enabled `deb` source of the host that carries $SUITE: deb822 `.sources` files and one-line `.list`
# files. Read at run time, so CI uses whatever mirror (or proxy) the machine is configured with.
host_mirror() {
  python3 - "$SUITE" <<'PY'
import glob, sys

suite = sys.argv[1]
files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
sources = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))

def from_deb822(text):
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        if suite in fields.get("suites", "").split():
            yield from fields.get("uris", "").split()

def from_one_line(text):
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...] options
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2 and words[1] == suite:
            yield words[0]

candidates = []
for path in sources:
    candidates += from_deb822(open(path, encoding="utf-8").read())
for path in files:
    try:
        candidates += from_one_line(open(path, encoding="utf-8").read())
    except FileNotFoundError:
        pass
if not candidates:
    sys.exit(f"no enabled 'deb' source for {suite} in /etc/apt/sources.list*")
print(candidates[0])
PY
}

install_tools
if ./.ci/podman image exists "$IMAGE"; then
  echo "base-image.sh: $IMAGE already exists (CI stand-in), nothing to do"
  exit 0
fi

mirror=$(host_mirror)
work=$(mktemp -d /var/tmp/python-slim-standin.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs=$work/rootfs

echo "base-image.sh: debootstrap $SUITE from $mirror (about a minute)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  exit 1
}

# As in the official image: `python` and `pip` on the PATH, in /usr/local/bin.
ln -s /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -s /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
# PEP 668: Debian marks its Python "externally managed"; the official image lets pip install system-wide.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# Nothing of the host or of the bootstrap stays in the image: resolver and hostname are set by podman at run time.
rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

echo "base-image.sh: importing as $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | ./.ci/podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.opencontainers.image.description="CI stand-in for python:3.11-slim (.ci/base-image.sh)"' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
./.ci/podman run --rm "$IMAGE" python -c 'import sys, ssl, venv; print("base-image.sh: stand-in ready,", sys.version.split()[0])'
