#!/usr/bin/env python3
"""Test stand-in for a GPU that other backends fill up (NOT a real backend).

    oom_backend.py DIR hold NAME -- ARGV...
        Locks DIR/NAME.lock (held until this process dies), then becomes ARGV:
        a backend that "holds GPU memory" while it lives.
    oom_backend.py DIR need -- ARGV...
        If any DIR/*.lock is held by a live process, prints what llama.cpp
        prints when cudaMalloc fails and exits 1 (an out-of-memory load);
        otherwise becomes ARGV.

Every start appends "<mode> <pid>" to DIR/starts.log, so a test can count
the tries.  Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

OOM_LINES = [
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
    "cudaMalloc failed: out of memory",
    "alloc_tensor_range: failed to allocate CUDA0 buffer of size 4294967296",
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
    "main: exiting due to model loading error",
]


def held(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def main() -> None:
    gpu, mode, *rest = sys.argv[1:]
    split = rest.index("--")
    argv = rest[split + 1 :]
    root = Path(gpu)
    with open(root / "starts.log", "a") as log:
        log.write(f"{mode} {os.getpid()}\n")
    if mode == "hold":
        fd = os.open(root / f"{rest[0]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.set_inheritable(fd, True)  # kept across exec: held while the backend lives
    elif any(held(lock) for lock in sorted(root.glob("*.lock"))):
        for line in OOM_LINES:
            print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
