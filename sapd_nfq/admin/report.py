"""The status, typed: what a worker reports on its control socket, and what
`sapd-nfq status`, its `--json` and the metrics endpoint read.

A worker builds a `WorkerStatus` and sends it as JSON (`as_json`); the
operator's side reads it back with `WorkerStatus.from_json` and adds what
only it can see (the rules, the kernel's queue counters) in a
`GateStatus`. The JSON is the contract of `status --json`: each field is a
key under its own name, in the order declared here. A new field is one line
here and one where the worker fills it in; give it a default, and a command
still reads the answer of a worker that does not send it yet (as during an
upgrade, before the daemon restarts).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineSeconds:
    """The histogram of the engine's time a packet."""

    buckets: tuple[int, ...]  # one count a bound, and the last for +Inf
    sum: float
    bounds: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class LearnerStatus:
    """The log learner of worker 0."""

    files: tuple[str, ...]
    lines: int
    logins: int
    sessions: int


@dataclass(frozen=True, slots=True)
class ReceiveStatus:
    """The worker's queue socket (kernel/queue_socket.py)."""

    gso: bool | None  # the kernel took the GSO flag; None before it answered
    overruns: int  # times the receive buffer was full (the kernel dropped packets)
    cut: int  # datagrams longer than the reader's buffer
    batches: int = 0  # batch verdicts sent (each accepts the plain accepts waiting)
    verdict_errors: int = 0  # verdicts the socket would not take (sent again at the next batch)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker's answer to `status`."""

    pid: int
    started: float  # epoch seconds
    queue: int
    mode: str
    config: str | None  # the config file, None for the built-in defaults
    virtusertable: str
    postfix_maps: tuple[str, ...]
    virtusertable_entries: int  # every map's entries: the virtusertable and the Postfix maps
    flows_tracked: int
    flows_evicted: int
    logins_held: int
    logins_by_source: dict[str, int]
    #: the login store's own report (logins/replica.py, `stats()`): backend,
    #: connected, pending_writes, and for a replica its errors and last sync
    store: dict[str, Any]
    decisions: dict[str, int]  # "pass", "fail", "would_fail" (monitor mode's fail)
    counters: dict[str, int]  # the engine's, and the failures the worker caught
    retained_bytes: int
    reloads: int
    reload_errors: int
    login_logs: LearnerStatus | None
    last_reload_error: str | None
    verdicts: dict[str, int]  # packets by verdict
    rows: dict[str, int]  # decisions by "verdict|row"
    logins: dict[str, int]  # logins learned on the wire, by source
    engine_seconds: EngineSeconds
    receive: ReceiveStatus | None = None  # None until the queue is bound
    enforce: bool = True  # false: monitor mode, nothing refused
    #: decisions monitor mode let by that would have refused, by reason (stats.py)
    would_refuse: dict[str, int] = field(default_factory=dict)
    #: "compiled" or "python": the engine the worker runs (sapd_nfq.ENGINE, compiled.py)
    engine: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerStatus:
        return load(cls, data)


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue as `status` sees it: its worker's answer, if one answers,
    and the kernel's counters, if a process is bound to it."""

    queue: int
    worker: WorkerStatus | None
    kernel: dict[str, int] | None
    error: str | None = None  # why no worker answered

    @property
    def running(self) -> bool:
        return self.worker is not None

    def as_json(self) -> dict[str, Any]:
        if self.worker is None:
            return {"running": False, "queue": self.queue, "error": self.error, "kernel": self.kernel}
        return {**self.worker.as_json(), "running": True, "kernel": self.kernel}


@dataclass(frozen=True, slots=True)
class GateStatus:
    """The whole picture: the rules as installed, every queue, the logins held."""

    rules: dict[str, Any]  # rules.installed(), or {"error": ...}
    queues: tuple[QueueStatus, ...]
    logins_held: int
    logins_by_source: dict[str, int] = field(default_factory=dict)
    #: why the rules may not see the mail they judge (admin/status.py's `blind`)
    blind: tuple[str, ...] = ()

    @property
    def rules_installed(self) -> bool:
        return all(f.get("installed") for f in self.rules.values() if isinstance(f, dict))

    @property
    def daemon_running(self) -> bool:
        return all(q.running for q in self.queues)

    @property
    def running(self) -> list[WorkerStatus]:
        return [q.worker for q in self.queues if q.worker is not None]

    def as_json(self) -> dict[str, Any]:
        return {"rules": self.rules, "rules_installed": self.rules_installed,
                "daemon_running": self.daemon_running, "workers": [q.as_json() for q in self.queues],
                "logins_held": self.logins_held, "logins_by_source": self.logins_by_source,
                "blind": list(self.blind)}


def load(cls: type[T], data: dict[str, Any]) -> T:
    """An instance of the dataclass `cls` from its JSON object: nested
    dataclasses built again, lists made tuples where the field is a tuple,
    a field the object lacks left at its default."""
    hints = typing.get_type_hints(cls)
    values = {f.name: _value(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls) if f.name in data}  # type: ignore[arg-type]
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if dataclasses.is_dataclass(hint):
        return load(hint, value)  # type: ignore[arg-type]
    if typing.get_origin(hint) is tuple:
        return tuple(value)
    return value
