"""Which files of a Hugging Face repo a download takes, and where they go.

Pure functions (no network; only ``confine`` looks at the file system, to
resolve symlinks): the download manager (``dynllm.downloads``) and
``dynllm pull`` call them.

* ``parse_repo``: a request's ``url`` or ``repo_id`` as a repo id (and the
  revision or file a ``/tree/REV`` or ``/resolve/REV/FILE`` address names).
  ``https://huggingface.co/ORG/NAME``, ``hf.co/ORG/NAME`` and
  ``<configured endpoint>/ORG/NAME`` all name the repo ``ORG/NAME``; the
  transfer always goes to the configured endpoint.
* ``parse_pull_spec``: ``REPO[:QUANT]`` as ``dynllm pull`` takes it.
* ``quant_of``: the GGUF quantization tag in a file's path (``Q4_K_M``,
  ``IQ4_XS``, ``Q8_0``, ``BF16``, unsloth's ``UD-Q4_K_XL``), from the file
  name or, for the folder-per-quant layout (``Q4_K_M/x-00001-of-00002.gguf``),
  from its folder.
* ``select_files``: the files of a listing a request asks for.  With a
  ``quantization``, only the GGUF files of that quantization (every shard of a
  split one) and one multimodal projector (``mmproj*.gguf``) if the repo has
  any; no README, LICENSE or other small files, which llama.cpp never reads.
  ``include``/``exclude`` are glob lists (``huggingface_hub``'s
  ``filter_repo_objects``: ``*`` crosses ``/``) applied first.
* ``confine``: a destination folder under ``models_dir``, or 400.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from dynllm.errors import BadRequest, QuantizationNotFound

NAME_MAX = 255
HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
DEFAULT_ENDPOINT = "https://huggingface.co"

# A quantization tag, after anything but a letter or digit ("-", "_", ".",
# "/" or the start) and before "-", ".", "/" or the end ("Q4_K_Mx" is none):
# Q4_K_M, Q8_0, Q4_0_4_4, IQ2_XXS, IQ4_NL, Q6_K, Q2_K_XL, TQ1_0, MXFP4_MOE,
# F16, BF16, F32, optionally unsloth's "UD-".
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])("
    r"(?:UD-)?(?:I?Q[0-9]_(?:K(?:_(?:XXS|XS|S|M|L|XL))?|[0-9](?:_[0-9]_[0-9])?|XXS|XS|S|M|L|NL)"
    r"|TQ[12]_0|MXFP4(?:_MOE)?|BF16|FP16|FP32|F16|F32)"
    r")(?![A-Za-z0-9_])",
    re.IGNORECASE,
)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")
# Projectors are picked in this order when a repo has several and none has
# the requested quantization's tag (F16 is what llama.cpp's converter writes).
_PROJECTOR_PREFERENCE = ("F16", "BF16", "F32")


@dataclass(frozen=True, slots=True)
class RepoFile:
    """One file of a repo listing: its path in the repo and size (None when
    the Hub did not say)."""

    name: str
    size: int | None


@dataclass(frozen=True, slots=True)
class RepoRef:
    """What a request's ``url``/``repo_id`` names."""

    repo_id: str
    revision: str | None = None
    path: str | None = None
    """A single file the address pointed at (``/resolve/REV/PATH``, ``/blob/REV/PATH``)."""


# ---- repo addresses -----------------------------------------------------------------


def _checked_repo_id(text: str, given_as: str) -> str:
    # (the submodules: huggingface_hub.utils exports its names lazily, untyped)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id

    repo_id = text.strip().strip("/")
    repo_id = repo_id.removesuffix(".git") if repo_id.endswith(".git") else repo_id
    if repo_id.startswith(("datasets/", "spaces/")):
        raise BadRequest(f"{given_as} {text!r} names a dataset or Space; only model repos download")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BadRequest(
            f"{given_as} {text!r} is not a Hugging Face repo id: expected ORG/NAME "
            "(letters, digits, '-', '_' and '.', at most 96 characters)"
        ) from None
    return repo_id


