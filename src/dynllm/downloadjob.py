"""A download job as dynllm keeps it: its states, its files, the API's view
of it and the record the store keeps (``downloads.DownloadManager`` owns the
jobs and moves them between states)."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class JobStatus(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.DOWNLOADING})

EDGES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.DOWNLOADING, JobStatus.CANCELLED, JobStatus.INTERRUPTED, JobStatus.FAILED}
    ),
    # -> QUEUED: dynllm stops; the next start resumes it.  -> INTERRUPTED: a
    # restart finds it recorded as downloading and cannot resume it.
    JobStatus.DOWNLOADING: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,
            JobStatus.INTERRUPTED,
        }
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.INTERRUPTED: frozenset(),
}


class FileStatus(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    DONE = "done"
    PRESENT = "present"
    """Complete in the destination before the job started (never removed by it)."""


class DownloadRequest(BaseModel):
    """XandRouting's ``POST /v1/models/download`` body, plus ``repo_id`` and ``revision``."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    repo_id: str | None = None
    destination: str | None = None
    quantization: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    revision: str | None = None

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        return utf8_text(value)


def utf8_text(value: Any) -> Any:
    """``value`` when its strings are valid Unicode: JSON may carry a lone
    surrogate (``"\\ud800"``), which no URL, file name or log line can take."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


@dataclass
class FileState:
    name: str
    size: int | None
    status: FileStatus = FileStatus.PENDING
    partial: str | None = None
    """The partial file of the transfer in progress (the child names it)."""
    seen: int = 0
    """Its size when last looked at."""

    def view(self, done: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "bytes_done": done,
            "status": self.status.value,
        }


@dataclass
class Job:
    job_id: str
    repo_id: str
    destination: Path
    files: list[FileState]
    revision: str | None = None
    commit: str | None = None
    quantization: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    status: JobStatus = JobStatus.QUEUED
    message: str = ""
    error: str | None = None
    error_code: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    created_destination: bool = False
    """The destination did not exist before the job: a cancel may remove it."""
    # live figures (not recorded as such)
    bytes_done: int = 0
    speed: float = 0.0

    @property
    def bytes_total(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def file_bytes(self, f: FileState) -> int:
        if f.status in (FileStatus.DONE, FileStatus.PRESENT):
            return f.size or 0
        if f.partial is None:
            return 0
        # While it downloads, between the child's move of the partial file into
        # place and its "done" event neither path is the partial one: the bytes
        # are not gone (the progress must not step back).  A job waiting to
        # resume shows what its partial file holds.
        paths = [f.partial]
        if f.status is FileStatus.DOWNLOADING:
            paths.append(str(self.destination / f.name))
        for path in paths:
            with contextlib.suppress(OSError):
                f.seen = os.stat(path).st_size
                return f.seen
        return f.seen if f.status is FileStatus.DOWNLOADING else 0

    def view(self) -> dict[str, Any]:
        """The job as the API shows it: XandRouting's four fields first."""
        total = self.bytes_total
        done = min(self.bytes_done, total) if total else self.bytes_done
        speed = round(self.speed, 1) if self.status is JobStatus.DOWNLOADING else 0.0
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "destination": str(self.destination),
            "message": self.message,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "quantization": self.quantization,
            "files": [f.view(self.file_bytes(f)) for f in self.files],
            "bytes_done": done,
            "bytes_total": total,
            "progress": round(done / total, 4) if total else (1.0 if self.finished_ok else 0.0),
            "speed_bytes_per_s": speed,
            "eta_seconds": round((total - done) / speed, 1) if speed > 0 and total else None,
            "error": self.error,
            "error_code": self.error_code,
            "created_at": iso_time(self.created_at),
            "finished_at": iso_time(self.finished_at),
        }

    @property
    def finished_ok(self) -> bool:
        return self.status is JobStatus.COMPLETED

    def record(self) -> dict[str, Any]:
        """What the store keeps (enough to resume after a restart)."""
        return {
            "job_id": self.job_id,
            "repo_id": self.repo_id,
            "destination": str(self.destination),
            "revision": self.revision,
            "commit": self.commit,
            "quantization": self.quantization,
            "include": self.include,
            "exclude": self.exclude,
            "status": self.status.value,
            "message": self.message,
            "error": self.error,
            "error_code": self.error_code,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "created_destination": self.created_destination,
            "bytes_done": self.bytes_done,
            "files": [
                {"name": f.name, "size": f.size, "status": f.status.value, "partial": f.partial}
                for f in self.files
            ],
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Job:
        """A recorded job (KeyError/ValueError/TypeError when the record is unusable)."""
        files = [
            FileState(
                str(f["name"]),
                None if f.get("size") is None else int(f["size"]),
                FileStatus(f.get("status", "pending")),
                f.get("partial"),
            )
            for f in data["files"]
        ]
        return cls(
            job_id=str(data["job_id"]),
            repo_id=str(data["repo_id"]),
            destination=Path(data["destination"]),
            files=files,
            revision=data.get("revision"),
            commit=data.get("commit"),
            quantization=data.get("quantization"),
            include=data.get("include"),
            exclude=data.get("exclude"),
            status=JobStatus(data["status"]),
            message=str(data.get("message", "")),
            error=data.get("error"),
            error_code=data.get("error_code"),
            created_at=float(data.get("created_at") or time.time()),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            created_destination=bool(data.get("created_destination", False)),
            bytes_done=int(data.get("bytes_done") or 0),
        )


def iso_time(at: float | None) -> str | None:
    """A time since the epoch as the API shows it (ISO 8601, UTC, seconds);
    None for none, or for an infinite one (a model that never expires)."""
    if at is None or not math.isfinite(at):
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def new_job_id() -> str:
    """XandRouting's ``download_<ms since the epoch>``, plus 6 hex digits: two
    jobs submitted in the same millisecond stay apart."""
    return f"download_{int(time.time() * 1000)}_{secrets.token_hex(3)}"
