"""One worker of `sapd-nfq run`: bind the queue, feed the engine, carry out its decisions.

The loop is the only place that touches netfilterqueue. It also watches the
config file and the virtusertable for changes, answers the control socket,
and reloads on SIGHUP. A reload that fails keeps what is running.

The loop never waits on the login store: the engine is handed a replica that
answers from memory, and a thread of its own does the store's I/O
(logins/replica.py).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

from netfilterqueue import NetfilterQueue, Packet

from .. import ENGINE
from ..admin.control import ControlServer
from ..admin.recent import Recent
from ..admin.report import LearnerStatus, ReceiveStatus, WorkerStatus
from ..admin.stats import Stats
from ..engine.core import Engine
from ..engine.counters import ENGINE_ERRORS, FAIL, LOGINS, PASS
from ..engine.errors import SapdError
from ..engine.verdicts import ACCEPT, BYPASS, DROP, Decision, Notice, carried
from ..learners.hook import HookServer
from ..learners.logs import LogLearner
from ..logins.replica import ReplicaLoginStore
from ..wiring.build import daemon_logins, load_policy, login_scope, map_files
from ..wiring.config import Config, load_config
from ..wiring.filewatch import WATCH_INTERVAL, FileWatch, Stamps, stamp
from ..wiring.logsetup import LOGGER
from .inject import Injector
from .interfaces import ClientSide, read_host
from .marks import BYPASS_MARK
from .queue_socket import QueueSocket, receive_buffer
from .rules import RuleSpec, Runner, run_local, update

#: a reload that would make local addresses non-local waits until the file
#: has held still this long. A file caught half-written reads as a shorter but
#: well-formed table, and inbound mail to the addresses it lacks would be
#: refused; a removal that takes effect late costs nothing. SIGHUP and
#: `sapd-nfq reload` apply at once: the administrator says the file is whole.
REMOVAL_SETTLE = 30.0
#: how often expired logins are deleted from memory and the store (every
#: address that ever logged in would otherwise keep a row)
PURGE_INTERVAL = 300.0
#: how often the followed login logs are read (the delay from a login to its relay)
LEARN_INTERVAL = 0.2
#: keys that change the installed rules: a reload cannot apply them
RULE_KEYS = ("mode", "smtp_ports", "pop3_ports", "imap_ports", "interfaces", "queue", "workers")

log = logging.getLogger(LOGGER)


class Worker:
    """One worker: binds queue `config.queue + worker`."""

    def __init__(self, config: Config, config_path: Path | None, worker: int = 0) -> None:
        self.config = config
        self.config_path = config_path
        self.queue = config.queue + worker
        self.logins = daemon_logins(config, log)
        self.engine = Engine(config, load_policy(config, self.logins), self.logins)
        self.injector = Injector()
        self.client_side = ClientSide(config.mode, config.interfaces)
        self.stats = Stats()
        self.recent = Recent()
        self.started = time.time()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self._watch = FileWatch(self._watch_state())
        self._stop = False
        self._reload_requested = False
        self.worker = worker
        self.learner = self._learner(config)
        self._next_learn = 0.0
        self.reader: QueueSocket | None = None
        #: runs iptables when a reload switches `enforce` (tests give their own)
        self.rules_runner: Runner = run_local

    # -- packets -----------------------------------------------------------

    def on_packet(self, pkt: Packet) -> None:
        started = time.perf_counter()
        enforce = self.config.enforce
        try:
            # Where the packet came in (its bridge port, if bridged) decides its
            # direction, never its ports.
            decision = self.engine.handle(
                pkt.get_payload(), time.time(),
                from_client_side=self.client_side(pkt.indev, pkt.physindev))
        except Exception:  # a bug must not hold the packet or open a relay
            log.exception("engine failure; packet %s", "dropped" if enforce else "passed (monitor mode)")
            self.stats.counted[ENGINE_ERRORS] += 1
            decision = Decision(DROP, reason="engine_error")
        # Monitor mode acts here, and only here: what is carried out below
        # passes the packet as it came.
        decision = carried(decision, enforce)
        self.stats.record(decision, time.perf_counter() - started, enforce)
        if decision.notices:
            self._note(decision.notices)
        reader = self.reader
        assert reader is not None, "bound in run()"
        if decision.verdict is ACCEPT and decision.packet is None and not decision.inject:
            reader.accept_later(pkt.id)  # most packets: a batch verdict gives it
            return
        reader.flush()  # the packets before it leave first
        for raw in decision.inject:
            try:
                self.injector.send(raw)
            except OSError as exc:
                log.error("cannot inject a packet: %s", exc)
        if decision.packet is not None:
            pkt.set_payload(decision.packet)
        verdict = decision.verdict
        if verdict is ACCEPT:
            pkt.accept()
        elif verdict is BYPASS:
            # NF_REPEAT with the bypass bit: the rules save it to the
            # connmark, and the rest of the flow no longer enters the queue.
            pkt.set_mark(pkt.get_mark() | BYPASS_MARK)
            pkt.repeat()
        else:
            pkt.drop()

    def _note(self, notices: tuple[Notice, ...]) -> None:
        """Log what a decision says, and keep it for `why`."""
        for notice in notices:
            (log.error if notice.event == "error" else log.info)("%s", notice)
            self.recent.note(notice, self.config.auth_ttl)

    # -- reload ------------------------------------------------------------

    def _watch_state(self) -> Stamps:
        paths: list[str | Path] = [*map_files(self.config)]
        if self.config_path is not None:
            paths.append(self.config_path)
        return tuple(stamp(p) for p in paths)

    def watch(self, now: float) -> None:
        """Look at the watched files once; reload when a change is due."""
        stamps = self._watch_state()
        held = self._watch.due(stamps, now)
        if held is not None:
            self.reload("file changed", stamps, held)

    def reload(self, why: str, stamps: Stamps | None = None, held: float | None = None) -> dict[str, Any]:
        """Re-read config and virtusertable; on any error keep the old ones.

        `stamps` are the files' stamps taken before reading (a write that lands
        while we read is seen next time), and `held` how long they had held
        still: a watched change, not a request, must have held still
        REMOVAL_SETTLE before it may make local addresses non-local.
        """
        watched = self._watch_state() if stamps is None else stamps
        try:
            config = load_config(self.config_path) if self.config_path else self.config
            changed = [k for k in RULE_KEYS if getattr(config, k) != getattr(self.config, k)]
            policy = load_policy(config, self.logins)
        except SapdError as exc:
            self._watch.seen = watched
            self.last_reload_error = str(exc)
            self.reload_errors += 1
            log.error("reload (%s) failed, keeping the running config and table: %s", why, exc)
            return {"ok": False, "error": str(exc)}
        lost = self.engine.policy.table.local_keys() - policy.table.local_keys()
        if lost and held is not None and held < REMOVAL_SETTLE:
            self._watch.hold(REMOVAL_SETTLE)
            log.warning("reload (%s) deferred: %d addresses would stop being local (%s); "
                        "applying once the files have not changed for %d s, or on `sapd-nfq reload`",
                        why, len(lost), ", ".join(sorted(lost)[:5]), REMOVAL_SETTLE)
            return {"ok": False, "deferred": sorted(lost)}
        self._watch.seen = watched
        if config.enforce != self.config.enforce:
            try:
                # the rules that run now, with the new switch: a reload changes no other rule key
                spec = RuleSpec.from_config(replace(self.config, enforce=config.enforce),
                                            read_host().bridge_ports(self.config.interfaces))
                families = update(spec, self.rules_runner)
            except (SapdError, OSError) as exc:
                self.last_reload_error = str(exc)
                self.reload_errors += 1
                log.error("reload (%s) failed, keeping the running mode: %s", why, exc)
                return {"ok": False, "error": str(exc)}
            log.warning("reload: %s; SMTP fails %s with no daemon (rules updated: %s)",
                        "enforcing" if config.enforce else "monitor mode, nothing is refused",
                        "closed" if config.enforce else "open", ", ".join(families) or "none installed")
        if config.state != self.config.state:
            log.warning("reload: 'state' changed; restart the daemon to switch login stores")
        if login_scope(config) != login_scope(self.config):
            log.warning("reload: the login prefixes changed; restart the daemon to key logins "
                        "by the new ones (until then the old ones apply)")
        if changed:
            log.warning("reload: %s changed; run `sapd-nfq up` to apply to the rules",
                        ", ".join(changed))
        if config.login_logs != self.config.login_logs:
            if self.learner is not None:
                self.learner.close()
            self.learner = self._learner(config)
        elif self.learner is not None:
            self.learner.auth_ttl = config.auth_ttl
        self.config = config
        self.engine.reconfigure(config, policy)
        self.client_side = ClientSide(config.mode, config.interfaces)
        self.reloads += 1
        self.last_reload_error = None
        log.info("reloaded (%s): %s, %d entries%s", why, ", ".join(map(str, map_files(config))),
                 len(policy.table), f", {len(lost)} no longer local" if lost else "")
        return {"ok": True, "entries": len(policy.table)}

    # -- control -----------------------------------------------------------

    def status(self) -> WorkerStatus:
        now = time.time()
        counters = self.stats.counters(self.engine.counters)
        logins = self.logins.entries(now)
        would_fail = sum(n for row, n in self.stats.rows.items() if row.startswith("would-fail|"))
        return WorkerStatus(
            pid=os.getpid(),
            started=self.started,
            queue=self.queue,
            mode=self.config.mode,
            enforce=self.config.enforce,
            config=str(self.config_path) if self.config_path else None,
            virtusertable=str(self.config.virtusertable or ""),
            postfix_maps=self.config.postfix_maps,
            virtusertable_entries=len(self.engine.policy.table),
            flows_tracked=len(self.engine.flows),
            flows_evicted=self.engine.flows.evicted,
            logins_held=len(logins),
            logins_by_source=dict(Counter(login.source for login in logins)),
            store=self.store_status(),
            # the engine counts a refusal the same in both modes; the rows say which was carried out
            decisions={"pass": counters.get(PASS, 0), "fail": counters.get(FAIL, 0) - would_fail,
                       "would_fail": would_fail},
            counters=counters,
            retained_bytes=self.engine.flows.budget.used,
            reloads=self.reloads,
            reload_errors=self.reload_errors,
            login_logs=None if self.learner is None else LearnerStatus(
                files=tuple(f.path for f in self.learner.followers),
                lines=self.learner.lines, logins=self.learner.logins,
                sessions=len(self.learner.sessions)),
            last_reload_error=self.last_reload_error,
            verdicts=dict(self.stats.verdicts),
            rows=dict(self.stats.rows),
            logins=dict(self.stats.logins),
            would_refuse=dict(self.stats.would_refuse),
            engine_seconds=self.stats.histogram(),
            receive=None if self.reader is None else ReceiveStatus(
                gso=self.reader.gso, overruns=self.reader.overruns, cut=self.reader.cut,
                batches=self.reader.batches, verdict_errors=self.reader.verdict_errors),
            engine=ENGINE.engine,
        )

    def store_status(self) -> dict[str, object]:
        if isinstance(self.logins, ReplicaLoginStore):
            return self.logins.stats()
        return {"backend": "memory", "connected": True, "pending_writes": 0}

    def why(self, address: str) -> dict[str, Any]:
        """What this worker remembers of a client, and its open window now."""
        try:
            login = self.logins.get(address, time.time())
        except ValueError:
            return {"ok": False, "error": f"not an IP address: {address!r}"}
        except SapdError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "queue": self.queue, "enforce": self.config.enforce,
                "login": None if login is None else asdict(login),
                **self.recent.about(address)}

    def control(self, command: str) -> dict[str, Any]:
        if command == "status":
            return self.status().as_json()
        if command == "reload":
            return self.reload("control request")
        if command == "logins-changed":
            # `auth add/del` wrote the store: read it now, not at the next look;
            # the ticket tells the command when that is done (status: store.reloaded)
            if isinstance(self.logins, ReplicaLoginStore):
                return {"ok": True, "ticket": self.logins.request_reload()}
            return {"ok": True}
        verb, _, argument = command.partition(" ")
        if verb == "why":
            return self.why(argument)
        return {"ok": False, "error": f"unknown command {command!r}"}

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        if isinstance(self.logins, ReplicaLoginStore):
            self.logins.start()  # the table loaded (or the store found out) before packets flow
        nfq = NetfilterQueue()
        nfq.bind(self.queue, self.on_packet, max_len=self.config.queue_maxlen,
                 sock_len=receive_buffer(self.config.queue_maxlen))
        # bind() set a copy range of 4016 bytes and no flags: the daemon sets its own
        self.reader = QueueSocket(nfq.get_fd(), self.queue)
        try:
            self.reader.configure()
        except BaseException:
            self.reader.close()
            nfq.unbind()
            raise
        self.reader.feed(nfq)  # what arrived while the kernel answered
        control = ControlServer(self.config, self.queue, self.control)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        sel = selectors.DefaultSelector()
        sel.register(nfq.get_fd(), selectors.EVENT_READ, "queue")
        sel.register(control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        # one worker serves the hook, as one follows the logs
        hook = (HookServer(self.config.login_hook, self.config.login_hook_group)
                if self.config.login_hook is not None and self.worker == 0 else None)
        if hook is not None:
            sel.register(hook, selectors.EVENT_READ, "hook")
        log.info("running: queue %d, mode %s, %d virtusertable entries, %d logins held",
                 self.queue, self.config.mode, len(self.engine.policy.table),
                 len(self.logins.entries(time.time())))
        next_watch = time.monotonic() + WATCH_INTERVAL
        next_purge = time.monotonic()
        try:
            while not self._stop:
                timeout = WATCH_INTERVAL if self.learner is None else LEARN_INTERVAL
                for key, _ in sel.select(timeout=timeout):
                    if key.data == "queue":
                        self.reader.feed(nfq)
                    elif key.data == "control":
                        control.serve_one()
                    elif key.data == "hook":
                        self._hooked(hook)
                    else:
                        try:
                            while wake_r.recv(64):
                                pass
                        except BlockingIOError:
                            pass
                if self.learner is not None:
                    self._learn()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload("SIGHUP")
                now = time.monotonic()
                if now >= next_watch:
                    next_watch = now + WATCH_INTERVAL
                    self.client_side.forget()
                    self.watch(now)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL
                    self._purge()
        finally:
            signal.set_wakeup_fd(-1)
            sel.close()
            control.close()
            if hook is not None:
                hook.close()
            self.reader.close()
            nfq.unbind()
            self.injector.close()
            if self.learner is not None:
                self.learner.close()
            self.logins.close()
            wake_r.close()
            wake_w.close()
            log.info("stopped")
        return 0

    def _learner(self, config: Config) -> LogLearner | None:
        # one worker follows the logs: the store is shared, and two would race on positions
        if not config.login_logs or self.worker != 0:
            return None
        return LogLearner(config.login_logs, self.logins, config.auth_ttl, config.run_dir)

    def _learn(self) -> None:
        assert self.learner is not None
        now = time.time()
        if now < self._next_learn:
            return
        self._next_learn = now + LEARN_INTERVAL
        try:
            learned = self.learner.poll(now)
        except Exception:  # a bug in following the logs must not stop the packet path
            log.exception("log learner failure")
            self.stats.counted[ENGINE_ERRORS] += 1
            return
        for login in learned:
            self.stats.counted[LOGINS] += 1
            notice = Notice("login", login.address, user=login.user, time=now,
                            reason=f"log:{login.server} {login.service} {login.method or ''}".rstrip())
            log.info("%s", notice)
            self.recent.note(notice, self.config.auth_ttl)

    def _hooked(self, hook: HookServer | None) -> None:
        assert hook is not None
        now = time.time()
        login = hook.serve_one(self.logins, self.config.auth_ttl, now)
        if login is not None:
            self.stats.counted[LOGINS] += 1
            notice = Notice("login", login.address, user=login.user, time=now, reason="hook")
            log.info("%s", notice)
            self.recent.note(notice, self.config.auth_ttl)

    def _purge(self) -> None:
        try:
            purged = self.logins.purge(time.time())
        except SapdError as exc:
            log.error("cannot purge expired logins: %s", exc)
            return
        if purged:
            log.debug("purged %d expired logins", purged)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop = True
