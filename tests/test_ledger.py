"""Unit tests for ``dynllm.ledger``: the VRAM books and the eviction decision.

Pure functions, so every test builds residents by hand and checks ``plan``'s
answer.  The brute-force section at the end checks invariants over every
small random scenario (seeded, deterministic) against an independent oracle.
"""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from dynllm.config import EvictionPolicy
from dynllm.ledger import (
    Evict,
    Fits,
    Impossible,
    Resident,
    Wait,
    eviction_order,
    free_mb,
    idle_unpinned,
    plan,
    used_mb,
)

LRU = EvictionPolicy.LRU
LIFO = EvictionPolicy.LIFO
BOTH = pytest.mark.parametrize("policy", [LRU, LIFO], ids=["lru", "lifo"])


def res(
    name: str,
    vram_mb: int,
    *,
    seq: int = 0,
    used: float = 0.0,
    busy: bool = False,
    pinned: bool = False,
) -> Resident:
    return Resident(
        name=name, vram_mb=vram_mb, loaded_seq=seq, last_used=used, busy=busy, pinned=pinned
    )


def names(residents: list[Resident]) -> list[str]:
    return [r.name for r in residents]


# ---- books -----------------------------------------------------------------------


def test_used_and_free_on_empty() -> None:
    assert used_mb([]) == 0
    assert free_mb(8000, []) == 8000


def test_used_and_free_sum_every_resident_whatever_its_state() -> None:
    residents = [
        res("a", 1000),
        res("b", 2000, busy=True),
        res("c", 3000, pinned=True),
        res("d", 0),
    ]
    assert used_mb(residents) == 6000
    assert free_mb(8000, residents) == 2000


def test_books_accept_any_iterable_including_generators() -> None:
    residents = [res("a", 1000), res("b", 2500)]
    assert used_mb(r for r in residents) == 3500
    assert free_mb(4000, (r for r in residents)) == 500


def test_free_can_go_negative_when_overcommitted() -> None:
    assert free_mb(1000, [res("a", 1500)]) == -500


# ---- eviction order --------------------------------------------------------------


def test_lru_orders_by_last_used_ascending() -> None:
    residents = [
        res("recent", 1, seq=1, used=30.0),
        res("oldest", 1, seq=3, used=10.0),
        res("middle", 1, seq=2, used=20.0),
    ]
    assert names(eviction_order(residents, LRU)) == ["oldest", "middle", "recent"]


def test_lru_ties_on_last_used_break_by_load_order_then_name() -> None:
    residents = [
        res("late", 1, seq=5, used=10.0),
        res("early", 1, seq=1, used=10.0),
        res("zz", 1, seq=3, used=10.0),
        res("aa", 1, seq=3, used=10.0),
        res("least_recent", 1, seq=9, used=1.0),
    ]
    assert names(eviction_order(residents, LRU)) == ["least_recent", "early", "aa", "zz", "late"]


def test_lifo_orders_by_load_order_descending_ignoring_last_used() -> None:
    residents = [
        res("first", 1, seq=1, used=99.0),
        res("third", 1, seq=3, used=1.0),
        res("second", 1, seq=2, used=50.0),
    ]
    assert names(eviction_order(residents, LIFO)) == ["third", "second", "first"]


def test_lifo_ties_on_load_order_break_by_name() -> None:
    residents = [res("b", 1, seq=2), res("a", 1, seq=2), res("c", 1, seq=1)]
    assert names(eviction_order(residents, LIFO)) == ["a", "b", "c"]


@BOTH
def test_eviction_order_of_nothing_is_empty(policy: EvictionPolicy) -> None:
    assert eviction_order([], policy) == []


@BOTH
def test_eviction_order_does_not_depend_on_input_order(policy: EvictionPolicy) -> None:
    residents = [res(f"m{i}", 1, seq=i % 3, used=float(i % 2)) for i in range(6)]
    expected = names(eviction_order(residents, policy))
    rng = random.Random(1234)
    for _ in range(20):
        shuffled = residents[:]
        rng.shuffle(shuffled)
        assert names(eviction_order(shuffled, policy)) == expected


