"""sapd-nfq: a POP-before-SMTP relay gate in the kernel's packet path.

`engine/` is the pure core (packet bytes in, decisions out); `logins/` holds
the login store backends; every other module is an adapter around the
engine: the NFQUEUE loop, packet injection, rules, interfaces, the control
socket, logging, the config file and the CLI.
"""
