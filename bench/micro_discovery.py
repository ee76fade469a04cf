"""What discovering models costs: reading GGUF headers and scanning a folder.

`uv run python -m bench.micro_discovery` measures, on this machine:

- reading one GGUF's metadata with dynllm's reader (``dynllm.ggufheader``)
  and with the ``gguf`` package's ``GGUFReader``: for a 100 MiB file with a
  tiny vocabulary, a 32k-token vocabulary (Llama-2's size) and a 152k-token
  vocabulary with as many merges (Qwen's size; GGUFReader only with
  ``--with-152k-gguf-reader``: it takes about 10 s);
- a scan of a folder of 200 small GGUFs, cold and with the header cache
  that rescans keep.

Each figure is the best of a few repeats (steady on a busy machine).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tests.support.tiny_gguf import write_tiny_llama

from dynllm.config import BackendName
from dynllm.discovery import HeaderCache, scan
from dynllm.ggufheader import read_header

REPEATS = 3


def best(work: Callable[[], Any], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return min(times)


def vocab_gguf(path: Path, n_tokens: int) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="qwen2")
    writer.add_block_count(2)
    writer.add_token_list([f"token{i}" for i in range(n_tokens)])
    writer.add_token_types([1] * n_tokens)
    writer.add_array("tokenizer.ggml.merges", [f"a{i} b{i}" for i in range(n_tokens)])
    writer.add_tensor("w", np.zeros((8, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--with-152k-gguf-reader", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {
            "100 MiB file, tiny vocabulary": write_tiny_llama(root / "big.gguf", pad_mb=100),
            "32k vocabulary": vocab_gguf(root / "v32k.gguf", 32_000),
            "152k vocabulary + merges": vocab_gguf(root / "v152k.gguf", 151_936),
        }
        print("| GGUF | dynllm's reader | gguf.GGUFReader |")
        print("|---|---|---|")
        for label, path in files.items():
            ours = best(lambda p=path: read_header(p))
            if "152k" in label and not args.with_152k_gguf_reader:
                theirs = "(skipped; about 10 s)"
            else:
                theirs = f"{best(lambda p=path: gguf.GGUFReader(p), 1) * 1000:.1f} ms"
            print(f"| {label} | {ours * 1000:.1f} ms | {theirs} |")

        tiny = write_tiny_llama(root / "tiny.gguf")
        models = root / "models"
        for index in range(200):
            target = models / f"family{index % 10}" / f"model-{index:03d}.gguf"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny, target)
        enabled = [BackendName.LLAMACPP]
        cold = best(lambda: scan([models], enabled))
        cache = HeaderCache()
        scan([models], enabled, cache)
        warm = best(lambda: scan([models], enabled, cache))
        print(f"\nscan of 200 small GGUFs: {cold * 1000:.0f} ms cold, {warm * 1000:.0f} ms cached")


if __name__ == "__main__":
    main()
