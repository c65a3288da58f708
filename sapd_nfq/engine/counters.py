"""The names of the engine's counters (`Engine.counters`), defined once.

A worker counts what it catches around the engine under the same names (its
own tallies, admin/stats.py), and the two are added up for its status. They
are the keys operators read: under "counters" in `sapd-nfq status --json`,
and behind the metrics endpoint's refusal reasons. Renaming one breaks their
dashboards, so a name here never changes.
"""

from __future__ import annotations

from typing import Final

PACKETS: Final = "packets"                  # every packet handed to the engine
TRUNCATED: Final = "truncated"              # held only in part: dropped (SMTP) or let go (POP3, IMAP)
MALFORMED: Final = "malformed"              # not a well-formed TCP packet: dropped
FOREIGN: Final = "foreign"                  # on no mail port: accepted unjudged
WRONG_DIRECTION: Final = "wrong_direction"  # ports say one direction, the binding the other: dropped
URGENT_CLEARED: Final = "urgent_cleared"    # URG cleared, so the urgent byte is read in line
FLOWS: Final = "flows"                      # connections tracked from their SYN
UNTRACKED: Final = "untracked"              # a packet of a connection not seen to open
CONFLICTS: Final = "conflicts"              # a retransmission that differs: session refused
HELD_BACK: Final = "held_back"              # beyond a gap or over the retain budget: dropped
ACK_REQUESTS: Final = "ack_requests"        # a byte sent again to a receiver, for an ACK the queue sees
PROTOCOL_ERRORS: Final = "protocol_errors"  # a peer broke the protocol
PASS: Final = "pass"                        # RCPTs the relay table passed
FAIL: Final = "fail"                        # RCPTs the relay table failed
TLS_REFUSED: Final = "tls_refused"          # STARTTLS the policy does not allow: refused
LOGINS: Final = "logins"                    # logins learned: on the wire, or (the worker) from a log or the hook
STORE_ERRORS: Final = "store_errors"        # logins the store failed to record
ENGINE_ERRORS: Final = "engine_errors"      # (the worker) a failure caught around the engine or a learner
