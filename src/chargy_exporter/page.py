"""The status page a browser gets at `/`: a small HTML summary of the published state (placeholder)."""

from __future__ import annotations

from .status import State


def render_status_page(state: State, now: float) -> bytes:
    return (
        b"<!doctype html><html><head><title>chargy-exporter</title></head><body><h1>chargy-exporter</h1>"
        b'<p><a href="/metrics">Metrics</a> &middot; <a href="/healthz">Health</a></p></body></html>'
    )
