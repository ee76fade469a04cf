"""A stand-in for the Hugging Face Hub's HTTP API on loopback, for download tests.

It serves what huggingface_hub 2.4.0 asks for when dynllm downloads (read
from its source: ``hf_api.py`` ``HfApi.model_info`` and ``list_repo_tree``,
``file_download.py`` ``get_hf_file_metadata`` and ``http_get``,
``utils/_http.py`` ``hf_raise_for_status``):

    GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   repo info: sha, private, gated,
                                                            siblings (with ?blobs: size,
                                                            blobId, lfs)
    GET  /api/models/{repo}/tree/{rev}[/{path}]             file listing (recursive=true honoured)
    HEAD /{repo}/resolve/{rev}/{file}                       X-Repo-Commit, ETag (the sha256 of an
                                                            LFS file, the git blob id of others),
                                                            Content-Length, Accept-Ranges
    GET  /{repo}/resolve/{rev}/{file}                       the bytes; ``Range: bytes=N-`` -> 206

Errors as the real Hub sends them, with ``X-Error-Code`` (which
``hf_raise_for_status`` turns into its exception classes): a missing repo
404 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``, a
missing file 404 ``EntryNotFound``; a private repo 401 ``RepoNotFound``
without the right token; a gated repo lists its files (metadata is public on
the Hub) but its files answer 401 ``GatedRepo`` without the right token.

``throttle`` (bytes per second, changeable at any time) paces every file
body so that a cancel or a restart lands mid-transfer.  Between two chunks
the server watches its socket, so a client that goes away is noticed at
once: each ``Transfer`` records when its connection ended and why, and the
bytes it sent (``served_bytes`` adds them up per file).

It runs in a thread of the test process (``with FakeHub(repos) as hub``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.sockwait import pause_unless_gone
from tests.support.tiny_gguf import write_tiny_llama
from tests.support.tiny_split import write_mmproj, write_split_llama

GOOD_TOKEN = "hf_standin_token"
CHUNK = 16 << 10


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    private: bool = False
    sha: str = field(default_factory=lambda: secrets.token_hex(20))
    declared_sizes: dict[str, int] = field(default_factory=dict)
    """Sizes the listing claims instead of the real ones (a repo too big for any disk)."""

    def size(self, name: str) -> int:
        return self.declared_sizes.get(name, len(self.files[name]))

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith((".gguf", ".safetensors", ".bin"))

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return blob_id(data)


def blob_id(data: bytes) -> str:
    """git's object id of a blob (what the Hub's ETag is for a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Transfer:
    """One GET of a file body."""

    repo_id: str
    name: str
    offset: int
    started_at: float
    sent: int = 0
    ended_at: float | None = None
    ended: str | None = None  # "complete" | "client_gone" | "server_closing"


