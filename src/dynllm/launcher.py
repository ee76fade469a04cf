"""The scheduler's real side effects: spawn a backend process, wait until it
is ready, stop it.  Everything here acts; nothing here decides.

A port another process holds is reported as ``PortTaken`` (the scheduler
quarantines it and retries on another): a backend that says it could not
bind, one that exits while someone else listens on its port, and one that
keeps running while someone else does (a squatter bound it first; the
backend is stopped before any request reaches the squatter).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import httpx

from dynllm.backends import adapter_for, launch_for, missing_binary
from dynllm.config import Config, ModelConfig
from dynllm.errors import BackendExited, BackendMissing, ModelFileMissing
from dynllm.ports import listening_inodes
from dynllm.scheduler import Handle, PortTaken
from dynllm.supervisor import BackendProcess, PortHeldElsewhere

log = logging.getLogger("dynllm.launcher")


async def run_to_the_end(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even if the caller is cancelled meanwhile;
    a cancel that came is raised once the work is done (``asyncio.shield``
    alone would let the caller go on while the work still runs)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class ProcessEffects:
    def __init__(
        self,
        config: Config,
        marker: str,
        probe_client: httpx.AsyncClient,
        base_env: Mapping[str, str] | None = None,
        on_line: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.on_line = on_line
        """Called with (model, line) for each line a backend prints."""
        self.marker = marker
        self.client = probe_client
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.processes: dict[str, BackendProcess] = {}

    async def start(
        self, spec: ModelConfig, port: int, on_exit: Callable[[Handle], None]
    ) -> Handle:
        adapter = adapter_for(spec)
        launch = launch_for(self.config, spec, port)
        if (problem := missing_binary(self.config, spec)) is not None:
            raise BackendMissing(problem[0].upper() + problem[1:])
        if launch.mmproj_path is not None and not launch.mmproj_path.exists():
            raise ModelFileMissing(
                f"The mmproj file for '{spec.name}' does not exist: {launch.mmproj_path}"
            )
        if spec.path and not launch.model_path.exists():
            raise ModelFileMissing(
                f"The model file for '{spec.name}' does not exist: {launch.model_path}"
            )
        env = adapter.env(self.base_env, spec, self.marker)
        process = await BackendProcess.spawn(
            spec.name,
            adapter.argv(launch),
            env,
            on_exit=on_exit,
            log_level=self.config.backend_log_level,
            on_line=None if self.on_line is None else partial(self.on_line, spec.name),
        )
        self.processes[spec.name] = process
        try:
            await process.wait_ready(
                self.client,
                f"http://{launch.host}:{port}{adapter.probe(spec)}",
                interval=self.config.health_poll_interval_ms / 1000,
                timeout=self.config.load_timeout(spec),
                port=port if spec.port_owner_check else None,
            )
        except BackendExited as exc:
            # The whole tree is gone by now, so any listener left is someone else's.
            if adapter.is_bind_failure(exc.stderr_tail) or listening_inodes(port):
                raise PortTaken(port) from exc
            raise
        except PortHeldElsewhere as exc:
            log.warning(
                "port %d of '%s' is held by a process outside its backend; "
                "stopping the backend and moving to another port",
                port,
                spec.name,
            )
            await self._stop_before_raising(process)
            raise PortTaken(port) from exc
        except BaseException:
            await self._stop_before_raising(process)
            raise
        return process

    async def _stop_before_raising(self, process: BackendProcess) -> None:
        """Stop a backend whose load failed, to the end even if this task is
        cancelled meanwhile (an admin unload or shutdown during the stop): the
        scheduler books its VRAM and port free as soon as ``start`` raises, so
        ``start`` must not raise while the process still runs.  A cancel that
        came during the stop is raised once the process is gone."""
        await run_to_the_end(process.stop(self.config.stop_timeout_seconds))

    async def stop(self, handle: Handle) -> None:
        assert isinstance(handle, BackendProcess)
        await handle.stop(self.config.stop_timeout_seconds)

    def logs(self, name: str) -> list[str]:
        process = self.processes.get(name)
        return process.tail() if process else []
