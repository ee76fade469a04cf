"""Split GGUF models, projectors and grouped-query variants of the tiny fixtures.

Real GGUF repositories on the Hub ship big models as shards written by
llama.cpp's ``gguf-split``: ``NAME-00001-of-0000N.gguf`` ... ``NAME-0000N-of-0000N.gguf``.
Each shard is a valid GGUF of its own; all carry ``split.no`` (u16, 0-based),
``split.count`` (u16) and ``split.tensors.count`` (i32, tensors over all shards);
the first shard carries every other metadata key too, the others only those three.
llama-server opened on the first shard finds the rest by that naming scheme.
:func:`split_gguf` writes exactly that layout from any single-file GGUF, so the
shards are byte-for-byte what a reader of real split files meets.

:func:`write_gqa_llama` writes a tiny llama with fewer KV heads than query heads
(grouped-query attention), which the VRAM estimate's tests need: ``tiny_gguf``
always writes ``n_head_kv == n_head``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from tests.support import tiny_gguf
from tests.support.tiny_gguf import TinyModelSpec
from tests.support.tiny_mmproj import write_tiny_audio_mmproj

__all__ = [
    "rewrite_gguf",
    "shard_names",
    "split_gguf",
    "tensor_bytes",
    "write_gqa_llama",
    "write_mmproj",
    "write_split_llama",
]

# llama.cpp's llama_split_path(): "%s-%05d-of-%05d.gguf"
_SHARD_FORMAT = "{stem}-{no:05d}-of-{count:05d}.gguf"

TensorEdit = Callable[[str, npt.NDArray[Any]], npt.NDArray[Any]]


def shard_names(stem: str, shards: int) -> list[str]:
    """The file names llama.cpp expects for ``shards`` shards of ``stem``."""
    return [_SHARD_FORMAT.format(stem=stem, no=i + 1, count=shards) for i in range(shards)]


def _copy_fields(
    reader: gguf.GGUFReader, writer: gguf.GGUFWriter, overrides: Mapping[str, Any]
) -> None:
    """Every key of ``reader`` into ``writer`` (as gguf's own gguf_new_metadata does),
    with ``overrides`` replacing values of the same type."""
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = overrides.get(field.name, field.contents())
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)


def _rewrite(
    src: Path,
    outputs: Sequence[Path],
    *,
    overrides: Mapping[str, Any] | None = None,
    edit: TensorEdit | None = None,
) -> list[Path]:
    """Write ``src`` again as ``outputs`` (one file, or the shards of a split)."""
    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{src} has no general.architecture")
    arch = str(arch_field.contents())
    tensors = list(reader.tensors)
    count = len(outputs)
    if count > len(tensors):
        raise ValueError(f"{len(tensors)} tensors cannot fill {count} shards")

    for index, out in enumerate(outputs):
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(out), arch=arch)
        if index == 0:
            _copy_fields(reader, writer, overrides or {})
        else:
            # gguf-split writes only the split keys into shards 2..N.
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        if count > 1:
            writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, index)
            writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, count)
            writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
        # Even shares, in file order (gguf-split keeps the order too).
        for tensor in tensors[index * len(tensors) // count : (index + 1) * len(tensors) // count]:
            data: npt.NDArray[Any] = np.array(tensor.data)
            if edit is not None:
                data = edit(tensor.name, data)
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return list(outputs)


def rewrite_gguf(src: Path, dst: Path, overrides: Mapping[str, Any]) -> Path:
    """Copy ``src`` to ``dst`` with some metadata values replaced (same types), e.g.
    ``{"llama.pooling_type": 4}`` to make the tiny embedding model a reranker."""
    return _rewrite(Path(src), [Path(dst)], overrides=overrides)[0]


def split_gguf(src: Path, directory: Path, stem: str, shards: int) -> list[Path]:
    """Write ``src`` as ``directory/stem-0000i-of-0000N.gguf`` shards, as gguf-split does.

    ``shards`` must be at least 2 and at most the number of tensors.
    """
    if shards < 2:
        raise ValueError("a split has at least 2 shards")
    outputs = [Path(directory) / name for name in shard_names(stem, shards)]
    return _rewrite(Path(src), outputs)


def _write_tiny(path: Path, spec: TinyModelSpec, seed: int) -> Path:
    # tiny_gguf's public writer takes keyword arguments that do not cover every
    # field of TinyModelSpec (n_ff, context_length); its internal one takes the spec.
    return tiny_gguf._write(path, spec, seed=seed, name="tiny-llama")


def write_split_llama(
    directory: Path, stem: str, shards: int, spec: TinyModelSpec | None = None, *, seed: int = 0
) -> list[Path]:
    """A tiny llama chat model (see ``tiny_gguf``) as ``shards`` gguf-split shards.

    Returns the shard paths in order (the first is what llama-server's ``-m`` takes).
    The default spec has 21 tensors, so up to 21 shards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-split-", dir=directory) as scratch:
        whole = _write_tiny(Path(scratch) / "whole.gguf", spec or TinyModelSpec(), seed)
        return split_gguf(whole, directory, stem, shards)


def write_gqa_llama(
    path: Path, spec: TinyModelSpec | None = None, *, n_head_kv: int = 2, seed: int = 0
) -> Path:
    """A tiny llama whose K and V projections have ``n_head_kv`` heads (GQA).

    Written as a tiny_gguf model, then rewritten with ``head_count_kv`` set and
    ``attn_k``/``attn_v`` cut to their first ``n_head_kv * head_dim`` rows, which is
    exactly the shape a GQA checkpoint has. llama-server serves it like any llama.
    """
    spec = spec or TinyModelSpec(n_layer=4, n_head=4)
    if spec.n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    kv_rows = n_head_kv * (spec.n_embd // spec.n_head)

    def cut(name: str, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if name.endswith((".attn_k.weight", ".attn_v.weight")):
            return np.ascontiguousarray(data[:kv_rows, :])
        return data

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-gqa-", dir=path.parent) as scratch:
        whole = _write_tiny(Path(scratch) / "whole.gguf", spec, seed)
        _rewrite(whole, [path], overrides={"llama.attention.head_count_kv": n_head_kv}, edit=cut)
    return path


def write_mmproj(
    directory: Path, name: str = "mmproj-F16.gguf", *, projection_dim: int = 64
) -> Path:
    """A real projector GGUF (architecture ``clip``, see ``tiny_mmproj``) in ``directory``.

    ``projection_dim`` must equal the text model's ``n_embd`` for llama-server to
    accept the pair (64 for the default tiny models).
    """
    return write_tiny_audio_mmproj(Path(directory) / name, projection_dim=projection_dim)


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in one GGUF file, as its tensor infos declare them."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
