"""The live numbers no table holds, read from the processes' own ``/metrics``.

Spool depth, the publisher's queue, whether Kafka is reachable, dead letters and the
ingestor's consumer lag exist only in the serving and ingestor processes' Prometheus
registries. The console reads them from the URLs in ``ALIGNLOOP_CONSOLE_METRICS_URLS``
(``alignloop up`` sets them; in a cluster, Prometheus and the Grafana dashboards in
``deploy/grafana`` are the place for history). A URL that does not answer is reported as
such, never as zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The samples shown, summed over their labels (a replica's spool is one number).
SHOWN = (
    "alignloop_events_spool_records",
    "alignloop_events_spool_bytes",
    "alignloop_events_queue_depth",
    "alignloop_events_kafka_up",
    "alignloop_requests_in_flight",
    "alignloop_ingest_dead_letters_total",
    "alignloop_ingest_consumer_lag",
    "alignloop_ingest_events_total",
)


def summarize(text: str) -> dict[str, float]:
    """The :data:`SHOWN` samples of one exposition, each summed over its label sets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SHOWN:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def scrape(urls: Sequence[str], timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """One entry per URL: its :func:`summarize`d samples, or the error that kept them."""
    results = []
    for url in urls:
        try:
            response = httpx.get(url, timeout=timeout_s)
            response.raise_for_status()
            results.append({"url": url, "up": True, "samples": summarize(response.text)})
        except (httpx.HTTPError, ValueError) as exc:
            results.append({"url": url, "up": False, "error": str(exc) or type(exc).__name__})
    return results
