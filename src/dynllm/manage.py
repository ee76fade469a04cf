"""The commands that manage a running dynllm: status, models, load, unload,
logs and reload.  Each asks the service through ``client.AdminClient`` and
prints its answer, as a table for people or as JSON (``--json``) for
scripts.  Exit status: 0 done, 1 the service answered an error or could not
be reached, 2 a reload refused an invalid config (``client.ConfigRejected``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from dynllm.client import AdminClient, ClientError, Target


def _out(text: str = "") -> None:
    print(text, flush=True)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = [header, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )


def duration(seconds: float) -> str:
    """A span for people: 42s, 3m05s, 2h10m, 1d04h (negative spans are 0s)."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _ago(when: Any, now: float) -> str:
    return f"{duration(now - when)} ago" if isinstance(when, int | float) else "never"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_status(health: dict[str, Any], state: dict[str, Any], url: str, now: float) -> str:
    head = f"dynllm {health.get('version', '?')} at {url}"
    if isinstance(health.get("uptime_seconds"), int | float):
        head += f", up {duration(health['uptime_seconds'])}"
    used, total = state.get("vram_used_mb", 0), state.get("vram_total_mb", 0)
    share = f" ({100 * used / total:.0f}%)" if total else ""
    lines = [head, f"VRAM {used} of {total} MB used{share}"]
    if "queued_requests" in health:
        lines[-1] += f", {health['queued_requests']} request(s) queued"
    models = state.get("models", [])
    header = ["MODEL", "STATE", "PORT", "PID", "IN-FLIGHT", "QUEUED", "VRAM MB", "LAST USED"]
    rows = [
        [
            m["name"],
            _cell(m.get("status")),
            _cell(m.get("port")),
            _cell(m.get("pid")),
            _cell(m.get("in_flight")),
            _cell(m.get("queued")),
            _cell(m.get("vram_mb")),
            _ago(m.get("last_used"), now),
        ]
        for m in models
    ]
    lines += ["", _table(header, rows)] if rows else ["", "no models configured"]
    for m in models:
        if m.get("last_error"):
            lines.append(f"{m['name']}: last error: {m['last_error']}")
        if isinstance(m.get("cooldown_until"), int | float) and m["cooldown_until"] > now:
            lines.append(
                f"{m['name']}: cooling down after {m.get('consecutive_failures', '?')} failed "
                f"load(s); next try in {duration(m['cooldown_until'] - now)} "
                f"(`dynllm load {m['name']} --force` skips the wait)"
            )
    return "\n".join(lines)


def render_models(state: dict[str, Any]) -> str:
    header = ["MODEL", "ALIASES", "BACKEND", "TYPE", "VRAM MB", "PINNED", "UNLOAD AFTER", "STATE"]
    rows = []
    for m in state.get("models", []):
        after = m.get("unload_after_seconds")
        rows.append(
            [
                m["name"],
                ", ".join(m.get("aliases") or []) or "-",
                _cell(m.get("backend")),
                _cell(m.get("model_type")),
                _cell(m.get("vram_mb")),
                "yes" if m.get("pinned") else "no",
                "never" if after is None else duration(after),
                _cell(m.get("status")),
            ]
        )
    return _table(header, rows) if rows else "no models configured"


def render_reload(result: dict[str, Any]) -> str:
    def names(key: str) -> str:
        value = result.get(key) or []
        return ", ".join(str(v) for v in value) if value else "none"

    lines = [
        "reloaded the config",
        f"  added: {names('added')}",
        f"  changed (restart once idle): {names('changed')}",
        f"  removed (unload once idle): {names('removed')}",
    ]
    if result.get("restart_needed"):
        lines.append(f"  needs a restart of dynllm to apply: {names('restart_needed')}")
    return "\n".join(lines)


def _print_json(data: Any) -> None:
    _out(json.dumps(data, indent=2))


def _status(client: AdminClient, args: argparse.Namespace) -> int:
    health, state = client.health(), client.models()
    if args.json:
        extra = {k: health[k] for k in ("version", "uptime_seconds") if k in health}
        _print_json({**extra, **state})
    else:
        _out(render_status(health, state, client.target.url, time.time()))
    return 0


def _models(client: AdminClient, args: argparse.Namespace) -> int:
    state = client.models()
    _print_json(state) if args.json else _out(render_models(state))
    return 0


def _load(client: AdminClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    result = client.load(args.model, force=args.force)
    took = time.monotonic() - started
    if args.json:
        _print_json(result)
    else:
        _out(f"loaded {result.get('model', args.model)}: port {_cell(result.get('port'))}, "
             f"pid {_cell(result.get('pid'))} ({took:.2f} s)")  # fmt: skip
    return 0


def _unload(client: AdminClient, args: argparse.Namespace) -> int:
    result = client.unload(args.model, force=args.force)
    name = result.get("model", args.model)
    if args.json:
        _print_json(result)
    else:
        _out(f"unloaded {name}" if result.get("unloaded") else f"{name} was not loaded")
    return 0


def _logs(client: AdminClient, args: argparse.Namespace) -> int:
    if not args.follow:
        result = client.logs(args.model, args.lines)
        if args.json:
            _print_json(result)
        else:
            for line in result.get("lines", []):
                _out(str(line))
        return 0
    for item in client.follow_logs(args.model, args.lines):
        _out(json.dumps(item) if args.json else str(item.get("line", "")))
    print(f"dynllm: {client.target.url} ended the log stream", file=sys.stderr)
    return 1  # an end the follower did not ask for


def _reload(client: AdminClient, args: argparse.Namespace) -> int:
    result = client.reload()
    _print_json(result) if args.json else _out(render_reload(result))
    return 0


_CLIENT: dict[str, Callable[[AdminClient, argparse.Namespace], int]] = {
    "status": _status,
    "models": _models,
    "load": _load,
    "unload": _unload,
    "logs": _logs,
    "reload": _reload,
}


def run(args: argparse.Namespace, target: Target) -> int:
    """``args.command`` against the service at ``target``; its exit status."""
    try:
        with AdminClient(target) as client:
            return _CLIENT[args.command](client, args)
    except ClientError as exc:
        hint = ""
        if getattr(exc, "code", None) == "model_busy":
            hint = f" (`dynllm unload {args.model} --force` stops it anyway)"
        print(f"dynllm: {exc.message}{hint}", file=sys.stderr)
        return exc.exit_code
