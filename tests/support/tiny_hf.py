"""What the tiny Hugging Face models of the real-process tests have in common.

The builder scripts (``build_hf_fixtures.py`` for transformers serve and vLLM,
``build_ov_fixtures.py`` for the OpenVINO stand-in) run inside backend venvs,
as scripts: their folder is ``sys.path[0]``, so they ``import tiny_hf``.
Only the standard library is imported at the top; ``tokenizers`` and
``transformers`` are imported by the functions that need them, so the
``env_*`` modules can import this one for ``fixture_version`` anywhere.

Nothing is downloaded: tokenizers are trained here on a few sentences, and
weights are random.  ``non_words`` lists every token that is not a plain
lower-case word, for the tricks that make a random model answer in words.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CORPUS = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun",
    "a small model answers with plain words so that tests can read its replies",
    "rivers run to the sea and clouds carry the rain back over the green hills",
    "every morning the baker opens the shop and sells warm bread to the town",
    "we listen to music and talk about books films games and distant places",
    "hello world this is a tiny test speaking about time space light and sound",
    "people walk along the river path under tall trees with red and gold leaves",
    "she wrote a letter to her friend about the garden the birds and the weather",
)
WORD = re.compile(r"^Ġ[a-z]{2,}$")  # a word after a space (byte-level BPE writes it Ġ)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def fixture_version(builder: Path) -> str:
    """The cache key of fixtures a builder script writes: its text and this
    module's, so an edit to either rebuilds them."""
    digest = hashlib.sha256(builder.read_bytes() + Path(__file__).read_bytes())
    return digest.hexdigest()[:12]


def byte_level_bpe(vocab_size: int, specials: Sequence[str], corpus: Iterable[str] = CORPUS * 4):
    """A byte-level BPE tokenizer (GPT-2 style, a ``tokenizers.Tokenizer``)
    trained on ``corpus``: every byte has a token, so anything decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def chatml_tokenizer(vocab_size: int, corpus: Iterable[str] = CORPUS * 4):
    """A ``PreTrainedTokenizerFast`` over ``byte_level_bpe`` with ChatML's
    specials and template; ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(vocab_size, CHATML_SPECIALS, corpus),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def qwen2_config(vocab: Mapping[str, int], **shape: Any):
    """A ``Qwen2Config`` for a ``chatml_tokenizer``'s vocabulary: two layers of
    width 64 unless ``shape`` says otherwise (any Qwen2Config field)."""
    from transformers import Qwen2Config

    fields: dict[str, Any] = {
        "vocab_size": len(vocab),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    return Qwen2Config(**{**fields, **shape})


def non_words(vocab: Mapping[str, int], keep: Iterable[int] = ()) -> list[int]:
    """The ids of every token that is not a plain lower-case word after a space
    (specials, bytes, pieces of words), less ``keep``."""
    kept = set(keep)
    return sorted(i for t, i in vocab.items() if i not in kept and not WORD.match(t))


# --------------------------------------------------------------------- Whisper
# Each builder makes its own Whisper tokenizer: they differ (every language and
# timestamps marked special for transformers serve, four languages for the
# OpenVINO stand-in); their special tokens, model and generation config do not.
def whisper_specials(languages: Iterable[str]) -> list[str]:
    """Whisper's special tokens in its order: end of text, start of transcript,
    the languages (codes such as "en"), the tasks, ..., no timestamps."""
    return [
        "<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in languages),
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
        "<|notimestamps|>",
    ]  # fmt: skip


WHISPER_TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def whisper_config(vocab: Mapping[str, int]):
    """A ``WhisperConfig``: 1+1 layers of width 64, 80 mel bins."""
    from transformers import WhisperConfig

    eot = vocab["<|endoftext|>"]
    return WhisperConfig(
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
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        begin_suppress_tokens=None,  # the generation config says them
        suppress_tokens=None,
    )


def whisper_generation_config(
    vocab: Mapping[str, int], languages: Iterable[str], suppress: list[int], **extra: Any
):
    """Whisper's ``GenerationConfig``: its special tokens' ids, at most 24
    tokens, at least one token before the end of text, ``suppress`` never."""
    from transformers import GenerationConfig

    eot = vocab["<|endoftext|>"]
    return GenerationConfig(
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=24,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": vocab[f"<|{code}|>"] for code in languages},
        task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        prev_sot_token_id=vocab["<|startofprev|>"],
        begin_suppress_tokens=[eot],
        suppress_tokens=suppress,
        **extra,
    )
