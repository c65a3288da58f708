"""`sapd-nfq demo`: the story comes out as the relay table says, and the demo leaves
nothing behind, whether it ends, is interrupted with Ctrl-C, or is terminated.

The demo runs as a subprocess with a prefix of its own. With SAPD_LAB_VAGRANT
set to the vagrant/ directory, the story test plays on the VMs instead
(`sapd-nfq demo --vagrant DIR`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sapdt"
STATE_DIR = Path(f"/run/{PREFIX}-lab")
ROLES = ("client", "gw", "server")
AUTH_TTL = 1  # seconds: too short for steps 3 and 4 anywhere, so the demo must widen it
RUN_TIMEOUT = 120
VAGRANT = os.environ.get("SAPD_LAB_VAGRANT")

# Per step: what the client must have seen, and what sapd-nfq must have logged (its
# line holds these pieces in order).
STORY = {
    1: ("<-  250 2.0.0 Ok: queued as ",
        ("INFO PASS client=198.18.1.2 ", "sender='carol@external.example' "
         "recipient='alice@lab.example' row='row 1: recipient local")),
    2: ("<** 550 Log in.",
        ("INFO FAIL client=198.18.1.2 ", "sender='alice@lab.example' "
         "recipient='dave@external.example' row='row 3: ")),
    3: ("< +OK Logged in.", ("INFO LOGIN client=198.18.1.2 ", "user=alice ")),
    4: ("<-  250 2.0.0 Ok: queued as ",
        ("INFO PASS client=198.18.1.2 ", "user=alice sender='alice@lab.example' "
         "recipient='dave@external.example' row='row 2: ")),
    5: ("<** 550 Log in.",
        ("INFO FAIL client=198.18.1.2 ", "sender='alice@lab.example' "
         "recipient='dave@external.example' row='row 3: ")),
    # POP3S: learned from Dovecot's log (in the namespace lab; the VMs do not share it)
    6: ("< +OK Logged in.", ("INFO LOGIN client=198.18.1.2 ", "user=alice reason='log:dovecot pop3")),
    7: ("<-  250 2.0.0 Ok: queued as ",
        ("INFO PASS client=198.18.1.2 ", "user=alice sender='alice@lab.example' "
         "recipient='dave@external.example' row='row 2: ")),
}
VAGRANT_STORY = {n: step for n, step in STORY.items() if n <= 5}


def _require_lab() -> None:
    missing = [tool for tool in ("swaks", "curl", "postfix", "dovecot", "iptables-restore")
               if shutil.which(tool) is None]
    reason = ("needs root: the demo builds network namespaces" if os.geteuid() != 0
              else f"needs {', '.join(missing)}" if missing else None)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing capability is a failure)", pytrace=False)
    pytest.skip(reason)


class Demo:
    """`sapd-nfq demo` as a subprocess; records the lab's network namespaces once they
    exist, so that processes left in them can be found after the names are gone."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        # Ctrl-C as a terminal delivers it, whatever this run inherited: a
        # shell's background job ignores SIGINT, and its children with it.
        self.proc = subprocess.Popen([sys.executable, "-m", "sapd_nfq", "demo", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self.namespaces: set[int] = set()

    def read_until(self, start: str) -> None:
        """Read output up to and including the first line that starts with `start`."""
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Ready in "):
                self.namespaces = {os.stat(f"/run/netns/{PREFIX}-{r}").st_ino for r in ROLES}
            if line.startswith(start):
                return
        raise AssertionError(f"the demo ended before {start!r}:\n{self.output}")

    def finish(self) -> int:
        try:
            rest, _ = self.proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            self.proc.kill()
        self.lines += rest.splitlines()
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def assert_nothing_left(self) -> None:
        assert self.namespaces, "the demo never got its lab up"
        assert not any(Path(f"/run/netns/{PREFIX}-{r}").exists() for r in ROLES)
        assert not STATE_DIR.exists()
        left = []
        for ns in Path("/proc").glob("[0-9]*/ns/net"):
            try:
                inode = os.stat(ns).st_ino
            except OSError:  # the process has gone meanwhile
                continue
            if inode in self.namespaces:
                left.append(ns.parent.parent.name)
        assert not left, f"processes left in the demo's namespaces: {left}"


def _steps(output: str) -> dict[int, str]:
    """The demo's output cut into its numbered steps."""
    parts = re.split(r"^(\d)\. ", output, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def test_the_demo_tells_the_story_and_leaves_nothing():
    if VAGRANT:
        demo = Demo("--vagrant", VAGRANT)
    else:
        _require_lab()
        demo = Demo("--prefix", PREFIX, "--auth-ttl", str(AUTH_TTL))
        demo.read_until("Ready in ")
    assert demo.finish() == 0, demo.output
    steps = _steps(demo.output)
    story = VAGRANT_STORY if VAGRANT else STORY
    assert sorted(steps) == sorted(story), demo.output
    for number, (client, logged) in story.items():
        shown = steps[number]
        assert re.search(rf"^   client   \| {re.escape(client)}", shown, re.MULTILINE), shown
        assert re.search(rf"^   sapd-nfq \| .*{'.*'.join(map(re.escape, logged))}", shown,
                         re.MULTILINE), shown
    assert "PASSWORD" in steps[3] and "alice-lab-pw" not in demo.output
    if not VAGRANT:
        widened = re.search(rf"widened from {AUTH_TTL} s to (\d+) s", demo.output)
        assert widened, demo.output
        assert f"auth_ttl = {widened[1]} s here" in demo.output
        demo.assert_nothing_left()


@pytest.mark.parametrize("sig,at,status", [
    (signal.SIGINT, "Waiting ", 130),  # Ctrl-C, while the login window runs out
    (signal.SIGTERM, "Ready in ", 128 + signal.SIGTERM),  # as the story begins
], ids=["ctrl-c", "sigterm"])
def test_a_demo_cut_short_leaves_nothing(sig, at, status):
    _require_lab()
    demo = Demo("--prefix", PREFIX, "--auth-ttl", "60")
    demo.read_until(at)
    demo.proc.send_signal(sig)
    assert demo.finish() == status, demo.output
    assert "Lab removed" in demo.output
    demo.assert_nothing_left()