@BOTH
def test_eviction_order_keeps_every_resident_and_does_not_mutate_input(
    policy: EvictionPolicy,
) -> None:
    residents = [res("x", 1, seq=2), res("y", 1, seq=1), res("z", 1, seq=3)]
    before = list(residents)
    ordered = eviction_order(residents, policy)
    assert sorted(names(ordered)) == ["x", "y", "z"]
    assert residents == before


# ---- plan: Fits ------------------------------------------------------------------


@BOTH
def test_empty_residents_fit_up_to_the_whole_budget(policy: EvictionPolicy) -> None:
    assert plan(8000, 8000, [], policy) == Fits()
    assert plan(1, 8000, [], policy) == Fits()


@BOTH
def test_fits_exactly_at_the_boundary(policy: EvictionPolicy) -> None:
    residents = [res("a", 3000), res("b", 2000, busy=True), res("c", 1000, pinned=True)]
    # 6000 used of 8000: exactly 2000 free.
    assert plan(2000, 8000, residents, policy) == Fits()


@BOTH
def test_one_mb_over_the_boundary_does_not_fit(policy: EvictionPolicy) -> None:
    residents = [res("a", 3000), res("b", 2000, busy=True), res("c", 1000, pinned=True)]
    assert plan(2001, 8000, residents, policy) == Evict(("a",))


@BOTH
def test_need_zero_fits(policy: EvictionPolicy) -> None:
    assert plan(0, 8000, [], policy) == Fits()
    assert plan(0, 0, [], policy) == Fits()
    full = [res("a", 5000, busy=True), res("b", 3000, pinned=True)]
    assert plan(0, 8000, full, policy) == Fits()


@BOTH
def test_fits_never_touches_busy_or_pinned_models(policy: EvictionPolicy) -> None:
    residents = [res("a", 1000, busy=True), res("b", 1000, pinned=True, busy=True)]
    assert plan(6000, 8000, residents, policy) == Fits()


# ---- plan: Evict -----------------------------------------------------------------


@BOTH
def test_two_6000_mb_models_in_8000_mb_evict_the_idle_one(policy: EvictionPolicy) -> None:
    a = res("A", 6000, seq=1, used=1.0)
    assert plan(6000, 8000, [a], policy) == Evict(("A",))


@BOTH
def test_two_6000_mb_models_in_8000_mb_wait_for_the_busy_one(policy: EvictionPolicy) -> None:
    a = res("A", 6000, seq=1, used=1.0, busy=True)
    assert plan(6000, 8000, [a], policy) == Wait(("A",))


@BOTH
def test_two_6000_mb_models_in_8000_mb_impossible_when_pinned(policy: EvictionPolicy) -> None:
    a = res("A", 6000, seq=1, used=1.0, pinned=True)
    decision = plan(6000, 8000, [a], policy)
    assert isinstance(decision, Impossible)
    assert decision.pinned == ("A",)


def test_lru_evicts_the_least_recently_used() -> None:
    residents = [
        res("old_load_recent_use", 3000, seq=1, used=50.0),
        res("new_load_stale_use", 3000, seq=2, used=10.0),
    ]
    assert plan(3000, 7000, residents, LRU) == Evict(("new_load_stale_use",))


def test_lifo_evicts_the_most_recently_loaded() -> None:
    residents = [
        res("old_load_recent_use", 3000, seq=1, used=50.0),
        res("new_load_stale_use", 3000, seq=2, used=10.0),
    ]
    assert plan(3000, 7000, residents, LIFO) == Evict(("new_load_stale_use",))


def test_lru_and_lifo_choose_different_victims_for_the_same_residents() -> None:
    # A was loaded first but is stale; B was loaded last and used recently.
    residents = [res("A", 4000, seq=1, used=10.0), res("B", 4000, seq=2, used=90.0)]
    assert plan(4000, 8000, residents, LRU) == Evict(("A",))
    assert plan(4000, 8000, residents, LIFO) == Evict(("B",))


def test_lru_tie_on_last_used_evicts_the_earlier_load() -> None:
    residents = [res("later", 4000, seq=2, used=5.0), res("earlier", 4000, seq=1, used=5.0)]
    assert plan(4000, 8000, residents, LRU) == Evict(("earlier",))


def test_lifo_tie_on_load_order_evicts_by_name() -> None:
    residents = [res("b", 4000, seq=7), res("a", 4000, seq=7)]
    assert plan(4000, 8000, residents, LIFO) == Evict(("a",))


