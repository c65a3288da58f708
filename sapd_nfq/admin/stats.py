"""A worker's tallies beyond the engine's counters, for `status` and the
metrics endpoint: packets by verdict, decisions by table row, logins by
source, refusals monitor mode did not carry out by reason, a histogram of
the engine's time a packet, and what the worker counts itself (the engine's
counters are the engine's to write)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from ..engine.verdicts import Decision, Notice, Verdict
from .report import EngineSeconds

#: upper bounds, in seconds, of the engine-time histogram's buckets (+Inf last)
ENGINE_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1)


class Stats:
    __slots__ = ("_verdicts", "rows", "logins", "would_refuse", "buckets", "engine_seconds", "counted")

    def __init__(self) -> None:
        # by the verdict's name, read as the plain attribute `_value_`: a
        # packet costs a dict increment (Enum's `value` and hash are Python calls)
        self._verdicts = dict.fromkeys((verdict.value for verdict in Verdict), 0)
        self.rows: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        #: decisions monitor mode let by that would have dropped, rewritten or
        #: answered, by reason (a WOULD-FAIL's row is in `rows`)
        self.would_refuse: Counter[str] = Counter()
        self.buckets = [0] * (len(ENGINE_BUCKETS) + 1)
        self.engine_seconds = 0.0
        #: counted by the worker under the engine's counter names (engine/counters.py):
        #: ENGINE_ERRORS (a failure it caught), LOGINS (learned from a log or the hook)
        self.counted: Counter[str] = Counter()

    def record(self, decision: Decision, seconds: float, enforce: bool = True) -> None:
        """Count a decision as carried out (verdicts.carried)."""
        self._verdicts[decision.verdict._value_] += 1
        self.buckets[bisect_left(ENGINE_BUCKETS, seconds)] += 1
        self.engine_seconds += seconds
        if decision.reason is not None and not enforce:
            self.would_refuse[decision.reason] += 1
        if decision.notices:
            self._count(decision.notices)

    def _count(self, notices: tuple[Notice, ...]) -> None:
        for notice in notices:
            if notice.row is not None:
                self.rows[f"{notice.event}|{notice.row}"] += 1
            elif notice.event == "login":
                self.logins[notice.source] += 1

    @property
    def verdicts(self) -> dict[str, int]:
        """Packets by verdict, by its name."""
        return {verdict: n for verdict, n in self._verdicts.items() if n}

    def counters(self, engine: Counter[str]) -> dict[str, int]:
        """The engine's counters with the worker's own added."""
        return dict(engine + self.counted)

    def histogram(self) -> EngineSeconds:
        return EngineSeconds(tuple(self.buckets), self.engine_seconds, ENGINE_BUCKETS)
