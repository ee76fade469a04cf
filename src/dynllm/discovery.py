"""Find the models in the models folders: GGUF files (split ones as one model, a
``mmproj*.gguf`` attached to the models next to it), Hugging Face folders and
OpenVINO IR folders. Pure apart from reading the file system: nothing is logged;
what could not be read is returned as ``Scan.problems`` for the caller to log.

Names are paths relative to the folder a model was found under, '/'-separated,
without extension (and without a split's ``-00001-of-0000N``): the same files
get the same names on every scan. The walk is sorted, skips hidden entries
(``.cache``, where huggingface_hub keeps partial downloads) and partial files
(``*.incomplete``, ``*.part``), follows symlinks (the Hugging Face cache is
symlinks into ``blobs/``) and visits each real folder once, so a symlink loop
ends. A folder recognised as a Hugging Face or IR model is not descended into:
its subfolders belong to it.

Metadata comes from the files: a GGUF's header (``ggufheader``), a folder's
``config.json``; what it means (model type, estimate inputs) is ``modelmeta``'s.
``HeaderCache`` keeps the headers of unchanged files between scans so a periodic
rescan does not read every header again.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dynllm.config import BackendName, ModelType
from dynllm.ggufheader import GGUFError, Header, read_header
from dynllm.modelmeta import (
    PROJECTOR_ARCH,
    ModelMeta,
    gguf_meta,
    gguf_model_type,
    hf_meta,
    hf_model_type,
)

__all__ = [
    "Found",
    "FoundFile",
    "HeaderCache",
    "Kind",
    "ModelMeta",
    "Scan",
    "backends_for",
    "gguf_model_type",
    "hf_model_type",
    "pick_projector",
    "scan",
    "scan_one",
]


class Kind(StrEnum):
    GGUF = "gguf"
    HF = "hf"
    OPENVINO = "openvino"


@dataclass(frozen=True)
class FoundFile:
    name: str
    """Path relative to the model's folder ('/'-separated); for a GGUF its file name."""
    size: int
    """Bytes."""
    type: str
    """``gguf``, ``mmproj``, ``safetensors``, ``bin``, ``json``, ``xml``, ... (the suffix)."""


@dataclass(frozen=True)
class Found:
    name: str
    """Relative to its models folder, '/'-separated, no extension: ``qwen/Qwen2.5-0.5B-Q4_K_M``."""
    root: Path
    """The models folder it was found under (as configured, resolved)."""
    path: Path
    """Resolved: the .gguf (first shard of a split) or the HF / IR folder. A split's
    first shard keeps its own file name when it is a symlink (the Hugging Face cache):
    llama.cpp finds the other shards by that name."""
    kind: Kind
    files: tuple[FoundFile, ...]
    """Every file that belongs to it: all shards, the projector, an HF folder's files."""
    size: int
    """Bytes, all files."""
    mmproj: Path | None
    """A projector in the same folder (resolved)."""
    model_type: ModelType
    backends: tuple[BackendName, ...]
    """Enabled backends that run this kind, best first; empty when none is enabled."""
    meta: ModelMeta


@dataclass(frozen=True)
class Scan:
    found: tuple[Found, ...]
    """Sorted by name; on a name clash the first folder (or the first in walk order) wins."""
    problems: tuple[str, ...]
    """One line each, for the log: unreadable or corrupt files, missing folders, clashes."""


# ---- header cache ------------------------------------------------------------------
_FileKey = tuple[str, int, int, int, int]  # path, device, inode, size, mtime_ns


@dataclass
class HeaderCache:
    """GGUF headers by (path, inode, size, mtime) across scans. Owned by whoever
    rescans (one per app); entries of files not seen by the last scan are dropped."""

    _entries: dict[_FileKey, Header | str] = field(default_factory=dict)
    _seen: set[_FileKey] = field(default_factory=set)

    def read(self, path: Path, st: os.stat_result) -> Header | str:
        """The header, or a problem's words."""
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._seen.add(key)
        cached = self._entries.get(key)
        if cached is None:
            cached = _read_header(path)
            self._entries[key] = cached
        return cached

    def prune(self) -> None:
        for key in self._entries.keys() - self._seen:
            del self._entries[key]
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _read_header(path: Path) -> Header | str:
    try:
        return read_header(path)
    except GGUFError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


