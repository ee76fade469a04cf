"""Generate tiny, randomly initialised GGUF models that llama-server can serve.

The models are useless as language models but well-behaved as test fixtures:

* Every tensor is F16 (norm weights are F32); the prebuilt llama-server crashes
  on quantized types on some CPUs.
* The vocabulary is SentencePiece-style ("llama" tokenizer model): a handful of
  special tokens, the 256 ``<0xNN>`` byte-fallback tokens and then plain ASCII
  words such as ``"▁hello"``.
* Only plain-word tokens are ever sampled. Residual dimension 0 is held at a
  constant value: token embeddings set it, and the rows of ``attn_output`` and
  ``ffn_down`` that write into it are zero. The output projection gives that
  dimension a large negative weight for every special and byte token, so
  their logits sit far below any word's. As a result generated text is always
  valid UTF-8 (random byte tokens would make llama-server answer 500) and
  end-of-generation tokens are never chosen, so generation runs until
  ``max_tokens``.
* A ChatML chat template is embedded so ``/v1/chat/completions`` works.

Command line::

    python -m tests.support.tiny_gguf OUT.gguf [--embedding] [--pad-mb N] [--seed N]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "TinyModelSpec",
    "main",
    "word_vocabulary",
    "write_tiny_embedding",
    "write_tiny_llama",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"
_SPECIAL_TOKENS: tuple[tuple[str, gguf.TokenType], ...] = (
    ("<unk>", gguf.TokenType.UNKNOWN),
    (BOS_TOKEN, gguf.TokenType.CONTROL),
    (EOS_TOKEN, gguf.TokenType.CONTROL),
    (_IM_START, gguf.TokenType.CONTROL),
    (_IM_END, gguf.TokenType.CONTROL),
)
_N_BYTE_TOKENS = 256
_FIRST_WORD_ID = len(_SPECIAL_TOKENS) + _N_BYTE_TOKENS
_MIN_WORDS = 16
_SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BASE_WORDS_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form "
    "great think say help low line turn much mean before move right boy old too same tell "
    "does set three want air well also play small end put home read hand large add even "
    "land here must big high such follow act why ask men change went light kind off need "
    "house picture try again animal point mother world near build earth father"
)
_BASE_WORDS = tuple(_BASE_WORDS_TEXT.split())
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a generated model."""

    n_embd: int = 64
    n_layer: int = 2
    n_vocab: int = 512
    n_head: int = 4
    n_ff: int = 128
    context_length: int = 4096

    @property
    def n_words(self) -> int:
        return self.n_vocab - _FIRST_WORD_ID


def _synthetic_words() -> Iterator[str]:
    """Endless stream of pronounceable made-up words (``baba``, ``babe``, ...)."""
    syllables = [onset + vowel for onset in _ONSETS for vowel in _VOWELS]
    for n_syllables in itertools.count(2):
        for parts in itertools.product(syllables, repeat=n_syllables):
            yield "".join(parts)


def word_vocabulary(n_words: int) -> list[str]:
    """The first ``n_words`` plain ASCII words used as (non-special) tokens."""
    seen: set[str] = set()
    words: list[str] = []
    for word in itertools.chain(_BASE_WORDS, _synthetic_words()):
        if len(words) == n_words:
            break
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[gguf.TokenType]]:
    tokens = [text for text, _ in _SPECIAL_TOKENS]
    types = [kind for _, kind in _SPECIAL_TOKENS]
    tokens += [f"<0x{value:02X}>" for value in range(_N_BYTE_TOKENS)]
    types += [gguf.TokenType.BYTE] * _N_BYTE_TOKENS
    words = word_vocabulary(n_vocab - _FIRST_WORD_ID)
    tokens += [_SPM_SPACE + word for word in words]
    types += [gguf.TokenType.NORMAL] * len(words)
    # SentencePiece merge priority: earlier (more common) words score higher.
    scores = [0.0] * _FIRST_WORD_ID + [-float(rank) for rank in range(len(words))]
    return tokens, scores, types


def _f16(array: npt.NDArray[np.float32]) -> npt.NDArray[np.float16]:
    return array.astype(np.float16)


