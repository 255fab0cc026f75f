#!/usr/bin/env bash
# Build the image from the Dockerfile as it is, with podman (.ci/podman), on a CI machine:
#   .ci/build-image.sh TAG [more podman build options]
# HTTPS to PyPI goes through a proxy with its own certificate authority, so pip inside the build needs the host's
# pip configuration (`pip config list`: files and PIP_* variables) and the files it names (CA bundle, constraints,
# local indexes). They are mounted for the build only (`podman build -v`): no layer keeps anything of them.
# Needs the base image (.ci/base-image.sh). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  echo "usage: $0 TAG [podman build options]" >&2
  exit 2
fi
tag=$1
shift

python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python  # Debian's python3 may come without pip

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build runs as root with HOME=/root, a directory every Debian image has: $work/home is mounted over it for the
# build, holding the host's effective pip settings (files and PIP_* variables) as ~/.config/pip/pip.conf, and a
# mount point per host path they name (CA bundle, constraints, local indexes), mounted there read-only. The mount
# points are created here, not in the image, and mounting over an existing directory adds nothing to any layer.
"$python" - "$work/home" >"$work/mounts" <<'PY'
import ast, configparser, subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

home = Path(sys.argv[1])
inside = Path("/root/pip-host")  # where the named paths appear in the build
listing = subprocess.run(
    [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
).stdout
settings, from_environment = {}, {}
for line in listing.splitlines():
    key, sep, raw = line.partition("=")
    if not sep:
        continue
    section, _, name = key.rpartition(".")
    value = ast.literal_eval(raw)  # pip prints name=repr(value)
    if section == ":env:":  # PIP_* variables win over every file
        from_environment[("global", name)] = value
    else:
        settings[(section, name)] = value
settings.update(from_environment)

mounts = {}  # host path -> path in the build

def in_build(word):
    """The word with a host path (or file:// URL) it names replaced by where that path is mounted in the build."""
    is_url = word.startswith("file://")
    path = Path(unquote(urlsplit(word).path)) if is_url else Path(word)
    if not path.is_absolute() or not path.exists():
        return word
    # A local PEP 503 index (.../simple) links to its files by relative paths next to it: mount its parent.
    source = path.parent if path.name == "simple" else path
    if source not in mounts:
        mounts[source] = inside / f"{len(mounts)}-{source.name or 'root'}"
        placeholder = home / mounts[source].relative_to("/root")
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.mkdir() if source.is_dir() else placeholder.touch()
    target = mounts[source] / path.relative_to(source)
    return target.as_uri() if is_url else str(target)

config = configparser.ConfigParser(interpolation=None)
for (section, name), value in sorted(settings.items()):
    if not config.has_section(section):
        config.add_section(section)
    config.set(section, name, " ".join(in_build(word) for word in value.split()))
pip_conf = home / ".config" / "pip" / "pip.conf"
pip_conf.parent.mkdir(parents=True, exist_ok=True)
with pip_conf.open("w", encoding="utf-8") as out:
    config.write(out)
for source, target in mounts.items():
    print(f"{source}:{target}:ro")
PY
mounts=(-v "$work/home:/root")
while IFS= read -r mount; do
  [[ -n $mount ]] && mounts+=(-v "$mount")
done <"$work/mounts"

# --pull=never: the base image is local (the CI stand-in), never fetched. --format docker: the OCI format has no
# HEALTHCHECK (podman would drop it with a warning).
./.ci/podman build --pull=never --format docker "${mounts[@]}" -t "$tag" -f Dockerfile "$@" .
