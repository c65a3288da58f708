"""Record the replay captures: real clients against the lab's Postfix and Dovecot.

Run as root from the repository root:

    python tests/captures/record.py [SCENARIO ...]

Brings the namespace lab up, starts the mail server, and for each scenario
records the server's side of the traffic (tcpdump on the server's link, ports
25 and 110, both families, full packets) to tests/captures/<scenario>.pcap,
then rewrites README.md from the scenario table below. Every pcap holds one
short session (two for the login-then-relay ones) from the client namespace.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from sapd_nfq.lab import Lab, MailServer, capture  # noqa: E402

HELO = "client.example"
PAUSE = 0.1  # seconds between the raw client's sends: each send is its own segment
TIMEOUT = 10.0


@dataclass(frozen=True)
class Scenario:
    name: str
    contents: str  # what the capture holds
    verdict: str  # what the relay table says about it
    run: Callable[[Session], None]


SCENARIOS: list[Scenario] = []


def scenario(contents: str, verdict: str):
    def register(run: Callable[[Session], None]) -> Callable[[Session], None]:
        SCENARIOS.append(Scenario(run.__name__, contents, verdict, run))
        return run
    return register


class Session:
    """What a scenario works with: the lab, the mail server, and its own capture."""

    def __init__(self, lab: Lab, mail: MailServer, name: str) -> None:
        self.lab = lab
        self.mail = mail
        self.pcap = HERE / f"{name}.pcap"

    def capture(self):
        return capture(self.lab, self.lab.server, self.pcap)

    def client(self, argv: list[str]) -> str:
        done = self.lab.run("client", argv, check=False, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def swaks(self, *args: str, server: str | None = None) -> str:
        return self.client(["swaks", "--server", server or self.lab.server.ipv4,
                            "--helo", HELO, *args])

    def curl_smtp(self, sender: str, recipient: str) -> str:
        message = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: curl\r\n\r\n"
                   "Sent with curl.\r\n")
        path = self.lab.state_dir / "curl-message.txt"
        path.write_text(message)
        return self.client(["curl", "-sS", "--max-time", str(TIMEOUT),
                            f"smtp://{self.lab.server.ipv4}/{HELO}",
                            "--mail-from", sender, "--mail-rcpt", recipient,
                            "-T", str(path)])

    def imap(self, address: str | None = None) -> imaplib.IMAP4:
        with self.lab.inside("client"):
            return imaplib.IMAP4(address or self.lab.server.ipv4, timeout=TIMEOUT)

    def pop3(self, address: str | None = None) -> poplib.POP3:
        with self.lab.inside("client"):
            return poplib.POP3(address or self.lab.server.ipv4, timeout=TIMEOUT)

    def smtp(self, address: str | None = None) -> smtplib.SMTP:
        with self.lab.inside("client"):
            return smtplib.SMTP(address or self.lab.server.ipv4, timeout=TIMEOUT,
                                local_hostname=HELO)

    def raw(self) -> RawClient:
        with self.lab.inside("client"):
            return RawClient(socket.create_connection((self.lab.server.ipv4, 25), TIMEOUT))

    def seed_mail(self, user: str) -> None:
        """Deliver one short message to `user` (outside any capture)."""
        before = len(self.mail.wait_for_mail(user, 0))
        self.swaks("--from", "seed@external.example", "--to", f"{user}@lab.example",
                   "--body", "A message to retrieve.")
        self.mail.wait_for_mail(user, before + 1)

    def password(self, user: str) -> str:
        return self.mail.users[user]


class RawClient:
    """SMTP by hand, for exact segmentation: TCP_NODELAY and a pause after each send."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.expect(220)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        time.sleep(PAUSE)

    def expect(self, code: int) -> str:
        """Read one (possibly multi-line) reply; it must carry `code`."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                break
        if int(lines[-1][:3]) != code:
            raise RuntimeError(f"expected {code}, got: {lines}")
        return "\n".join(lines)

    def command(self, line: str, code: int) -> str:
        self.send(line.encode() + b"\r\n")
        return self.expect(code)

    def close(self) -> None:
        self.command("QUIT", 221)
        self.file.close()
        self.sock.close()


# --- the scenarios ------------------------------------------------------------

@scenario("swaks: `MAIL FROM:<dave@external.example>`, `RCPT TO:<alice@lab.example>`, `DATA`",
          "PASS (row 1: local recipient)")
def smtp_inbound_local(s: Session) -> None:
    with s.capture():
        s.swaks("--from", "dave@external.example", "--to", "alice@lab.example")


@scenario("swaks: `MAIL FROM:<alice@lab.example>`, `RCPT TO:<dave@external.example>`, `DATA`",
          "with a POP3 login of 198.18.1.2 in the window: PASS (row 2); without: FAIL at the "
          "RCPT (row 3)")
def smtp_local_to_external(s: Session) -> None:
    with s.capture():
        s.swaks("--from", "alice@lab.example", "--to", "dave@external.example")


@scenario("curl smtp://: `MAIL FROM:<dave@external.example> SIZE=n`, "
          "`RCPT TO:<erin@external.example>`, `DATA`",
          "FAIL at the RCPT, login or not (row 4)")
def smtp_external_relay(s: Session) -> None:
    with s.capture():
        s.curl_smtp("dave@external.example", "erin@external.example")


@scenario("poplib: `USER alice`, `PASS` -> `+OK`, `STAT`, `RETR 1`, `QUIT`",
          "login: alice from 198.18.1.2 (learned from the `+OK` after `PASS`)")
def pop3_user_pass(s: Session) -> None:
    s.seed_mail("alice")
    with s.capture():
        pop = s.pop3()
        pop.user("alice")
        pop.pass_(s.password("alice"))
        pop.stat()
        pop.retr(1)
        pop.quit()


@scenario("curl pop3:// --login-options AUTH=PLAIN: `CAPA`, `AUTH PLAIN`, `+ `, base64 "
          "credentials -> `+OK`, `LIST`, `QUIT`",
          "login: bob from 198.18.1.2 (SASL PLAIN, user read from the client's response)")
def pop3_auth_plain(s: Session) -> None:
    with s.capture():
        s.client(["curl", "-sS", "--max-time", str(TIMEOUT), "--login-options", "AUTH=PLAIN",
                  "-u", f"bob:{s.password('bob')}", f"pop3://{s.lab.server.ipv4}/"])


def failed_pop3_login(s: Session) -> None:
    """poplib logs in as alice with a wrong password and quits."""
    pop = s.pop3()
    pop.user("alice")
    try:
        pop.pass_("not-the-password")
    except poplib.error_proto:
        pass
    else:
        raise RuntimeError("a wrong password was accepted")
    pop.quit()


@scenario("poplib: `USER alice`, `PASS` (wrong) -> `-ERR [AUTH] Authentication failed.`, `QUIT`",
          "no login (the server said `-ERR`)")
def pop3_failed_login(s: Session) -> None:
    with s.capture():
        failed_pop3_login(s)


@scenario("raw client: `MAIL FROM:<erin@external.example>`, then `RCPT TO:<dave@ex` and "
          "`ternal.example>\\r\\n` in two segments 0.1 s apart, `QUIT`",
          "FAIL at the RCPT once reassembled (row 4); judged on the second segment")
def smtp_rcpt_split(s: Session) -> None:
    with s.capture():
        raw = s.raw()
        raw.command(f"EHLO {HELO}", 250)
        raw.command("MAIL FROM:<erin@external.example>", 250)
        raw.send(b"RCPT TO:<dave@ex")
        raw.send(b"ternal.example>\r\n")
        raw.expect(250)
        raw.close()


@scenario("swaks --pipeline: `MAIL FROM:<dave@external.example>`, `RCPT TO:<alice@lab.example>`, "
          "`RCPT TO:<erin@external.example>`, `DATA` in one segment",
          "RCPT alice PASS (row 1), RCPT erin FAIL (row 4): the FAIL lands inside the "
          "pipelined segment")
def smtp_pipelining(s: Session) -> None:
    with s.capture():
        s.swaks("--pipeline", "--from", "dave@external.example",
                "--to", "alice@lab.example,erin@external.example")


@scenario("raw client: `MAIL FROM:<dave@external.example>`, `DATA` -> `554` (no valid recipients), "
          "`RCPT TO:<erin@external.example>` -> `250`, `DATA` -> `354`, message, `QUIT`",
          "FAIL at the RCPT (row 4): the refused DATA left the session in command mode")
def smtp_data_refused(s: Session) -> None:
    with s.capture():
        raw = s.raw()
        raw.command(f"EHLO {HELO}", 250)
        raw.command("MAIL FROM:<dave@external.example>", 250)
        raw.command("DATA", 554)
        raw.command("RCPT TO:<erin@external.example>", 250)
        raw.command("DATA", 354)
        raw.send(b"Subject: after a refused DATA\r\n\r\nbody\r\n.\r\n")
        raw.expect(250)
        raw.close()


@scenario("smtplib (lower-case verbs): `mail FROM:<dave@external.example> size=n`, "
          "`rcpt TO:<alice@lab.example>`, `data`; body lines `RCPT TO:<x@external.example>`, "
          "`MAIL FROM:<mallory@external.example>`, `DATA` and the dot-stuffed "
          "`..dot-stuffed line`",
          "PASS (row 1); the body lines are message text, not commands")
def smtp_body_commands(s: Session) -> None:
    body = ("Subject: commands in the body\r\n\r\n"
            "RCPT TO:<x@external.example>\r\n"
            "MAIL FROM:<mallory@external.example>\r\n"
            "DATA\r\n"
            ".dot-stuffed line\r\n"  # smtplib sends it as '..dot-stuffed line'
            "end\r\n")
    with s.capture():
        smtp = s.smtp()
        smtp.sendmail("dave@external.example", ["alice@lab.example"], body)
        smtp.quit()


BDAT_FIRST = b"Subject: chunked\r\n\r\nRCPT TO:<x@external.example>\r\n"
BDAT_LAST = b"MAIL FROM:<mallory@external.example>\r\n"


@scenario("raw client (CHUNKING): `MAIL FROM:<dave@external.example>`, "
          f"`RCPT TO:<alice@lab.example>`, `BDAT {len(BDAT_FIRST)}` and a chunk holding "
          f"`RCPT TO:<x@external.example>` in one segment, `BDAT {len(BDAT_LAST)} LAST` and a "
          "chunk `MAIL FROM:<mallory@external.example>` in two segments; then "
          "`MAIL FROM:<dave@external.example>`, `RCPT TO:<erin@external.example>`, `QUIT`",
          "RCPT alice PASS (row 1); chunk bytes are skipped by count; RCPT erin FAIL (row 4)")
def smtp_bdat(s: Session) -> None:
    with s.capture():
        raw = s.raw()
        raw.command(f"EHLO {HELO}", 250)
        raw.command("MAIL FROM:<dave@external.example>", 250)
        raw.command("RCPT TO:<alice@lab.example>", 250)
        raw.send(b"BDAT %d\r\n" % len(BDAT_FIRST) + BDAT_FIRST)
        raw.expect(250)
        raw.send(b"BDAT %d LAST\r\n" % len(BDAT_LAST))
        raw.send(BDAT_LAST)
        raw.expect(250)
        raw.command("MAIL FROM:<dave@external.example>", 250)
        raw.command("RCPT TO:<erin@external.example>", 250)
        raw.close()


@scenario("smtplib over IPv6 (2001:db8:1::2 -> 2001:db8:2::2): "
          "`mail FROM:<dave@external.example>`, `rcpt TO:<erin@external.example>`, `data`",
          "FAIL at the RCPT (row 4)")
def smtp_ipv6_relay(s: Session) -> None:
    with s.capture():
        smtp = s.smtp(s.lab.server.ipv6)
        smtp.sendmail("dave@external.example", ["erin@external.example"],
                      "Subject: over IPv6\r\n\r\nbody\r\n")
        smtp.quit()


@scenario("poplib over IPv6: `USER bob`, `PASS` -> `+OK`, `STAT`, `QUIT`",
          "login: bob from 2001:db8:1::2")
def pop3_ipv6_login(s: Session) -> None:
    with s.capture():
        pop = s.pop3(s.lab.server.ipv6)
        pop.user("bob")
        pop.pass_(s.password("bob"))
        pop.stat()
        pop.quit()


@scenario("swaks --tls: `EHLO`, `STARTTLS` -> `220`, TLS 1.3; inside it "
          "`MAIL FROM:<dave@external.example>`, `RCPT TO:<erin@external.example>`, `DATA`",
          "envelope not visible (a row-4 relay hidden in TLS): the STARTTLS policy decides; "
          "it must never become an unchecked relay")
def smtp_starttls(s: Session) -> None:
    with s.capture():
        s.swaks("--tls", "--from", "dave@external.example", "--to", "erin@external.example")


@scenario("poplib: `CAPA`, `STLS` -> `+OK`, TLS 1.3; inside it `USER alice`, `PASS`, `QUIT`",
          "login not visible on the wire (no login learned)")
def pop3_stls(s: Session) -> None:
    context = ssl.create_default_context(cafile=s.mail.cert)
    context.check_hostname = False  # the lab connects by address; the cert names the host
    with s.capture():
        pop = s.pop3()
        pop.stls(context)  # asks CAPA first
        pop.user("alice")
        pop.pass_(s.password("alice"))
        pop.quit()


@scenario("poplib `USER alice`, `PASS` -> `+OK`, `QUIT`; then curl smtp:// from the same address: "
          "`MAIL FROM:<alice@lab.example> SIZE=n`, `RCPT TO:<dave@external.example>`, `DATA`",
          "login: alice from 198.18.1.2, then PASS (row 2: local sender, logged in)")
def pop3_then_smtp_relay(s: Session) -> None:
    with s.capture():
        pop = s.pop3()
        pop.user("alice")
        pop.pass_(s.password("alice"))
        pop.quit()
        s.curl_smtp("alice@lab.example", "dave@external.example")


@scenario("poplib `USER alice`, `PASS` (wrong) -> `-ERR`, `QUIT`; then curl smtp:// from the same "
          "address: `MAIL FROM:<alice@lab.example> SIZE=n`, `RCPT TO:<dave@external.example>`, "
          "`DATA`",
          "no login, then FAIL at the RCPT (row 3)")
def pop3_failed_then_smtp_relay(s: Session) -> None:
    with s.capture():
        failed_pop3_login(s)
        s.curl_smtp("alice@lab.example", "dave@external.example")


def failed_imap_login(s: Session) -> None:
    """imaplib logs in as alice with a wrong password and logs out."""
    imap = s.imap()
    try:
        imap.login("alice", "not-the-password")
    except imaplib.IMAP4.error:
        pass
    else:
        raise RuntimeError("a wrong password was accepted")
    imap.logout()


@scenario("imaplib: `CAPABILITY`, `LOGIN alice \"...\"` -> tagged `OK`, `SELECT INBOX`, `LOGOUT`",
          "login: alice from 198.18.1.2 (learned from the tagged `OK` to `LOGIN`)")
def imap_login(s: Session) -> None:
    with s.capture():
        imap = s.imap()
        imap.login("alice", s.password("alice"))
        imap.select("INBOX")
        imap.logout()


@scenario("curl imap://: `CAPABILITY`, `AUTHENTICATE PLAIN` with the initial response (SASL-IR) "
          "-> tagged `OK`, `LIST`, `LOGOUT`",
          "login: bob from 198.18.1.2 (SASL PLAIN, user read from the initial response)")
def imap_authenticate_plain(s: Session) -> None:
    with s.capture():
        s.client(["curl", "-sS", "--max-time", str(TIMEOUT), "-u", f"bob:{s.password('bob')}",
                  f"imap://{s.lab.server.ipv4}/"])


@scenario("raw client: `a LOGIN {5}` -> `+`, `alice {n}` -> `+`, the password; tagged `OK`; "
          "`b LOGOUT`; each send its own segment",
          "login: alice from 198.18.1.2 (synchronising literals, user read from the first)")
def imap_literal_login(s: Session) -> None:
    password = s.password("alice").encode()
    with s.capture():
        with s.lab.inside("client"):
            sock = socket.create_connection((s.lab.server.ipv4, 143), TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        reader.readline()
        for send in (b"a LOGIN {5}\r\n", b"alice {%d}\r\n" % len(password)):
            sock.sendall(send)
            if not reader.readline().startswith(b"+"):
                raise RuntimeError("no continuation for a literal")
        sock.sendall(password + b"\r\n")
        if not reader.readline().startswith(b"a OK"):
            raise RuntimeError("the literal login failed")
        sock.sendall(b"b LOGOUT\r\n")
        reader.read()
        sock.close()


@scenario("imaplib: `LOGIN alice` (wrong) -> `NO [AUTHENTICATIONFAILED]`, `LOGOUT`",
          "no login (the server said `NO`)")
def imap_failed_login(s: Session) -> None:
    with s.capture():
        failed_imap_login(s)


@scenario("imaplib: `STARTTLS` -> tagged `OK`, TLS 1.3; inside it `LOGIN alice`, `LOGOUT`",
          "login not visible on the wire (no login learned)")
def imap_starttls(s: Session) -> None:
    context = ssl.create_default_context(cafile=s.mail.cert)
    with s.capture():
        imap = s.imap()
        imap.starttls(context)
        imap.login("alice", s.password("alice"))
        imap.logout()


@scenario("imaplib over IPv6: `LOGIN bob` -> tagged `OK`, `LOGOUT`",
          "login: bob from 2001:db8:1::2")
def imap_ipv6_login(s: Session) -> None:
    with s.capture():
        imap = s.imap(s.lab.server.ipv6)
        imap.login("bob", s.password("bob"))
        imap.logout()


@scenario("imaplib `LOGIN alice` -> tagged `OK`, `LOGOUT`; then curl smtp:// from the same "
          "address: `MAIL FROM:<alice@lab.example> SIZE=n`, `RCPT TO:<dave@external.example>`, "
          "`DATA`",
          "login: alice from 198.18.1.2, then PASS (row 2: local sender, logged in)")
def imap_then_smtp_relay(s: Session) -> None:
    with s.capture():
        imap = s.imap()
        imap.login("alice", s.password("alice"))
        imap.logout()
        s.curl_smtp("alice@lab.example", "dave@external.example")


# --- recording ------------------------------------------------------------------

README_HEAD = """\
# Replay captures

