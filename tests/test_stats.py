"""Cache statistics, pure: counting, the view, flushing and restoring."""

from __future__ import annotations

import sys
from typing import Any

from dynllm.stats import CacheStats, hit_rate
from tests.conftest import ConfigFactory, serve
from tests.test_dispatch import fake_model


def test_hits_misses_and_rates_since_start_and_all_time() -> None:
    previous = CacheStats()
    for hit in (False, True, True):
        previous.count("a", hit=hit)
    written: dict[str, dict[str, Any]] = {}
    previous.flush(lambda name, **fields: written.setdefault(name, {}).update(fields))
    assert written == {"a": {"requests": 3, "hits": 2, "misses": 1}}

    stats = CacheStats()
    stats.restore({**written, "never": {"requests": 0, "hits": 0, "misses": 0}})
    stats.count("a", hit=False)
    for _ in range(3):
        stats.count("b", hit=True)
    view = stats.view(["a", "b", "c"], ["b"])
    assert (view["total_models"], view["active_models"]) == (3, 1)
    assert (view["total_requests"], view["cache_hits"], view["cache_misses"]) == (4, 3, 1)
    assert view["hit_rate"] == 0.75
    assert view["all_time"] == {
        "total_requests": 7, "cache_hits": 5, "cache_misses": 2, "hit_rate": round(5 / 7, 4)
    }  # fmt: skip
    assert view["models"]["a"]["all_time"]["total_requests"] == 4
    assert view["models"]["b"]["loaded"] is True
    assert "never" not in view["models"]


def test_flush_hands_over_only_what_changed() -> None:
    stats = CacheStats()
    stats.count("a", hit=True)
    seen: list[str] = []
    stats.flush(lambda name, **fields: seen.append(name))
    stats.flush(lambda name, **fields: seen.append(name))
    stats.count("b", hit=True)
    stats.flush(lambda name, **fields: seen.append(name))
    assert seen == ["a", "b"]


def test_no_requests_is_a_rate_of_zero_not_an_error() -> None:
    assert hit_rate(0, 0) == 0.0
    assert CacheStats().view([], [])["hit_rate"] == 0.0


async def test_totals_survive_a_restart_and_since_start_begins_again(
    make_config: ConfigFactory,
) -> None:
    config = make_config([fake_model("m")], enabled_backends=["llamacpp", "command"])
    async with serve(config) as app:
        for _ in range(3):
            assert (await app.chat("m")).status_code == 200
        unknown = await app.chat("nope")
        assert unknown.status_code == 404  # refused before the scheduler: neither
        first = (await app.client.get("/v1/models/stats")).json()
        assert (first["cache_misses"], first["cache_hits"]) == (1, 2)
    async with serve(config) as app:  # the same state file
        assert (await app.chat("m")).status_code == 200
        again = (await app.client.get("/v1/models/stats")).json()
    print("after a restart:", again["all_time"], "since start:", again["total_requests"])
    assert (again["total_requests"], again["cache_misses"]) == (1, 1)
    assert again["all_time"] == {
        "total_requests": 4, "cache_hits": 2, "cache_misses": 2, "hit_rate": 0.5
    }  # fmt: skip


async def test_a_failed_load_is_a_miss_and_a_cooldown_refusal_is_neither(
    make_config: ConfigFactory,
) -> None:
    broken = fake_model("broken")
    broken["command"] = [sys.executable, "-c", "import sys; sys.exit(3)"]
    config = make_config([broken], enabled_backends=["command"], load_failure_cooldown_seconds=60)
    async with serve(config) as app:
        first = await app.chat("broken")
        assert first.status_code == 502, first.text
        cooling = await app.chat("broken")
        assert cooling.status_code == 503 and cooling.json()["error"]["code"] == "load_cooldown"
        stats = (await app.client.get("/v1/models/stats")).json()
    assert (stats["total_requests"], stats["cache_misses"], stats["cache_hits"]) == (1, 1, 0)