@BOTH
def test_evicts_only_as_many_as_needed_in_policy_order(policy: EvictionPolicy) -> None:
    # The same seq/used order under both policies: d first, then c, b, a.
    residents = [
        res("a", 1000, seq=1, used=4.0),
        res("b", 1000, seq=2, used=3.0),
        res("c", 1000, seq=3, used=2.0),
        res("d", 1000, seq=4, used=1.0),
    ]
    # budget 4500: 500 free.
    assert plan(1500, 4500, residents, policy) == Evict(("d",))
    assert plan(2500, 4500, residents, policy) == Evict(("d", "c"))
    assert plan(3500, 4500, residents, policy) == Evict(("d", "c", "b"))
    assert plan(4500, 4500, residents, policy) == Evict(("d", "c", "b", "a"))


def test_large_late_victim_covers_for_small_early_ones_lru() -> None:
    residents = [
        res("small1", 1000, seq=1, used=1.0),
        res("small2", 1000, seq=2, used=2.0),
        res("big", 5000, seq=3, used=3.0),
    ]
    # 7000 used of 8000 -> 1000 free; need 6000 -> 5000 must be freed.
    # The policy prefix is small1, small2, big, but big alone is enough.
    assert plan(6000, 8000, residents, LRU) == Evict(("big",))


def test_large_late_victim_covers_for_small_early_ones_lifo() -> None:
    residents = [
        res("big", 5000, seq=1),
        res("small1", 1000, seq=2),
        res("small2", 1000, seq=3),
    ]
    assert plan(6000, 8000, residents, LIFO) == Evict(("big",))


def test_pruning_keeps_the_needed_early_victims_and_drops_the_rest() -> None:
    residents = [
        res("a", 1000, seq=1, used=1.0),
        res("b", 2000, seq=2, used=2.0),
        res("c", 3000, seq=3, used=3.0),
    ]
    # 6000 used of 6000; need 5000: prefix a, b, c (6000); a is unnecessary.
    assert plan(5000, 6000, residents, LRU) == Evict(("b", "c"))


def test_victims_keep_policy_order_after_pruning() -> None:
    residents = [
        res("a", 500, seq=1, used=1.0),
        res("b", 3000, seq=2, used=2.0),
        res("c", 500, seq=3, used=3.0),
        res("d", 4000, seq=4, used=4.0),
    ]
    # 8000 used of 8000, need 7000: the prefix is a, b, c, d (8000 freed).
    # Without a: 7500, enough -> drop a.  Without b: 4500 -> keep b.
    # Without c: 7000, enough -> drop c.  Without d: 3000 -> keep d.
    assert plan(7000, 8000, residents, LRU) == Evict(("b", "d"))


@BOTH
def test_busy_and_pinned_are_never_victims(policy: EvictionPolicy) -> None:
    residents = [
        res("busy", 4000, seq=3, used=0.0, busy=True),
        res("pinned", 4000, seq=2, used=0.0, pinned=True),
        res("idle", 2000, seq=1, used=99.0),
    ]
    # 10000 used of 10000; need 2000: only "idle" may go, whatever its rank.
    assert plan(2000, 10000, residents, policy) == Evict(("idle",))


@BOTH
def test_pinned_idle_model_is_not_a_victim_even_when_first_in_order(
    policy: EvictionPolicy,
) -> None:
    residents = [res("p", 3000, seq=9, used=0.0, pinned=True), res("i", 3000, seq=1, used=9.0)]
    assert plan(3000, 6000, residents, policy) == Evict(("i",))


@BOTH
def test_zero_vram_residents_are_never_victims(policy: EvictionPolicy) -> None:
    residents = [
        res("cpu1", 0, seq=5, used=0.0),
        res("cpu2", 0, seq=4, used=0.5),
        res("gpu", 3000, seq=1, used=9.0),
    ]
    assert plan(3000, 3000, residents, policy) == Evict(("gpu",))


@BOTH
def test_zero_vram_residents_alone_cannot_make_room(policy: EvictionPolicy) -> None:
    residents = [res("cpu", 0), res("gpu", 4000, busy=True)]
    assert plan(1000, 4000, residents, policy) == Wait(("gpu",))


