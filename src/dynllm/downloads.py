"""Hugging Face downloads: jobs with progress, a real cancel, resume across restarts.

    POST /v1/models/download -> DownloadManager.submit -> Job (queued | downloading)

One job downloads the files ``hubfiles.select_files`` chose from the repo's
listing (pinned to the commit the listing named, so a resumed job fetches the
same files) into a folder under ``models_dir``.  Its transfer runs in a
**child process** (``python -m dynllm.hubio``, its own session and
process group, a parent-death signal): a thread blocked in a socket read
cannot be stopped, a process can.  Cancel = SIGTERM to the group, SIGKILL
after ``STOP_GRACE`` seconds, reap; only then is the job "cancelled" and its
files removed.

The child (``dynllm.hubio``) resumes a partial file across restarts and
checks each file's sha256 before moving it into place.

Progress: the parent polls the size of the file in transfer every
``POLL_SECONDS`` (the child names it when it starts a file) and adds the
files done; speed is bytes per second over the last ``SPEED_WINDOW`` seconds.
Every state change and, at most once a second, the progress are recorded in
the store, so a restart finds every job: one that was queued or downloading
is resumed (its partial file kept); one that cannot be (no ``models_dir``, a
destination now outside it, an unreadable record) is marked "interrupted"
with the reason.

What a cancel removes: the files this job wrote (a cancelled download is not
a model: one shard of three, or a quantization half there, would be found by
discovery), every partial file under the destination, their bookkeeping under
``.cache/huggingface``, and the folder itself when the job created it and it
is empty.  Files that were complete in the destination before the job
started are kept.  A failed job keeps its partial file, so submitting it
again resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynllm.downloadjob import (
    ACTIVE,
    EDGES,
    DownloadRequest,
    FileState,
    FileStatus,
    Job,
    JobStatus,
    new_job_id,
)
from dynllm.errors import (
    BadRequest,
    DownloadNotFound,
    DynllmError,
    InsufficientStorage,
    ModelBusy,
    RepoGated,
    RepoNotFound,
)
from dynllm.hubfiles import (
    DEFAULT_ENDPOINT,
    confine,
    default_destination,
    human_size,
    looks_like_url,
    parse_repo,
    quantizations,
    select_files,
)
from dynllm.hubio import Listing, check_access, fetch_listing, hub_error
from dynllm.proctree import die_with_parent

if TYPE_CHECKING:
    from dynllm.config import Config
    from dynllm.store import Store

__all__ = [  # the job model is re-exported: the app, the routes and tests import it here
    "DownloadManager",
    "DownloadRequest",
    "FileStatus",
    "Job",
    "JobStatus",
    "disk_free",
]

log = logging.getLogger("dynllm.downloads")

POLL_SECONDS = 0.2
RECORD_EVERY = 1.0
"""Progress reaches the store at most this often (state changes at once)."""
SPEED_WINDOW = 5.0
STOP_GRACE = 0.5
"""Seconds between SIGTERM and SIGKILL of a transfer being stopped."""
KEEP_FINISHED = 200
"""Finished jobs kept in the list (and the store); older ones are forgotten."""
CHUNK_BYTES = 256 << 10
"""The child's read size.  huggingface_hub reads 10 MiB at a time
(``constants.DOWNLOAD_CHUNK_SIZE``): nothing reaches the partial file, and so
neither the progress nor a resume sees it, until 10 MiB have arrived (at
2 MB/s, a progress step every 5 s).  256 KiB: a step every 0.13 s at 2 MB/s,
and at 100 MB/s 400 reads a second, which cost the child little."""
STDERR_LINES = 50


def disk_free(path: Path) -> int:
    """Free bytes on the file system ``path`` would be on (its nearest existing folder)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


# ---- the manager --------------------------------------------------------------------


