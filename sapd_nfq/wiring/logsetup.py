"""Logging to syslog (mail facility) and, in the foreground, to stderr.

Normal events (logins, PASS, FAIL) are info; faults are err. Passwords never
reach a log: the engine's notices do not carry them. Under systemd, stderr
is the journal, and so is syslog's socket: a line goes to syslog alone
there, once, with its facility.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER = "sapd-nfq"


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream (systemd names it in JOURNAL_STREAM)."""
    named = os.environ.get("JOURNAL_STREAM")
    if not named:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a file
        return False
    return named == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "info", *, foreground: bool = True) -> logging.Logger:
    # A decision's line is written on the packet path: a record gathers
    # nothing the formats do not show (the logging HOWTO's "Optimization":
    # no caller's frame, thread or process name; the process id stays).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    logger.setLevel(level.upper())
    logger.propagate = False
    syslog_too = os.path.exists("/dev/log")
    if syslog_too:
        syslog = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        syslog.setFormatter(logging.Formatter("sapd-nfq[%(process)d]: %(message)s"))
        logger.addHandler(syslog)
    if foreground and not (syslog_too and stderr_is_journal()):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(stderr)
    return logger
