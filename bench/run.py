"""`python -m bench`: every workload on every path, in one run, in the namespace lab.

client -> gw -> server, with the path under test on gw:

    nofilter  plain forwarding
    floor     an NFQUEUE rule to a Python callback that only accepts (bench/floor.py)
    sapd      sapd-nfq in forward mode (`python -m sapd_nfq up` + `run`)
    relay     an asyncio relay in the style of SAPD, behind an iptables REDIRECT (bench/relay.py)

Workloads: POP3 retrieval from Dovecot, SMTP upload to Postfix (after a POP3
login, so the upload relays by the table's row 2), both with the lab's
offloads off (MTU-size segments, as on a wire without GRO) and on (TSO at the
senders, GRO at the gateway, as a NIC's defaults have it), short SMTP sessions to a
fast responder (bench/responder.py) at 1 and 64 concurrent clients, the
daemon's memory with 0, 1,000 and 10,000 open sessions, and 1 against 2
worker processes. Results go to bench/results.json and bench/results.png.

The lab uses its own prefix (SAPD_LAB_PREFIX's with a "b", by default "sapdb",
state in /run/sapdb-lab), so a benchmark and the lab tests can share a host; it sends no
packet outside its namespaces. Needs root.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import pyspy

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PREFIX = os.environ.get("SAPD_LAB_PREFIX", "sapd") + "b"
STATE_DIR = Path(f"/run/{PREFIX}-lab")
POOL_SIZE = 64

SMTP_PORT, POP3_PORT = 25, 110          # Postfix, Dovecot
FAST_SMTP, FAST_POP3 = 2525, 2110       # bench/responder.py
RELAY_SMTP, RELAY_POP3 = 10025, 10110   # bench/relay.py on gw
CLIENT_IF = "to-client"                 # gw's interface towards the clients
MAILBOX_USER = "bob"                    # the POP3 retrieval mailbox
UPLOAD_USER = "alice"                   # logs in by POP3, then relays
STARTUP_TIMEOUT = 15.0

PATHS = ("nofilter", "floor", "sapd", "relay")
LABELS = {"nofilter": "no filter", "floor": "accept-only NFQUEUE", "sapd": "sapd-nfq",
          "relay": "asyncio relay"}
#: the paths that refuse a relay attempt: the others let it through to the responder
REFUSING = ("sapd", "relay")
SHORT = {"nofilter": "no filter", "floor": "floor", "sapd": "sapd-nfq engine", "relay": "relay"}

TARGETS = {  # name: (comparison, threshold)
    "pop3_retr_ratio_vs_nofilter": (">=", 0.9),
    "smtp_upload_ratio_vs_floor": (">=", 0.7),
    "smtp_upload_ratio_vs_relay": (">=", 1.0),
    # offloads on: the daemon gets super-packets whole; the floor stays what it is
    # (netfilterqueue, no GSO flag: the kernel segments before queueing)
    "smtp_upload_ratio_vs_floor_offloads_on": (">=", 1.2),
    "smtp_upload_ratio_vs_relay_offloads_on": (">=", 1.0),
    "upload_cpu_ratio_vs_relay_offloads_on": ("<=", 1.0),
    "pop3_retr_ratio_vs_nofilter_offloads_on": (">=", 0.9),
    "sessions_ratio_vs_nofilter": (">=", 0.8),
    "sessions_ratio_vs_relay": (">=", 1.2),
    "p99_rtt_ratio_vs_relay": ("<=", 1.0),
    "session_cpu_ratio_vs_relay": ("<=", 0.8),
    # CPU per queued packet of the short sessions: the per-packet cost beside
    # the floor's, whose callback does nothing (its CPU is nearly all the
    # kernel's round trip, which sapd-nfq pays too)
    "packet_cpu_ratio_vs_floor": ("<=", 3.0),
    "rss_mb_10k_flows": ("<=", 44.0),
    "refusal_rate_ratio_vs_pass": (">=", 0.9),
    "p99_rtt_ratio_under_refusal_flood": ("<=", 1.5),
    # a second worker must not make a session dearer; its speed-up on 2 CPUs shared with
    # the load generators would measure the machine, not the daemon
    "workers2_cpu_per_session_ratio": ("<=", 1.1),
}


@dataclass(frozen=True)
class Plan:
    reps: int = 3
    mailbox_messages: int = 21
    message_size: int = 5_000_000
    upload_count: int = 4
    upload_size: int = 10_000_000
    bulk_runs: int = 3  # POP3 and upload runs per visit of a path (they are short)
    quiet_wait: float = 60.0  # seconds to wait for other load to pass before a step
    session_seconds: float = 5.0
    warmup_seconds: float = 1.0
    concurrency: tuple[int, ...] = (1, 64)
    flows: tuple[int, ...] = (0, 1000, 10000)
    scaling_concurrency: int = 64
    #: relay attempts at once beside the inbound sessions, in the flood workload
    flood_concurrency: int = 16
    paths: tuple[str, ...] = PATHS
    alternatives: bool = True

    @classmethod
    def quick(cls) -> Plan:
        return cls(reps=1, mailbox_messages=5, upload_count=2, bulk_runs=1,
                   session_seconds=2.5, warmup_seconds=0.5, quiet_wait=3.0)


# --- small helpers ---------------------------------------------------------------

class Progress:
    """One line per step: "[  3/40   0m41s] what ... result"."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    @contextmanager
    def step(self, what: str) -> Iterator[Callable[[str], None]]:
        self.done += 1
        elapsed = int(time.monotonic() - self.started)
        print(f"[{self.done:3d}/{self.total} {elapsed // 60:3d}m{elapsed % 60:02d}s] {what} ... ",
              end="", flush=True)
        said: list[str] = []
        try:
            yield said.append
        except BaseException:
            print("FAILED", flush=True)
            raise
        print(" ".join(said) or "done", flush=True)


