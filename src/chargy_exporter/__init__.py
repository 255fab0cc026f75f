"""chargy-exporter: the live state of Luxembourg's Chargy EV-charging network as Prometheus / OTel metrics."""

__version__ = "1.0.0"
