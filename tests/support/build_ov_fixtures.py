"""Build the tiny OpenVINO IR models the ``ovms`` stand-in serves.

Run inside the ``ov-export`` environment (tests/support/env_ovms.py):
``python build_ov_fixtures.py OUT_DIR``.  Nothing is downloaded: every source
model is made here with random weights and a tokenizer trained on a few
hundred words, saved as a Hugging Face folder, then exported to IR.  What the
LLM and Whisper share with the transformers serve models (``build_hf_fixtures.py``)
is in ``tiny_hf.py``, next to this script.

Recipe (BACKENDS.md, "Checked again on 2026-12-01"):
  pip install torch==2.13.0 "optimum-intel[openvino]==2.2.0" openvino==2026.4.1 \
      openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0
  pip uninstall -y torchvision            # fails to import next to this torch
  pip install sentencepiece "huggingface-hub>=1.5,<1.22" diffusers==0.39.0 protobuf
  optimum-cli export openvino -m SRC --task T --weight-format fp16 OUT

What it writes under OUT_DIR, one folder per kind:
  llm/         Qwen2-shaped, byte-level BPE, ChatML template; text-generation-with-past
  embedding/   DistilBERT-shaped (BERT with token_type_ids fails in genai); feature-extraction
  rerank/      DistilBERT sequence classifier with one label; text-classification
  whisper/     Whisper with 80 mel bins; automatic-speech-recognition-with-past
  speecht5/    SpeechT5 + HiFi-GAN vocoder; text-to-audio
  image/       Stable Diffusion (CLIP text encoder, UNet, VAE), 32x32; text-to-image
  classifier/  a plain OpenVINO model for KServe, in OVMS's layout ``classifier/1/model.xml``

Random weights make random tokens.  So that the generative models answer in
words (not newlines, byte fragments or an immediate end of text), every token
that is not a plain lowercase word is pushed out of reach: for the LLM one
residual dimension is kept constant and given a large negative output weight
for those tokens (no generation config needed, so it holds in every runtime);
for Whisper they go to ``suppress_tokens``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tiny_hf
import torch

SEED = 1234
VOCABULARY = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "over new sound take only little work know place year live me back give most very after "
    "thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn here why ask "
    "went men read need land different home us move try kind hand picture again change off "
    "play spell air away animal house point page letter mother answer found study still learn "
    "should america world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw"
)
WORDS = VOCABULARY.split()


def corpus(lines: int = 400, seed: int = SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(lines):
        n = int(rng.integers(4, 12))
        out.append(" ".join(rng.choice(WORDS, size=n)) + ".")
    return out


def export(src: Path, out: Path, task: str, *extra: str) -> None:
    argv = [
        str(Path(sys.executable).with_name("optimum-cli")),  # this venv's
        "export",
        "openvino",
        "-m",
        str(src),
        "--task",
        task,
        "--weight-format",
        "fp16",
        *extra,
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-4000:]
        raise SystemExit(f"export of {src.name} ({task}) failed:\n{tail}")


# --------------------------------------------------------------------------- LLM
def build_llm(src: Path) -> None:
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = tiny_hf.chatml_tokenizer(420, corpus())
    vocab = tokenizer.get_vocab()
    torch.manual_seed(SEED)
    config = tiny_hf.qwen2_config(
        vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,  # the output weights are edited apart from the inputs
        bos_token_id=vocab["<|endoftext|>"],
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        # Residual dimension 0 stays 1.0 through every layer (nothing writes
        # to it), so after the final RMSNorm it is always positive: a large
        # negative output weight on it rules a token out whatever the context.
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tiny_hf.non_words(vocab), 0] = -100.0
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(src)


# ------------------------------------------------------------- embedding / rerank
def wordpiece_tokenizer(src: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import DistilBertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(f"{tmp}/tokenizer.json")
        return DistilBertTokenizerFast(
            tokenizer_file=f"{tmp}/tokenizer.json",
            model_max_length=128,
            unk_token="[UNK]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            mask_token="[MASK]",
        )


def distilbert_config(vocab_size: int, **extra: object):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        **extra,
    )


def build_embedding(src: Path) -> None:
    from transformers import DistilBertModel

    tokenizer = wordpiece_tokenizer(src)
    torch.manual_seed(SEED)
    DistilBertModel(distilbert_config(len(tokenizer))).eval().save_pretrained(src)
    tokenizer.save_pretrained(src)


def build_rerank(src: Path) -> None:
    from transformers import DistilBertForSequenceClassification

    tokenizer = wordpiece_tokenizer(src)
    torch.manual_seed(SEED + 1)
    config = distilbert_config(len(tokenizer), num_labels=1)
    model = DistilBertForSequenceClassification(config).eval()
    with torch.no_grad():
        # With the default init every pair scores ~sigmoid(0.003): the [CLS]
        # state hardly depends on the words.  Louder words and attention make
        # it depend on them, and wider heads spread the logits to O(1).
        model.distilbert.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
        for layer in model.distilbert.transformer.layer:
            layer.attention.v_lin.weight.mul_(30.0)
            layer.attention.out_lin.weight.mul_(30.0)
        model.pre_classifier.weight.normal_(0.0, 0.5)
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)


# ------------------------------------------------------------------------ Whisper
LANGS = ["en", "fr", "de", "es"]


def build_whisper(src: Path) -> None:
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        bpe = tiny_hf.byte_level_bpe(300, ["<|endoftext|>"], corpus())
        bpe.model.save(tmp)
        tokenizer = WhisperTokenizer(
            f"{tmp}/vocab.json",
            f"{tmp}/merges.txt",
            unk_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
    tokenizer.add_special_tokens({"additional_special_tokens": tiny_hf.whisper_specials(LANGS)[1:]})
    tokenizer.add_tokens(tiny_hf.WHISPER_TIMESTAMPS)
    ids = tokenizer.get_vocab()
    extractor = WhisperFeatureExtractor(feature_size=80)
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(tiny_hf.whisper_config(ids)).eval()
    model.save_pretrained(src)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(src)
    # Every token that is not a word is suppressed, the end of text included:
    # a random model then always writes max_new_tokens words.
    tiny_hf.whisper_generation_config(
        ids,
        LANGS,
        tiny_hf.non_words(ids),
        max_new_tokens=12,
        max_initial_timestamp_index=50,
    ).save_pretrained(src)


# ---------------------------------------------------------------------- SpeechT5
def build_speecht5(src: Path, vocoder_dir: Path) -> None:
    import sentencepiece as spm
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus()))
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=f"{tmp}/spm",
            vocab_size=40,
            model_type="char",
            character_coverage=1.0,
            bos_id=0,
            pad_id=1,
            eos_id=2,
            unk_id=3,
            minloglevel=2,
        )
        tokenizer = SpeechT5Tokenizer(f"{tmp}/spm.model")
        processor = SpeechT5Processor(SpeechT5FeatureExtractor(), tokenizer)
        processor.save_pretrained(src)
    torch.manual_seed(SEED)
    config = SpeechT5Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        speech_decoder_prenet_units=32,
        speech_decoder_postnet_units=32,
        speech_decoder_postnet_layers=2,
        num_mel_bins=80,
        reduction_factor=2,
        max_speech_positions=256,
        max_text_positions=128,
    )
    model = SpeechT5ForTextToSpeech(config).eval()
    with torch.no_grad():  # never "stop" early: speak until maxlenratio (~0.2 s of audio)
        model.speech_decoder_postnet.prob_out.bias.fill_(-20.0)
    model.save_pretrained(src)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=80,
            upsample_initial_channel=32,
            upsample_rates=[4, 4],
            upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
        )
    ).eval()
    vocoder.save_pretrained(vocoder_dir)


# ------------------------------------------------------------- Stable Diffusion
def build_image(src: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # CLIP's BPE without merges: every word is spelt in characters.
        chars = sorted(set("".join(WORDS)) | set(".,!?'"))
        vocab = {}
        for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
            vocab[c] = len(vocab)
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(src)


# -------------------------------------------------------------------- classifier
def build_classifier(out: Path) -> None:
    """A plain model (no task) in OVMS's layout: NAME/<version>/model.xml.
    input FP32 [1,4] -> MatMul [4,3] + bias -> Softmax -> probabilities FP32 [1,3]."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(SEED)
    x = ops.parameter([1, 4], np.float32, name="input")
    weights = ops.constant(rng.standard_normal((4, 3)).astype(np.float32))
    bias = ops.constant(rng.standard_normal((1, 3)).astype(np.float32))
    logits = ops.add(ops.matmul(x, weights, False, False), bias)
    probs = ops.softmax(logits, 1)
    probs.output(0).get_tensor().set_names({"probabilities"})
    model = ov.Model([probs], [x], "tiny_classifier")
    (out / "1").mkdir(parents=True)
    ov.save_model(model, out / "1" / "model.xml", compress_to_fp16=False)


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    only = set(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)

    def wanted(kind: str) -> bool:
        return not only or kind in only

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jobs = [
            ("llm", build_llm, "text-generation-with-past"),
            ("embedding", build_embedding, "feature-extraction"),
            ("rerank", build_rerank, "text-classification"),
            ("whisper", build_whisper, "automatic-speech-recognition-with-past"),
            ("image", build_image, "text-to-image"),
        ]
        for kind, build, task in jobs:
            if wanted(kind):
                build(tmp / kind)
                export(tmp / kind, out / kind, task)
        if wanted("speecht5"):
            build_speecht5(tmp / "speecht5", tmp / "hifigan")
            kwargs = json.dumps({"vocoder": str(tmp / "hifigan")})
            export(tmp / "speecht5", out / "speecht5", "text-to-audio", "--model-kwargs", kwargs)
        if wanted("classifier"):
            build_classifier(out / "classifier")
    print(
        json.dumps(
            {
                p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                for p in sorted(out.iterdir())
            }
        )
    )


if __name__ == "__main__":
    main()
