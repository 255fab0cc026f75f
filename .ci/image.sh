#!/usr/bin/env bash
# CI's image step (after .ci/run, which creates .venv): recreate the base image if needed, then build the image
# from the Dockerfile with podman and run it as the README says (tests/test_image.py). Run as root, with CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/base-image.sh
.venv/bin/python -m pytest -m image "$@"
