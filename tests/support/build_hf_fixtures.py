"""Build tiny Hugging Face models for the ``transformers serve`` tests.

Run inside the transformers-serve venv (it imports torch and transformers):

    python build_hf_fixtures.py chat OUT_DIR
    python build_hf_fixtures.py whisper OUT_DIR

Nothing is downloaded: the tokenizers are trained here on a few sentences and
the weights are random.  Random weights alone make poor test output (a chat
model that answers only newlines or bytes that are not UTF-8), so each model's
``generation_config.suppress_tokens`` lists every token that is not a plain
lower-case word: whatever the weights prefer, the answer is words.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig

VERSION = "1"
"""Bump when the models this script writes change (the fixtures' cache key)."""

CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun",
    "a small model answers with plain words so that tests can read its replies",
    "rivers run to the sea and clouds carry the rain back over the green hills",
    "every morning the baker opens the shop and sells warm bread to the town",
    "we listen to music and talk about books films games and distant places",
    "hello world this is a tiny test speaking about time space light and sound",
    "people walk along the river path under tall trees with red and gold leaves",
    "she wrote a letter to her friend about the garden the birds and the weather",
]
WORD = re.compile(r"^Ġ[a-z]{2,}$")  # a word after a space (byte-level BPE writes it Ġ)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``CORPUS``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def non_words(vocab: dict[str, int], keep: set[int]) -> list[int]:
    return sorted(i for t, i in vocab.items() if i not in keep and not WORD.match(t))


def build_chat(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(400, specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML,
    )
    tokenizer.save_pretrained(out)
    vocab = tokenizer.get_vocab()
    im_end = vocab["<|im_end|>"]
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    # <|im_end|> is suppressed too: the answer always runs to max_tokens, so
    # tests know how many tokens (and stream chunks) to expect.
    model.generation_config = GenerationConfig(
        eos_token_id=im_end,
        pad_token_id=config.pad_token_id,
        suppress_tokens=non_words(vocab, keep=set()),
        max_new_tokens=32,
    )
    model.save_pretrained(out)


def build_whisper(out: Path) -> None:
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    languages = [f"<|{code}|>" for code in LANGUAGES]
    specials = [
        "<|endoftext|>", "<|startoftranscript|>", *languages, "<|translate|>",
        "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
        "<|notimestamps|>",
    ]  # fmt: skip
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    bpe = json.loads(train_bpe(300, []).to_str())["model"]
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_tokens(timestamps, special_tokens=True)
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in specials}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    processor.save_pretrained(out)
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=None,  # the generation config says it (twice warns)
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    # Only words (and the end of text) may be generated: not timestamps, not
    # language or task tokens, not stray bytes.
    keep = {eot}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=24,
        is_multilingual=True,
        lang_to_id={t: vocab[t] for t in languages},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        begin_suppress_tokens=[eot],
        suppress_tokens=non_words(vocab, keep=keep),
        forced_decoder_ids=None,
    )
    model.save_pretrained(out)


def main(argv: list[str]) -> int:
    kind, out = argv[1], Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"chat": build_chat, "whisper": build_whisper}[kind](out)
    print(json.dumps({"kind": kind, "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