class _Weights:
    """Random weight factory; all matrices are shaped (n_out, n_in) like GGUF expects."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def normal(self, n_out: int, n_in: int, std: float) -> npt.NDArray[np.float32]:
        values = self._rng.standard_normal((n_out, n_in), dtype=np.float32)
        values *= np.float32(std)
        return values


# Value of the constant residual dimension and the logit weight that keeps
# special/byte tokens from being sampled. The hidden state's other dimensions
# stay O(0.3), so after RMS norm dim 0 is ~>2 and those logits sit around -2000,
# far below the word logits (~N(0, 2)), while staying well inside F16 range.
_CONSTANT_DIM = 0
_CONSTANT_VALUE = 1.0
_SUPPRESS_WEIGHT = -1000.0


def _build_tensors(
    spec: TinyModelSpec, seed: int
) -> list[tuple[str, npt.NDArray[np.float16] | npt.NDArray[np.float32]]]:
    weights = _Weights(seed)
    d, ff = spec.n_embd, spec.n_ff
    tensors: list[tuple[str, npt.NDArray[np.float16] | npt.NDArray[np.float32]]] = []

    embd = weights.normal(spec.n_vocab, d, 0.3)
    embd[:, _CONSTANT_DIM] = _CONSTANT_VALUE
    tensors.append(("token_embd.weight", _f16(embd)))

    ones = np.ones(d, dtype=np.float32)
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}"
        tensors.append((f"{prefix}.attn_norm.weight", ones.copy()))
        for name in ("attn_q", "attn_k", "attn_v"):
            tensors.append((f"{prefix}.{name}.weight", _f16(weights.normal(d, d, d**-0.5))))
        attn_out = weights.normal(d, d, 0.1 * d**-0.5)
        attn_out[_CONSTANT_DIM, :] = 0.0
        tensors.append((f"{prefix}.attn_output.weight", _f16(attn_out)))

        tensors.append((f"{prefix}.ffn_norm.weight", ones.copy()))
        tensors.append((f"{prefix}.ffn_gate.weight", _f16(weights.normal(ff, d, d**-0.5))))
        tensors.append((f"{prefix}.ffn_up.weight", _f16(weights.normal(ff, d, d**-0.5))))
        ffn_down = weights.normal(d, ff, 0.1 * ff**-0.5)
        ffn_down[_CONSTANT_DIM, :] = 0.0
        tensors.append((f"{prefix}.ffn_down.weight", _f16(ffn_down)))

    tensors.append(("output_norm.weight", ones.copy()))
    output = weights.normal(spec.n_vocab, d, 2.0 * d**-0.5)
    output[:, _CONSTANT_DIM] = 0.0
    output[:_FIRST_WORD_ID, :] = 0.0
    output[:_FIRST_WORD_ID, _CONSTANT_DIM] = _SUPPRESS_WEIGHT
    tensors.append(("output.weight", _f16(output)))
    return tensors


def _write(
    path: Path,
    spec: TinyModelSpec,
    *,
    seed: int,
    name: str,
    pooling: gguf.PoolingType | None = None,
) -> Path:
    if spec.n_words < _MIN_WORDS:
        raise ValueError(f"n_vocab must be at least {_FIRST_WORD_ID + _MIN_WORDS}")
    if spec.n_embd % spec.n_head or (spec.n_embd // spec.n_head) % 2:
        raise ValueError("n_embd must split into n_head heads of even size")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocabulary(spec.n_vocab)
    token_ids = {text: index for index, text in enumerate(tokens)}

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if pooling is not None:
        writer.add_pooling_type(pooling)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(token_ids[BOS_TOKEN])
    writer.add_eos_token_id(token_ids[EOS_TOKEN])
    writer.add_eot_token_id(token_ids[_IM_END])
    writer.add_unk_token_id(token_ids["<unk>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    for tensor_name, data in _build_tensors(spec, seed):
        writer.add_tensor(tensor_name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _padded_ff(n_embd: int, n_layer: int, n_ff: int, pad_mb: int) -> int:
    """Widen the FFN so the three FFN matrices add roughly ``pad_mb`` MiB of F16."""
    if pad_mb <= 0:
        return n_ff
    extra = math.ceil(pad_mb * 2**20 / (n_layer * 3 * n_embd * 2))
    return n_ff + -(-extra // 64) * 64


def write_tiny_llama(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_vocab: int = 512,
    n_head: int = 4,
    seed: int = 0,
    pad_mb: int = 0,
) -> Path:
    """Write a tiny llama-architecture chat model to ``path`` and return the path.

    The default file is about 300 KiB. ``pad_mb`` widens the feed-forward layers
    so the file grows by about that many MiB (for load-time benchmarks); such a
    model still generates, just more slowly per token (~30 tokens/s on one CPU
    thread at ``pad_mb=300``). ``n_vocab`` counts the 261 special and byte tokens,
    so it must be at least 277; the rest are plain words.
    """
    spec = TinyModelSpec(
        n_embd=n_embd,
        n_layer=n_layer,
        n_vocab=n_vocab,
        n_head=n_head,
        n_ff=_padded_ff(n_embd, n_layer, 2 * n_embd, pad_mb),
    )
    return _write(path, spec, seed=seed, name="tiny-llama")


def write_tiny_embedding(path: Path, *, n_embd: int = 64, seed: int = 1) -> Path:
    """Write a tiny model for ``llama-server --embeddings`` (mean pooling by default)."""
    spec = TinyModelSpec(n_embd=n_embd, n_ff=2 * n_embd)
    return _write(path, spec, seed=seed, name="tiny-embedding", pooling=gguf.PoolingType.MEAN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random GGUF model.")
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--embedding", action="store_true", help="write an embedding model")
    parser.add_argument("--pad-mb", type=int, default=0, help="extra MiB of FFN weights")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    if args.embedding:
        if args.pad_mb:
            parser.error("--pad-mb only applies to chat models")
        out = write_tiny_embedding(args.out, seed=1 if args.seed is None else args.seed)
    else:
        out = write_tiny_llama(
            args.out, seed=0 if args.seed is None else args.seed, pad_mb=args.pad_mb
        )
    print(f"{out} ({out.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
