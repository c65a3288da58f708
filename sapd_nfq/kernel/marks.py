"""The packet marks the rules and the daemon share, and the rules' own connection mark.

The rules match them; the daemon's raw socket sets one (kernel/inject.py)
and its verdicts the other (kernel/worker.py). Only the bits named here are
ours: the rest of a mark belongs to the host's own rules.
"""

#: SO_MARK of the daemon's raw socket: packets it injects (RSTs, the 550 reply)
#: carry it and are never queued again. Only the upper half is matched.
INJECT_MARK = 0x5A9D0000
INJECT_MASK = 0xFFFF0000
#: A settled flow leaves the queue: the daemon ORs this bit into the packet's
#: mark and answers NF_REPEAT; the rules copy the bit to the connection mark,
#: and packets of a connection carrying it are not queued any more.
BYPASS_MARK = 0x00001000
#: Connection mark bit, the rules' alone: this mail connection was opened from a
#: client port of a bridge. A reply-direction packet of it that comes in on a
#: client port is forged (the port guard drops it).
CLIENT_OPENED_MARK = 0x00002000