def origin(url: str) -> tuple[str, str, int | None]:
    """``url``'s (scheme, host, port), the default port filled in: two
    addresses with the same origin are the same server."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:  # a port that is not a number
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


def _repo_path(url: str, endpoint: str) -> str | None:
    """The path after the Hub's address in ``url`` (None: not a Hub address)."""
    if "://" not in url:
        url = "https://" + url  # "hf.co/org/name", "huggingface.co/org/name"
    parts = urlsplit(url)
    if (parts.hostname or "").lower() in HUB_HOSTS and parts.scheme in ("http", "https"):
        return parts.path
    base = endpoint.rstrip("/")
    if origin(url) == origin(base):
        prefix = urlsplit(base).path.rstrip("/")
        if parts.path.startswith(prefix + "/"):
            return parts.path[len(prefix) :]
    return None


MISSING_REPO = "Name the repo: 'url' (https://huggingface.co/ORG/NAME) or 'repo_id'"


def parse_repo(url: str | None, repo_id: str | None, endpoint: str = DEFAULT_ENDPOINT) -> RepoRef:
    """The repo a request names by ``url`` or ``repo_id`` (400 when neither,
    both disagree, or the address is not on the Hub)."""
    if repo_id is not None and not url:
        return RepoRef(_checked_repo_id(repo_id, "repo_id"))
    if not url:
        raise BadRequest(MISSING_REPO)
    path = _repo_path(url.strip(), endpoint)
    if path is None:
        raise BadRequest(
            f"url {url!r} is not a Hugging Face repo address: expected "
            f"https://huggingface.co/ORG/NAME or {endpoint.rstrip('/')}/ORG/NAME"
        )
    segments = [s for s in path.split("/") if s]
    if segments[:1] == ["models"]:  # huggingface.co/models/ORG/NAME is accepted by the Hub too
        segments = segments[1:]
    if segments[:1] in (["datasets"], ["spaces"]):
        raise BadRequest(f"url {url!r} names a dataset or Space; only model repos download")
    name_parts = 2 if len(segments) >= 2 and segments[1] not in ("tree", "resolve", "blob") else 1
    ref = RepoRef(_checked_repo_id("/".join(segments[:name_parts]), "url"))
    rest = segments[name_parts:]
    if not rest:
        return ref
    if rest[0] == "tree" and len(rest) >= 2:
        return RepoRef(ref.repo_id, rest[1])
    if rest[0] in ("resolve", "blob") and len(rest) >= 3:
        return RepoRef(ref.repo_id, rest[1], "/".join(rest[2:]))
    raise BadRequest(
        f"url {url!r}: expected the repo's address (https://huggingface.co/ORG/NAME), "
        "optionally with /tree/REVISION"
    )


def looks_like_url(text: str) -> bool:
    return "://" in text or text.lower().startswith(tuple(h + "/" for h in HUB_HOSTS))


def parse_pull_spec(spec: str) -> tuple[str, str | None]:
    """``REPO[:QUANT]`` (``REPO`` an id or an address) as (repo, quantization)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.isdigit():
        return head, tail
    return spec, None


def default_destination(repo_id: str) -> str:
    """XandRouting's folder name: the repo's name, lower-cased."""
    return repo_id.rsplit("/", 1)[-1].lower()


def human_size(n: float) -> str:
    """A size for people: 512 B, 2.7 MB, 4.7 GB, 1.1 PB (decimal units, like
    disk makers).  The download manager's messages and ``dynllm pull``'s
    progress use it."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


# ---- quantizations ------------------------------------------------------------------


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def is_projector(name: str) -> bool:
    return is_gguf(name) and "mmproj" in PurePosixPath(name).name.lower()


def _stem(part: str) -> str:
    stem = part[:-5] if part.lower().endswith(".gguf") else part
    return _SHARD.sub("", stem)


def quant_of(name: str) -> str | None:
    """The quantization tag of a GGUF path, upper-cased (None when it has none)."""
    for part in reversed(PurePosixPath(name).parts):
        found = _QUANT.findall(_stem(part))
        if found:
            return str(found[-1]).upper()
    return None


