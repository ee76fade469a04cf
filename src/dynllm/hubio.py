"""The Hub's I/O for downloads: the listing and access check the manager asks
for (in a worker thread), the translation of the Hub's failures into dynllm
errors, and the transfer itself, which runs in a child process::

    python -m dynllm.hubio < spec.json      (stdout: one JSON event per line)

Events: ``{"event": "file", "name", "partial", "size"}`` when a file's
transfer starts (``partial`` is the file the bytes go to, which the parent
polls for progress), ``{"event": "done", "name"}``, and on failure
``{"event": "error", "name", "code", "message"}`` before exit status 1.

The transfer uses ``huggingface_hub``'s own pieces: ``get_hf_file_metadata``
(the HEAD on ``/resolve``: commit, ETag, size, redirect), ``http_get`` (the
GET, with ``Range`` resume and its retries) and its local-dir bookkeeping
(``.cache/huggingface/download/<file>.metadata`` and the lock).  Not
``hf_hub_download`` itself: since huggingface_hub 2.4 (its PR #4228) that
writes each transfer to a process-unique ``<etag>.<random>.incomplete`` file
and deletes it on failure, so a killed or restarted download would start
again from byte 0.  The child writes to the stable name
``<hash>.<etag>.incomplete`` (``LocalDownloadFilePaths.incomplete_path``)
and resumes it with ``http_get(resume_size=...)``.  A file whose ETag is a
sha256 (every LFS file on the Hub) is hashed before it is moved into place:
a resumed file that does not match is deleted, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynllm.errors import (
    DynllmError,
    HubUnavailable,
    InsufficientStorage,
    RepoGated,
    RepoNotFound,
)
from dynllm.hubfiles import RepoFile, origin

log = logging.getLogger("dynllm.downloads")

LISTING_TIMEOUT = 15.0
"""Seconds the Hub has to answer a listing or a HEAD (the library's own
default is 10 s for a HEAD and none for the listing)."""


@dataclass(frozen=True, slots=True)
class Listing:
    repo_id: str
    commit: str | None
    files: list[RepoFile]
    gated: bool
    private: bool


def hub_error(exc: BaseException, repo_id: str, endpoint: str, revision: str | None) -> DynllmError:
    """A huggingface_hub or network failure as a dynllm error with plain words
    (the library's text, which holds URLs and advice for its own API, goes to
    the log only)."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token_hint = "set hf_token in the config (or HF_TOKEN) to a token that can read it"
    if isinstance(exc, GatedRepoError):
        return RepoGated(
            f"The repository {repo_id} is gated: accept its terms on the Hub, then {token_hint}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return RepoNotFound(f"The repository {repo_id} has no revision {revision!r}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return RepoNotFound(f"A file listed in {repo_id} is missing on the Hub")
    if isinstance(exc, DisabledRepoError):
        return RepoNotFound(f"The repository {repo_id} is disabled on the Hub")
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFound(
            f"No repository {repo_id} on the Hub at {endpoint} (if it is private, {token_hint})"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return RepoGated(f"The Hub refused access to {repo_id} (HTTP {status}): {token_hint}")
        if status == 404:
            return RepoNotFound(f"No repository {repo_id} on the Hub at {endpoint}")
        return HubUnavailable(f"The Hub at {endpoint} answered HTTP {status} for {repo_id}")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnavailable("HF_HUB_OFFLINE is set in dynllm's environment: no download")
    import httpx2

    if isinstance(exc, httpx2.TimeoutException):
        return HubUnavailable(f"The Hub at {endpoint} did not answer in time")
    if isinstance(exc, httpx2.TransportError | ConnectionError):
        return HubUnavailable(f"Cannot reach the Hub at {endpoint}")
    return HubUnavailable(f"The Hub at {endpoint} gave an answer dynllm cannot read for {repo_id}")


def _quiet_library() -> None:
    """huggingface_hub, imported in dynllm's process, with its telemetry off.

    With telemetry on, every request's headers (``build_hf_headers``) first
    look up "AI agent harnesses" at ``constants.ENDPOINT`` -- huggingface.co
    unless HF_ENDPOINT was in the environment at import -- whatever endpoint
    the call itself was given: a request to the internet that hf_endpoint
    must not cause.  The transfer child gets HF_HUB_DISABLE_TELEMETRY=1 in
    its environment instead.
    """
    import huggingface_hub.constants as hf_constants

    hf_constants.HF_HUB_DISABLE_TELEMETRY = True


def fetch_listing(endpoint: str, token: str | None, repo_id: str, revision: str | None) -> Listing:
    """The repo's commit and files with their sizes (one ``GET /api/models``).
    Blocks: call it in a worker thread.  Raises what ``hub_error`` translates."""
    _quiet_library()
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=token).model_info(
        repo_id, revision=revision, files_metadata=True, timeout=LISTING_TIMEOUT
    )
    files = [
        RepoFile(s.rfilename, s.lfs.size if s.lfs is not None else s.size)
        for s in info.siblings or []
    ]
    return Listing(info.id or repo_id, info.sha, files, bool(info.gated), bool(info.private))


def check_access(endpoint: str, token: str | None, repo_id: str, revision: str, name: str) -> None:
    """The HEAD a transfer starts with, for one file: a gated repo whose
    terms the token has not accepted fails here (GatedRepoError)."""
    _quiet_library()
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
    get_hf_file_metadata(url, token=token, endpoint=endpoint, timeout=LISTING_TIMEOUT)


# ---- the child process ---------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ChecksumMismatch(Exception):
    pass


def _fetch(spec: dict[str, Any], name: str, token: str | None) -> None:
    """One file: HEAD, then resume or start its partial file, check, move in place."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub._local_folder import (
        get_local_download_paths,
        read_download_metadata,
        write_download_metadata,
    )
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils._fixes import WeakFileLock
    from huggingface_hub.utils._headers import build_hf_headers

    destination, endpoint = Path(spec["destination"]), spec["endpoint"]
    url = hf_hub_url(spec["repo_id"], name, revision=spec["commit"], endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    if meta.etag is None or meta.commit_hash is None:
        raise HubUnavailable(f"The Hub at {endpoint} did not give the file's ETag and commit")
    paths = get_local_download_paths(destination, name)
    # (read_download_metadata takes the file's lock itself; it is not reentrant)
    local = read_download_metadata(destination, name)
    if paths.file_path.is_file() and local is not None and local.etag == meta.etag:
        return
    with WeakFileLock(paths.lock_path):
        partial = paths.incomplete_path(meta.etag)
        if meta.size is not None and partial.exists() and partial.stat().st_size > meta.size:
            partial.unlink()  # longer than the file: not a prefix of it
        _emit({"event": "file", "name": name, "partial": str(partial), "size": meta.size})
        headers = build_hf_headers(token=token)
        if origin(meta.location) != origin(url):  # a CDN: the token stays on the Hub
            headers.pop("authorization", None)
        with partial.open("ab") as out:
            http_get(meta.location, out, resume_size=out.tell(), headers=headers,
                     expected_size=meta.size, displayed_filename=name)  # fmt: skip
        etag = meta.etag.lower()
        is_sha256 = len(etag) == 64 and all(c in "0123456789abcdef" for c in etag)
        if is_sha256 and _sha256_of(partial) != etag:
            partial.unlink()
            raise ChecksumMismatch(name)
        paths.file_path.unlink(missing_ok=True)
        os.replace(partial, paths.file_path)
    write_download_metadata(destination, name, commit_hash=meta.commit_hash, etag=meta.etag)


def _failure(exc: BaseException, spec: dict[str, Any], name: str) -> tuple[str, str]:
    """The (code, message) a failed file becomes in the job."""
    if isinstance(exc, ChecksumMismatch):
        return (
            "checksum_mismatch",
            f"{name} did not match its sha256 after the transfer; it was deleted, try again",
        )
    if isinstance(exc, DynllmError):
        return exc.code, exc.message
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return InsufficientStorage.code, f"The disk filled up while writing {name}"
    from huggingface_hub.errors import HfHubHTTPError

    if (
        isinstance(exc, OSError)
        and not isinstance(exc, HfHubHTTPError | ConnectionError)
        and (exc.errno is not None)
    ):
        return "download_failed", f"Cannot write {name} in {spec['destination']}: {exc.strerror}"
    error = hub_error(exc, spec["repo_id"], spec["endpoint"], spec["commit"])
    return error.code, f"{name}: {error.message}"


def child_main() -> int:
    spec = json.loads(sys.stdin.read())
    if os.getppid() != spec["parent"]:  # the parent died before the death signal was set
        return 1
    import huggingface_hub.constants as hf_constants

    hf_constants.DOWNLOAD_CHUNK_SIZE = int(spec["chunk_bytes"])  # see CHUNK_BYTES
    token = os.environ.get("HF_TOKEN") or None
    for name in spec["files"]:
        try:
            _fetch(spec, name, token)
        except Exception as exc:  # reported to the parent, which owns the job's state
            code, message = _failure(exc, spec, name)
            print(f"download of {name} failed: {exc!r}", file=sys.stderr)
            _emit({"event": "error", "name": name, "code": code, "message": message})
            return 1
        _emit({"event": "done", "name": name})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
