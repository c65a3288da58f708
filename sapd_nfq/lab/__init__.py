"""A network-namespace lab with real Postfix and Dovecot, for tests and captures.

    with Lab() as lab, MailServer(lab) as mail:
        lab.run("client", ["swaks", "--server", lab.server.ipv4, ...])
"""

from sapd_nfq.lab.capture import capture
from sapd_nfq.lab.mail import MailServer, lab_users
from sapd_nfq.lab.topology import BRIDGED, ROUTED, Host, Lab, LabError, Layout

__all__ = ["BRIDGED", "ROUTED", "Host", "Lab", "LabError", "Layout", "MailServer", "capture", "lab_users"]
