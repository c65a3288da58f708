"""Dovecot's log lines as the tests need them, built in one place.

As Dovecot 2.3 writes them to its `log_path` by default (the lab's 2.3.19
wrote these); `prefix` and `info` give the syslog and journal forms, `tail`
the other login_log_format_elements.
"""

from __future__ import annotations

SESSION = "xJF7TJ9h2L/GEgEC"
#: the timestamp Dovecot's own log_path starts a line with
LOG_PATH = "Dec 02 04:44:31 "


def elements(address: str = "198.18.1.2", session: str = SESSION) -> str:
    """The default login_log_format_elements after the method."""
    return f"rip={address}, lip=198.18.2.2, mpid=28598, TLS, session=<{session}>"


def login(user: str = "alice", *, service: str = "imap", method: str = "PLAIN",
          address: str = "198.18.1.2", session: str = SESSION, tail: str | None = None,
          prefix: str = LOG_PATH, info: str = "Info: ") -> bytes:
    """A `<service>-login` success line."""
    tail = elements(address, session) if tail is None else tail
    return f"{prefix}{service}-login: {info}Login: user=<{user}>, method={method}, {tail}".encode()


def failed(user: str, service: str = "imap") -> bytes:
    """A login that failed: the session ends before it logged in."""
    return (f"{LOG_PATH}{service}-login: Info: Disconnected: Connection closed "
            f"(auth failed, 1 attempts in 2 secs): user=<{user}>, method=PLAIN, "
            f"rip=198.18.1.2, lip=198.18.2.2, TLS, session=<ApWETJ9h4L/GEgEC>").encode()


def session_end(session: str = SESSION, user: str = "alice") -> bytes:
    """The mail process's line when the session logged in ends."""
    return f"Dec 02 05:44:31 imap({user})<28598><{session}>: Info: Disconnected: Logged out".encode()
