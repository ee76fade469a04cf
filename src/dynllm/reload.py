"""What a config reload changes: a pure comparison of the running config and
the new one.  The scheduler and the app apply the plan; nothing here acts.

A model's *process* is defined by what it is started with: its command line
(binary, model file, flags, port placeholder), its environment, its backend
and type, and the VRAM booked for it.  A model whose process would be started
the same way is kept (same pid) even if other keys changed (aliases, idle
timeout, limits, ``hidden``); one whose process would differ is *changed*
and restarts once idle.  Comparing the command line rather than listing
"keys that matter" means a new adapter flag or a changed ``models_dir`` or
``backend.*_binary`` is caught without anyone remembering to add it here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dynllm.backends import adapter_for, command_line
from dynllm.config import Config, ModelConfig

PROBE_PORT = 0
"""A stand-in port: the real one is leased at start; only the rest matters."""

_NEEDS_RESTART: dict[str, Callable[[Config], object]] = {
    "server.host": lambda c: c.server.host,
    "server.port": lambda c: c.server.port,
    "db_path": lambda c: str(c.db_file),
}
"""Settings a running dynllm cannot change: they need a restart of dynllm."""


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...]
    """New models: they appear at once."""
    changed: tuple[str, ...]
    """Models whose process would start differently: restarted once idle."""
    removed: tuple[str, ...]
    """Models no longer configured: unloaded once idle, then gone."""
    updated: tuple[str, ...]
    """Models whose process stays as it is but whose other settings changed
    (aliases, timeouts, limits, listing): they apply at once."""
    restart_needed: tuple[str, ...]
    """Settings that only take effect when dynllm itself restarts."""

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "changed": list(self.changed),
            "removed": list(self.removed),
            "updated": list(self.updated),
            "restart_needed": list(self.restart_needed),
        }


def process_identity(config: Config, model: ModelConfig) -> tuple[object, ...]:
    """Everything that decides how the model's backend process is started."""
    adapter = adapter_for(model)
    env = adapter.env({}, model, marker="")  # the inherited part is the same for both
    return (
        model.backend,
        model.model_type,
        model.vram_mb,
        tuple(command_line(config, model, PROBE_PORT)),
        tuple(sorted(env.items())),
        adapter.probe(model),
        model.port_owner_check,
    )


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """The settings that differ and only take effect when dynllm restarts."""
    return tuple(key for key, read in _NEEDS_RESTART.items() if read(old) != read(new))


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    changed, updated = [], []
    for name in before.keys() & after.keys():
        if process_identity(old, before[name]) != process_identity(new, after[name]):
            changed.append(name)
        elif before[name] != after[name]:
            updated.append(name)
    return ReloadPlan(
        added=tuple(sorted(after.keys() - before.keys())),
        changed=tuple(sorted(changed)),
        removed=tuple(sorted(before.keys() - after.keys())),
        updated=tuple(sorted(updated)),
        restart_needed=restart_needed(old, new),
    )