# ---- plan: Wait ------------------------------------------------------------------


@BOTH
def test_wait_when_idle_victims_are_not_enough_but_busy_ones_would_be(
    policy: EvictionPolicy,
) -> None:
    residents = [res("idle", 1000, seq=1, used=1.0), res("busy", 5000, seq=2, used=2.0, busy=True)]
    # 6000 of 6000 used; need 4000: idle frees 1000 only.
    assert plan(4000, 6000, residents, policy) == Wait(("busy",))


@BOTH
def test_wait_lists_only_busy_models_never_idle_or_pinned(policy: EvictionPolicy) -> None:
    residents = [
        res("idle", 1000, seq=1, used=1.0),
        res("busy", 3000, seq=2, used=2.0, busy=True),
        res("pinned", 2000, seq=3, used=3.0, pinned=True),
    ]
    decision = plan(4000, 6000, residents, policy)
    assert decision == Wait(("busy",))


@BOTH
def test_wait_ignores_busy_models_that_are_not_needed(policy: EvictionPolicy) -> None:
    # Idle frees 2000 of the 3000 needed; each busy model alone covers the
    # rest, so exactly one (the first in policy order) is a blocker.
    residents = [
        res("idle", 2000, seq=1, used=1.0),
        res("b1", 1000, seq=2, used=2.0, busy=True),
        res("b2", 1000, seq=3, used=3.0, busy=True),
    ]
    expected = "b1" if policy is LRU else "b2"
    assert plan(3000, 4000, residents, policy) == Wait((expected,))


@BOTH
def test_wait_lists_several_blockers_when_one_is_not_enough(policy: EvictionPolicy) -> None:
    residents = [
        res("b1", 2000, seq=1, used=1.0, busy=True),
        res("b2", 2000, seq=2, used=2.0, busy=True),
        res("b3", 2000, seq=3, used=3.0, busy=True),
    ]
    decision = plan(4000, 6000, residents, policy)
    assert isinstance(decision, Wait)
    expected = ("b1", "b2") if policy is LRU else ("b3", "b2")
    assert decision.blockers == expected


@BOTH
def test_busy_pinned_model_is_not_a_blocker(policy: EvictionPolicy) -> None:
    residents = [
        res("pinned_busy", 3000, seq=1, used=0.0, busy=True, pinned=True),
        res("busy", 3000, seq=2, used=1.0, busy=True),
    ]
    assert plan(3000, 6000, residents, policy) == Wait(("busy",))


@BOTH
def test_wait_blockers_are_minimal(policy: EvictionPolicy) -> None:
    """A busy model whose VRAM is not needed does not stand in the way.

    ``small`` comes first in both policy orders but cannot cover the need on
    its own; ``big`` alone covers it.  Waiting for ``small`` to drain buys
    nothing, so ``big`` is the only blocker (the same pruning as for Evict).
    """
    residents = [
        res("idle", 1000, seq=3, used=1.0),
        res("small", 500, seq=2, used=2.0, busy=True),
        res("big", 5000, seq=1, used=3.0, busy=True),
        res("pin", 1000, seq=0, used=0.0, pinned=True),
    ]
    # budget 8000, used 7500 -> 500 free; need 3000.
    # idle: 500 + 1000 = 1500 < 3000; all unpinned: 7000 >= 3000 -> Wait.
    assert plan(3000, 8000, residents, policy) == Wait(("big",))


# ---- plan: Impossible ------------------------------------------------------------


@BOTH
def test_need_larger_than_budget_is_impossible(policy: EvictionPolicy) -> None:
    decision = plan(8001, 8000, [], policy)
    assert isinstance(decision, Impossible)
    assert decision.pinned == ()
    assert "8001" in decision.reason
    assert "8000" in decision.reason
    assert "budget" in decision.reason


@BOTH
def test_need_larger_than_budget_is_impossible_even_with_pinned_residents(
    policy: EvictionPolicy,
) -> None:
    decision = plan(9000, 8000, [res("p", 1000, pinned=True)], policy)
    assert isinstance(decision, Impossible)
    assert decision.pinned == ()  # the budget, not the pin, is the reason


@BOTH
def test_zero_budget_is_impossible_for_any_positive_need(policy: EvictionPolicy) -> None:
    assert isinstance(plan(1, 0, [], policy), Impossible)


