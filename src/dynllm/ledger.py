"""VRAM books and the eviction decision.  Pure: no I/O, no logging, no clock.

The scheduler describes every model that holds VRAM (loading, ready or
stopping) as a ``Resident`` and asks ``plan`` what admitting one more model
needs.  The answer is one of four outcomes:

* ``Fits``        - enough VRAM is free now;
* ``Evict``       - stop these idle, unpinned models first (in this order);
* ``Wait``        - only busy models stand in the way: wait until they drain;
* ``Impossible``  - pinned models or the budget itself make it impossible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dynllm.config import EvictionPolicy


@dataclass(frozen=True, slots=True)
class Resident:
    name: str
    vram_mb: int
    loaded_seq: int
    """Monotonic load order: a larger number was loaded later."""
    last_used: float
    busy: bool
    """Serving a request, loading, or stopping: never a victim."""
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Fits:
    pass


@dataclass(frozen=True, slots=True)
class Evict:
    victims: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    blockers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Impossible:
    reason: str
    pinned: tuple[str, ...] = ()


Decision = Fits | Evict | Wait | Impossible


def used_mb(residents: Iterable[Resident]) -> int:
    return sum(r.vram_mb for r in residents)


def free_mb(budget_mb: int, residents: Iterable[Resident]) -> int:
    return budget_mb - used_mb(residents)


def eviction_order(residents: Iterable[Resident], policy: EvictionPolicy) -> list[Resident]:
    """Candidates first-to-evict first.  LRU: least recently used; LIFO: newest load."""
    if policy is EvictionPolicy.LIFO:
        return sorted(residents, key=lambda r: (-r.loaded_seq, r.name))
    return sorted(residents, key=lambda r: (r.last_used, r.loaded_seq, r.name))


def _take_until(need: int, free: int, ordered: Sequence[Resident]) -> list[Resident] | None:
    taken: list[Resident] = []
    for resident in ordered:
        if free >= need:
            break
        if resident.vram_mb == 0:
            continue
        taken.append(resident)
        free += resident.vram_mb
    return taken if free >= need else None


def _prune(taken: Sequence[Resident], free: int, need: int) -> list[Resident]:
    """Drop members that turned out unnecessary (a large one taken late can
    cover for small ones taken earlier); keep the order otherwise."""
    needed = list(taken)
    for candidate in taken:
        trial = [r for r in needed if r is not candidate]
        if free + used_mb(trial) >= need:
            needed = trial
    return needed


def idle_unpinned(residents: Iterable[Resident]) -> tuple[str, ...]:
    """Every resident that may be evicted now, whatever its size: what a load
    that ran out of memory despite the books evicts before its one retry (the
    books were wrong, so they cannot say how much is enough)."""
    return tuple(r.name for r in residents if not r.busy and not r.pinned)


def plan(
    need_mb: int,
    budget_mb: int,
    residents: Sequence[Resident],
    policy: EvictionPolicy,
) -> Decision:
    if need_mb > budget_mb:
        return Impossible(f"needs {need_mb} MB but the whole budget is {budget_mb} MB")
    free = free_mb(budget_mb, residents)
    if need_mb == 0 or need_mb <= free:
        return Fits()
    idle = [r for r in residents if not r.busy and not r.pinned]
    victims = _take_until(need_mb, free, eviction_order(idle, policy))
    if victims is not None:
        return Evict(tuple(r.name for r in _prune(victims, free, need_mb)))
    unpinned = [r for r in residents if not r.pinned]
    if free + used_mb(unpinned) >= need_mb:
        # Evicting every idle model is not enough: some busy ones must finish first.
        after_idle = free + used_mb(idle)
        busy = eviction_order([r for r in unpinned if r.busy], policy)
        blockers = _prune(_take_until(need_mb, after_idle, busy) or [], after_idle, need_mb)
        return Wait(tuple(r.name for r in blockers))
    pinned = tuple(sorted(r.name for r in residents if r.pinned and r.vram_mb > 0))
    return Impossible(
        f"needs {need_mb} MB but at most {free + used_mb(unpinned)} MB can be made free; "
        f"pinned models hold the rest ({', '.join(pinned)})",
        pinned,
    )
