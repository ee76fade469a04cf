"""Re-reading the config while dynllm runs (SIGHUP, ``POST /admin/reload``,
``dynllm reload``).

The new file is read and validated first: an invalid one is refused with its
error and the running config stays.  Then everything derived from the config
(the name registry, the (model, route) -> upstream table, body limits, API
keys, CORS origins, the launcher's settings) is built anew, and only then
swapped in, in one synchronous step on the event loop: no request sees half
of the old config and half of the new.  The scheduler applies the difference
(``reload.plan_reload``): new models appear, changed ones restart once idle,
removed ones unload once idle and go, global settings apply at once.

What a running server cannot change (its listen address, its state file) is
kept as it is and reported as needing a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dynllm.api.access import Access
from dynllm.api.cors import Cors
from dynllm.backends import upstream_table
from dynllm.config import Config, ConfigError, load_config
from dynllm.errors import InvalidConfig
from dynllm.registry import Registry
from dynllm.reload import ReloadPlan, plan_reload

if TYPE_CHECKING:
    from dynllm.app import Front, Services

log = logging.getLogger("dynllm.reload")


class Reloader:
    def __init__(
        self,
        front: Front,
        path: Path,
        adjust: Callable[[Config], Config] = lambda config: config,
    ) -> None:
        """``adjust``: what the command line and environment add to a config
        read from ``path`` (the same as at startup)."""
        self.front = front
        self.path = path
        self.adjust = adjust

    def reload(self) -> ReloadPlan:
        services: Services = self.front.state.services
        old = services.config
        try:
            new = self.adjust(load_config(self.path))
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s: %s", self.path, exc)
            message = f"The new config is invalid; the running one stays: {exc}"
            raise InvalidConfig(message) from None
        plan = plan_reload(old, new)
        # What only a restart can change stays as it runs.
        new = new.model_copy(update={"server": old.server, "db_path": old.db_path})
        registry, upstreams, access = Registry(new), upstream_table(new), Access(new)
        cors = Cors.from_config(new.cors_origins)
        # From here to the end: no await, so the swap is one step for every request.
        services.config = new
        services.registry = registry
        services.upstreams = upstreams
        services.json_limit = int(new.max_body_mb * (1 << 20))
        services.upload_limit = int(new.max_upload_mb * (1 << 20))
        services.effects.config = new
        self.front.access, self.front.cors = access, cors
        services.scheduler.reconfigure(new, plan)
        log.info(
            "config reloaded from %s: added %s, changed %s, removed %s, updated %s%s",
            self.path,
            list(plan.added),
            list(plan.changed),
            list(plan.removed),
            list(plan.updated),
            f"; needs a restart of dynllm: {list(plan.restart_needed)}"
            if plan.restart_needed
            else "",
        )
        return plan
