"""`sapd-nfq run`: the workers' supervision, one process a queue.

A worker that dies stops the others, and the exit status says so: systemd
then restarts the whole service, never half of it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType

from ..wiring.config import Config
from ..wiring.logsetup import LOGGER
from .worker import Worker

log = logging.getLogger(LOGGER)


def serve_metrics(config: Config) -> None:
    """The metrics endpoint, if configured; prometheus_client is imported only
    then (a daemon keeps about 3 MB of it)."""
    if config.metrics_listen:
        from ..admin.metrics import serve

        serve(config)


def run_workers(config: Config, config_path: Path | None) -> int:
    """Run `config.workers` daemons, one process each, until told to stop.

    The rules spread flows over the queues by address pair, so each worker
    sees both directions of its flows; the login store (SQLite) is shared.
    Signals reach every worker; if one dies, the others are stopped and the
    exit status says so (systemd then restarts the service).
    """
    if config.workers == 1:
        daemon = Worker(config, config_path)
        serve_metrics(config)
        return daemon.run()
    children: dict[int, int] = {}
    for worker in range(config.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = Worker(config, config_path, worker).run()
            except Exception:
                log.exception("worker %d failed", worker)
            finally:
                os._exit(code)
        children[pid] = worker
    serve_metrics(config)  # here, not before: a fork must not copy its thread

    def forward(signum: int, _frame: FrameType | None) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        ended = children.pop(pid, None)
        if ended is not None and os.waitstatus_to_exitcode(code) != 0:
            log.error("worker %d exited with status %d; stopping the others",
                      ended, os.waitstatus_to_exitcode(code))
            status = 1
            forward(signal.SIGTERM, None)
    return status
