#!/usr/bin/env bash
# CI: install the LOWEST versions pyproject.toml allows for the direct dependencies (the product's and the test
# extra's; their own dependencies resolve to the newest allowed), in a separate venv, then run the default suite.
# A floor that passes here is a floor that was tested. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .venv-floors
python3 -m venv .venv-floors
.venv-floors/bin/pip install -q uv
# --system-certs: use the system's certificate store, as pip does (HTTPS may go through a proxy with its own CA).
.venv-floors/bin/uv pip install -q --system-certs --python .venv-floors/bin/python \
  --resolution lowest-direct -e '.[test]'
.venv-floors/bin/uv pip list --system-certs --python .venv-floors/bin/python
.venv-floors/bin/python -m pytest "$@"
