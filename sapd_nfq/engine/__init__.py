"""The sans-I/O engine: packet bytes in, a Decision out.

Everything in this package is pure: it imports no socket, netfilter,
netlink, subprocess, database or logging-handler code, and nothing from the
adapters around it (tests/test_architecture.py keeps it so). The daemon, the
CLI and the tests drive it alike: `Engine.handle(packet, now)` (core.py),
with a login store handed in through the `LoginStore` interface (logins.py).
docs/engine.md maps its modules.
"""
