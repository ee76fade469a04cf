"""Read a GGUF file's header: its metadata keys and its tensors' sizes. Pure apart
from reading the file.

Why not ``gguf.GGUFReader``: it builds numpy views for every element of every
array, and a real model's vocabulary is an array of 150 000 strings next to as
many merges: 10 s per file on our machines (measured on a Qwen2-sized
vocabulary), so a folder of twenty models would take minutes to scan. This
reader walks the same layout (llama.cpp's ``gguf.h``; the ``gguf`` package's
``gguf_reader.py``) but keeps only scalars, strings and short numeric arrays and
steps over long arrays without building anything: about 0.1 s for that file.
The tests check it against ``GGUFReader`` key for key and tensor for tensor.

Layout (little-endian, versions 2 and 3)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 type, value)          string = u64 length + UTF-8 bytes
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the tensor data

Every length and count is checked against the file's size before it is used, so
a truncated or corrupt file raises :class:`GGUFError` (never reads past the end,
never allocates what a corrupt count asks for).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GGUFError", "Header", "read_header"]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
KEEP_ARRAY_MAX = 4096
"""Numeric arrays up to this length are kept (per-layer head counts); longer ones
(vocabulary scores, token types) are stepped over."""

# GGUFValueType -> struct format of its scalar (STRING = 8 and ARRAY = 9 are read apart).
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_STRING = 8
_ARRAY = 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """Not a GGUF file, or a truncated or corrupt one; the message says which, in plain words."""


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    """Scalars, strings and numeric arrays of at most KEEP_ARRAY_MAX elements (as tuples)."""
    tensor_count: int
    tensor_bytes: int
    """Bytes of tensor data over this file's tensors, as their types and shapes say."""


def _quant_sizes() -> dict[int, tuple[int, int]]:
    # Imported here, not at module load: the gguf package pulls in numpy, which the
    # server does not otherwise need until the first scan.
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): (int(block), int(size)) for kind, (block, size) in GGML_QUANT_SIZES.items()}


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated: {what} runs past the end of the file")

    def unpack(self, fmt: struct.Struct, what: str) -> Any:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"corrupt: {what} is not UTF-8") from exc

    def value(self, kind: int, what: str) -> Any:
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            return self.array(what)
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFError(f"corrupt: {what} has unknown value type {kind}")
        return self.unpack(fmt, what)

    def array(self, what: str) -> tuple[Any, ...] | None:
        kind = self.u32(what)
        count = self.u64(what)
        if kind == _STRING:
            # Every string takes at least its 8-byte length.
            self.need(8 * count, what)
            # The hot loop of a scan (a vocabulary is 150 000 strings): locals only,
            # one bounds check per string.
            unpack_from, data, size, pos = _U64.unpack_from, self.data, self.size, self.pos
            for _ in range(count):
                if pos + 8 > size:
                    raise GGUFError(f"truncated: {what} runs past the end of the file")
                pos += 8 + unpack_from(data, pos)[0]
            if pos > size:
                raise GGUFError(f"truncated: {what} runs past the end of the file")
            self.pos = pos
            return None
        if kind == _ARRAY:
            raise GGUFError(f"corrupt: {what} is an array of arrays")
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFError(f"corrupt: {what} has unknown element type {kind}")
        self.need(fmt.size * count, what)
        if count > KEEP_ARRAY_MAX:
            self.pos += fmt.size * count
            return None
        values = tuple(
            v for (v,) in fmt.iter_unpack(self.data[self.pos : self.pos + fmt.size * count])
        )
        self.pos += fmt.size * count
        return values


def _parse(data: mmap.mmap | bytes) -> Header:
    cur = _Cursor(data)
    cur.need(4, "the magic number")
    if bytes(data[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic number)")
    cur.pos = 4
    version = cur.u32("the version")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise GGUFError("a big-endian GGUF file; only little-endian files are read")
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key count")
    # Each key and each tensor info takes well over 8 bytes: a count beyond that is corrupt.
    if 8 * (n_tensors + n_kv) > cur.size:
        raise GGUFError(f"truncated or corrupt: too short for {n_kv} keys and {n_tensors} tensors")

    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = cur.string(f"key {index}")
        kind = cur.u32(f"the type of {key}")
        value = cur.value(kind, key)
        if value is not None:
            metadata[key] = value

    sizes = _quant_sizes()
    infos: list[tuple[str, int, int]] = []  # name, offset, bytes
    for index in range(n_tensors):
        name = cur.string(f"tensor {index}'s name")
        n_dims = cur.u32(f"tensor {name}'s rank")
        if n_dims > 8:
            raise GGUFError(f"corrupt: tensor {name} has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.u64(f"tensor {name}'s shape")
        ggml_type = cur.u32(f"tensor {name}'s type")
        offset = cur.u64(f"tensor {name}'s offset")
        block_type = sizes.get(ggml_type)
        if block_type is None:
            raise GGUFError(
                f"tensor {name} has a tensor type this reader does not know ({ggml_type})"
            )
        block, type_size = block_type
        infos.append((name, offset, elements * type_size // block))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError("corrupt: general.alignment is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    total = 0
    for name, offset, nbytes in infos:
        if data_start + offset + nbytes > cur.size:
            raise GGUFError(f"truncated: tensor {name}'s data runs past the end of the file")
        total += nbytes
    return Header(metadata=metadata, tensor_count=n_tensors, tensor_bytes=total)


def read_header(path: Path) -> Header:
    """The header of the GGUF file at ``path``.

    Raises GGUFError for a file that is not GGUF, truncated or corrupt, and
    OSError when it cannot be opened or mapped.
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise GGUFError("empty file")
        # The OS pages in only the header; the tensor data is never touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)
