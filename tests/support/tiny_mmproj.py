"""Write a tiny audio projector GGUF (``llama-server --mmproj``) for the tiny text models.

llama.cpp's multimodal library (mtmd) reads a projector as a separate GGUF of
architecture ``clip``.  This one is a Whisper-style audio encoder with the
Qwen2-Audio projector (``qwen2a``): log-mel frames (128 bins) -> two 1-D
convolutions (the second with stride 2) -> ``block_count`` transformer blocks
-> a final layer norm -> one linear layer ``mm.a.fc`` into the text model's
embedding width, so ``projection_dim`` must equal the text model's ``n_embd``.

With random weights the audio embeddings are noise; the text model then
generates plain words from them (see ``tiny_gguf``), which is all a test of the
transcription route needs.  Tensor layouts follow the GGUF convention: numpy
shapes are ggml's ``ne`` reversed, so a matrix is ``(n_out, n_in)`` and a 1-D
convolution kernel ``(out_channels, in_channels, kernel)``.

Command line::

    python -m tests.support.tiny_mmproj OUT.gguf [--projection-dim 64] [--seed N]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["TinyAudioSpec", "main", "write_tiny_audio_mmproj"]

Array = npt.NDArray[np.float16] | npt.NDArray[np.float32]


@dataclass(frozen=True)
class TinyAudioSpec:
    """Shape of the audio encoder; ``projection_dim`` is the text model's width."""

    projection_dim: int = 64
    n_embd: int = 32
    n_ff: int = 64
    n_layer: int = 1
    n_head: int = 2
    n_mel_bins: int = 128
    # Whisper's 30 s window gives 3000 mel frames, 1500 after the stride-2 conv.
    n_positions: int = 1500


def _tensors(spec: TinyAudioSpec, seed: int) -> list[tuple[str, Array]]:
    rng = np.random.default_rng(seed)
    d, ff = spec.n_embd, spec.n_ff

    def normal(*shape: int, std: float) -> npt.NDArray[np.float32]:
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values

    def f16(*shape: int, std: float) -> npt.NDArray[np.float16]:
        return normal(*shape, std=std).astype(np.float16)

    def zeros(*shape: int) -> npt.NDArray[np.float32]:
        return np.zeros(shape, dtype=np.float32)

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    tensors: list[tuple[str, Array]] = [
        ("a.conv1d.1.weight", f16(d, spec.n_mel_bins, 3, std=(3 * spec.n_mel_bins) ** -0.5)),
        # Conv biases are (out_channels, 1) so ggml broadcasts them over time.
        ("a.conv1d.1.bias", zeros(d, 1)),
        ("a.conv1d.2.weight", f16(d, d, 3, std=(3 * d) ** -0.5)),
        ("a.conv1d.2.bias", zeros(d, 1)),
        ("a.position_embd.weight", normal(spec.n_positions, d, std=0.02)),
    ]
    for layer in range(spec.n_layer):
        p = f"a.blk.{layer}"
        tensors += [
            (f"{p}.ln1.weight", ones(d)),
            (f"{p}.ln1.bias", zeros(d)),
            (f"{p}.attn_q.weight", f16(d, d, std=d**-0.5)),
            (f"{p}.attn_q.bias", zeros(d)),
            # Whisper's key projection has no bias; mtmd asserts its absence.
            (f"{p}.attn_k.weight", f16(d, d, std=d**-0.5)),
            (f"{p}.attn_v.weight", f16(d, d, std=d**-0.5)),
            (f"{p}.attn_v.bias", zeros(d)),
            (f"{p}.attn_out.weight", f16(d, d, std=d**-0.5)),
            (f"{p}.attn_out.bias", zeros(d)),
            (f"{p}.ln2.weight", ones(d)),
            (f"{p}.ln2.bias", zeros(d)),
            (f"{p}.ffn_up.weight", f16(ff, d, std=d**-0.5)),
            (f"{p}.ffn_up.bias", zeros(ff)),
            (f"{p}.ffn_down.weight", f16(d, ff, std=ff**-0.5)),
            (f"{p}.ffn_down.bias", zeros(d)),
        ]
    tensors += [
        ("a.post_ln.weight", ones(d)),
        ("a.post_ln.bias", zeros(d)),
        ("mm.a.fc.weight", f16(spec.projection_dim, d, std=d**-0.5)),
        ("mm.a.fc.bias", zeros(spec.projection_dim)),
    ]
    return tensors


def write_tiny_audio_mmproj(
    path: Path, *, projection_dim: int = 64, seed: int = 0, spec: TinyAudioSpec | None = None
) -> Path:
    """Write the projector to ``path`` (about 250 KB) and return the path.

    ``projection_dim`` must be the ``n_embd`` of the text model it is paired
    with (64 for ``tiny_gguf``'s defaults); llama-server refuses a mismatch.
    """
    spec = spec or TinyAudioSpec(projection_dim=projection_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), arch="clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name("tiny-audio-projector")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool(gguf.Keys.Clip.HAS_AUDIO_ENCODER, True)
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, False)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "qwen2a")
    writer.add_uint32(gguf.Keys.ClipAudio.NUM_MEL_BINS, spec.n_mel_bins)
    writer.add_uint32(gguf.Keys.ClipAudio.EMBEDDING_LENGTH, spec.n_embd)
    writer.add_uint32(gguf.Keys.ClipAudio.FEED_FORWARD_LENGTH, spec.n_ff)
    writer.add_uint32(gguf.Keys.ClipAudio.BLOCK_COUNT, spec.n_layer)
    writer.add_uint32(gguf.Keys.ClipAudio.PROJECTION_DIM, spec.projection_dim)
    writer.add_uint32(gguf.Keys.ClipAudio.Attention.HEAD_COUNT, spec.n_head)
    writer.add_float32(gguf.Keys.ClipAudio.Attention.LAYERNORM_EPS, 1e-5)

    for name, data in _tensors(spec, seed):
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random audio projector GGUF.")
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--projection-dim", type=int, default=64, help="the text model's width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_audio_mmproj(args.out, projection_dim=args.projection_dim, seed=args.seed)
    print(f"{out} ({out.stat().st_size / 2**10:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