def _ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0, 0
    return int(fields[11]), int(fields[12])


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                pass
    return out


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes and their descendants. The
    system time of a queue's reader includes the kernel's work on each packet
    it gives a verdict (the rest of its path, often the receiver's TCP too)."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = [_ticks(p) for root in pids for p in _descendants(root)]
    return sum(u for u, _ in times) / ticks, sum(s for _, s in times) / ticks


def machine_cpu() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies over all CPUs; steal is time the hypervisor took."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, values[7], sum(values)


def wait_quiet(threshold: float = 15.0, sample: float = 0.5, limit: float = 60.0) -> float:
    """Wait until the machine is nearly idle before a measurement: the lab is idle
    between steps, so CPU use now is someone else's. Returns the last busy %
    seen (recorded with the run); after `limit` seconds it goes ahead anyway."""
    deadline = time.monotonic() + limit
    while True:
        busy0, _, total0 = machine_cpu()
        time.sleep(sample)
        busy1, _, total1 = machine_cpu()
        busy = round(100 * (busy1 - busy0) / max(1, total1 - total0), 1)
        if busy < threshold or time.monotonic() > deadline:
            return busy


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


_FLUSH_CONNTRACK = """
from pyroute2 import Conntrack
table = Conntrack()
print(table.count())
table.flush()
table.close()
"""


class WorkloadFailed(RuntimeError):
    """The client side of a workload reported an error (kept in the results)."""


# --- the lab and the paths ------------------------------------------------------------

@dataclass
class PathRun:
    """A path as installed: the processes doing its work (for CPU accounting)."""

    name: str
    pids: list[int] = field(default_factory=list)
    queues: bool = False  # packets go through NFQUEUE (count them)
    config: Path | None = None  # sapd-nfq's config file
    workers: int = 1


class Bench:
    def __init__(self, plan: Plan, tmp: Path, sapd_source: Path = REPO,
                 profile_dir: Path | None = None) -> None:
        from sapd_nfq.lab import Lab, MailServer

        self.plan = plan
        self.tmp = tmp
        # The daemon may come from another source tree: how a change to it is measured.
        self.sapd_source = sapd_source
        self.sapd_env = dict(os.environ, PYTHONPATH=f"{sapd_source}:{REPO}")
        self.lab = Lab(prefix=PREFIX, state_dir=STATE_DIR, pool_size=POOL_SIZE)
        self.mail = MailServer(self.lab)
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.server = self.lab.server.ipv4
        self.failures: list[str] = []
        self.sources = list(self.lab.client.pool_ipv4)
        self.offloads_on = False
        #: where --profile puts the daemon's profiles (None: not profiled)
        self.profile_dir = profile_dir

    # -- running things in the lab --

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def run(self, host: str, argv: list[str], timeout: float = 600, sapd: bool = False) -> str:
        """Run to completion in `host`; `sapd`: with sapd-nfq from --sapd-source."""
        done = subprocess.run(self.lab.command(host, argv), cwd=self.sapd_source if sapd else REPO,
                              env=self.sapd_env if sapd else self.env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} in {host} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def spawn(self, host: str, argv: list[str], log: str, ready: str | None = None,
              stdin: bool = False, sapd: bool = False, stdout: bool = False) -> subprocess.Popen:
        """Start a background process; with `ready`, wait for that text on its stdout.

        Its stdout is a pipe with `ready`, `stdin` (a process driven by commands) or `stdout`."""
        with open(self.tmp / log, "ab") as err:
            proc = self.lab.spawn(host, argv, cwd=self.sapd_source if sapd else REPO,
                                  env=self.sapd_env if sapd else self.env, stderr=err,
                                  stdout=subprocess.PIPE if ready or stdin or stdout else subprocess.DEVNULL,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  text=True, bufsize=1)
        if ready:
            self._await_line(proc, ready, log)
        return proc

    def _await_line(self, proc: subprocess.Popen, text: str, log: str) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line = proc.stdout.readline()
                if text in line:
                    return line
                if not line and proc.poll() is not None:
                    break
        raise RuntimeError(f"{proc.args[-1]} did not say {text!r}; see {self.tmp / log}:\n"
                           + (self.tmp / log).read_text()[-2000:])

    def iptables(self, rules: str) -> None:
        done = subprocess.run(self.lab.command("gw", ["iptables-restore", "--noflush"]),
                              input=rules, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"iptables-restore failed: {done.stderr}\n{rules}")

    def queue_counters(self) -> tuple[int, int]:
        """(packets queued so far, packets dropped) over all queues in gw."""
        text = self.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"])
        packets = dropped = 0
        for line in text.splitlines():
            f = line.split()
            dropped += int(f[5]) + int(f[6])
            packets += int(f[7])
        return packets, dropped

    # -- setting up --

    def up(self) -> None:
        if self.mail.state_dir.is_mount():  # left by a run that was killed
            subprocess.run(["umount", str(self.mail.state_dir)], check=True)
        self.lab.up()
        # Postfix's queue, the maildirs and Dovecot's index in memory: the server's
        # disk is not the path under test, and its write-back timing is noise.
        self.mail.state_dir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=755", f"{PREFIX}-mail",
                        str(self.mail.state_dir)], check=True)
        self.mail.start()
        self.responder = self.spawn("server", self.python(
            "-m", "bench.responder", "--host", self.server,
            "--smtp-port", str(FAST_SMTP), "--pop3-port", str(FAST_POP3)),
            "responder.log", ready="responder listening")
        self.fill_mailbox()

    def down(self) -> None:
        try:
            if self.mail.state_dir.is_mount():
                self.mail.stop()
        finally:
            if self.mail.state_dir.is_mount():
                subprocess.run(["umount", str(self.mail.state_dir)], check=False)
            self.lab.down()

    def fill_mailbox(self) -> None:
        """bob's Maildir: `mailbox_messages` messages of `message_size` bytes (LF lines, as stored)."""
        import pwd

        vmail = pwd.getpwnam("mail")
        maildir = self.mail.maildir(MAILBOX_USER)
        line = b"m" * 79 + b"\n"
        for sub in ("", "cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for directory in (maildir.parent, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
            os.chown(directory, vmail.pw_uid, vmail.pw_gid)
        stamp = int(time.time())
        for i in range(self.plan.mailbox_messages):
            head = (f"From: <carol@external.example>\nTo: <bob@lab.example>\n"
                    f"Subject: bulk {i}\nMessage-ID: <bulk{i}@external.example>\n\n").encode()
            size = self.plan.message_size
            text = head + line * ((size - len(head)) // len(line))
            text += b"n" * (size - len(text) - 1) + b"\n"
            path = maildir / "cur" / f"{stamp}.M{i}P{os.getpid()}.bench,S={size}:2,S"
            path.write_bytes(text)
            os.chown(path, vmail.pw_uid, vmail.pw_gid)

    def offloads(self, on: bool) -> None:
        """Segmentation and GRO on every lab link, as real NICs have them, or off
        (the lab's default: MTU-sized segments with complete checksums)."""
        self.lab.set_links(offloads=on)
        self.offloads_on = on

    # -- the paths --

    @contextmanager
    def path(self, name: str, workers: int = 1, binding: str = "netfilterqueue") -> Iterator[PathRun]:
        setup = {"nofilter": self._nofilter, "floor": self._floor, "sapd": self._sapd,
                 "relay": self._relay}[name]
        try:
            with setup(workers, binding) as run:
                yield run
        finally:
            self.flush_conntrack()

    def flush_conntrack(self) -> int:
        """Empty the gateway's connection table, so that no path inherits another's
        state: a relay's REDIRECT stays on its connections after its rule is gone,
        and a client reusing such a port would be sent to a relay no longer there.
        Returns how many entries there were."""
        # In a process of its own inside gw: pyroute2 opens its netlink socket
        # lazily, so a socket made under lab.inside() could land in this namespace.
        return int(self.run("gw", self.python("-c", _FLUSH_CONNTRACK)))

    @contextmanager
    def _nofilter(self, workers: int, binding: str) -> Iterator[PathRun]:
        yield PathRun("nofilter")

    def _queue_rules(self, chain: str, target: str) -> str:
        ports = f"{SMTP_PORT},{POP3_PORT},{FAST_SMTP},{FAST_POP3}"
        return (f"*mangle\n:{chain} - [0:0]\n-A {chain} -j {target}\n"
                f"-A FORWARD -i {CLIENT_IF} -p tcp -m multiport --dports {ports} -j {chain}\n"
                f"-A FORWARD -o {CLIENT_IF} -p tcp -m multiport --sports {ports} -j {chain}\n"
                "COMMIT\n")

    @contextmanager
    def _floor(self, workers: int, binding: str) -> Iterator[PathRun]:
        procs = [self.spawn("gw", self.python("-m", "bench.floor", "--queue", str(q),
                                              "--binding", binding),
                            "floor.log", ready="floor bound") for q in range(workers)]
        target = "NFQUEUE --queue-num 0" if workers == 1 else f"NFQUEUE --queue-balance 0:{workers - 1}"
        try:
            self.iptables(self._queue_rules("BENCH_FLOOR", target))
            yield PathRun("floor", [p.pid for p in procs], queues=True)
        finally:
            self.iptables("*mangle\n-F FORWARD\n-F BENCH_FLOOR\n-X BENCH_FLOOR\nCOMMIT\n")
            for proc in procs:
                self.lab.stop(proc)

    def sapd_config(self, workers: int) -> Path:
        path = self.tmp / f"sapd-nfq-{workers}.toml"
        path.write_text(
            'mode = "forward"\n'
            f'interfaces = ["{CLIENT_IF}"]\n'
            f"smtp_ports = [{SMTP_PORT}, {FAST_SMTP}]\n"
            f"pop3_ports = [{POP3_PORT}, {FAST_POP3}]\n"
            f'virtusertable = "{REPO / "sapd_nfq/lab/provision/virtusertable"}"\n'
            f'state = "{self.tmp / "logins.sqlite"}"\n'
            f'run_dir = "{self.tmp / "run"}"\n'
            f"workers = {workers}\n")
        return path

    def sapd_status(self, config_path: Path, workers: int) -> list[dict]:
        from sapd_nfq.admin.control import request
        from sapd_nfq.wiring.config import load_config

        config = load_config(config_path)
        return [request(config, queue, "status") for queue in range(workers)]

    @contextmanager
    def _sapd(self, workers: int, binding: str) -> Iterator[PathRun]:
        from sapd_nfq.admin.control import DaemonNotRunning

        config = self.sapd_config(workers)
        if binding != "netfilterqueue":  # the engine on the alternative binding
            proc = self.spawn("gw", self.python("-m", "bench.fnfq_engine", "--config", str(config)),
                              "fnfq-engine.log", ready="engine bound", sapd=True)
            try:
                self.run("gw", self.python("-m", "sapd_nfq", "up", "--config", str(config)), sapd=True)
                yield PathRun("sapd", [proc.pid], queues=True)
            finally:
                self.run("gw", self.python("-m", "sapd_nfq", "down", "--config", str(config)),
                         sapd=True)
                self.lab.stop(proc)
            return
        proc = self.spawn("gw", self.python("-m", "sapd_nfq", "run", "--config", str(config)),
                          "sapd-nfq.log", sapd=True)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                try:
                    self.sapd_status(config, workers)
                    break
                except DaemonNotRunning:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("sapd-nfq run did not come up:\n"
                                           + (self.tmp / "sapd-nfq.log").read_text()[-2000:]) from None
                    time.sleep(0.1)
            self.run("gw", self.python("-m", "sapd_nfq", "up", "--config", str(config)),
                     sapd=True)
            yield PathRun("sapd", [proc.pid], queues=True, config=config, workers=workers)
        finally:
            self.run("gw", self.python("-m", "sapd_nfq", "down", "--config", str(config)),
                     sapd=True)
            self.lab.stop(proc)

    @contextmanager
    def _relay(self, workers: int, binding: str) -> Iterator[PathRun]:
        proc = self.spawn("gw", self.python(
            "-m", "bench.relay", "--virtusertable", str(REPO / "sapd_nfq/lab/provision/virtusertable"),
            "--smtp-port", str(RELAY_SMTP), "--pop3-port", str(RELAY_POP3)),
            "relay.log", ready="relay listening", sapd=True)  # the daemon's machines and table
        try:
            self.iptables(
                "*nat\n"
                f"-A PREROUTING -i {CLIENT_IF} -p tcp -m multiport --dports {SMTP_PORT},{FAST_SMTP}"
                f" -j REDIRECT --to-ports {RELAY_SMTP}\n"
                f"-A PREROUTING -i {CLIENT_IF} -p tcp -m multiport --dports {POP3_PORT},{FAST_POP3}"
                f" -j REDIRECT --to-ports {RELAY_POP3}\n"
                "COMMIT\n")
            yield PathRun("relay", [proc.pid])
        finally:
            self.iptables("*nat\n-F PREROUTING\nCOMMIT\n")
            self.lab.stop(proc)

    # -- one measurement --

    def measure(self, run: PathRun, argv: list[str], workload: str) -> dict:
        """Run a load subcommand in the client; add CPU use and queue counters
        (and sapd-nfq's profile with --profile)."""
        busy_before = wait_quiet(limit=self.plan.quiet_wait)
        # read before the CPU is: answering a status costs the daemon CPU of its own
        batches0 = self.verdict_batches(run)
        (user0, sys0), (busy0, steal0, total0) = cpu_seconds(run.pids), machine_cpu()
        queued0 = self.queue_counters() if run.queues else (0, 0)
        wall0 = time.monotonic()
        with self.profiled(run, workload):
            done = subprocess.run(self.lab.command("client", self.python("-m", "bench.load", *argv)),
                                  cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - wall0
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
        if "error" in result:
            raise WorkloadFailed(result["error"])
        busy1, steal1, total1 = machine_cpu()
        user1, sys1 = cpu_seconds(run.pids)
        result["path_cpu_s"] = round(user1 + sys1 - user0 - sys0, 4)
        result["path_user_s"] = round(user1 - user0, 4)
        result["path_cpu_pct"] = round(100 * result["path_cpu_s"] / wall, 1)
        result["machine_busy_pct"] = round(100 * (busy1 - busy0) / max(1, total1 - total0), 1)
        result["steal_pct"] = round(100 * (steal1 - steal0) / max(1, total1 - total0), 1)
        result["busy_before_pct"] = busy_before
        if batches0 is not None:
            batches1 = self.verdict_batches(run)
            assert batches1 is not None
            result["verdict_batches"] = batches1[0] - batches0[0]
            result["accepted"] = batches1[1] - batches0[1]
        if run.queues:
            queued1 = self.queue_counters()
            result["queued_packets"] = queued1[0] - queued0[0]
            result["queue_drops"] = queued1[1] - queued0[1]
        # The path's CPU per unit of work: the figure that does not depend on
        # how the machine's two cores were shared out.
        cpu = result["path_cpu_s"]
        if "sessions_total" in result and result["sessions_total"]:
            result["path_cpu_us_per_session"] = round(cpu * 1e6 / result["sessions_total"], 1)
        if "bytes" in result:
            result["path_cpu_ms_per_mb"] = round(cpu * 1e3 / (result["bytes"] / 1e6), 3)
        if result.get("verdict_batches"):
            result["accepts_per_batch"] = round(result["accepted"] / result["verdict_batches"], 2)
        if result.get("queued_packets"):
            result["path_cpu_us_per_packet"] = round(cpu * 1e6 / result["queued_packets"], 2)
            result["path_user_us_per_packet"] = round(result["path_user_s"] * 1e6
                                                      / result["queued_packets"], 2)
        return result

    def verdict_batches(self, run: PathRun) -> tuple[int, int] | None:
        """sapd-nfq's batch verdicts so far and the packets it accepted, over its workers."""
        if run.name != "sapd" or run.config is None:
            return None
        workers = [w for w in self.sapd_status(run.config, run.workers) if w.get("ok")]
        return (sum((w.get("receive") or {}).get("batches", 0) for w in workers),
                sum(w["verdicts"].get("accept", 0) for w in workers))

    @contextmanager
    def profiled(self, run: PathRun, workload: str) -> Iterator[None]:
        """The daemon's profile over the body, into --profile's directory (bench/pyspy.py)."""
        if self.profile_dir is None or run.name != "sapd":
            yield
            return
        stem = workload + ("-offloads" if self.offloads_on else "")
        out = self.profile_dir / f"{stem}.txt"
        rep = 1
        while out.exists():
            rep += 1
            out = self.profile_dir / f"{stem}-{rep}.txt"
        with pyspy.recording(run.pids[0], out):
            yield

    def pop3(self, run: PathRun) -> dict:
        return self.measure(run, ["pop3", "--server", self.server, "--port", str(POP3_PORT),
                                  "--user", MAILBOX_USER], "pop3")

    def upload(self, run: PathRun) -> dict:
        return self.measure(run, ["upload", "--server", self.server, "--port", str(SMTP_PORT),
                                  "--pop3-port", str(POP3_PORT), "--user", UPLOAD_USER,
                                  "--count", str(self.plan.upload_count),
                                  "--size", str(self.plan.upload_size)], "upload")

    def _sessions_argv(self, concurrency: int, seconds: float, relay: bool = False) -> list[str]:
        return ["sessions", "--server", self.server, "--port", str(FAST_SMTP),
                "--sources", ",".join(self.sources), "--concurrency", str(concurrency),
                "--duration", str(seconds), "--warmup", str(self.plan.warmup_seconds),
                *(["--relay-attempts"] if relay else [])]

    def sessions(self, run: PathRun, concurrency: int) -> dict:
        return self.measure(run, self._sessions_argv(concurrency, self.plan.session_seconds),
                            f"sessions-{concurrency}")

    def refusals(self, run: PathRun, concurrency: int) -> dict:
        """Relay attempts from addresses that never logged in, all refused at RCPT."""
        return self.measure(run, self._sessions_argv(concurrency, self.plan.session_seconds,
                                                     relay=True), f"refusals-{concurrency}")

    def under_flood(self, run: PathRun, concurrency: int) -> dict:
        """Inbound sessions while `flood_concurrency` relay attempts run beside them."""
        plan = self.plan
        flood = self.spawn("client", self.python("-m", "bench.load", *self._sessions_argv(
            plan.flood_concurrency, plan.session_seconds + 2 * plan.warmup_seconds, relay=True)),
            "flood.log", stdout=True)  # its figures are read below
        try:
            time.sleep(plan.warmup_seconds)  # the flood is under way before the measurement
            result = self.measure(run, self._sessions_argv(concurrency, plan.session_seconds),
                                  f"flood-{concurrency}")
            out, _ = flood.communicate(timeout=plan.session_seconds + 60)
        finally:
            self.lab.stop(flood)
        try:
            result["flood"] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise WorkloadFailed(f"the flood printed nothing: {out[-300:]!r}") from None
        if "error" in result["flood"] or not result["flood"].get("sessions"):
            raise WorkloadFailed(f"the flood did not run: {result['flood']}")
        return result


# --- the run ---------------------------------------------------------------------

def mb_s(result: dict) -> float:
    return result["bytes"] / result["seconds"] / 1e6


def attempt(bench: Bench, progress: Progress, what: str, store: list, work: Callable[[], dict],
            say_result: Callable[[dict], str]) -> None:
    """One step: run `work`, keep its result (or its error) in `store`."""
    with progress.step(what) as say:
        try:
            result = work()
        except WorkloadFailed as exc:
            bench.failures.append(f"{what}: {exc}")
            store.append({"error": str(exc)})
            say(f"FAILED: {exc}")
            return
        store.append(result)
        say(say_result(result))


def _bulk(r: dict) -> str:
    return f"{mb_s(r):8.1f} MB/s  (path CPU {r['path_cpu_ms_per_mb']} ms/MB)"


def _sessions(r: dict) -> str:
    return (f"{r['sessions_per_s']:8.1f} sessions/s  p50 {r['command'].get('p50_ms')} ms"
            f"  p99 {r['command'].get('p99_ms')} ms  (path CPU {r.get('path_cpu_us_per_session')}"
            " us/session)" + (f"  {r['accepts_per_batch']} accepts a batch verdict"
                              if "accepts_per_batch" in r else "")
            + (f"  errors {r['errors']}" if r["errors"] else ""))


def _flooded(r: dict) -> str:
    return _sessions(r) + f"  flood {r['flood']['sessions_per_s']} refused/s"


#: the bulk workloads' keys in the results, offloads off and on
BULK = {False: ("pop3", "upload"), True: ("pop3_offloads", "upload_offloads")}


def run_all(bench: Bench, plan: Plan, progress: Progress) -> dict:
    raw: dict = {"pop3": {}, "upload": {}, "pop3_offloads": {}, "upload_offloads": {},
                 "memory": {}, "scaling": {}, "refusals": {}, "flood": {}}
    for c in plan.concurrency:
        raw[f"sessions_{c}"] = {}
    for rep in range(plan.reps):
        # Each repetition visits the paths in a rotated order, so drift in the
        # machine's load does not always favour the same path.
        order = plan.paths[rep % len(plan.paths):] + plan.paths[:rep % len(plan.paths)]
        for name in order:
            tag = f"rep {rep + 1}/{plan.reps} {LABELS[name]:>19}"
            with bench.path(name) as run:
                for offloads, (pop3, upload) in BULK.items():
                    bench.offloads(offloads)
                    state = f"offloads {'on' if offloads else 'off'}"
                    try:
                        for _ in range(plan.bulk_runs):
                            attempt(bench, progress, f"{tag}: POP3 RETR of {plan.mailbox_messages} "
                                    f"messages, {state}", raw[pop3].setdefault(name, []),
                                    lambda: bench.pop3(run), _bulk_packets)
                        for _ in range(plan.bulk_runs):
                            attempt(bench, progress, f"{tag}: SMTP upload of {plan.upload_count} "
                                    f"x 10 MB, {state}", raw[upload].setdefault(name, []),
                                    lambda: bench.upload(run), _bulk_packets)
                    finally:
                        bench.offloads(False)
                for c in plan.concurrency:
                    attempt(bench, progress, f"{tag}: short SMTP sessions, {c} client(s)",
                            raw[f"sessions_{c}"].setdefault(name, []),
                            lambda c=c: bench.sessions(run, c), _sessions)
                if name in REFUSING:
                    top = max(plan.concurrency)
                    attempt(bench, progress, f"{tag}: relay attempts refused, {top} clients",
                            raw["refusals"].setdefault(name, []),
                            lambda top=top: bench.refusals(run, top), _sessions)
                    attempt(bench, progress, f"{tag}: {top} clients beside "
                            f"{plan.flood_concurrency} relay attempts at once",
                            raw["flood"].setdefault(name, []),
                            lambda top=top: bench.under_flood(run, top), _flooded)
    for name in ("sapd", "relay"):
        if name in plan.paths:
            raw["memory"][name] = memory(bench, plan, progress, name)
    for name in ("sapd", "floor"):
        if name in plan.paths:
            raw["scaling"][name] = scaling(bench, plan, progress, name)
    if plan.alternatives:
        if importlib.util.find_spec("fnfqueue") is None:
            bench.failures.append("alternatives skipped: fnfqueue is not installed "
                                  "(pip install '.[bench]')")
        else:
            raw["alternatives"] = alternatives(bench, plan, progress)
    return raw


def memory(bench: Bench, plan: Plan, progress: Progress, name: str) -> list[dict]:
    """RSS of the path's process with 0, 1,000, 10,000 open SMTP sessions through it."""
    points = []
    with bench.path(name) as run:
        pid = run.pids[0]
        hold = bench.spawn("client", bench.python(
            "-m", "bench.load", "hold", "--server", bench.server, "--port", str(FAST_SMTP),
            "--sources", ",".join(bench.sources)), "hold.log", stdin=True)
        try:
            for flows in plan.flows:
                with progress.step(f"memory {LABELS[name]:>19}: {flows} open sessions") as say:
                    opened = {"open": 0, "errors": {}}
                    if flows:
                        hold.stdin.write(f"open {flows}\n")
                        hold.stdin.flush()
                        opened = json.loads(hold.stdout.readline())
                    time.sleep(1.0)  # let the last packets through the path
                    point = {"flows": flows, "opened": opened["open"], "errors": opened["errors"],
                             "rss_mb": round(rss_mb(pid), 2)}
                    if name == "sapd":
                        point["tracked"] = bench.sapd_status(run.config, 1)[0]["flows_tracked"]
                    points.append(point)
                    say(f"RSS {point['rss_mb']:.1f} MB"
                        + (f", {point['tracked']} flows tracked" if "tracked" in point else ""))
        finally:
            hold.stdin.write("quit\n")
            hold.stdin.flush()
            bench.lab.stop(hold)
    base = points[0]["rss_mb"]
    for point in points[1:]:
        point["bytes_per_flow"] = round((point["rss_mb"] - base) * 2**20 / point["flows"])
    return points


def scaling(bench: Bench, plan: Plan, progress: Progress, name: str) -> dict:
    out: dict[str, list] = {}
    for rep in range(plan.reps):
        for workers in (1, 2):
            with bench.path(name, workers=workers) as run:
                attempt(bench, progress, f"scaling {LABELS[name]:>19}: {workers} worker(s), rep {rep + 1}",
                        out.setdefault(str(workers), []),
                        lambda: bench.sessions(run, plan.scaling_concurrency),
                        lambda r: f"{r['sessions_per_s']:8.1f} sessions/s  (path CPU {r['path_cpu_pct']}%"
                                  f" of a core, machine {r['machine_busy_pct']}% busy)")
    return out


#: (offloads on, path, binding) measured in the alternatives section (the main
#: table has every path on netfilterqueue, offloads off and on)
ALTERNATIVES = (
    (False, "floor", "fnfqueue-gso"), (False, "sapd", "fnfqueue-gso"),
    (True, "floor", "fnfqueue-gso"), (True, "sapd", "fnfqueue-gso"),
)


def alternatives(bench: Bench, plan: Plan, progress: Progress) -> dict:
    """The binding the user chose against fnfqueue with the GSO flag, with the lab's
    offloads off (MTU segments) and on (TSO at the senders, GRO at the gateway)."""
    out: dict = {}
    try:
        for _ in range(plan.reps):
            for offloads, name, binding in ALTERNATIVES:
                bench.offloads(offloads)
                key = f"offloads {'on' if offloads else 'off'}: {SHORT[name]}" + (
                    f", {binding}" if name != "nofilter" else "")
                runs = out.setdefault(key, {"upload": [], f"sessions_{plan.scaling_concurrency}": []})
                try:
                    with bench.path(name, binding=binding) as run:
                        attempt(bench, progress, f"alternative {key}: SMTP upload", runs["upload"],
                                lambda: bench.upload(run), _bulk_packets)
                        attempt(bench, progress, f"alternative {key}: {plan.scaling_concurrency} clients",
                                runs[f"sessions_{plan.scaling_concurrency}"],
                                lambda: bench.sessions(run, plan.scaling_concurrency), _sessions)
                except RuntimeError as exc:  # the path would not start: keep what the run has
                    bench.failures.append(f"alternative {key}: {exc}")
    finally:
        bench.offloads(False)
    return out


def _bulk_packets(r: dict) -> str:
    packets = r.get("queued_packets")
    return _bulk(r) + (f"  {packets / (r['bytes'] / 1e6):.0f} packets/MB" if packets else "")


def total_steps(plan: Plan) -> int:
    per_path = 2 * len(BULK) * plan.bulk_runs + len(plan.concurrency)
    refusal_steps = 2 * plan.reps * sum(n in plan.paths for n in REFUSING)
    memory_steps = sum(len(plan.flows) for n in ("sapd", "relay") if n in plan.paths)
    scaling_steps = sum(2 * plan.reps for n in ("sapd", "floor") if n in plan.paths)
    alternative_steps = 2 * plan.reps * len(ALTERNATIVES) if plan.alternatives else 0
    return (plan.reps * len(plan.paths) * per_path + refusal_steps + memory_steps + scaling_steps
            + alternative_steps)


# --- results ---------------------------------------------------------------------

def _figures(runs: dict[str, list[dict]], value: Callable[[dict], float | None]) -> dict:
    """{path: spread of value(run)} over the runs that succeeded and have the value."""
    out = {}
    for path, rs in runs.items():
        values = [v for r in rs if "error" not in r and (v := value(r)) is not None]
        if values:
            out[path] = spread(values)
    return out


def summarise(raw: dict, plan: Plan) -> dict:
    summary: dict = {}
    for workload in (workload for pair in BULK.values() for workload in pair):
        runs = raw.get(workload, {})
        summary[f"{workload}_mb_s"] = _figures(runs, mb_s)
        summary[f"{workload}_cpu_ms_per_mb"] = _figures(runs, lambda r: r["path_cpu_ms_per_mb"])
        summary[f"{workload}_packets_per_mb"] = _figures(runs, _packets_per_mb)
        summary[f"{workload}_cpu_us_per_packet"] = _figures(
            runs, lambda r: r.get("path_cpu_us_per_packet"))
        summary[f"{workload}_accepts_per_batch"] = _figures(runs, lambda r: r.get("accepts_per_batch"))
    for c in plan.concurrency:
        runs = raw[f"sessions_{c}"]
        summary[f"sessions_{c}_per_s"] = _figures(runs, lambda r: r["sessions_per_s"])
        for q in ("p50", "p99"):
            summary[f"sessions_{c}_{q}_ms"] = _figures(runs, lambda r, q=q: r["command"].get(f"{q}_ms"))
        summary[f"sessions_{c}_cpu_us_per_session"] = _figures(
            runs, lambda r: r.get("path_cpu_us_per_session"))
        summary[f"sessions_{c}_cpu_us_per_packet"] = _figures(
            runs, lambda r: r.get("path_cpu_us_per_packet"))
        summary[f"sessions_{c}_user_us_per_packet"] = _figures(
            runs, lambda r: r.get("path_user_us_per_packet"))
        summary[f"sessions_{c}_accepts_per_batch"] = _figures(
            runs, lambda r: r.get("accepts_per_batch"))
    top = max(plan.concurrency)
    summary[f"refusals_{top}_per_s"] = _figures(raw.get("refusals", {}),
                                                lambda r: r["sessions_per_s"])
    summary[f"refusals_{top}_cpu_us_per_session"] = _figures(
        raw.get("refusals", {}), lambda r: r.get("path_cpu_us_per_session"))
    summary[f"flood_{top}_p99_ms"] = _figures(raw.get("flood", {}),
                                              lambda r: r["command"].get("p99_ms"))
    summary[f"flood_{top}_per_s"] = _figures(raw.get("flood", {}), lambda r: r["sessions_per_s"])
    for name, runs in raw["scaling"].items():
        summary[f"scaling_{name}_per_s"] = _figures(runs, lambda r: r["sessions_per_s"])
        summary[f"scaling_{name}_cpu_us_per_session"] = _figures(
            runs, lambda r: r.get("path_cpu_us_per_session"))
    alt = raw.get("alternatives", {})
    if alt:
        key = f"sessions_{plan.scaling_concurrency}"
        summary["alternatives"] = {
            "upload_mb_s": _figures({k: v["upload"] for k, v in alt.items()}, mb_s),
            "upload_packets_per_mb": _figures({k: v["upload"] for k, v in alt.items()},
                                              _packets_per_mb),
            "upload_cpu_us_per_packet": _figures(
                {k: v["upload"] for k, v in alt.items()}, lambda r: r.get("path_cpu_us_per_packet")),
            "sessions_per_s": _figures({k: v[key] for k, v in alt.items()}, lambda r: r["sessions_per_s"]),
            "sessions_cpu_us_per_packet": _figures(
                {k: v[key] for k, v in alt.items()}, lambda r: r.get("path_cpu_us_per_packet")),
        }
    return summary


def _packets_per_mb(r: dict) -> float | None:
    return r["queued_packets"] / (r["bytes"] / 1e6) if r.get("queued_packets") else None


def _ratio(summary: dict, key: str, a: str, b: str, *, sub: str = "median") -> float | None:
    table = summary.get(key, {})
    if a not in table or b not in table or not table[b][sub]:
        return None
    return round(table[a][sub] / table[b][sub], 3)


def _ratio_of_keys(summary: dict, a: str, b: str, path: str) -> float | None:
    """One path's median under workload key `a` over its median under `b`."""
    x, y = summary.get(a, {}).get(path), summary.get(b, {}).get(path)
    if x is None or y is None or not y["median"]:
        return None
    return round(x["median"] / y["median"], 3)


def headline(summary: dict, raw: dict, plan: Plan) -> dict:
    top = max(plan.concurrency)
    memory = raw["memory"].get("sapd", [])
    at_10k = [p for p in memory if p["flows"] == max(plan.flows)]
    out = {
        "pop3_retr_ratio_vs_nofilter": _ratio(summary, "pop3_mb_s", "sapd", "nofilter"),
        "smtp_upload_ratio_vs_floor": _ratio(summary, "upload_mb_s", "sapd", "floor"),
        "smtp_upload_ratio_vs_relay": _ratio(summary, "upload_mb_s", "sapd", "relay"),
        "sessions_ratio_vs_nofilter": _ratio(summary, f"sessions_{top}_per_s", "sapd", "nofilter"),
        "sessions_ratio_vs_relay": _ratio(summary, f"sessions_{top}_per_s", "sapd", "relay"),
        "p99_rtt_ratio_vs_relay": _ratio(summary, f"sessions_{top}_p99_ms", "sapd", "relay"),
        "session_cpu_ratio_vs_relay": _ratio(summary, f"sessions_{top}_cpu_us_per_session",
                                             "sapd", "relay"),
        "packet_cpu_ratio_vs_floor": _ratio(summary, f"sessions_{top}_cpu_us_per_packet",
                                            "sapd", "floor"),
        "smtp_upload_ratio_vs_floor_offloads_on": _ratio(summary, "upload_offloads_mb_s",
                                                         "sapd", "floor"),
        "smtp_upload_ratio_vs_relay_offloads_on": _ratio(summary, "upload_offloads_mb_s",
                                                         "sapd", "relay"),
        "upload_cpu_ratio_vs_relay_offloads_on": _ratio(summary, "upload_offloads_cpu_ms_per_mb",
                                                        "sapd", "relay"),
        "pop3_retr_ratio_vs_nofilter_offloads_on": _ratio(summary, "pop3_offloads_mb_s",
                                                          "sapd", "nofilter"),
        "rss_mb_10k_flows": at_10k[0]["rss_mb"] if at_10k else None,
        "workers2_cpu_per_session_ratio": _ratio(summary, "scaling_sapd_cpu_us_per_session",
                                                 "2", "1"),
    }
    out["refusal_rate_ratio_vs_pass"] = _ratio_of_keys(
        summary, f"refusals_{top}_per_s", f"sessions_{top}_per_s", "sapd")
    out["p99_rtt_ratio_under_refusal_flood"] = _ratio_of_keys(
        summary, f"flood_{top}_p99_ms", f"sessions_{top}_p99_ms", "sapd")
    # the same ratios at one client, for the latency-bound case
    out["sessions_ratio_vs_nofilter_1_client"] = _ratio(summary, "sessions_1_per_s", "sapd", "nofilter")
    out["p99_rtt_ratio_vs_relay_1_client"] = _ratio(summary, "sessions_1_p99_ms", "sapd", "relay")
    if memory[1:]:
        out["bytes_per_flow"] = memory[-1].get("bytes_per_flow")
    return out


def targets(ratios: dict) -> dict:
    out = {}
    for name, (op, threshold) in TARGETS.items():
        value = ratios.get(name)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "target": f"{op} {threshold:g}", "met": met}
    return out


def export_rev(rev: str, into: Path) -> dict:
    """sapd_nfq/ and rules/ as committed at `rev`, unpacked into `into`."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "sapd_nfq", "rules"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return {"tree": f"git archive {rev}", "commit": commit, "modified": []}


def source_state(tree: Path) -> dict:
    """The commit the daemon ran from, and its files that differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    return {"tree": str(tree), "commit": git("rev-parse", "--short", "HEAD") or None,
            "modified": git("status", "--porcelain", "--", "sapd_nfq", "rules").splitlines()}


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _num(x: float) -> str:
    """A figure with the digits that mean something at this spread."""
    size = abs(x)
    if x == 0:
        return "0"
    return f"{x:.0f}" if size >= 100 else f"{x:.1f}" if size >= 10 else \
        f"{x:.2f}" if size >= 1 else f"{x:.3f}"


def format_table(results: dict) -> str:
    s = results["summary"]
    paths = [p for p in PATHS if p in results["plan"]["paths"]]
    rows = []
    for offloads, (pop3, upload) in BULK.items():
        state = "offloads on" if offloads else "offloads off"
        rows += [(f"POP3 RETR, {state}, MB/s", f"{pop3}_mb_s"),
                 ("  path CPU, ms per MB", f"{pop3}_cpu_ms_per_mb"),
                 (f"SMTP upload, {state}, MB/s", f"{upload}_mb_s"),
                 ("  path CPU, ms per MB", f"{upload}_cpu_ms_per_mb"),
                 ("  queued packets per MB", f"{upload}_packets_per_mb"),
                 ("  path CPU, us per packet", f"{upload}_cpu_us_per_packet"),
                 ("  accepts a batch verdict", f"{upload}_accepts_per_batch")]
    for c in results["plan"]["concurrency"]:
        rows += [(f"sessions/s, {c} client{'s' if c > 1 else ''}", f"sessions_{c}_per_s"),
                 (f"  p50 RTT ms, {c}", f"sessions_{c}_p50_ms"),
                 (f"  p99 RTT ms, {c}", f"sessions_{c}_p99_ms"),
                 (f"  path CPU, us/session, {c}", f"sessions_{c}_cpu_us_per_session"),
                 (f"  path CPU, us per packet, {c}", f"sessions_{c}_cpu_us_per_packet"),
                 (f"    of it in user space, {c}", f"sessions_{c}_user_us_per_packet"),
                 (f"  accepts a batch verdict, {c}", f"sessions_{c}_accepts_per_batch")]
    top = max(results["plan"]["concurrency"])
    rows += [(f"relay attempts refused/s, {top}", f"refusals_{top}_per_s"),
             (f"  path CPU, us/attempt, {top}", f"refusals_{top}_cpu_us_per_session"),
             (f"sessions/s beside a flood, {top}", f"flood_{top}_per_s"),
             (f"  p99 RTT ms beside a flood, {top}", f"flood_{top}_p99_ms")]
    width = 28
    lines = ["| workload | " + " | ".join(LABELS[p] for p in paths) + " |",
             "|---|" + "---:|" * len(paths)]
    for label, key in rows:
        cells = []
        for p in paths:
            v = s.get(key, {}).get(p)
            if v is None or (p == "nofilter" and "_cpu_" in key):  # no process on the gateway
                cells.append("-")
            elif v["n"] > 1 and v["min"] != v["max"]:
                cells.append(f"{_num(v['median'])} ({_num(v['min'])}-{_num(v['max'])})")
            else:
                cells.append(_num(v["median"]))
        lines.append(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    mem = results["raw"]["memory"]
    if mem:
        lines += ["", "| open sessions | " + " | ".join(f"RSS MB, {LABELS[p]}" for p in mem) + " |",
                  "|---:|" + "---:|" * len(mem)]
        for i, point in enumerate(next(iter(mem.values()))):
            cells = [f"{mem[p][i]['rss_mb']:.1f}" + (f" ({mem[p][i]['bytes_per_flow']} B/flow)"
                                                     if "bytes_per_flow" in mem[p][i] else "")
                     for p in mem]
            lines.append(f"| {point['flows']} | " + " | ".join(cells) + " |")
    for name in results["raw"]["scaling"]:
        v = s.get(f"scaling_{name}_per_s", {})
        cpu = s.get(f"scaling_{name}_cpu_us_per_session", {})
        if "1" in v and "2" in v:
            lines.append(f"\nscaling, {LABELS[name]}: 1 worker {v['1']['median']:.0f}/s, "
                         f"2 workers {v['2']['median']:.0f}/s "
                         f"(x{v['2']['median'] / v['1']['median']:.2f})"
                         + (f"; path CPU {cpu['1']['median']:.0f} and {cpu['2']['median']:.0f} "
                            "us/session" if "1" in cpu and "2" in cpu else ""))
    alt = s.get("alternatives")
    if alt:
        def cell(table: str, key: str) -> str:
            v = alt[table].get(key)
            return "-" if v is None else _num(v["median"])

        lines += ["", "| alternative | upload MB/s | packets/MB | us/packet | sessions/s | us/packet |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key in dict.fromkeys([*alt["upload_mb_s"], *alt["sessions_per_s"]]):
            lines.append(f"| {key} | {cell('upload_mb_s', key)} | {cell('upload_packets_per_mb', key)} | "
                         f"{cell('upload_cpu_us_per_packet', key)} | {cell('sessions_per_s', key)} | "
                         f"{cell('sessions_cpu_us_per_packet', key)} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    for name, t in results["targets"].items():
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        value = "-" if t["value"] is None else _num(t["value"])
        lines.append(f"| {name} | {value} | {t['target']} | {met} |")
    if results["failures"]:
        lines += ["", "failed steps (kept as errors in results.json):"]
        lines += [f"  {failure}" for failure in results["failures"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, smaller mailbox, "
                        "shorter session runs (under 5 minutes)")
    parser.add_argument("--reps", type=int, help="repetitions of each workload on each path")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    parser.add_argument("--plot", type=Path, default=BENCH / "results.png")
    parser.add_argument("--no-alternatives", action="store_true",
                        help="skip the fnfqueue/GSO alternatives section")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record sapd-nfq's profile under each workload with py-spy, into "
                             "DIR/<workload>.txt (python -m bench.pyspy FILE prints its top)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the daemon's config and logs")
    parser.add_argument("--show", type=Path, metavar="RESULTS",
                        help="print the table of an earlier results.json and redraw its plot "
                             "(to --plot); runs nothing")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sapd-source", type=Path, default=REPO, metavar="DIR",
                        help="run sapd-nfq from this source tree (to measure a change to it)")
    source.add_argument("--sapd-rev", metavar="REV",
                        help="run sapd-nfq as committed at REV (git archive), whatever the "
                             "working tree holds")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    changes: dict = {"paths": tuple(p for p in PATHS if p in args.paths.split(",")),
                     "alternatives": not args.no_alternatives}
    if args.reps:
        changes["reps"] = args.reps
    return Plan(**{**asdict(plan), **changes})


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    if args.show:
        results = json.loads(args.show.read_text())
        print(format_table(results))
        draw(results, args.plot)
        return 0
    if os.geteuid() != 0:
        print("python -m bench: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    # A stop request (SIGTERM, or SIGINT even where the shell ignores it for a
    # background job) unwinds normally, so the lab is always taken down.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    # pyroute2 forks a helper into a namespace for each netlink socket it opens there,
    # and stops it with SIGTERM when it is slow (on a busy machine): the helper must
    # die then, not unwind into this process's code and take the lab down.
    from pyroute2 import config as pyroute2_config

    pyroute2_config.disable_mp_signal = True
    info = machine_info()
    print(f"sapd-nfq benchmark, {'quick' if args.quick else 'full'} run: {plan.reps} repetition(s), "
          f"paths {', '.join(plan.paths)}; {info['cpus']} CPUs ({info['cpu_model']}), "
          f"load {info['loadavg_at_start']}", flush=True)
    if info["loadavg_at_start"][0] > 0.5:
        print("note: the machine is busy; figures will be noisy", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="sapdb-bench-"))
    if args.sapd_rev:
        sapd_source = tmp / "sapd-src"
        source = export_rev(args.sapd_rev, sapd_source)
    else:
        sapd_source = args.sapd_source.resolve()
        source = source_state(sapd_source)
    if args.profile:
        pyspy.binary()  # before the lab is up, not at the first profiled step
    bench = Bench(plan, tmp, sapd_source, args.profile)
    progress = Progress(total_steps(plan) + 1)
    started = time.time()
    finished = False
    try:
        with progress.step("lab up: namespaces, Postfix, Dovecot, responder, mailbox") as say:
            bench.up()
            say(f"{plan.mailbox_messages} x {plan.message_size / 1e6:g} MB in {MAILBOX_USER}'s mailbox")
            # Dovecot indexes the mailbox on the first login; keep that out of the figures.
            bench.pop3(PathRun("nofilter"))
        raw = run_all(bench, plan, progress)
        finished = True
    finally:
        bench.down()
        if args.keep_tmp or bench.failures or not finished:
            print(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.sapd_rev and source_state(sapd_source) != source:
        source["changed_during_run"] = True
        bench.failures.append("sapd-nfq's source changed during the run: figures mix two versions")
    summary = summarise(raw, plan)
    ratios = headline(summary, raw, plan)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "plan": asdict(plan),
        "sapd_source": source,
        **ratios,
        "targets": targets(ratios),
        "failures": bench.failures,
        "summary": summary,
        "raw": raw,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(format_table(results))
    print(f"\nwrote {args.out}")
    draw(results, args.plot)
    return 0


def draw(results: dict, out: Path) -> None:
    try:
        from .plot import plot
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot drawn")
    else:
        plot(results, out)
        print(f"wrote {out}")
