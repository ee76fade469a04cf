"""Every process a backend started, found and stopped as one: its tree.

A backend is rarely one process.  vLLM forks engine workers, a ``command``
backend may be a shell that starts the real server, and a server may
daemonize a helper (fork, ``setsid``, fork again) that leaves both the
process group and the parent chain.  Whatever a backend started must die
with it -- on unload, on a crash of its main process, on dynllm's shutdown
and after a ``kill -9`` of dynllm -- or it keeps its port and its VRAM.

How members are found (Linux; elsewhere only the process group is signalled):

* **dynllm is a child subreaper** (``prctl(PR_SET_CHILD_SUBREAPER)``, set
  before the first backend is spawned).  A backend's descendant orphaned
  while dynllm lives -- a daemonized helper, the workers of a main process
  that crashed -- is re-parented to dynllm instead of init, so it stays among
  dynllm's own descendants: dynllm never needs to look at the rest of the
  machine while it runs.
* **Every backend carries a tag in its environment** (``DYNLLM_SPAWN``, a
  fresh random value per spawn, next to the instance marker
  ``DYNLLM_INSTANCE`` and ``DYNLLM_MODEL``).  Children inherit it across
  fork and exec, ``setsid`` does not drop it, and ``/proc/<pid>/environ``
  shows it, so an orphan among dynllm's descendants is attributed to the
  right backend.
* A backend's members are: its main process and everything below it; every
  descendant of dynllm still in the backend's process group or carrying its
  tag, and everything below those; and every process seen as a member at an
  earlier scan that is still the same process (pid and start time), which
  keeps a member that cleared its environment once it has been seen.
* **Stop** = SIGTERM to the group and to every member; SIGKILL to whatever
  is left after the grace; the backend counts as stopped (its port and VRAM
  free) only when no member is left.  When the main process dies by itself
  (a crash) the rest are killed at once: without their main process they
  serve nobody and may hold the VRAM a restart needs.  dynllm reaps the
  members re-parented to it, so none lingers as a zombie.
* **After ``kill -9`` of dynllm** the main process dies by its parent-death
  signal, but processes that left its group or were orphaned survive
  (re-parented to init).  The next dynllm on the same state file finds them
  by the instance marker in their environment (``find_marked``: every
  process whose environment it may read) and stops them before it serves.

Why not a cgroup per backend?  ``cgroup.kill`` would be the strongest tool,
but creating cgroups needs a delegated, writable cgroup v2 subtree: root,
or a systemd unit with ``Delegate=yes``.  A plain user session, most
containers and cgroup v1 hosts have none, so the mechanism above is needed
anyway and covers every case the issue names.  (Under systemd the default
``KillMode=control-group`` still kills everything left when the service
stops.)  Limits of this approach: a process that clears its environment
*and* leaves the backend's group and parent chain before dynllm has seen it
is not found, nor are processes started on a backend's behalf by another
daemon (``docker run`` asks dockerd; its port is then held by docker-proxy,
outside the tree, and the port check refuses it).  A helper that left the
backend's group, was orphaned to dynllm and exited on its own before any scan
saw it stays a zombie of dynllm (no memory, no port, one pid) until dynllm
exits: a zombie's environment cannot be read, so it cannot be attributed,
and reaping a child dynllm cannot attribute could steal another waiter's
exit status.

Everything here reads ``/proc`` synchronously; callers on the event loop run
scans in a worker thread (``asyncio.to_thread``).  Nothing here is on the
request path: scans run while a backend loads, stops or exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from dynllm.backends.base import MODEL_ENV
from dynllm.ports import listening_inodes

SPAWN_ENV = "DYNLLM_SPAWN"
"""The per-spawn tag every process of one backend carries in its environment."""

_PR_SET_CHILD_SUBREAPER = 36
_PROC = "/proc"


_PR_SET_PDEATHSIG = 1


def _resolve_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return prctl


# Resolved once, in dynllm's own process: ``die_with_parent`` runs in a
# child between fork and exec, where loading libc again (dlopen takes the
# loader's lock) deadlocks if another thread held that lock at the fork; the
# child then never execs and its spawn never returns (seen in a test run).
_PRCTL = _resolve_prctl()


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants; False where the OS
    cannot (then orphans go to init and only the group and the marker scan at
    the next start find them)."""
    return _PRCTL is not None and int(_PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def die_with_parent() -> None:
    """``preexec_fn`` of dynllm's children (backends, download transfers):
    the child gets SIGKILL when dynllm dies, even by ``kill -9``.  Without
    prctl (not Linux), startup reconciliation still finds the leftovers."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as ``/proc/<pid>/stat`` shows it.  ``(pid, start)`` is its
    identity: a pid is reused, a pid with its start time is not."""

    pid: int
    ppid: int
    pgrp: int
    sid: int
    state: str
    start: int  # clock ticks after boot

    @property
    def zombie(self) -> bool:
        """Dead, waiting for its parent to reap it: it holds no memory, port or VRAM."""
        return self.state in ("Z", "X")


def read_stat(pid: int) -> Proc | None:
    """The process ``pid`` now, or None when there is none."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold ") ", so split
    # at the last one.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]),
                    fields[0].decode(), int(fields[19]))  # fmt: skip
    except (IndexError, ValueError):
        return None


def _pids() -> Iterator[int]:
    try:
        names = os.listdir(_PROC)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def snapshot() -> dict[int, Proc]:
    """Every process on the machine (one read of each ``/proc/<pid>/stat``)."""
    procs = {}
    for pid in _pids():
        if (proc := read_stat(pid)) is not None:
            procs[pid] = proc
    return procs


def _children(procs: dict[int, Proc]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for proc in procs.values():
        kids.setdefault(proc.ppid, []).append(proc.pid)
    return kids


def _below(kids: dict[int, list[int]], roots: Iterable[int]) -> set[int]:
    """``roots`` and every process below them."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(kids.get(pid, ()))
    return seen


def environ_has(pid: int, key: str, value: str) -> bool:
    """Whether ``pid``'s environment holds ``key=value`` (False when it cannot
    be read: another user's process, a zombie, gone)."""
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return f"{key}={value}".encode() in data.split(b"\0")


def environ_value(pid: int, key: str) -> str | None:
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = f"{key}=".encode()
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def cmdline(pid: int) -> str:
    try:
        with open(f"{_PROC}/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (``socket:[N]`` fd links)."""
    found: set[int] = set()
    fd_dir = f"{_PROC}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def send(proc: Proc, sig: signal.Signals) -> bool:
    """Signal ``proc`` if it is still the same process (pid and start time)."""
    now = read_stat(proc.pid)
    if now is None or now.start != proc.start or now.zombie:
        return False
    try:
        os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group; one already gone (or not ours) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap(proc: Proc) -> None:
    """Collect a zombie child of ours (one re-parented to us as subreaper)."""
    if proc.zombie and proc.ppid == os.getpid():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)


class PortOwner(StrEnum):
    NOBODY = "nobody"  # nothing listens on the port yet
    BACKEND = "backend"  # every listener on the port belongs to the backend's tree
    OTHER = "other"  # some listener belongs to another process: a squatter
    UNKNOWN = "unknown"  # /proc/net/tcp cannot be read: cannot tell


class ProcessTree:
    """The processes of one backend (see the module docstring for who counts).

    ``main`` is the process dynllm spawned (its exit status belongs to
    asyncio's child watcher, so it is never reaped here); ``tag`` is the
    value of ``SPAWN_ENV`` it was started with.  Methods are synchronous and
    safe to call from worker threads.
    """

    def __init__(self, main: int, tag: str) -> None:
        self.main = main
        self.pgid = main  # start_new_session: the main process leads its own group
        self.tag = tag
        first = read_stat(main)
        self._main_start = first.start if first is not None else None
        self._known: dict[int, int] = {}  # pid -> start of members seen so far
        self._tagged: dict[tuple[int, int], bool] = {}  # (pid, start) -> carries our tag
        self._lock = threading.Lock()

    def members(self) -> list[Proc]:
        """The backend's live processes now, the main one included while it
        runs.  Zombies among them are reaped (ours) or skipped (someone
        else's to reap); they hold nothing."""
        with self._lock:
            return self._scan()

    def _scan(self) -> list[Proc]:
        procs = snapshot()
        me = os.getpid()
        kids = _children(procs)
        seeds: set[int] = set()
        main = procs.get(self.main)
        if main is not None and main.start == self._main_start:
            seeds.add(self.main)
        seeds.update(p for p, s in self._known.items() if p in procs and procs[p].start == s)
        for pid in _below(kids, [me]) - {me} - seeds:
            proc = procs[pid]
            if proc.pgrp == self.pgid or self._carries_tag(proc):
                seeds.add(pid)
        found = [procs[pid] for pid in _below(kids, seeds) if pid != me]
        alive = []
        for proc in found:
            if proc.zombie:
                if proc.pid != self.main:
                    reap(proc)
                continue
            alive.append(proc)
        self._known = {p.pid: p.start for p in alive if p.pid != self.main}
        self._tagged = {k: v for k, v in self._tagged.items() if k[0] in procs}
        return alive

    def _carries_tag(self, proc: Proc) -> bool:
        key = (proc.pid, proc.start)
        if key not in self._tagged:
            if proc.zombie:  # a zombie's environment is gone; ask again never
                return False
            self._tagged[key] = environ_has(proc.pid, SPAWN_ENV, self.tag)
        return self._tagged[key]

    def signal(self, sig: signal.Signals, members: Iterable[Proc] | None = None) -> list[Proc]:
        """Send ``sig`` to the group and to every member (scanned now unless
        given); the members signalled."""
        killpg(self.pgid, sig)
        targets = self.members() if members is None else list(members)
        return [proc for proc in targets if send(proc, sig)]

    def port_owner(self, port: int) -> PortOwner:
        """Who listens on ``port``.  The main process is asked first (it holds
        the listener of nearly every server); the whole tree only when it
        does not."""
        listeners = listening_inodes(port)
        if listeners is None:
            return PortOwner.UNKNOWN
        if not listeners:
            return PortOwner.NOBODY
        held = socket_inodes(self.main)
        if listeners <= held:
            return PortOwner.BACKEND
        for proc in self.members():
            if proc.pid != self.main:
                held |= socket_inodes(proc.pid)
                if listeners <= held:
                    return PortOwner.BACKEND
        return PortOwner.OTHER


@dataclass(frozen=True, slots=True)
class Marked:
    """A process found by its instance marker."""

    proc: Proc
    model: str | None
    cmdline: str


def find_marked(key: str, value: str) -> list[Marked]:
    """Every live process (but this one) whose environment holds ``key=value``:
    the leftovers of an earlier dynllm that used the same state file.  Reads
    the environment of every process this user may read; only at startup."""
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me or not environ_has(pid, key, value):
            continue
        proc = read_stat(pid)
        if proc is None or proc.zombie:
            continue
        found.append(Marked(proc, environ_value(pid, MODEL_ENV), cmdline(pid)))
    return found


def alive(procs: Iterable[Proc]) -> list[Proc]:
    """Those of ``procs`` that are still the same live process."""
    left = []
    for proc in procs:
        now = read_stat(proc.pid)
        if now is not None and now.start == proc.start and not now.zombie:
            left.append(proc)
    return left


TERMINATE_POLL_SECONDS = 0.02
KILL_WAIT_SECONDS = 5.0
"""How long processes are waited for after SIGKILL before giving up on them
(one still there is stuck in the kernel)."""


async def terminate(procs: list[Proc], grace: float) -> None:
    """SIGTERM ``procs``, SIGKILL those left after ``grace`` s, and return when
    none is left (or KILL_WAIT_SECONDS after the SIGKILL).  For processes
    that are not our children: their reaping is someone else's."""
    for proc in procs:
        send(proc, signal.SIGTERM)
    kill_at = time.monotonic() + grace
    killed = False
    while left := alive(procs):
        now = time.monotonic()
        if now >= kill_at + KILL_WAIT_SECONDS:
            return
        if now >= kill_at and not killed:
            for proc in left:
                send(proc, signal.SIGKILL)
            killed = True
        await asyncio.sleep(TERMINATE_POLL_SECONDS)
