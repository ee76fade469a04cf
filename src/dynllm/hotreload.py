"""Changing the served models while dynllm runs: re-reading the config
(SIGHUP, ``POST /admin/reload``, ``dynllm reload``), scanning the model
folders again (periodically, ``POST /admin/models/rescan``, after a
download), and adding the variants requests ask for.

Each builds a new ``catalog.Catalog`` and swaps it in through ``_swap``:
everything derived from it (the name registry, the (model, route) ->
upstream table, body limits, API keys, CORS origins, the launcher's
settings) is built first, then swapped in one synchronous step on the event
loop: no request sees half of the old catalog and half of the new.  The
scheduler applies the difference (``reload.plan_reload``): new models
appear, changed ones restart once idle, removed ones (a deleted file, a
removed YAML entry) unload once idle and go, global settings apply at once.

An invalid config file is refused with its error and the running config
stays.  What a running server cannot change (its listen address, its state
file) is kept as it is and reported as needing a restart.  Folder scans run
in a thread; the catalog is built from their result on the loop, from the
newest config and variants, so a reload or a variant added meanwhile is
never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynllm import catalog as cat
from dynllm.api.access import Access
from dynllm.api.cors import Cors
from dynllm.backends import upstream_table
from dynllm.config import Config, ConfigError, ModelConfig, load_config
from dynllm.discovery import HeaderCache, Scan, scan, scan_one
from dynllm.errors import BadRequest, InvalidConfig, ModelNotFound, Unavailable
from dynllm.events import ModelState
from dynllm.registry import Registry
from dynllm.reload import ReloadPlan, plan_reload, restart_needed

if TYPE_CHECKING:
    from dynllm.app import Front, Services

log = logging.getLogger("dynllm.reload")


@dataclass(frozen=True)
class RescanResult:
    plan: ReloadPlan
    found: int
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": list(self.plan.added),
            "removed": list(self.plan.removed),
            "changed": list(self.plan.changed),
            "found": self.found,
            "problems": list(self.problems),
        }


async def scan_folders(config: Config, cache: HeaderCache | None = None) -> Scan:
    """Scan the model folders of ``config`` in a thread (file reads)."""
    dirs = cat.model_dirs(config)
    if not dirs:
        return cat.empty_scan()
    return await asyncio.to_thread(scan, dirs, list(config.enabled_backends), cache)


class Reloader:
    def __init__(
        self,
        front: Front,
        path: Path | None,
        adjust: Callable[[Config], Config] = lambda config: config,
    ) -> None:
        """``path``: the config file a reload re-reads (None: started without
        one); ``adjust``: what the command line and environment add to a
        config read from it (the same as at startup)."""
        self.front = front
        self.path = path
        self.adjust = adjust
        self._scan_lock = asyncio.Lock()
        self._headers = HeaderCache()
        """GGUF headers of unchanged files, kept from one rescan to the next."""
        self._scans = 0  # rescans finished
        self._last: RescanResult | None = None
        self._refused: dict[Path, tuple[int, int]] = {}
        """Paths a request named that a scan found but would not serve (a name
        clash, no enabled backend), with their (mtime, size): not scanned for
        again until they change."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_config: Callable[[Config], None] = lambda config: None
        """Told of each reloaded config (the app reschedules its periodic rescan)."""

    @property
    def services(self) -> Services:
        services: Services = self.front.state.services
        return services

    # ---- the three ways the catalog changes --------------------------------------
    def reload(self) -> ReloadPlan:
        if self.path is None:
            raise BadRequest("This dynllm was started without a config file to re-read")
        old = self.services.catalog
        try:
            new = self.adjust(load_config(self.path))
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s: %s", self.path, exc)
            message = f"The new config is invalid; the running one stays: {exc}"
            raise InvalidConfig(message) from None
        # What only a restart can change stays as it runs.
        restart = restart_needed(old.yaml, new)
        new = new.model_copy(update={"server": old.yaml.server, "db_path": old.yaml.db_path})
        # The last scan stays until the next one: new folders are scanned right
        # after (below); files of folders no longer listed go with that scan.
        plan = self._swap(cat.build(new, old.scan, old.variants), restart)
        self.services.downloads.config = new  # hf_token, hf_endpoint, limits, models_dir
        self.on_config(new)
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
        if cat.model_dirs(new) != old.dirs:  # new folders: scan them now
            self.rescan_soon("after-reload")
        return plan

    async def rescan(self, newer_than: int | None = None) -> RescanResult:
        """Scan the model folders again and serve what changed: new files
        appear, removed ones unload once idle and go.  ``newer_than``: a
        scan count; a scan finished since then will do (N requests for one
        new file wait for one scan, not N)."""
        async with self._scan_lock:  # one scan at a time; later callers get a fresh one
            if newer_than is not None and self._scans > newer_than and self._last is not None:
                return self._last
            while True:
                scanned = self.services.catalog.yaml
                found = await scan_folders(scanned, self._headers)
                current = self.services.catalog  # the newest, after the await
                if cat.model_dirs(current.yaml) == cat.model_dirs(scanned):
                    break  # else a reload changed the folders meanwhile: scan those
            new = cat.build(current.yaml, found, current.variants)
            plan = self._swap(new)
            for problem in new.problems:
                if problem not in current.problems:
                    log.warning("model discovery: %s", problem)
            if plan.added or plan.removed or plan.changed:
                log.info(
                    "model folders rescanned: added %s, removed %s, changed %s",
                    list(plan.added),
                    list(plan.removed),
                    list(plan.changed),
                )
            self._scans += 1
            self._last = RescanResult(plan, len(found.found), new.problems)
            return self._last

    def rescan_soon(self, why: str) -> None:
        """A rescan in the background (a download finished, folders changed)."""
        task = asyncio.get_running_loop().create_task(self.rescan(), name=f"rescan-{why}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("rescanning the model folders failed: %s", exc, exc_info=exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def with_variant(self, spec: ModelConfig, settings: dict[str, Any]) -> ModelConfig:
        """The model that serves ``spec`` with a request's ``settings``: a
        variant of it (added to the catalog the first time), or ``spec``
        itself when the settings change nothing.  Synchronous: two requests
        asking for the same new variant get the same entry."""
        current = self.services.catalog
        wanted = cat.variant_for(current, spec, settings)
        if wanted is None:
            return self.services.registry.get(current.base_of(spec.name))
        name, variant = wanted
        scheduler = self.services.scheduler
        live = [
            n
            for n in current.variants
            if (s := scheduler.slots.get(n)) is not None and s.state is not ModelState.UNLOADED
        ]
        if name not in live and len(live) >= cat.MAX_LIVE_VARIANTS:
            # CPU variants book no VRAM, so the ledger alone would let any
            # client start a process per setting it can think of.
            raise Unavailable(
                f"{len(live)} variants (models started with request settings) are "
                f"running, the most allowed; retry once one is idle and unloaded, "
                f"or unload one: {', '.join(sorted(live)[:8])}",
                retry_after=self.services.config.idle_check_interval_seconds,
            )
        if name not in current.variants:
            idle = [
                n
                for n, s in sorted(scheduler.slots.items(), key=lambda item: item[1].last_used)
                if n in current.variants
                and s.state is ModelState.UNLOADED
                and not scheduler.waiting(s)
            ]
            self._swap(cat.with_variant(current, name, variant, idle))
            log.info("serving '%s' as a variant of '%s'", name, variant.base)
        return self.services.registry.get(name)

    async def find(self, label: str) -> ModelConfig:
        """A model named by a path (absolute, or relative to a models
        folder) or a name the last scan has not seen yet: found on disk
        inside a models folder, or ModelNotFound."""
        current = self.services.catalog
        not_found = ModelNotFound(f"The model '{label}' does not exist")
        if not current.dirs or not label or "\x00" in label or len(label) > 4096:
            raise not_found
        roots = _resolved_dirs(current.dirs)
        candidates = _candidates(label, current.dirs, roots)
        for path in candidates:
            name = current.paths.get(path)
            if name is not None:
                return self.services.registry.get(name)
        inside = [n for p, n in current.paths.items() if any(_within(p, c) for c in candidates)]
        if len(inside) > 1:
            raise BadRequest(
                f"The folder '{label}' holds {len(inside)} models; name one of: "
                + ", ".join(sorted(inside)[:20])
            )
        if inside:
            return self.services.registry.get(inside[0])
        for path in candidates:
            refused = self._refused.get(path)
            if _skipped(path, roots) or (refused is not None and refused == _stamp(path)):
                continue
            scans = self._scans
            found = await asyncio.to_thread(
                scan_one, path, current.dirs, list(current.yaml.enabled_backends)
            )
            if found is not None:
                await self.rescan(newer_than=scans)  # serve it, and whatever else is new
                name = self.services.catalog.paths.get(found.path)
                if name is not None:
                    return self.services.registry.get(name)
                if (stamp := _stamp(path)) is not None:
                    self._refused[path] = stamp
                    if len(self._refused) > 1024:  # bounded: the oldest go first
                        del self._refused[next(iter(self._refused))]
        raise not_found

    # ---- the swap --------------------------------------------------------------------
    def _swap(self, new: cat.Catalog, restart_needed: tuple[str, ...] = ()) -> ReloadPlan:
        services = self.services
        old_config, config = services.config, new.config
        plan = plan_reload(old_config, config)
        if restart_needed:
            plan = ReloadPlan(plan.added, plan.changed, plan.removed, plan.updated, restart_needed)
        registry, upstreams, access = Registry(config), upstream_table(config), Access(config)
        cors = Cors.from_config(config.cors_origins)
        # From here to the end: no await, so the swap is one step for every request.
        services.catalog = new
        services.config = config
        services.registry = registry
        services.upstreams = upstreams
        services.json_limit = int(config.max_body_mb * (1 << 20))
        services.upload_limit = int(config.max_upload_mb * (1 << 20))
        services.effects.config = config
        self.front.access, self.front.cors = access, cors
        services.scheduler.reconfigure(config, plan)
        return plan


def _candidates(label: str, dirs: tuple[Path, ...], roots: list[Path]) -> list[Path]:
    """Where ``label`` may point: itself if absolute, else under each models
    folder; with and without ``.gguf``; resolved (symlinks, ``..``) and
    kept only when it exists inside a models folder (``roots``: the
    folders resolved)."""
    raw = Path(label)
    bases = [raw] if raw.is_absolute() else [d / raw for d in dirs]
    out: list[Path] = []
    for base in bases:
        forms = [base, base.with_name(base.name + ".gguf")] if base.name else [base]
        for path in forms:
            try:
                resolved = path.resolve()
                if not resolved.exists():
                    continue
            except (OSError, RuntimeError, ValueError):
                continue
            if resolved not in out and any(_within(resolved, d) for d in roots):
                out.append(resolved)
    return out


def _skipped(path: Path, roots: list[Path]) -> bool:
    """What a folder scan skips: hidden entries (a download's
    ``.cache/huggingface``) and partial files."""
    if path.name.endswith((".incomplete", ".part")):
        return True
    for folder in roots:
        if _within(path, folder):
            return any(part.startswith(".") for part in path.relative_to(folder).parts)
    return False


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def _resolved_dirs(dirs: tuple[Path, ...]) -> list[Path]:
    out = []
    for d in dirs:
        try:
            out.append(d.resolve())
        except (OSError, RuntimeError, ValueError):
            continue
    return out


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
