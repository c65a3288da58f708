"""The metrics endpoint: Prometheus' text format, through prometheus_client.

One endpoint for all workers: at each scrape the collector asks every
worker on its control socket (as `sapd-nfq status` does) and reads the
rules' and the kernel's counters, so the numbers are the workers' own, with
no shared files between processes and nothing added to the packet path.
It runs in the process that started the workers (the worker itself when
there is one), on `metrics_listen`, which is off by default and meant for
a loopback or management address: the numbers say how much mail this host
handles and refuses.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..engine.counters import (
    CONFLICTS,
    ENGINE_ERRORS,
    FAIL,
    MALFORMED,
    PROTOCOL_ERRORS,
    STORE_ERRORS,
    TLS_REFUSED,
    TRUNCATED,
    UNTRACKED,
    WRONG_DIRECTION,
)
from ..kernel.rules import GUARDS
from ..wiring.config import Config, parse_listen
from ..wiring.logsetup import LOGGER
from .report import GateStatus

log = logging.getLogger(LOGGER)

#: engine counters that count a refused or dropped packet, by reason
REFUSALS = {
    FAIL: "relay_denied", TLS_REFUSED: "starttls_not_allowed",
    CONFLICTS: "retransmission_differs", PROTOCOL_ERRORS: "protocol_error",
    UNTRACKED: "untracked_connection", WRONG_DIRECTION: "wrong_direction",
    TRUNCATED: "truncated", MALFORMED: "malformed", ENGINE_ERRORS: "engine_error",
}


def _total(tallies: Iterable[dict[str, int]]) -> dict[str, float]:
    """The sum over workers of one of their tallies."""
    total: dict[str, float] = {}
    for tally in tallies:
        for name, value in tally.items():
            total[name] = total.get(name, 0) + value
    return total


class GateCollector(Collector):
    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Any]:
        from .status import gather_status

        status = gather_status(self.config)
        yield from render(status)


def render(status: GateStatus) -> Iterator[Any]:
    """Metric families for one `gather_status` answer."""
    workers = status.running
    up = GaugeMetricFamily("sapd_nfq_worker_up", "1 if the worker of this queue answers", labels=["queue"])
    for queue in status.queues:
        up.add_metric([str(queue.queue)], 1 if queue.running else 0)
    yield up
    enforcing = GaugeMetricFamily("sapd_nfq_enforcing",
                                  "1 if the worker refuses, 0 in monitor mode (enforce = false)",
                                  labels=["queue"])
    for worker in workers:
        enforcing.add_metric([str(worker.queue)], 1 if worker.enforce else 0)
    yield enforcing

    def counter(name: str, doc: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=[label])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        return family

    yield counter("sapd_nfq_packets", "packets judged, by verdict", "verdict", _total(w.verdicts for w in workers))
    rows = CounterMetricFamily("sapd_nfq_decisions", "RCPT decisions, by verdict and table row",
                               labels=["verdict", "row"])
    for key, value in sorted(_total(w.rows for w in workers).items()):
        verdict, _, row = key.partition("|")
        rows.add_metric([verdict.upper(), row], value)
    yield rows
    yield counter("sapd_nfq_logins", "logins learned, by source", "source", _total(w.logins for w in workers))
    counters = _total(w.counters for w in workers)
    yield counter("sapd_nfq_would_refuse", "packets monitor mode let by unchanged that enforcing "
                  "would have dropped, rewritten or answered, by reason", "reason",
                  _total(w.would_refuse for w in workers))
    yield counter("sapd_nfq_refusals", "refusals decided (packets dropped, sessions refused), by reason; "
                  "carried out where sapd_nfq_enforcing is 1", "reason",
                  {reason: counters.get(key, 0) for key, reason in REFUSALS.items()})
    stores = [w.store for w in workers]
    yield CounterMetricFamily("sapd_nfq_store_errors", "login store operations that failed",
                              value=counters.get(STORE_ERRORS, 0)
                              + sum(x.get("write_errors", 0) for x in stores))
    connected = GaugeMetricFamily("sapd_nfq_store_connected",
                                  "1 if the worker's login store answers (it decides from memory either way)",
                                  labels=["queue"])
    for worker in workers:
        connected.add_metric([str(worker.queue)], 1 if worker.store.get("connected", True) else 0)
    yield connected
    yield GaugeMetricFamily("sapd_nfq_store_pending_writes", "logins and removals not yet written to the store",
                            value=sum(x.get("pending_writes", 0) for x in stores))
    yield CounterMetricFamily("sapd_nfq_store_writes_dropped", "changes dropped from a full queue of writes",
                              value=sum(x.get("dropped_writes", 0) for x in stores))

    yield GaugeMetricFamily("sapd_nfq_flows", "flows tracked", value=sum(w.flows_tracked for w in workers))
    yield CounterMetricFamily("sapd_nfq_flows_evicted", "flows evicted from a full table",
                              value=sum(w.flows_evicted for w in workers))
    yield GaugeMetricFamily("sapd_nfq_retained_bytes", "stream bytes held until acknowledged",
                            value=sum(w.retained_bytes for w in workers))
    yield GaugeMetricFamily("sapd_nfq_logins_held", "open login windows", value=status.logins_held)
    yield CounterMetricFamily("sapd_nfq_reloads", "successful reloads", value=sum(w.reloads for w in workers))
    yield CounterMetricFamily("sapd_nfq_reload_errors", "reloads that failed (the running table stayed)",
                              value=sum(w.reload_errors for w in workers))

    yield CounterMetricFamily("sapd_nfq_receive_overruns", "times a worker's receive buffer was full "
                              "(the kernel dropped packets)",
                              value=sum(w.receive.overruns for w in workers if w.receive))
    yield CounterMetricFamily("sapd_nfq_verdict_batches", "batch verdicts sent, each accepting "
                              "the plain accepts waiting", value=sum(w.receive.batches for w in workers
                                                                      if w.receive))
    yield CounterMetricFamily("sapd_nfq_verdict_errors", "verdicts the queue's socket would not take "
                              "(sent again with the next batch)",
                              value=sum(w.receive.verdict_errors for w in workers if w.receive))
    gso = GaugeMetricFamily("sapd_nfq_queue_gso", "1 if the kernel queues super-packets whole "
                            "(it took the GSO flag)", labels=["queue"])
    for worker in workers:
        if worker.receive is not None and worker.receive.gso is not None:
            gso.add_metric([str(worker.queue)], 1 if worker.receive.gso else 0)
    yield gso
    kernel = {"queue_dropped": ("sapd_nfq_kernel_queue_dropped", "packets the kernel dropped: queue full"),
              "user_dropped": ("sapd_nfq_kernel_user_dropped", "packets the kernel could not hand over")}
    for key, (name, doc) in kernel.items():
        family = CounterMetricFamily(name, doc, labels=["queue"])
        for queue in status.queues:
            if queue.kernel:
                family.add_metric([str(queue.queue)], queue.kernel[key])
        yield family
    spoofs = CounterMetricFamily("sapd_nfq_spoofs_dropped", "packets from a client interface that claimed "
                                 "a mail server's address, dropped before routing", labels=["family"])
    for family_name, table in status.rules.items():
        if isinstance(table, dict):
            # the guards' DROP rules (the port guard's first rule marks, it drops nothing)
            spoofs.add_metric([family_name], sum(r["packets"] or 0 for r in table.get("rules", [])
                                                 if r["chain"] in GUARDS
                                                 and r["rule"].endswith("-j DROP")))
    yield spoofs
    opens = CounterMetricFamily("sapd_nfq_smtp_opens", "SMTP connections opened through this host "
                                "on any interface (where=host) and into the queue (where=queued)",
                                labels=["family", "where"])
    for family_name, table in status.rules.items():
        if isinstance(table, dict) and "smtp_opens" in table:
            for where, count in table["smtp_opens"].items():
                opens.add_metric([family_name, where], count)
    yield opens
    yield GaugeMetricFamily("sapd_nfq_blind", "reasons the rules may not see the mail they judge "
                            "(sapd-nfq status lists them)", value=len(status.blind))

    if workers:
        bounds = workers[0].engine_seconds.bounds
        counts = [sum(w.engine_seconds.buckets[i] for w in workers) for i in range(len(bounds) + 1)]
        cumulative, running = [], 0
        for bound, count in zip([*map(repr, bounds), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily("sapd_nfq_engine_seconds", "engine time a packet", buckets=cumulative,
                                    sum_value=sum(w.engine_seconds.sum for w in workers))


def serve(config: Config) -> None:
    """Start the endpoint in a thread of this process, if configured."""
    if not config.metrics_listen:
        return
    host, port = parse_listen(config.metrics_listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GateCollector(config))
    start_http_server(port, addr=host, registry=registry)
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("metrics on %s, not a loopback address: keep it behind a firewall", config.metrics_listen)
    log.info("metrics on http://%s/metrics", config.metrics_listen)
