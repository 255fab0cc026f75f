# chargy-exporter container image.
#
#   docker build -t chargy-exporter .
#   docker run --rm --read-only -p 9000:9000 -e KML_URL='<your feed URL>' chargy-exporter
#
# No feed URL is baked in: the Chargy URL carries an API key, pass it at run time.

# ---- build stage: turn the source tree into a wheel --------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-deps -w /dist .

# ---- runtime stage: only the wheel and its dependencies ----------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OTEL_EXPORTER_PROMETHEUS_HOST=0.0.0.0 \
    OTEL_EXPORTER_PROMETHEUS_PORT=9000

COPY --from=builder /dist/ /tmp/dist/
RUN pip install /tmp/dist/*.whl \
    && rm -rf /tmp/dist

# Any non-root uid works; group 0 keeps OpenShift-style random uids happy.
# The exporter writes nothing to disk, so the root filesystem can be read-only.
USER 1001:0
EXPOSE 9000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OTEL_EXPORTER_PROMETHEUS_PORT', '9000'), timeout=4)"]

ENTRYPOINT ["chargy-exporter"]