@dataclass
class _Run:
    """One job's transfer while it runs: the process and how to stop it."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: bool = False
    proc: asyncio.subprocess.Process | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=200))
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    failure: tuple[str, str] | None = None  # (code, message) the child reported
    last_record: float = 0.0


class DownloadManager:
    """Download jobs: submit, list, cancel, resume after a restart.

    Lifecycle: ``await start()`` after the store opens (restores and resumes
    jobs), ``await close()`` before it closes (stops every transfer, keeps the
    partial files, records the jobs as queued so the next start resumes them).
    Each running job has one runner task, the only code that touches its
    process and moves it out of "downloading"; ``cancel`` asks the runner and
    waits for it.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        on_finished: Callable[[Path], None],
        *,
        free_bytes: Callable[[Path], int] = disk_free,
        chunk_bytes: int = CHUNK_BYTES,
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.store = store
        self.on_finished = on_finished
        self.free_bytes = free_bytes
        self.chunk_bytes = chunk_bytes
        self.python = python
        self._jobs: dict[str, Job] = {}
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # ---- settings ----------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return (
            self.config.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        ).rstrip("/")

    @property
    def token(self) -> str | None:
        return self.config.hf_token or os.environ.get("HF_TOKEN") or None

    def _models_dir(self) -> Path:
        if self.config.models_dir is None:
            raise BadRequest(
                "Downloads need a folder to go to: set models_dir in the config "
                "(downloads land in a folder under it)"
            )
        return self.config.resolve(self.config.models_dir)

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        for data in await self.store.downloads():
            job = self._restore(data)
            if job is not None:
                self._jobs[job.job_id] = job
        self._trim()
        self._pump()

    def _restore(self, data: dict[str, Any]) -> Job | None:
        try:
            job = Job.from_record(data)
        except (KeyError, ValueError, TypeError) as exc:
            job_id = data.get("job_id") if isinstance(data, dict) else None
            if not isinstance(job_id, str):
                log.warning("a download record without a job id was dropped: %r", data)
                return None
            log.warning("download %s: its record is unreadable (%s)", job_id, exc)
            job = Job(job_id, str(data.get("repo_id", "?")), Path(str(data.get("destination"))), [])
            self._finish(job, JobStatus.INTERRUPTED, "Its record could not be read after a restart")
            return job
        if job.status not in ACTIVE:
            return job
        problem = self._resume_problem(job)
        if problem is not None:
            self._finish(job, JobStatus.INTERRUPTED, f"Not resumed after a restart: {problem}")
        else:
            job.status = JobStatus.QUEUED
            job.message = "Resuming after a restart"
            self.store.record_download(job.job_id, job.record())
        return job

    def _resume_problem(self, job: Job) -> str | None:
        if self.config.models_dir is None:
            return "models_dir is no longer set in the config"
        try:
            confined: Path | None = confine(self._models_dir(), str(job.destination))
        except BadRequest:
            confined = None
        if confined != job.destination:
            return f"its destination {job.destination} is no longer under models_dir"
        if not job.files or job.commit is None:
            return "its record names no files"
        return None

    async def close(self) -> None:
        """Stop every transfer (processes reaped), keep partial files, record
        the jobs so the next start resumes them."""
        self._closing = True
        runs = list(self._runs.values())
        for run in runs:
            run.wake.set()
        await asyncio.gather(*(run.finished.wait() for run in runs))

    # ---- the API -----------------------------------------------------------------
    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def transfer_pid(self, job_id: str) -> int | None:
        """The pid of the job's transfer process while it runs (tests, logs)."""
        run = self._runs.get(job_id)
        return None if run is None or run.proc is None else run.proc.pid

    def job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise DownloadNotFound(f"No download job {job_id!r}") from None

    async def submit(self, request: DownloadRequest) -> Job:
        models_dir = self._models_dir()
        endpoint, token = self.endpoint, self.token
        ref = parse_repo(request.url, request.repo_id, endpoint)
        revision = request.revision or ref.revision
        include = request.include or ([ref.path] if ref.path else None)
        destination = confine(models_dir, request.destination or default_destination(ref.repo_id))
        listing = await self._hub(fetch_listing, endpoint, token, ref.repo_id, revision)
        chosen = select_files(
            listing.files, request.quantization, include, request.exclude, repo_id=ref.repo_id
        )
        commit = await self._pinned(endpoint, token, ref.repo_id, listing, revision, chosen[0].name)
        # No await from here on: the checks and the insertion are one step.
        for other in self._jobs.values():
            if other.status in ACTIVE and other.destination == destination:
                raise ModelBusy(
                    f"Download {other.job_id} is already writing to {destination}; "
                    "cancel it or choose another destination"
                )
        files = [
            FileState(
                f.name,
                f.size,
                FileStatus.PRESENT
                if _complete(destination / f.name, f.size)
                else FileStatus.PENDING,
            )
            for f in chosen
        ]
        self._check_space(destination, files)
        job = Job(
            new_job_id(),
            listing.repo_id,
            destination,
            files,
            revision=revision,
            commit=commit,
            quantization=request.quantization,
            include=include,
            exclude=request.exclude,
            created_destination=not destination.exists(),
        )
        job.bytes_done = sum(job.file_bytes(f) for f in files)
        self._jobs[job.job_id] = job
        self._move(job, JobStatus.QUEUED, "Waiting for a download slot")
        self._pump()
        return job

    async def cancel(self, job_id: str) -> Job:
        """Stop the job's transfer and remove its files; returns once the
        process is gone.  A finished job is returned as it is."""
        job = self.job(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            run.cancel = True
            run.wake.set()
            await run.finished.wait()
        elif job.status is JobStatus.QUEUED:
            # Held as running while its files go: the pump must not start it,
            # and a second cancel waits for this one (as for a runner).
            run = self._runs[job_id] = _Run(cancel=True)
            try:
                await self._cancelled(job, "Cancelled before it started")
            finally:
                self._runs.pop(job_id, None)
                run.finished.set()
                self._pump()
        return job

    async def verify(self, repo: str, revision: str | None = None) -> dict[str, Any]:
        """Whether a repo can be downloaded: XandRouting's verify-repo.  A
        missing or gated repo is an answer (exists/gated), not an error; only
        an unreachable Hub is (502)."""
        endpoint, token = self.endpoint, self.token
        ref = parse_repo(repo, None, endpoint) if looks_like_url(repo) else parse_repo(None, repo)
        revision = revision or ref.revision
        result: dict[str, Any] = {
            "repo_id": ref.repo_id,
            "revision": revision,
            "exists": False,
            "gated": False,
            "private": False,
            "accessible": False,
            "files": [],
            "total_size": 0,
            "gguf_quantizations": [],
        }
        try:
            listing = await self._hub(fetch_listing, endpoint, token, ref.repo_id, revision)
        except RepoGated as exc:
            return {**result, "exists": True, "gated": True, "error": exc.message}
        except RepoNotFound as exc:
            return {**result, "error": exc.message}
        result.update(
            repo_id=listing.repo_id,
            commit=listing.commit,
            exists=True,
            gated=listing.gated,
            private=listing.private,
            accessible=True,
            files=[{"name": f.name, "size": f.size} for f in listing.files],
            total_size=sum(f.size or 0 for f in listing.files),
            gguf_quantizations=quantizations(listing.files),
        )
        if listing.files:
            try:
                await self._pinned(endpoint, token, ref.repo_id, listing, revision,
                                   listing.files[0].name)  # fmt: skip
            except (RepoGated, RepoNotFound) as exc:
                result.update(accessible=False, error=exc.message)
        return result

    async def _pinned(self, endpoint: str, token: str | None, repo_id: str, listing: Listing,
                      revision: str | None, name: str) -> str:  # fmt: skip
        """The commit a download of ``listing`` is pinned to (the listing's,
        else the revision asked for).  For a gated repo, first the HEAD a
        transfer starts with, on the file ``name``: RepoGated when the token
        has not been granted access (the listing alone does not tell)."""
        commit = listing.commit or revision or "main"
        if listing.gated:
            await self._hub(check_access, endpoint, token, repo_id, commit, name)
        return commit

    # ---- decisions ----------------------------------------------------------------
    def _check_space(self, destination: Path, files: list[FileState]) -> None:
        need = sum(f.size or 0 for f in files if f.status is not FileStatus.PRESENT)
        # Other jobs on their way still need their own remaining bytes.
        others = sum(
            max(0, j.bytes_total - j.bytes_done) for j in self._jobs.values() if j.status in ACTIVE
        )
        free = self.free_bytes(destination)
        if need + others > free:
            busy = f" (other downloads still need {human_size(others)})" if others else ""
            raise InsufficientStorage(
                f"Not enough disk space for this download: it needs {human_size(need)} "
                f"({need} bytes), the disk of {destination} has {human_size(free)} "
                f"({free} bytes) free{busy}"
            )

    def _pump(self) -> None:
        """Start queued jobs, oldest first, while slots are free."""
        if self._closing:
            return
        for job in list(self._jobs.values()):
            if len(self._runs) >= self.config.max_concurrent_downloads:
                break
            if job.status is JobStatus.QUEUED and job.job_id not in self._runs:
                run = _Run()
                self._runs[job.job_id] = run
                job.started_at = job.started_at or time.time()
                self._move(job, JobStatus.DOWNLOADING, "Downloading model files...")
                task = asyncio.create_task(self._run(job, run), name=f"download-{job.job_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        ahead = 0
        for job in self._jobs.values():
            if job.status is JobStatus.QUEUED and job.job_id not in self._runs:
                job.message = f"Waiting for a download slot ({ahead} queued ahead)"
                ahead += 1

    def _move(self, job: Job, status: JobStatus, message: str) -> None:
        if job.status is not status and status not in EDGES[job.status]:
            raise RuntimeError(f"download {job.job_id}: {job.status} -> {status} is not allowed")
        job.status = status
        job.message = message
        self.store.record_download(job.job_id, job.record())

    def _finish(
        self, job: Job, status: JobStatus, message: str, error: DynllmError | None = None
    ) -> None:
        if error is not None:
            job.error, job.error_code = error.message, error.code
        job.finished_at = time.time()
        job.speed = 0.0
        self._move(job, status, message)
        self._trim()

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.status not in ACTIVE]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.job_id]
            self.store.forget_download(job.job_id)

    async def _hub(self, call: Callable[..., Any], endpoint: str, token: str | None,
                   repo_id: str, revision: str | None, *rest: Any) -> Any:  # fmt: skip
        try:
            return await asyncio.to_thread(call, endpoint, token, repo_id, revision, *rest)
        except DynllmError:
            raise
        except Exception as exc:  # the library's and the network's: one translation point
            log.info("Hub request for %s failed: %r", repo_id, exc)
            raise hub_error(exc, repo_id, endpoint, revision) from None

    # ---- one job's transfer (its runner) ------------------------------------------
    async def _run(self, job: Job, run: _Run) -> None:
        try:
            await self._transfer(job, run)
        except Exception as exc:  # a bug here must not leave the job "downloading" forever
            log.exception("download %s failed", job.job_id)
            if job.status is JobStatus.DOWNLOADING:
                self._finish(
                    job, JobStatus.FAILED, "The download stopped on an internal error",
                    DynllmError(f"internal error: {type(exc).__name__}"),
                )  # fmt: skip
        finally:
            self._runs.pop(job.job_id, None)
            run.finished.set()
            self._pump()

    async def _transfer(self, job: Job, run: _Run) -> None:
        for f in job.files:  # a restart's leftovers, or a finished file deleted since
            done = f.status in (FileStatus.DONE, FileStatus.PRESENT)
            if f.status is FileStatus.DOWNLOADING or (
                done and not _complete(job.destination / f.name, f.size)
            ):
                f.status = FileStatus.PENDING
        spec = {
            "repo_id": job.repo_id,
            "commit": job.commit,
            "endpoint": self.endpoint,
            "destination": str(job.destination),
            "files": [f.name for f in job.files if f.status is FileStatus.PENDING],
            "chunk_bytes": self.chunk_bytes,
            "parent": os.getpid(),
        }
        env = {
            **os.environ,
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("HF_TOKEN", None)
        if self.token:
            env["HF_TOKEN"] = self.token  # in the environment: argv is visible to every user
        if not run.cancel and not self._closing:
            # die_with_parent: a dynllm killed with -9 takes its transfers along
            # (a restart's resume would otherwise race them for the partial file).
            run.proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "dynllm.hubio",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        proc = run.proc
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec).encode())
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            proc.stdin.close()
            readers = [
                asyncio.create_task(self._read_events(job, run, proc)),
                asyncio.create_task(self._read_stderr(run, proc)),
            ]
            exited = asyncio.create_task(proc.wait())
            while not exited.done():
                woken = asyncio.create_task(run.wake.wait())
                await asyncio.wait({exited, woken}, timeout=POLL_SECONDS,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                woken.cancel()
                if (run.cancel or self._closing) and not exited.done():
                    await _stop(proc)
                self._progress(job, run)
            await asyncio.gather(*readers)
        self._progress(job, run, force=True)
        await self._conclude(job, run, None if proc is None else proc.returncode)

    async def _conclude(self, job: Job, run: _Run, returncode: int | None) -> None:
        if run.cancel:
            await self._cancelled(job, "Cancelled; the files it had written are removed")
        elif self._closing:
            for f in job.files:
                if f.status is FileStatus.DOWNLOADING:
                    f.status = FileStatus.PENDING
            self._move(
                job, JobStatus.QUEUED, "dynllm stopped; the download resumes at the next start"
            )
        elif returncode == 0 and all(
            f.status in (FileStatus.DONE, FileStatus.PRESENT) for f in job.files
        ):
            seconds = time.time() - (job.started_at or job.created_at)
            size = human_size(job.bytes_total)
            self._finish(
                job, JobStatus.COMPLETED,
                f"Downloaded {len(job.files)} file(s), {size}, in {seconds:.1f} s",
            )  # fmt: skip
            try:
                self.on_finished(job.destination)
            except Exception:  # the download stands; discovery's next scan finds it
                log.exception("download %s: the rescan after it failed", job.job_id)
        else:
            missing = [f.name for f in job.files if f.status is FileStatus.PENDING]
            code, message = run.failure or (
                "download_failed",
                f"The download process exited with status {returncode}"
                + (f" before {', '.join(missing)} arrived" if missing else ""),
            )
            if run.failure is None and run.stderr:
                log.warning("download %s: %s", job.job_id, " | ".join(run.stderr))
            error = _coded(code, message)
            self._finish(job, JobStatus.FAILED, message, error)

    async def _cancelled(self, job: Job, message: str) -> None:
        """The end of a cancelled job, by its runner or, for a job still
        queued, by ``cancel``: the files go (see the module's docstring), then
        the job is recorded as cancelled, once.  It stays active while its
        files go, so no other job is let into its destination meanwhile (nor
        has its partial file removed under it)."""
        await asyncio.to_thread(_remove_job_files, job)
        job.bytes_done = 0
        self._finish(job, JobStatus.CANCELLED, message)

    def _progress(self, job: Job, run: _Run, force: bool = False) -> None:
        job.bytes_done = sum(job.file_bytes(f) for f in job.files)
        now = time.monotonic()
        run.samples.append((now, job.bytes_done))
        while run.samples and now - run.samples[0][0] > SPEED_WINDOW:
            run.samples.popleft()
        first_t, first_b = run.samples[0]
        job.speed = (job.bytes_done - first_b) / (now - first_t) if now > first_t else 0.0
        if force or now - run.last_record >= RECORD_EVERY:
            run.last_record = now
            self.store.record_download(job.job_id, job.record())

    async def _read_events(self, job: Job, run: _Run, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        by_name = {f.name: f for f in job.files}
        async for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                run.stderr.append(raw.decode(errors="replace").rstrip())
                continue
            if not isinstance(event, dict):
                continue
            kind = event.get("event")
            f = by_name.get(str(event.get("name")))
            if kind == "file" and f is not None:
                f.status = FileStatus.DOWNLOADING
                f.partial = event.get("partial")
                self.store.record_download(job.job_id, job.record())
            elif kind == "done" and f is not None:
                f.status = FileStatus.DONE
                f.partial = None
                self.store.record_download(job.job_id, job.record())
            elif kind == "error":
                run.failure = (str(event.get("code")), str(event.get("message")))

    async def _read_stderr(self, run: _Run, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            run.stderr.append(raw.decode(errors="replace").rstrip())


def _coded(code: str, message: str) -> DynllmError:
    error = DynllmError(message)
    error.code = code
    return error


def _complete(path: Path, size: int | None) -> bool:
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the transfer's process group, SIGKILL after the grace; reaped."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue


def _hf_dir(destination: Path) -> Path:
    return destination / ".cache" / "huggingface"


def _remove_job_files(job: Job) -> None:
    """What a cancel removes (see the module's docstring).  Runs in a worker
    thread, after the transfer's process is gone."""
    hf = _hf_dir(job.destination)
    for f in job.files:
        if f.status is FileStatus.PRESENT:
            continue
        if f.status is FileStatus.DONE:
            (job.destination / f.name).unlink(missing_ok=True)
        for suffix in (".metadata", ".lock"):
            (hf / "download" / (f.name + suffix)).unlink(missing_ok=True)
        f.status, f.partial = FileStatus.PENDING, None
    if hf.is_dir():
        for partial in hf.rglob("*.incomplete"):
            partial.unlink(missing_ok=True)
    _prune(job.destination, keep_root=not job.created_destination)


_HF_BOOKKEEPING = frozenset({"CACHEDIR.TAG", ".gitignore", ".gitignore.lock"})


def _prune(destination: Path, keep_root: bool) -> None:
    """Remove the empty folders a cancelled job leaves (bottom up), and
    ``.cache/huggingface`` when only huggingface_hub's own markers are left."""
    hf = _hf_dir(destination)
    if not destination.is_dir():
        return
    for folder, _, _ in sorted(os.walk(destination), key=lambda t: -len(t[0])):
        if folder != str(destination):
            with contextlib.suppress(OSError):  # not empty: someone else's files
                os.rmdir(folder)
    if hf.is_dir() and {p.name for p in hf.iterdir()} <= _HF_BOOKKEEPING:
        for name in _HF_BOOKKEEPING:
            (hf / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            hf.rmdir()
            hf.parent.rmdir()
    if not keep_root:
        with contextlib.suppress(OSError):
            destination.rmdir()
