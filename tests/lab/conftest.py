"""Fixtures for the lab tests: root, network namespaces, real Postfix and Dovecot.

Every test under tests/lab is marked `lab` (deselect with `-m "not lab"`). Without
the capabilities the lab needs, its tests are skipped with the reason; when CI=true
a missing capability fails them instead, so CI never passes by skipping.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import Gate, require_lab, stop_and_check

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session", autouse=True)
def _no_name_lookups() -> Iterator[None]:
    """The lab's clients in this process name hosts by address only.

    A lookup here would go to the machine's own resolver, which may time out
    (smtplib, say, looks up this machine's name unless it is given one): a
    test that made one would depend on a fast resolver, so it fails at once.
    """
    def literal(host: object) -> bool:
        if host is None:  # a passive socket: no name
            return True
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in ("", "localhost"):
            return True
        try:
            ipaddress.ip_address(name.split("%")[0])
        except ValueError:
            return False
        return True

    def guard(name: str, allowed) -> object:
        real = getattr(socket, name)

        def guarded(host="", *args, **kwargs):
            if not allowed(host):
                raise AssertionError(f"socket.{name}({host!r}): the lab names hosts by address")
            return real(host, *args, **kwargs)
        return guarded

    with pytest.MonkeyPatch.context() as patch:
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            patch.setattr(socket, name, guard(name, literal))
        for name in ("gethostbyaddr", "getfqdn"):  # reverse lookups, whatever the argument
            patch.setattr(socket, name, guard(name, lambda host: False))
        yield


@pytest.fixture(scope="session")
def _lab_session() -> Iterator[tuple]:
    require_lab()
    from sapd_nfq.lab import Lab, MailServer

    # SAPD_LAB_PREFIX names the namespaces, so that two runs can share a host
    with Lab(prefix=os.environ.get("SAPD_LAB_PREFIX", "sapd")) as lab, MailServer(lab) as mail:
        yield lab, mail


@pytest.fixture(scope="session")
def lab(_lab_session):
    """The namespace lab (client, gw, server) with Postfix and Dovecot running in server."""
    return _lab_session[0]


@pytest.fixture(scope="session")
def mail_server(_lab_session):
    """The lab's MailServer: log paths, maildirs, users, wait_for_mail()."""
    return _lab_session[1]


def _unpacked(lab, mta_class):
    from sapd_nfq.lab.topology import LabError

    mta = mta_class(lab)
    try:
        mta.start()
    except LabError as exc:
        mta.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"{mta.name} could not be set up: {exc}", pytrace=False)
        pytest.skip(f"{mta.name} could not be set up here: {exc}")
    return mta


@pytest.fixture(scope="session")
def sendmail(lab):
    """Sendmail beside the lab's Postfix, on an address of its own (lab/sendmail.py)."""
    from sapd_nfq.lab.sendmail import Sendmail

    mta = _unpacked(lab, Sendmail)
    yield mta
    mta.stop()


@pytest.fixture(scope="session")
def exim(lab):
    """Exim beside the lab's Postfix, on an address of its own (lab/exim.py)."""
    from sapd_nfq.lab.exim import Exim

    mta = _unpacked(lab, Exim)
    yield mta
    mta.stop()


@pytest.fixture
def links(request, lab):
    """The lab's links as an indirect parameter asks, (MTU, offloads on), for
    the test's length; the plain links (MTU 1500, offloads off) after it."""
    from sapd_nfq.lab.topology import DEFAULT_MTU

    mtu, offloads = getattr(request, "param", (DEFAULT_MTU, False))
    lab.set_links(mtu, offloads=offloads)
    yield mtu, offloads
    lab.set_links()


@pytest.fixture(scope="session")
def _pools(lab):
    # Every test's login store is a file of its own, so even a reused address
    # could not inherit a login; fresh addresses also keep conntrack apart.
    return {AF_INET: itertools.cycle(lab.client.pool_ipv4),
            AF_INET6: itertools.cycle(lab.client.pool_ipv6)}


@pytest.fixture
def fresh(_pools):
    """The next client pool address of a family."""
    return lambda family=AF_INET: next(_pools[family])


@pytest.fixture
def make_gate(lab, mail_server, tmp_path):
    """Start sapd-nfq (up, then run) with a config of its own; stop and check it after:
    it stopped cleanly on SIGTERM, logged no traceback and no password, and `down`
    left the mangle table as it was before `up`."""
    gates: list[Gate] = []

    def make(mode: str = "forward", **settings: object) -> Gate:
        workdir = tmp_path / f"gate-{len(gates)}"
        workdir.mkdir()
        gate = Gate(lab, workdir, mode, **settings)
        gates.append(gate)
        gate.up()
        gate.start()
        return gate

    yield make
    problems = [problem for gate in gates for problem in stop_and_check(gate, mail_server)]
    assert not problems, "\n".join(problems) + "\n" + "\n".join(g.log() for g in gates)
