"""A worker's tallies beyond the engine's counters, for `status` and the
metrics endpoint: packets by verdict, decisions by table row, logins by
source, and a histogram of the engine's time a packet."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

from ..engine.verdicts import Decision

#: upper bounds, in seconds, of the engine-time histogram's buckets (+Inf last)
ENGINE_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1)


class Stats:
    __slots__ = ("verdicts", "rows", "logins", "buckets", "engine_seconds")

    def __init__(self) -> None:
        self.verdicts: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        self.buckets = [0] * (len(ENGINE_BUCKETS) + 1)
        self.engine_seconds = 0.0

    def record(self, decision: Decision, seconds: float) -> None:
        self.verdicts[decision.verdict.value] += 1
        self.buckets[bisect_left(ENGINE_BUCKETS, seconds)] += 1
        self.engine_seconds += seconds
        for notice in decision.notices:
            if notice.row is not None:
                self.rows[f"{notice.event}|{notice.row}"] += 1
            elif notice.event == "login":
                self.logins[(notice.reason or "").split(" ")[0]] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"verdicts": dict(self.verdicts), "rows": dict(self.rows), "logins": dict(self.logins),
                "engine_seconds": {"buckets": list(self.buckets), "sum": self.engine_seconds,
                                   "bounds": list(ENGINE_BUCKETS)}}
