"""Cache statistics (XandRouting's ``GET /v1/models/stats``).

A *hit* is a request served by a model that was already loaded; a *miss*
one that had to wait for a load (served or not: a failed load is a miss
too).  Requests refused before they reached the scheduler (unknown model,
bad body, a full admission queue) are neither.  Counting is two integer
additions on the request path; the totals reach the state file with the
periodic flush (``flush``), off the request path, and are restored at
startup, so they survive restarts.  The figures since this start are kept
apart from the totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Counts:
    requests: int = 0
    hits: int = 0
    misses: int = 0

    def add(self, hit: bool) -> None:
        self.requests += 1
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def view(self) -> dict[str, Any]:
        return {
            "total_requests": self.requests,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "hit_rate": hit_rate(self.hits, self.misses),
        }


def hit_rate(hits: int, misses: int) -> float:
    seen = hits + misses
    return round(hits / seen, 4) if seen else 0.0


@dataclass
class CacheStats:
    since_start: dict[str, Counts] = field(default_factory=dict)
    total: dict[str, Counts] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _dirty: set[str] = field(default_factory=set)

    def restore(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """The totals a previous run left in the state file."""
        for name, row in rows.items():
            counts = Counts(
                int(row.get("requests") or 0),
                int(row.get("hits") or 0),
                int(row.get("misses") or 0),
            )
            if counts.requests:
                self.total[name] = counts

    def count(self, name: str, *, hit: bool) -> None:
        self.since_start.setdefault(name, Counts()).add(hit)
        self.total.setdefault(name, Counts()).add(hit)
        self._dirty.add(name)

    def flush(self, record: Callable[..., None]) -> None:
        """Hand the changed totals to ``record(name, requests=, hits=, misses=)``."""
        dirty, self._dirty = self._dirty, set()
        for name in sorted(dirty):
            c = self.total[name]
            record(name, requests=c.requests, hits=c.hits, misses=c.misses)

    def view(self, models: Iterable[str], active: Iterable[str]) -> dict[str, Any]:
        """XandRouting's fields (since this start), per model, and the totals
        kept across restarts."""
        known, loaded = list(models), list(active)
        now = _sum(self.since_start.values())
        ever = _sum(self.total.values())
        names = sorted(set(self.since_start) | set(self.total))
        return {
            "total_models": len(known),
            "active_models": len(loaded),
            **now.view(),
            "since": self.started_at,
            "all_time": ever.view(),
            "models": {
                name: {
                    **self.since_start.get(name, Counts()).view(),
                    "all_time": self.total.get(name, Counts()).view(),
                    "loaded": name in loaded,
                }
                for name in names
            },
        }


def _sum(counts: Iterable[Counts]) -> Counts:
    out = Counts()
    for c in counts:
        out.requests += c.requests
        out.hits += c.hits
        out.misses += c.misses
    return out
