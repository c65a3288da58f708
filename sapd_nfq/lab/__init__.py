"""A network-namespace lab with real Postfix and Dovecot, for tests and captures.

    with Lab() as lab, MailServer(lab) as mail:
        lab.run("client", ["swaks", "--server", lab.server.ipv4, ...])

The names below load their module (and pyroute2) on first use: `sapd-nfq`
imports the lab's commands, and a command that never builds a lab must run
where pyroute2 is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# `capture` is bound here, not looked up: the name is its module's too, and the
# package attribute of a loaded submodule would hide a lookup
from sapd_nfq.lab.capture import capture

if TYPE_CHECKING:
    from sapd_nfq.lab.mail import MailServer, lab_users
    from sapd_nfq.lab.topology import BRIDGED, ROUTED, Host, Lab, LabError, Layout

#: each exported name and the module that holds it
_HOME = {
    "MailServer": "mail", "lab_users": "mail",
    **dict.fromkeys(("BRIDGED", "ROUTED", "Host", "Lab", "LabError", "Layout"), "topology"),
}

__all__ = ["BRIDGED", "ROUTED", "Host", "Lab", "LabError", "Layout", "MailServer", "capture", "lab_users"]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