# ---- the walk ---------------------------------------------------------------------------
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".lock")
_MAX_DEPTH = 64
_HF_WEIGHT = re.compile(
    r"^(?:.*\.safetensors|pytorch_model.*\.bin|model\.safetensors\.index\.json)$", re.IGNORECASE
)
_IR_IMAGE_PARTS = ("openvino_text_encoder", "openvino_unet", "openvino_transformer")


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(_PARTIAL_SUFFIXES)


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _file_type(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    return suffix or "file"


@dataclass
class _Listing:
    files: dict[str, os.stat_result]
    """Regular files (after symlinks), by name, sorted."""
    dirs: list[str]
    """Folders (after symlinks), sorted."""


def backends_for(kind: Kind, enabled: Sequence[BackendName]) -> tuple[BackendName, ...]:
    """The enabled backends that run ``kind``, best first."""
    if kind is Kind.GGUF:
        wanted: tuple[BackendName, ...] = (BackendName.LLAMACPP,)
    elif kind is Kind.OPENVINO:
        wanted = (BackendName.OPENVINO,)
    else:
        wanted = (BackendName.VLLM, BackendName.TRANSFORMERS)
    return tuple(b for b in wanted if b in enabled)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _projector_key(name: str) -> str:
    stem = name.lower().removesuffix(".gguf")
    if stem.startswith("mmproj"):
        stem = stem[len("mmproj") :].lstrip("-_. ")
    return stem


def pick_projector(model_file: str, projectors: Sequence[str]) -> str | None:
    """The projector for ``model_file`` among ``projectors`` (file names in one
    folder): the one sharing the longest prefix with the model's name once its
    ``mmproj`` prefix is set aside, else the first by name."""
    if not projectors:
        return None
    ordered = sorted(projectors)
    target = model_file.lower()
    best = max(
        range(len(ordered)),
        key=lambda i: (_common_prefix(_projector_key(ordered[i]), target), -i),
    )
    return ordered[best]


class _Walker:
    """One scan's state: problems, the folders already visited (so a symlink loop or
    a folder reached twice yields its models once) and the header cache."""

    def __init__(self, enabled: Sequence[BackendName], cache: HeaderCache | None) -> None:
        self.enabled = tuple(enabled)
        self.cache = cache if cache is not None else HeaderCache()
        self.problems: list[str] = []
        self.visited: set[tuple[int, int]] = set()

    # -- listing
    def listing(self, folder: Path) -> _Listing | None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.problems.append(f"{folder}: cannot be read ({exc.strerror or exc})")
            return None
        files: dict[str, os.stat_result] = {}
        dirs: list[str] = []
        for entry in entries:
            if _skipped(entry.name):
                continue
            try:
                st = entry.stat()  # follows symlinks
            except OSError:
                # A dangling symlink (a Hugging Face snapshot whose blob is gone, or
                # a download being replaced): nothing to serve, not worth a line.
                continue
            if stat.S_ISDIR(st.st_mode):
                dirs.append(entry.name)
            elif stat.S_ISREG(st.st_mode):
                files[entry.name] = st
        return _Listing(files, dirs)

    def enter(self, folder: Path) -> bool:
        """Whether ``folder`` is seen for the first time in this scan."""
        try:
            st = folder.stat()
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            return False
        self.visited.add(key)
        return True

    # -- the recursive walk
    def walk(self, root: Path) -> list[Found]:
        out: list[Found] = []
        self._walk(root, root, (), out, 0)
        return out

    def _walk(
        self, root: Path, folder: Path, rel: tuple[str, ...], out: list[Found], depth: int
    ) -> None:
        if depth > _MAX_DEPTH:
            self.problems.append(f"{folder}: more than {_MAX_DEPTH} folders deep; not scanned")
            return
        if not self.enter(folder):
            return
        listing = self.listing(folder)
        if listing is None:
            return
        folder_model = self.folder_model(root, folder, rel, listing)
        out.extend(self.gguf_models(root, folder, rel, listing))
        if folder_model is not None:
            out.append(folder_model)
            return  # its subfolders belong to it
        if self.is_pipeline(folder, listing):
            return
        for name in listing.dirs:
            self._walk(root, folder / name, (*rel, name), out, depth + 1)

    # -- GGUF files of one folder
    def gguf_models(
        self, root: Path, folder: Path, rel: tuple[str, ...], listing: _Listing
    ) -> list[Found]:
        headers: dict[str, Header] = {}
        for name, st in listing.files.items():
            if not _is_gguf(name):
                continue
            header = self.cache.read(folder / name, st)
            if isinstance(header, str):
                self.problems.append(f"{folder / name}: {header}")
            else:
                headers[name] = header
        projectors = [
            n
            for n, h in headers.items()
            if n.lower().startswith("mmproj")
            or h.metadata.get("general.architecture") == PROJECTOR_ARCH
        ]
        models: list[Found] = []
        splits: dict[tuple[str, int], dict[int, str]] = {}
        for name in listing.files:
            if not _is_gguf(name) or name in projectors:
                continue
            match = _SPLIT.match(name)
            if match is None:
                if name in headers:
                    stem = name[: -len(".gguf")]
                    models.append(
                        self.gguf_found(root, folder, rel, stem, [name], headers, listing,
                                        projectors)
                    )  # fmt: skip
                continue
            key = (match["stem"], int(match["count"]))
            splits.setdefault(key, {})[int(match["no"])] = name
        for (stem, count), shards in splits.items():
            found = self.split_found(root, folder, rel, stem, count, shards, headers, listing,
                                     projectors)  # fmt: skip
            if found is not None:
                models.append(found)
        return models

    def split_found(
        self,
        root: Path,
        folder: Path,
        rel: tuple[str, ...],
        stem: str,
        count: int,
        shards: dict[int, str],
        headers: dict[str, Header],
        listing: _Listing,
        projectors: list[str],
    ) -> Found | None:
        where = folder / f"{stem}-*-of-{count:05d}.gguf"
        missing = [n for n in range(1, count + 1) if n not in shards]
        if count == 0 or missing:
            shown = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            self.problems.append(f"{where}: incomplete split, shard(s) {shown} missing")
            return None
        names = [shards[n] for n in range(1, count + 1)]
        if any(n not in headers for n in names):
            return None  # the unreadable shard already has its problem line
        declared = headers[names[0]].metadata.get("split.count")
        if declared is not None and declared != count:
            self.problems.append(
                f"{folder / names[0]}: says split.count {declared} but is named one of {count}"
            )
            return None
        return self.gguf_found(root, folder, rel, stem, names, headers, listing, projectors)

    def gguf_found(
        self,
        root: Path,
        folder: Path,
        rel: tuple[str, ...],
        stem: str,
        names: list[str],
        headers: dict[str, Header],
        listing: _Listing,
        projectors: list[str],
    ) -> Found:
        first = headers[names[0]].metadata
        files = [FoundFile(n, listing.files[n].st_size, "gguf") for n in names]
        projector = pick_projector(names[0], projectors)
        mmproj: Path | None = None
        if projector is not None:
            mmproj = (folder / projector).resolve()
            files.append(FoundFile(projector, listing.files[projector].st_size, "mmproj"))
        path = (folder / names[0]).resolve()
        if len(names) > 1 and path.name != names[0]:
            # llama.cpp finds shards 2..N next to the first by its name; a symlink
            # into the Hugging Face cache's blobs/ resolves to a hash.
            path = folder.resolve() / names[0]
        kind = Kind.GGUF
        weight_bytes = sum(headers[n].tensor_bytes for n in names)
        return Found(
            name="/".join((*rel, stem)),
            root=root,
            path=path,
            kind=kind,
            files=tuple(files),
            size=sum(f.size for f in files),
            mmproj=mmproj,
            model_type=gguf_model_type(first),
            backends=backends_for(kind, self.enabled),
            meta=gguf_meta(first, weight_bytes),
        )

    # -- Hugging Face and IR folders
    def is_pipeline(self, folder: Path, listing: _Listing) -> bool:
        """A diffusers pipeline that is not an IR export: no backend here serves it,
        and its parts (``unet/`` with config.json + safetensors) are not models."""
        if "model_index.json" not in listing.files:
            return False
        self.problems.append(
            f"{folder}: a diffusers pipeline in PyTorch form; only its OpenVINO export is served"
        )
        return True

    def folder_kind(self, folder: Path, listing: _Listing) -> Kind | None:
        files = listing.files
        if (
            "openvino_model.xml" in files
            or "openvino_language_model.xml" in files
            or ("openvino_encoder_model.xml" in files and "openvino_decoder_model.xml" in files)
            or any(n.startswith(_IR_IMAGE_PARTS) and n.endswith(".xml") for n in files)
        ):
            return Kind.OPENVINO
        if "model_index.json" in files and any(
            (folder / d / "openvino_model.xml").is_file() for d in listing.dirs
        ):
            return Kind.OPENVINO
        if "config.json" in files and any(_HF_WEIGHT.match(n) for n in files):
            return Kind.HF
        return None

    def folder_model(
        self, root: Path, folder: Path, rel: tuple[str, ...], listing: _Listing
    ) -> Found | None:
        kind = self.folder_kind(folder, listing)
        if kind is None:
            return None
        files = self.folder_files(folder)
        config: dict[str, Any] = {}
        if "config.json" in listing.files:
            try:
                loaded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                self.problems.append(f"{folder / 'config.json'}: cannot be read ({exc})")
                return None
            if isinstance(loaded, dict):
                config = loaded
        names = set(listing.files)
        if kind is Kind.OPENVINO:
            if "model_index.json" in names or any(
                n.startswith(_IR_IMAGE_PARTS) and n.endswith(".xml") for n in names
            ):
                model_type = ModelType.IMAGE_GENERATION
            elif config:
                model_type = hf_model_type(config, names)
            elif "openvino_encoder_model.xml" in names:
                model_type = ModelType.TRANSCRIPTION
            else:
                model_type = ModelType.LLM
            weight_bytes = sum(f.size for f in files if f.type == "bin")
        else:
            model_type = hf_model_type(config, names)
            weights = [f for f in files if f.type == "safetensors"]
            if not weights:  # transformers loads safetensors when both are there
                weights = [f for f in files if f.type == "bin" and "/" not in f.name]
            weight_bytes = sum(f.size for f in weights)
        # The root itself may be a model folder: name it after the folder.
        name = "/".join(rel) if rel else folder.name
        return Found(
            name=name,
            root=root,
            path=folder.resolve(),
            kind=kind,
            files=tuple(files),
            size=sum(f.size for f in files),
            mmproj=None,
            model_type=model_type,
            backends=backends_for(kind, self.enabled),
            meta=hf_meta(config, weight_bytes),
        )

    def folder_files(self, folder: Path) -> list[FoundFile]:
        """Every file under ``folder`` (its subfolders belong to it), GGUF files at its
        top aside (they are models of their own)."""
        out: list[FoundFile] = []
        seen: set[tuple[int, int]] = set()

        def visit(at: Path, prefix: str, depth: int) -> None:
            try:
                st = at.stat()
            except OSError:
                return
            if (st.st_dev, st.st_ino) in seen or depth > _MAX_DEPTH:
                return
            seen.add((st.st_dev, st.st_ino))
            listing = self.listing(at)
            if listing is None:
                return
            for name, fst in listing.files.items():
                if depth == 0 and _is_gguf(name):
                    continue
                out.append(FoundFile(prefix + name, fst.st_size, _file_type(name)))
            for name in listing.dirs:
                visit(at / name, f"{prefix}{name}/", depth + 1)

        visit(folder, "", 0)
        return out


# ---- entry points -------------------------------------------------------------------
def _resolved_dir(path: Path) -> Path | None:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return resolved if resolved.is_dir() else None


def scan(
    dirs: Sequence[Path], enabled: Sequence[BackendName], cache: HeaderCache | None = None
) -> Scan:
    """Every model under ``dirs``, in order; never raises for what is on disk.

    ``cache`` (optional) keeps GGUF headers of unchanged files from one scan to the next.
    """
    walker = _Walker(enabled, cache)
    by_name: dict[str, Found] = {}
    paths: dict[Path, str] = {}
    for configured in dirs:
        root = _resolved_dir(configured)
        if root is None:
            walker.problems.append(f"{configured}: models folder missing (or not a folder)")
            continue
        for found in walker.walk(root):
            if found.path in paths:
                continue  # the same model reached again through a symlink: one name
            if found.name in by_name:
                walker.problems.append(
                    f"{found.path}: not listed, the name '{found.name}' is taken by "
                    f"{by_name[found.name].path}"
                )
                continue
            by_name[found.name] = found
            paths[found.path] = found.name
    walker.cache.prune()
    found_sorted = tuple(sorted(by_name.values(), key=lambda f: f.name))
    return Scan(found=found_sorted, problems=tuple(walker.problems))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def scan_one(path: Path, dirs: Sequence[Path], enabled: Sequence[BackendName]) -> Found | None:
    """The model at ``path`` (or, for a folder holding exactly one model, inside it)
    if it lies inside one of ``dirs`` once symlinks and ``..`` are resolved; a
    relative ``path`` is tried under each folder in order. None otherwise: outside
    every folder, missing, not a model. Never raises for a bad path."""
    try:
        return _scan_one(Path(path), dirs, enabled)
    except (OSError, RuntimeError, ValueError):
        # ValueError: a NUL byte in the path; RuntimeError: a symlink loop on resolve.
        return None


def _scan_one(path: Path, dirs: Sequence[Path], enabled: Sequence[BackendName]) -> Found | None:
    roots = [(Path(d).expanduser(), r) for d in dirs if (r := _resolved_dir(Path(d))) is not None]
    candidates = [path] if path.is_absolute() else [given / path for given, _ in roots]
    for candidate in candidates:
        spellings = [candidate]
        if candidate.name and not _is_gguf(candidate.name):
            spellings.append(candidate.with_name(candidate.name + ".gguf"))
        for lexical in spellings:
            if not lexical.exists():
                continue
            real = lexical.resolve()
            for given, root in roots:
                if not _inside(real, root):
                    continue
                found = _model_at(lexical, real, given, root, enabled)
                if found is not None:
                    return found
    return None


def _relative(lexical: Path, given: Path, root: Path, real: Path) -> tuple[str, ...] | None:
    """``lexical`` relative to the folder, as the walk names it (symlinked folders keep
    their link names); None when no spelling of it lies inside."""
    normal = Path(os.path.normpath(lexical.absolute()))
    # normpath drops '..' without looking at symlinks: only a spelling that still
    # leads to the same file may name it.
    if normal.resolve() == real:
        for base in (root, Path(os.path.normpath(given.absolute()))):
            if normal.is_relative_to(base):
                return normal.relative_to(base).parts
    if real.is_relative_to(root):
        return real.relative_to(root).parts
    return None


def _model_at(
    lexical: Path, real: Path, given: Path, root: Path, enabled: Sequence[BackendName]
) -> Found | None:
    rel = _relative(lexical, given, root, real)
    if rel is None:
        return None
    walker = _Walker(enabled, None)
    if real.is_file():
        if not _is_gguf(lexical.name) or not rel:
            return None
        folder, parent_rel = lexical.parent, rel[:-1]
        listing = walker.listing(folder)
        if listing is None:
            return None
        wanted = real
        for found in walker.gguf_models(root, folder, parent_rel, listing):
            if any((folder / f.name).resolve() == wanted for f in found.files if f.type == "gguf"):
                return found
        return None
    # A folder: an HF / IR model itself, or a folder that holds exactly one model.
    listing = walker.listing(lexical)
    if listing is None:
        return None
    itself = walker.folder_model(root, lexical, rel, listing)
    if itself is not None and not any(_is_gguf(n) for n in listing.files):
        return itself
    inside: list[Found] = []
    walker._walk(root, lexical, rel, inside, 0)
    return inside[0] if len(inside) == 1 else None
