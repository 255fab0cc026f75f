#!/usr/bin/env bash
# CI's image step (after .ci/run, which creates .venv): recreate the base image if needed, then build the image
# from the Dockerfile with podman and run it as the README says (tests/test_image.py), and play the Kubernetes
# Deployment with `podman kube play` (tests/test_kubernetes.py). Run as root, with CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/base-image.sh
# podman kube play builds its pods' pause image with catatonit (Debian recommends it with podman; not always there).
if ! command -v catatonit >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    catatonit >/dev/null
fi
.venv/bin/python -m pytest -m image "$@"
