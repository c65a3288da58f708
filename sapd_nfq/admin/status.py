"""The whole picture for `status`, `why` and the metrics endpoint: the
rules as installed, each worker's reply on its control socket, and the
kernel's queue counters."""

from __future__ import annotations

import time
from collections import Counter

from ..engine.errors import SapdError
from ..kernel import rules
from ..wiring.build import open_logins
from ..wiring.config import Config
from .control import DaemonNotRunning, request, worker_queues


def kernel_queues(path: str = "/proc/net/netfilter/nfnetlink_queue") -> dict[int, dict[str, int]]:
    """The kernel's per-queue counters (only queues a process is bound to)."""
    names = ("portid", "waiting", "copy_mode", "copy_range", "queue_dropped", "user_dropped", "id_sequence")
    queues: dict[int, dict[str, int]] = {}
    try:
        with open(path) as f:
            for line in f:
                fields = [int(x) for x in line.split()]
                queues[fields[0]] = dict(zip(names, fields[1:8]))
    except (OSError, ValueError):
        pass
    return queues


def gather_status(config: Config) -> dict:
    try:
        installed = rules.installed()
    except SapdError as exc:
        installed = {"error": str(exc)}
    kernel = kernel_queues()
    workers = []
    for queue in worker_queues(config):
        try:
            reply = request(config, queue, "status")
        except DaemonNotRunning as exc:
            reply = {"running": False, "queue": queue, "error": str(exc)}
        else:
            reply["running"] = True
        reply["kernel"] = kernel.get(queue)
        workers.append(reply)
    status = {
        "rules": installed,
        "rules_installed": all(f.get("installed") for f in installed.values() if isinstance(f, dict)),
        "daemon_running": all(w["running"] for w in workers),
        "workers": workers,
    }
    if not any(w["running"] for w in workers):
        logins = open_logins(config)
        try:
            entries = logins.entries(time.time())
        finally:
            logins.close()
        status["logins_held"] = len(entries)
        status["logins_by_source"] = dict(Counter(login.source for login in entries))
    else:
        busiest = max((w for w in workers if w["running"]), key=lambda w: w.get("logins_held", 0))
        status["logins_held"] = busiest.get("logins_held", 0)
        status["logins_by_source"] = busiest.get("logins_by_source", {})
    return status