def quantizations(files: Sequence[RepoFile]) -> list[str]:
    """The quantizations a listing offers (projectors are not models)."""
    tags = {quant_of(f.name) for f in files if is_gguf(f.name) and not is_projector(f.name)}
    return sorted(t for t in tags if t is not None)


def _matches(tag: str | None, wanted: str) -> bool:
    if tag is None:
        return False
    return tag == wanted or tag == "UD-" + wanted


def _projector(projectors: list[RepoFile], wanted: str) -> RepoFile | None:
    if len(projectors) <= 1:
        return projectors[0] if projectors else None
    by_tag = {quant_of(p.name): p for p in projectors}
    for tag in (wanted, *_PROJECTOR_PREFERENCE):
        if tag in by_tag:
            return by_tag[tag]
    return min(projectors, key=lambda p: (p.size or 0, p.name))


def safe_name(name: str) -> bool:
    """A listed path that stays inside the destination (a Hub that lists
    ``../x`` or ``/etc/x`` gets those files skipped, not written)."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def select_files(
    files: Sequence[RepoFile],
    quantization: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    repo_id: str = "the repo",
) -> list[RepoFile]:
    """The files a download takes, in listing order (404 when a quantization
    matches nothing; 400 when the filters leave nothing)."""
    from huggingface_hub.utils._paths import filter_repo_objects

    chosen = list(
        filter_repo_objects(
            [f for f in files if safe_name(f.name)],
            allow_patterns=list(include) if include else None,
            ignore_patterns=list(exclude) if exclude else None,
            key=lambda f: f.name,
        )
    )
    if quantization:
        wanted = quantization.strip().upper()
        models = [
            f
            for f in chosen
            if is_gguf(f.name) and not is_projector(f.name) and _matches(quant_of(f.name), wanted)
        ]
        if any(quant_of(f.name) == wanted for f in models):  # exact tags win over UD- ones
            models = [f for f in models if quant_of(f.name) == wanted]
        if not models:
            available = quantizations(chosen) or quantizations(files)
            offer = ", ".join(available) if available else "none (it has no GGUF files)"
            raise QuantizationNotFound(
                f"{repo_id} has no GGUF file of quantization {quantization!r}; "
                f"quantizations available: {offer}"
            )
        projector = _projector([f for f in chosen if is_projector(f.name)], wanted)
        keep = {f.name for f in models} | ({projector.name} if projector else set())
        chosen = [f for f in chosen if f.name in keep]
    if not chosen:
        raise BadRequest(f"No file of {repo_id} matches the include/exclude patterns")
    return chosen


# ---- destinations -------------------------------------------------------------------


def confine(models_dir: Path, destination: str) -> Path:
    """``destination`` (a folder name, a relative path or an absolute path)
    as a folder strictly inside ``models_dir``, symlinks resolved; 400 for
    anything that would land elsewhere or that no file system would take."""
    if not destination or "\0" in destination or not destination.strip():
        raise BadRequest("destination must be a folder name under models_dir")
    try:
        # Checked here: a name the file system refuses (longer than NAME_MAX,
        # a lone surrogate) would otherwise fail later, as a 500.
        if any(len(os.fsencode(part)) > NAME_MAX for part in Path(destination).parts):
            raise BadRequest(f"destination has a name longer than {NAME_MAX} bytes")
        root = models_dir.expanduser().resolve()
        # An absolute destination replaces the root; ".." and symlinks are
        # resolved, so whatever escapes is seen here.
        target = (root / Path(destination).expanduser()).resolve()
    except (OSError, UnicodeError, RuntimeError):  # RuntimeError: a symlink loop
        raise BadRequest(f"destination {destination!r} is not a usable folder name") from None
    if target == root or not target.is_relative_to(root):
        raise BadRequest(
            f"destination {destination!r} is outside models_dir ({root}); "
            "give a folder name under it"
        )
    return target