class FakeHub:
    def __init__(
        self,
        repos: list[HubRepo],
        *,
        throttle: int | None = None,
    ) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.throttle = throttle
        self.lock = threading.Lock()
        self.transfers: list[Transfer] = []
        self.requests: list[tuple[str, str]] = []
        self.closing = threading.Event()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- what the tests read --------------------------------------------------------
    def served_bytes(self, repo_id: str, name: str) -> int:
        with self.lock:
            return sum(t.sent for t in self.transfers if (t.repo_id, t.name) == (repo_id, name))

    def transfers_of(self, name: str) -> list[Transfer]:
        with self.lock:
            return [t for t in self.transfers if t.name == name]

    def open_transfers(self) -> list[Transfer]:
        with self.lock:
            return [t for t in self.transfers if t.ended_at is None]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read the hub's own records

    # ---- routing ----------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path))
        if path.startswith("/api/models/"):
            self._api(path.removeprefix("/api/models/"), query)
        elif "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            self._resolve(repo_id, revision, name, head)
        else:
            self._error(404, "EntryNotFound", "Not found")

    def _authorized(self) -> bool:
        value = self.headers.get("Authorization", "")
        return value == f"Bearer {GOOD_TOKEN}"

    def _repo(self, repo_id: str, revision: str | None) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            status = 401 if repo is not None else 404
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        if revision not in (None, "main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    # ---- /api/models ---------------------------------------------------------------------
    def _api(self, rest: str, query: Mapping[str, str]) -> None:
        revision: str | None = None
        tree_path: str | None = None
        if "/tree/" in rest:
            rest, _, after = rest.partition("/tree/")
            revision, _, tree_path = after.partition("/")
        elif "/revision/" in rest:
            rest, _, revision = rest.partition("/revision/")
        repo = self._repo(rest, revision)
        if repo is None:
            return
        if tree_path is not None:
            self._json(200, self._tree(repo, tree_path, query.get("recursive") in ("true", "True")))
            return
        blobs = query.get("blobs") in ("true", "True", "1")
        self._json(200, self._info(repo, blobs))

    def _info(self, repo: HubRepo, blobs: bool) -> dict[str, Any]:
        siblings = []
        for name in repo.files:
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling["size"] = repo.size(name)
                sibling["blobId"] = blob_id(repo.files[name])
                if repo.is_lfs(name):
                    sibling["lfs"] = {
                        "size": repo.size(name),
                        "sha256": repo.etag(name),
                        "pointerSize": 134,
                    }
            siblings.append(sibling)
        return {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.sha,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["gguf"] if any(n.endswith(".gguf") for n in repo.files) else [],
            "siblings": siblings,
        }

    def _tree(self, repo: HubRepo, under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name in repo.files:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "oid": blob_id(repo.files[name]),
                "size": repo.size(name),
                "path": name,
            }
            if repo.is_lfs(name):
                entry["lfs"] = {"oid": repo.etag(name), "size": repo.size(name), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        return entries

    # ---- /resolve ------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.gated and not self._authorized():
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it "
                "and be authenticated to access it. Please log in.",
            )
            return
        if name not in repo.files:
            self._error(404, "EntryNotFound", f'{name} does not exist on "{revision}"')
            return
        data = repo.files[name]
        size = len(data)
        start = _range_start(self.headers.get("Range"))
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{repo.etag(name)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if start is not None and start >= size and size > 0:
            self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
            return
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        offset = start or 0
        self.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Length": str(size - offset)}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self._body(repo, name, data, offset)

    def _body(self, repo: HubRepo, name: str, data: bytes, offset: int) -> None:
        transfer = Transfer(repo.repo_id, name, offset, time.time())
        with self.hub.lock:
            self.hub.transfers.append(transfer)
        connection: socket.socket = self.connection
        position = offset
        ended = "complete"
        try:
            while position < len(data):
                if self.hub.closing.is_set():
                    ended = "server_closing"
                    break
                chunk = data[position : position + CHUNK]
                self.wfile.write(chunk)
                self.wfile.flush()
                position += len(chunk)
                with self.hub.lock:
                    transfer.sent += len(chunk)
                throttle = self.hub.throttle
                more = position < len(data)
                if more and throttle and not pause_unless_gone(connection, len(chunk) / throttle):
                    ended = "client_gone"
                    break
        except (BrokenPipeError, ConnectionResetError):
            ended = "client_gone"
        finally:
            with self.hub.lock:
                transfer.ended_at = time.time()
                transfer.ended = ended
        if ended != "complete":
            self.close_connection = True

    # ---- plumbing ------------------------------------------------------------------------
    def _json(self, status: int, payload: Any) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Error-Code": code,
            "X-Error-Message": message,
        }
        self._send(status, headers, body)

    def _send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _range_start(value: str | None) -> int | None:
    """N of ``bytes=N-`` or ``bytes=N-M`` (what huggingface_hub's resume sends)."""
    if not value or not value.startswith("bytes="):
        return None
    first = value.removeprefix("bytes=").split(",")[0].split("-")[0].strip()
    return int(first) if first.isdigit() else None


# ---- repos for the tests ------------------------------------------------------------------

GGUF_REPO = "tiny-org/Tiny-Chat-GGUF"
GATED_REPO = "tiny-org/Gated-GGUF"
PRIVATE_REPO = "tiny-org/Private-GGUF"
HUGE_REPO = "tiny-org/Huge-GGUF"


def tiny_gguf_repo(scratch: Path, *, pad_mb: int = 0) -> HubRepo:
    """A GGUF repo laid out as real ones are: one file per quantization, a
    split quantization (two shards), a folder-per-quant split, a projector,
    and the small files (README, LICENSE, .gitattributes) a GGUF user never
    needs.  The models are tiny_gguf llamas (``pad_mb`` makes the Q4_K_M one
    that much bigger, so a throttled transfer of it takes a while)."""
    scratch.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        ".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# Tiny chat model\n\nA stand-in repo for tests.\n",
        "LICENSE": b"MIT\n",
    }
    for name, seed, pad in (("tiny-Q4_K_M.gguf", 1, pad_mb), ("tiny-Q8_0.gguf", 2, 0),
                            ("tiny-IQ4_XS.gguf", 3, 0)):  # fmt: skip
        files[name] = write_tiny_llama(scratch / name, seed=seed, pad_mb=pad).read_bytes()
    for shard in write_split_llama(scratch / "split", "tiny-Q2_K", 2, seed=4):
        files[shard.name] = shard.read_bytes()
    for shard in write_split_llama(scratch / "Q5_K_M", "tiny-Q5_K_M", 2, seed=5):
        files[f"Q5_K_M/{shard.name}"] = shard.read_bytes()
    files["mmproj-F16.gguf"] = write_mmproj(scratch / "proj").read_bytes()
    return HubRepo(GGUF_REPO, files)


def standard_repos(scratch: Path, *, pad_mb: int = 0) -> list[HubRepo]:
    """The tiny GGUF repo, a gated one, a private one and one too big for any disk."""
    small = {"model-Q4_K_M.gguf": write_tiny_llama(scratch / "g.gguf", seed=7).read_bytes()}
    return [
        tiny_gguf_repo(scratch / "tiny", pad_mb=pad_mb),
        HubRepo(GATED_REPO, dict(small), gated=True),
        HubRepo(PRIVATE_REPO, dict(small), private=True),
        HubRepo(HUGE_REPO, dict(small), declared_sizes={"model-Q4_K_M.gguf": 1 << 50}),
    ]