Real sessions recorded in the namespace lab (`sapd_nfq/lab`) by `record.py` (run as root:
`python tests/captures/record.py`; it rewrites this file). Each pcap is Ethernet, full
packets, taken with tcpdump on the server's link (`tcp port 25 or tcp port 110 or tcp port
143`), offloads off so segments are MTU-sized with valid checksums. Client 198.18.1.2 /
2001:db8:1::2, server (Postfix 3.7, Dovecot 2.3 POP3 and IMAP) 198.18.2.2 / 2001:db8:2::2.
Local = listed in `sapd_nfq/lab/provision/virtusertable` (alice, bob, postmaster
@lab.example). The POP3 and IMAP passwords in the captures are the lab's throwaway ones
(`sapd_nfq/lab/provision/users`).
"Row n" refers to the relay table in the project brief.

| capture | contents | relay table |
|---|---|---|
"""


def write_readme() -> None:
    rows = "".join(f"| `{sc.name}.pcap` | {sc.contents} | {sc.verdict} |\n" for sc in SCENARIOS)
    (HERE / "README.md").write_text(README_HEAD + rows)


def summary(pcap: Path) -> str:
    read = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True,
                          check=True)
    return f"{pcap.name}: {pcap.stat().st_size} bytes, {len(read.stdout.splitlines())} packets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"default: all of {', '.join(sc.name for sc in SCENARIOS)}")
    args = parser.parse_args()
    chosen = [sc for sc in SCENARIOS if not args.scenarios or sc.name in args.scenarios]
    unknown = set(args.scenarios) - {sc.name for sc in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        parser.error("must run as root (network namespaces, tcpdump, Postfix, Dovecot)")

    # SAPD_LAB_PREFIX names the namespaces, as for the lab tests
    with Lab(prefix=os.environ.get("SAPD_LAB_PREFIX", "sapd")) as lab, MailServer(lab) as mail:
        for sc in chosen:
            sc.run(Session(lab, mail, sc.name))
            print(summary(HERE / f"{sc.name}.pcap"))
    write_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
