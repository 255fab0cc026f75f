"""The status page at `/`, built per request from the `State` alone: no I/O, no URL (the feed's key cannot show).
One self-contained document: inline CSS, no script, nothing fetched from elsewhere."""

from __future__ import annotations

import time
from html import escape
from typing import Final

from . import __version__
from .model import FeedStatus, NetworkCounts, State

_STYLE: Final = """
:root{color-scheme:light dark;--fg:#1d2327;--muted:#5f6b73;--bg:#f6f7f9;--card:#fff;--line:#dde1e5;
--available:#1a7f37;--charging:#1f6feb;--unavailable:#9a6700;--bad:#cf222e}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9aa5af;--bg:#0d1117;--card:#161b22;--line:#30363d;
--available:#3fb950;--charging:#58a6ff;--unavailable:#d29922;--bad:#f85149}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:46rem;margin:0 auto;padding:1.5rem 1rem 2rem}
h1{font-size:1.6rem;margin:0}
h2{font-size:1.05rem;margin:0 0 .75rem;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
.sub{margin:.1rem 0 1.25rem;color:var(--muted)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:1rem 1.25rem;margin-bottom:1rem}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(8.5rem,1fr));gap:.75rem}
.available{--state:var(--available)}.charging{--state:var(--charging)}.unavailable{--state:var(--unavailable)}
.stations{--state:var(--muted)}
.tile{border-left:4px solid var(--state);padding:.15rem .75rem}
.tile .n{display:block;font-size:2rem;font-weight:700;line-height:1.2;font-variant-numeric:tabular-nums}
.tile .l{color:var(--muted);font-size:.9rem}
.bar{display:flex;height:.6rem;border-radius:.3rem;overflow:hidden;margin:1rem 0 .5rem;background:var(--line)}
.bar span{background:var(--state)}
.note{color:var(--muted);font-size:.9rem;margin:.25rem 0 0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.4rem 1.25rem;margin:0}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 .55rem;border-radius:1rem;font-weight:600;font-size:.9rem;color:#fff}
.badge.up{background:var(--available)}.badge.down{background:var(--bad)}.badge.waiting{background:var(--muted)}
.warn{border-left:4px solid var(--bad);padding:.1rem .75rem;margin:.75rem 0 0}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
footer{color:var(--muted);font-size:.9rem;text-align:center}
a{color:var(--charging)}
"""


_LIVE: Final = '<p class="sub">Luxembourg\'s public EV-charging network, live from the Chargy feed</p>'
_DEMO: Final = (
    '<p class="sub" id="demo"><strong>Demo</strong>: a made-up network of the live one\'s size and shape, whose states '
    "change at each refresh (<code>--demo</code>). Not real data.</p>"
)


def render_status_page(state: State, now: float, demo: bool = False) -> bytes:
    """The page for `state` as seen at Unix time `now`, UTF-8 encoded; `demo`: the data is --demo's made-up network."""
    counts = state.snapshot.counts  # computed once per snapshot: the page is built on every request
    has_data = bool(state.snapshot.stations)
    title = "chargy-exporter"
    if has_data:
        title += f": {counts.available:,} of {counts.connectors:,} connectors available"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body><main>"
        "<h1>chargy-exporter</h1>"
        f"{_DEMO if demo else _LIVE}"
        f"{_network(counts, state.status, has_data, now)}{_feed(state.status, has_data, now)}"
        f'<footer>chargy-exporter <span id="version">{escape(__version__)}</span> · '
        '<a href="/metrics">/metrics</a> (Prometheus) · <a href="/healthz">/healthz</a></footer>'
        "</main></body></html>"
    ).encode()


def _network(counts: NetworkCounts, status: FeedStatus, has_data: bool, now: float) -> str:
    if not has_data:
        waiting = "The first refresh is under way." if status.last_error_time is None else "No good feed read yet."
        return f'<section id="network"><h2>The network now</h2><p>No data yet. {waiting}</p></section>'
    by_state = (("available", counts.available), ("charging", counts.charging), ("unavailable", counts.unavailable))
    tiles = [(css, css, number, f"connectors {css}") for css, number in by_state]
    without = f"of {counts.stations:,} stations with no connector available"
    tiles.append(("stations", "stations-without-available", counts.stations_without_available, without))
    spans = "".join(  # none when there are no connectors
        f'<span class="{css}" style="width:{100 * number / counts.connectors:.2f}%" title="{css}"></span>'
        for css, number in by_state
        if number
    )
    bar = f'<div class="bar" role="img" aria-label="connectors by state">{spans}</div>' if spans else ""
    tiles_html = "".join(
        f'<div class="tile {css}"><span class="n" id="{element_id}">{number:,}</span>'
        f'<span class="l">{escape(label)}</span></div>'
        for css, element_id, number, label in tiles
    )
    as_of = f"{counts.connectors:,} connectors at {counts.stations:,} stations"
    if counts.stations_without_connectors:  # no series in /metrics, so neither in the dashboard's share
        listed = "lists" if counts.stations_without_connectors == 1 else "list"
        number = f'<span id="stations-without-connectors">{counts.stations_without_connectors:,}</span>'
        as_of += f"; {number} more {listed} no connector"
    stale = ""
    if status.last_success_time is not None:
        as_of += f", as of {_time(status.last_success_time, now)}"
        if not status.up:
            age = _duration(now - status.last_success_time)
            stale = f'<p class="warn">The feed is failing: this is the last good data, {age} old.</p>'
    return (
        f'<section id="network"><h2>The network now</h2><div class="tiles">{tiles_html}</div>'
        f'{bar}<p class="note">{as_of}</p>{stale}</section>'
    )


def _feed(status: FeedStatus, has_data: bool, now: float) -> str:
    if status.up:
        badge, label, text = "up", "up", "the last refresh succeeded"
    elif status.failures_in_a_row:
        failures = "failure" if status.failures_in_a_row == 1 else "failures in a row"
        served = "the last good data is still served" if has_data else "no data to serve yet"
        badge, label, text = "down", "down", f"{status.failures_in_a_row} {failures}; {served}"
    else:
        badge, label, text = "waiting", "starting", "waiting for the first refresh"
    health = f'<span class="badge {badge}" id="feed-status">{label}</span> {text}'

    last_error = "none since the exporter started"
    if status.last_error_reason is not None:
        last_error = f'<code id="last-error-reason">{escape(status.last_error_reason)}</code>'
        if status.last_error_time is not None:
            last_error += f", {_time(status.last_error_time, now)}"
        if status.last_error_message:
            last_error += f'<br><span class="note" id="last-error-message">{escape(status.last_error_message)}</span>'

    next_refresh = "when the refresh under way ends"
    if (when := status.next_refresh_time) is not None:
        next_refresh = "under way" if when <= now else f"in {_duration(when - now)} ({_clock(when)})"

    last_success = "never" if status.last_success_time is None else _time(status.last_success_time, now)
    rows = {"Status": health, "Last success": last_success, "Last error": last_error, "Next refresh": next_refresh}
    items = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows.items())
    return f'<section id="feed"><h2>The feed</h2><dl>{items}</dl></section>'


def _time(when: float, now: float) -> str:
    """An absolute time (UTC: the server cannot know the reader's zone without a script) and its age."""
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return f'<time datetime="{iso}">{_clock(when)}</time> ({_duration(now - when)} ago)'


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _duration(seconds: float) -> str:
    """A human duration with two units at most: "42 s", "3 min 12 s", "2 h 5 min", "3 d 4 h"."""
    whole = max(0, int(seconds))
    for size, unit, part, part_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // part} {part_unit}"
    return f"{whole} s"
