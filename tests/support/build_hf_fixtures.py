"""Build tiny Hugging Face models for the ``transformers serve`` and vLLM tests.

Run with the python of the backend's venv (torch and transformers, which
dynllm's own environment does not have); ``tiny_hf`` lies next to this script:

    python build_hf_fixtures.py chat OUT_DIR        # transformers-serve venv
    python build_hf_fixtures.py whisper OUT_DIR     # transformers-serve venv
    python build_hf_fixtures.py vllm-chat OUT_DIR   # vllm venv

Random weights alone make poor test output (a chat model that answers only
newlines or bytes that are not UTF-8), so the transformers serve models'
``generation_config.suppress_tokens`` lists every token that is not a plain
lower-case word: whatever the weights prefer, the answer is words.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny_hf
import torch
from transformers import GenerationConfig, Qwen2ForCausalLM


def build_chat(out: Path) -> None:
    """Qwen2-shaped, 2 layers of width 64; answers only words of the form " word"."""
    tokenizer = tiny_hf.chatml_tokenizer(400)
    tokenizer.save_pretrained(out)
    vocab = tokenizer.get_vocab()
    config = tiny_hf.qwen2_config(vocab)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    # <|im_end|> is suppressed too: the answer always runs to max_tokens, so
    # tests know how many tokens (and stream chunks) to expect.
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=tiny_hf.non_words(vocab),
        max_new_tokens=32,
    )
    model.save_pretrained(out)


def build_vllm_chat(out: Path) -> None:
    """Qwen2-shaped, 2 layers of width 128 with head_dim 64 (vLLM's CPU
    attention wants a head size it has kernels for).  No words-only trick:
    vLLM ignores ``suppress_tokens``.  Its answers are noise, but every token
    decodes, and a request with ``ignore_eos`` runs to ``max_tokens``."""
    tokenizer = tiny_hf.chatml_tokenizer(400)
    tokenizer.save_pretrained(out)
    config = tiny_hf.qwen2_config(
        tokenizer.get_vocab(),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(out)


def build_whisper(out: Path) -> None:
    """Whisper-shaped (``tiny_hf.whisper_config``), every language of
    transformers' Whisper; transcribes into words."""
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    specials = tiny_hf.whisper_specials(LANGUAGES)
    bpe = json.loads(tiny_hf.byte_level_bpe(300, []).to_str())["model"]
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_tokens(tiny_hf.WHISPER_TIMESTAMPS, special_tokens=True)
    vocab = tokenizer.get_vocab()
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    processor.save_pretrained(out)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_hf.whisper_config(vocab)).eval()
    # Only words (and the end of text) may be generated: not timestamps, not
    # language or task tokens, not stray bytes.
    eot = vocab["<|endoftext|>"]
    model.generation_config = tiny_hf.whisper_generation_config(
        vocab, LANGUAGES, tiny_hf.non_words(vocab, keep={eot}), forced_decoder_ids=None
    )
    model.save_pretrained(out)


BUILDERS = {"chat": build_chat, "vllm-chat": build_vllm_chat, "whisper": build_whisper}


def main(argv: list[str]) -> int:
    kind, out = argv[1], Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[kind](out)
    print(json.dumps({"kind": kind, "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