@BOTH
def test_pinned_models_make_it_impossible_and_are_named(policy: EvictionPolicy) -> None:
    residents = [
        res("zeta", 3000, pinned=True),
        res("alpha", 3000, pinned=True, busy=True),
        res("idle", 1000),
        res("busy", 500, busy=True),
    ]
    # budget 8000, 7500 used; all unpinned give 500 + 1500 = 2000 < 3000.
    decision = plan(3000, 8000, residents, policy)
    assert isinstance(decision, Impossible)
    assert decision.pinned == ("alpha", "zeta")
    assert "alpha" in decision.reason and "zeta" in decision.reason
    assert "3000" in decision.reason
    assert "2000" in decision.reason  # what could be freed at most
    assert "pinned" in decision.reason


@BOTH
def test_pinned_boundary_exactly_enough_is_not_impossible(policy: EvictionPolicy) -> None:
    residents = [res("pin", 4000, pinned=True), res("idle", 4000)]
    assert plan(4000, 8000, residents, policy) == Evict(("idle",))
    assert isinstance(plan(4001, 8000, residents, policy), Impossible)


# ---- plan: general properties ----------------------------------------------------


@BOTH
def test_plan_does_not_mutate_residents(policy: EvictionPolicy) -> None:
    residents = [res("b", 3000, seq=2), res("a", 3000, seq=1, busy=True)]
    before = list(residents)
    plan(5000, 6000, residents, policy)
    assert residents == before


@BOTH
def test_plan_accepts_a_tuple(policy: EvictionPolicy) -> None:
    residents = (res("a", 4000),)
    assert plan(4000, 4000, residents, policy) == Evict(("a",))


# ---- brute force over small random scenarios -------------------------------------

_VRAM_CHOICES = (0, 500, 1000, 1500, 2000, 3000, 4000, 6000)


