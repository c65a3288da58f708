"""Logging to syslog (mail facility) and, in the foreground, to stderr.

Normal events (logins, PASS, FAIL) are info; faults are err. Passwords never
reach a log: the engine's notices do not carry them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER = "sapd-nfq"


def setup_logging(level: str = "info", *, foreground: bool = True) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    logger.setLevel(level.upper())
    logger.propagate = False
    if os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        syslog.setFormatter(logging.Formatter("sapd-nfq[%(process)d]: %(message)s"))
        logger.addHandler(syslog)
    if foreground:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(stderr)
    return logger
