"""The whole picture for `status`, `why` and the metrics endpoint: the
rules as installed, each worker's reply on its control socket, and the
kernel's queue counters."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..engine.errors import SapdError
from ..kernel import rules
from ..kernel.interfaces import blind_spots, read_host
from ..wiring.build import open_logins
from ..wiring.config import Config
from .control import DaemonNotRunning, request, worker_queues
from .report import GateStatus, QueueStatus, WorkerStatus


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


def gather_status(config: Config) -> GateStatus:
    installed: dict[str, Any]
    try:
        installed = rules.installed()
    except SapdError as exc:
        installed = {"error": str(exc)}
    kernel = kernel_queues()
    queues = []
    for queue in worker_queues(config):
        try:
            reply = request(config, queue, "status")
        except DaemonNotRunning as exc:
            queues.append(QueueStatus(queue, None, kernel.get(queue), error=str(exc)))
            continue
        if not reply.get("ok"):
            raise SapdError(f"queue {queue}: {reply.get('error')}")
        queues.append(QueueStatus(queue, WorkerStatus.from_json(reply), kernel.get(queue)))
    found = tuple(blind(config, installed))
    running = [q.worker for q in queues if q.worker is not None]
    if running:
        busiest = max(running, key=lambda w: w.logins_held)
        return GateStatus(installed, tuple(queues), busiest.logins_held, busiest.logins_by_source,
                          blind=found)
    logins = open_logins(config)
    try:
        entries = logins.entries(time.time())
    finally:
        logins.close()
    return GateStatus(installed, tuple(queues), len(entries), dict(Counter(login.source for login in entries)),
                      blind=found)


def blind(config: Config, installed: dict[str, Any]) -> list[str]:
    """Why the rules may not see the mail they are meant to judge, as far as
    this host tells: the checks `up` and `run` refuse on (the host may have
    changed since), and SMTP connections crossing the host while none
    reached the queue."""
    try:
        found = blind_spots(config.mode, config.interfaces, read_host())
    except OSError as exc:
        found = [f"cannot read this host's interfaces: {exc}"]
    for family, table in installed.items():
        opens = table.get("smtp_opens") if isinstance(table, dict) else None
        if opens and opens["host"] and not opens["queued"]:
            found.append(f"{family}: {opens['host']} SMTP connections opened through this host "
                         "since the rules went in, none of them into the queue: if clients "
                         "sent mail, the rules do not see the interfaces they came in on")
    return found