def _scenarios(count: int, seed: int) -> list[tuple[int, int, list[Resident]]]:
    """(need_mb, budget_mb, residents) with at most 5 residents, books not overcommitted."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(0, 5)
        residents = []
        for i in range(n):
            r = rng.random()
            residents.append(
                Resident(
                    name=f"m{i}",
                    vram_mb=rng.choice(_VRAM_CHOICES),
                    loaded_seq=rng.randint(0, 3),  # ties on purpose
                    last_used=float(rng.randint(0, 3)),
                    busy=r < 0.3,
                    pinned=0.3 <= r < 0.45 or (r < 0.05),  # some busy+pinned too
                )
            )
        budget = used_mb(residents) + rng.choice((0, 0, 500, 1000, 3000))
        need = rng.choice((0, 500, 1000, 2000, 3000, 4000, 6000, 8000, budget, budget + 1))
        out.append((need, budget, residents))
    return out


_SCENARIOS = _scenarios(3000, seed=20240611)


def _sum(residents: list[Resident]) -> int:
    return sum(r.vram_mb for r in residents)


def _check(need: int, budget: int, residents: list[Resident], policy: EvictionPolicy) -> None:
    by_name = {r.name: r for r in residents}
    free = budget - _sum(residents)
    idle = [r for r in residents if not r.busy and not r.pinned]
    unpinned = [r for r in residents if not r.pinned]
    decision = plan(need, budget, residents, policy)
    context = f"need={need} budget={budget} policy={policy} residents={residents}"

    if need > budget:
        assert isinstance(decision, Impossible), context
        assert decision.pinned == (), context
        return
    if need <= free:
        assert decision == Fits(), context
        return
    if free + _sum(idle) >= need:
        assert isinstance(decision, Evict), context
        victims = [by_name[n] for n in decision.victims]
        assert len(set(decision.victims)) == len(victims), context
        # Only idle, unpinned models holding VRAM.
        assert all(not v.busy and not v.pinned and v.vram_mb > 0 for v in victims), context
        # After the eviction the model fits.
        assert free + _sum(victims) >= need, context
        # Minimal: no strict subset would also fit (ledger.plan prunes for this).
        for k in range(len(victims)):
            for subset in combinations(victims, k):
                assert free + _sum(list(subset)) < need, (context, subset)
        # Drawn from the shortest prefix of the policy order, kept in that order.
        order = [r for r in eviction_order(idle, policy) if r.vram_mb > 0]
        prefix: list[Resident] = []
        for r in order:
            if free + _sum(prefix) >= need:
                break
            prefix.append(r)
        prefix_names = [r.name for r in prefix]
        assert set(decision.victims) <= set(prefix_names), context
        assert list(decision.victims) == [n for n in prefix_names if n in decision.victims]
        return
    if free + _sum(unpinned) >= need:
        assert isinstance(decision, Wait), context
        blockers = [by_name[n] for n in decision.blockers]
        assert blockers, context
        assert len(set(decision.blockers)) == len(blockers), context
        assert all(b.busy and not b.pinned and b.vram_mb > 0 for b in blockers), context
        # Once the blockers drain, evicting every idle model and them is enough.
        assert free + _sum(idle) + _sum(blockers) >= need, context
        return
    assert isinstance(decision, Impossible), context
    # Only pinned models that hold VRAM stand in the way.
    assert decision.pinned == tuple(sorted(r.name for r in residents if r.pinned and r.vram_mb)), (
        context
    )
    for name in decision.pinned:
        assert name in decision.reason, context


@BOTH
def test_brute_force_invariants(policy: EvictionPolicy) -> None:
    kinds: dict[type, int] = {}
    for need, budget, residents in _SCENARIOS:
        _check(need, budget, residents, policy)
        kind = type(plan(need, budget, residents, policy))
        kinds[kind] = kinds.get(kind, 0) + 1
    # The generator really exercises every outcome.
    assert set(kinds) == {Fits, Evict, Wait, Impossible}, kinds
    assert min(kinds.values()) >= 50, kinds


@BOTH
def test_brute_force_decision_does_not_depend_on_resident_order(policy: EvictionPolicy) -> None:
    rng = random.Random(7)
    for need, budget, residents in _SCENARIOS[:1000]:
        expected = plan(need, budget, residents, policy)
        shuffled = residents[:]
        rng.shuffle(shuffled)
        assert plan(need, budget, shuffled, policy) == expected


@BOTH
def test_brute_force_evict_victims_are_minimal_by_exhaustive_search(
    policy: EvictionPolicy,
) -> None:
    """Cross-check minimality with a search over every subset of the idle models."""
    for need, budget, residents in _SCENARIOS:
        decision = plan(need, budget, residents, policy)
        if not isinstance(decision, Evict):
            continue
        free = budget - _sum(residents)
        idle = [r for r in residents if not r.busy and not r.pinned]
        chosen = frozenset(decision.victims)
        fitting = [
            frozenset(r.name for r in subset)
            for k in range(len(idle) + 1)
            for subset in combinations(idle, k)
            if free + _sum(list(subset)) >= need
        ]
        assert chosen in fitting
        assert not any(other < chosen for other in fitting)


@BOTH
def test_brute_force_wait_blockers_are_minimal(policy: EvictionPolicy) -> None:
    """No busy model is named a blocker unless waiting for it is needed.

    With every idle model evicted, the blockers cover the need and no strict
    subset of them would (see ``test_wait_blockers_are_minimal``).
    """
    for need, budget, residents in _SCENARIOS:
        decision = plan(need, budget, residents, policy)
        if not isinstance(decision, Wait):
            continue
        free = budget - _sum(residents)
        idle_total = _sum([r for r in residents if not r.busy and not r.pinned])
        by_name = {r.name: r for r in residents}
        blockers = [by_name[n] for n in decision.blockers]
        context = f"need={need} budget={budget} policy={policy} residents={residents}"
        assert free + idle_total + _sum(blockers) >= need, context
        for k in range(len(blockers)):
            for subset in combinations(blockers, k):
                assert free + idle_total + _sum(list(subset)) < need, (context, subset)


def test_idle_unpinned_names_every_evictable_resident_whatever_its_size() -> None:
    """What a load that ran out of memory evicts before its one retry: the
    books were wrong, so every idle unpinned model goes, 0 MB ones too."""
    residents = [
        res("idle", 3000),
        res("zero", 0),
        res("busy", 3000, busy=True),
        res("pinned", 1000, pinned=True),
    ]
    assert idle_unpinned(residents) == ("idle", "zero")
    assert idle_unpinned([]) == ()
