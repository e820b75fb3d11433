"""Prometheus metrics of one node (``GET /metrics``), with ``prometheus_client``.

Why two kinds: counters are read from the state database at each scrape (they are bumped in
the same transaction as the change they count, :mod:`dicom_node.counters`), so they never
go back after a restart and always equal what the database says; timings are histograms in
this process (a restart starts them afresh, as Prometheus expects of a new process).  Gauges
(queue, oldest item, free spool space) are measured at the scrape.

No label carries patient data: called AE titles, model and destination names, states and
outcomes only.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from dicom_node.config import NodeConfig
    from dicom_node.spool import Spool
    from dicom_node.state import StateDB

__all__ = ["NodeMetrics", "METRIC_PREFIX", "received_by_protocol"]

METRIC_PREFIX = "dicom_node_"
# Seconds: a C-STORE answer is milliseconds (it persists a file and a row); translations
# take from a fraction of a second (GPU) to minutes (a large radiograph on a small CPU).
CSTORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSLATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# counter in the state database -> (metric name without prefix and _total, help, label names)
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "received": ("instances_received", "Instances acknowledged to senders, per called AE title and protocol "
                 "(dimse: C-STORE, stow-rs: STOW-RS)", ("called_ae", "protocol")),
    "translated": ("instances_translated", "Outputs written, per model", ("model",)),
    "flagged": ("fidelity_flagged", "Outputs the fidelity guard flagged, per model", ("model",)),
    "deliveries": ("deliveries", "Delivery attempts per destination and outcome (delivered, retry, failed)",
                   ("destination", "outcome")),
    "associations": ("associations", "DICOM associations by how they ended (released, aborted, rejected)",
                     ("outcome",)),
    "notifications": ("notifications", "Webhook sends per webhook and outcome (sent, retry, failed)",
                      ("webhook", "outcome")),
}
# a label added to a counter later: what its rows from before mean (every instance received
# before STOW-RS ingest came over DIMSE)
LABEL_DEFAULTS = {"protocol": "dimse"}


def received_by_protocol(values: dict[str, list[tuple[dict[str, str], int]]]) -> dict[str, dict[str, int]]:
    """Called AE title -> protocol -> instances received, from the counters (``StateDB.counters.values()``):
    what ``dicom-node status`` shows beside the metric."""
    out: dict[str, dict[str, int]] = {}
    for labels, n in values.get("received", []):
        by_protocol = out.setdefault(str(labels.get("called_ae", "")), {})
        protocol = str(labels.get("protocol", LABEL_DEFAULTS["protocol"]))
        by_protocol[protocol] = by_protocol.get(protocol, 0) + n
    return out


class NodeMetrics:
    """The node's metrics registry: histograms fed by the listener and the translators, and a
    collector that reads the state database when scraped."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        self._state: _StateCollector | None = None  # watch(): the state database's numbers
        self.cstore_seconds = Histogram(
            METRIC_PREFIX + "cstore_response_seconds", "Time from a C-STORE request's dataset to our answer",
            buckets=CSTORE_BUCKETS, registry=self.registry)
        self.translation_seconds = Histogram(
            METRIC_PREFIX + "translation_seconds", "Time to translate one instance (model, guard, writing the SC)",
            ["model"], buckets=TRANSLATION_BUCKETS, registry=self.registry)

    def watch(self, db: StateDB, spool: Spool, config: NodeConfig) -> None:
        """Report the state database ``db`` (the console's own connection) and ``spool``."""
        self._state = _StateCollector(db, spool, config)
        self.registry.register(self._state)

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config: new routes, models and destinations are reported (from 0),
        ``spool_min_free_bytes`` is the new watermark."""
        if self._state is not None:
            self._state.config = config

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StateCollector:
    """Counters, queue gauges and disk space, read at scrape time."""

    def __init__(self, db: StateDB, spool: Spool, config: NodeConfig) -> None:
        self.db, self.spool, self.config = db, spool, config

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values = self.db.counters.values()
        # configured names start at 0, so a rate() works from the first increment
        web = self.config.web
        protocols = ["dimse"] + (["stow-rs"] if web is not None and web.stow_rs_tokens is not None else [])
        known = {"received": [{"called_ae": r.called_ae, "protocol": p} for r in self.config.routes for p in protocols],
                 "translated": [{"model": m} for m in self.config.models],
                 "flagged": [{"model": m} for m in self.config.models]}
        for key, (name, help_text, labels) in COUNTERS.items():
            family = CounterMetricFamily(METRIC_PREFIX + name, help_text, labels=list(labels))
            series: dict[tuple[str, ...], int] = {}
            for lv, value in values.get(key, []):
                label_values = tuple(str(lv.get(k, LABEL_DEFAULTS.get(k, ""))) for k in labels)
                series[label_values] = series.get(label_values, 0) + value
            for lv in known.get(key, []):
                series.setdefault(tuple(lv[k] for k in labels), 0)
            for label_values, value in sorted(series.items()):
                family.add_metric(list(label_values), value)
            yield family
        instances, deliveries = self.db.counts()
        queue = GaugeMetricFamily(METRIC_PREFIX + "queue_items", "Instances in each state", labels=["state"])
        for state, n in instances.items():
            queue.add_metric([state], n)
        yield queue
        pending = GaugeMetricFamily(METRIC_PREFIX + "deliveries_queued", "Deliveries in each state",
                                    labels=["state"])
        for state, n in deliveries.items():
            pending.add_metric([state], n)
        yield pending
        backlog = GaugeMetricFamily(METRIC_PREFIX + "destination_backlog", "Deliveries waiting, per destination",
                                    labels=["destination"])
        waiting = dict.fromkeys(self.config.destinations, 0)
        waiting.update({name: pend for name, pend, _failed, _attempts, _error in self.db.destination_summary()})
        for name, n in waiting.items():
            backlog.add_metric([name], n)
        yield backlog
        oldest = self.db.oldest_waiting()
        yield GaugeMetricFamily(METRIC_PREFIX + "oldest_waiting_seconds",
                                "Age of the oldest unfinished instance or delivery (0: nothing waits)",
                                value=0.0 if oldest is None else max(0.0, time.time() - oldest[2]))
        yield GaugeMetricFamily(METRIC_PREFIX + "spool_free_bytes", "Free bytes on the spool's filesystem",
                                value=float(self.spool.free_bytes()))
        yield GaugeMetricFamily(METRIC_PREFIX + "spool_min_free_bytes",
                                "The watermark below which instances are refused (storage.min_free_bytes)",
                                value=float(self.config.storage.min_free_bytes))
