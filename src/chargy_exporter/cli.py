"""`chargy-exporter`: wire config → feed → kml → metrics → exporters, run until SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import MutableMapping, Sequence
from typing import Final

from . import __version__, process
from .config import Config, RedactingFilter, load_config
from .feed import FeedClient
from .metrics import MetricsPipeline
from .model import State
from .otlp import OtlpPush
from .page import render_status_page
from .prometheus import PrometheusEndpoint
from .refresher import Refresher
from .resource import build_resource

log = logging.getLogger("chargy_exporter")

# Their messages repeat, less clearly, our one line per failure (urllib3's "Retrying ..." on every try, gRPC's
# connection chatter): below --log-level debug only their errors show.
CHATTY_LIBRARIES: Final = ("urllib3", "grpc")


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # On the handler, so that records of every library (urllib3 logs full URLs) pass through it.
    handler.addFilter(RedactingFilter(config.secrets))
    line = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(format=line, level=config.log_level.upper(), handlers=[handler], force=True)
    debugging = config.log_level == "debug"
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if debugging else logging.ERROR)
    quiet_grpc_core(os.environ, debugging)


def quiet_grpc_core(environ: MutableMapping[str, str], debugging: bool) -> None:
    """Quiet gRPC's C core: it writes to stderr itself ("Handshake failed": otlp.py reports the failed push).
    It reads GRPC_VERBOSITY when grpc is imported (only by the OTLP gRPC exporter, after this). The user's wins."""
    environ.setdefault("GRPC_VERBOSITY", "INFO" if debugging else "NONE")


def build_pipeline(config: Config, endpoint: PrometheusEndpoint) -> MetricsPipeline:
    prometheus = "prometheus" in config.metrics_exporter.split(",")
    push = OtlpPush(config.otlp) if config.otlp is not None else None
    pipeline = MetricsPipeline(
        build_resource(config, config.port),
        readers=[push.make_reader] if push is not None else [],
        on_published=[endpoint.render] if prometheus else [],
        instruments=[push.register_instruments] if push is not None else [],
        reader_instruments=[process.register_instruments],
    )
    if push is not None:
        push.attach(pipeline)
        otlp = push.settings
        log.info("pushing OTLP metrics (%s) to %s every %g s", otlp.protocol, otlp.shown_endpoint, otlp.export_interval)
    if not prometheus and push is None:
        # The HTTP server still answers /healthz (the container's HEALTHCHECK); /metrics is empty.
        log.warning("no metrics exporter enabled (OTEL_METRICS_EXPORTER=none): only /healthz is served")
    return pipeline


def main(argv: Sequence[str] | None = None) -> int:
    process.tune_malloc(os.environ)
    config = load_config(argv)
    setup_logging(config)
    # Blocked before any thread starts, so that every thread leaves them to the sigwait() below.
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    refresher: Refresher | None = None  # until there is one, the status page shows an empty state
    endpoint = PrometheusEndpoint(
        lambda: render_status_page(refresher.state if refresher else State(), time.time(), config.demo)
    )
    try:
        pipeline = build_pipeline(config, endpoint)
    except Exception as error:  # the SDK refusing an OTEL_* variable it reads, e.g. a gRPC compression it lacks
        log.debug("cannot build the metrics pipeline", exc_info=True)
        sys.stderr.write(f"chargy-exporter: error: {error}\n")
        return 2
    client = FeedClient(config)
    refresher = Refresher(config, client, pipeline.publish)
    # What start-up built (modules, the SDK, the pipeline) lives as long as the process: no full collection needs to
    # walk it again. A refresh makes ~100,000 short-lived objects (one collection's series), which the default
    # threshold of 700 allocations turns into hundreds of young collections that promote them all.
    gc.freeze()
    gc.set_threshold(10_000)
    try:
        server = endpoint.serve(config.host, config.port, web_config=config.web_config_file)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, error.strerror or error)
        pipeline.shutdown()
        return 1

    serving = f"{server.scheme}://{config.host}:{server.port}/metrics, feed {config.redacted_url}"
    log.info("chargy-exporter %s serving %s every %g s", __version__, serving, config.refresh_interval)
    refresher.start()
    while (signum := signal.sigwait(handled)) == signal.SIGHUP:
        refresher.refresh_now()  # rather than at the end of the interval (also what the tests use instead of waiting)
    log.info("received %s, shutting down", signal.Signals(signum).name)

    # Within about 3 s in all, an OTLP export in flight included: well inside a container runtime's grace period.
    server.shutdown()
    refresher.stop(timeout=1)  # a fetch under way is abandoned: nothing of it needs to be kept
    pipeline.shutdown(timeout_millis=1_500)
    client.close()
    log.info("stopped")
    return 0
