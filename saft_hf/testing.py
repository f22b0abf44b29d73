"""Tiny CLIP and T5 models, tokenizers and processors built offline from configs.

Used by the test suite and the offline demo: no download, deterministic given a seed, and saved as complete model
folders that load through the same `from_pretrained` calls real Hub ids go through. The tokenizers are the real
`CLIPTokenizer` (byte-level BPE) and `T5Tokenizer` (Unigram) classes with small vocabularies built from a
built-in corpus, so every special token, pre-tokenization and save/load path is the real one.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

TINY_IMAGE_SIZE = 32
TINY_TEXT_MAX_LENGTH = 64

# Words the tiny tokenizers must encode compactly: the paper's GLUE label words, digit class names, prompt words,
# and a little ordinary text so subword merges exist.
_CORPUS = (
    "unacceptable acceptable not_equivalent equivalent entailment not_entailment negative positive",
    "zero one two three four five six seven eight nine even odd small large",
    "0 1 2 3 4 5 6 7 8 9",
    "a photo of the number a photo of a digit a handwritten digit a centered photo of the",
    "a satellite photo of a photo of a picture of a drawing of",
    "the movie was great and the acting was wonderful",
    "a terrible film , boring and far too long",
    "this is a good sentence . is this sentence acceptable ?",
    "sentence question premise hypothesis answer label classify the sentiment of",
    "does the first sentence entail the second ? are these sentences equivalent ?",
)

_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _corpus(words: Iterable[str] | None) -> list[str]:
    return list(_CORPUS) + ([" ".join(words)] if words is not None else [])


def build_tiny_t5_tokenizer(words: Iterable[str] | None = None) -> T5Tokenizer:
    """A `T5Tokenizer` (pad 0, eos 1, unk 2) whose Unigram vocabulary holds every word of a built-in corpus plus
    `words` as one piece, and every printable ASCII character as a fallback piece, so any ASCII text encodes and
    decodes exactly."""
    corpus_words = sorted({word for line in _corpus(words) for word in line.split()})
    characters = string.ascii_letters + string.digits + string.punctuation
    # Unigram segmentation maximises the summed log-probabilities: a whole word (-5) beats its characters (-10 each).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    vocab += [("▁" + word, -5.0) for word in corpus_words]
    vocab += [(character, -10.0) for character in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_clip_tokenizer(words: Iterable[str] | None = None) -> CLIPTokenizer:
    """A `CLIPTokenizer` (byte-level BPE, bos `<|startoftext|>` = 0, eos = pad = `<|endoftext|>` = 1) whose merges
    spell out every word of a built-in corpus plus `words`; any text encodes without unknown tokens.

    The merges are built deterministically (each corpus word is assembled left to right, words in sorted order)
    rather than by `tokenizers`' BPE trainer, which breaks ties between equally frequent pairs arbitrarily.
    """
    # CLIP's normalisation and pre-tokenization, as `CLIPTokenizer` rebuilds them.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    pieces = {
        piece for line in _corpus(words) for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    }
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # A word's last symbol carries the `</w>` suffix: every byte needs both forms, or an unseen character would
    # become the unknown token, which is CLIP's end-of-text token and would end the prompt early.
    tokens = ["<|startoftext|>", "<|endoftext|>", *byte_alphabet, *(symbol + "</w>" for symbol in byte_alphabet)]
    merges: list[tuple[str, str]] = []
    for piece in sorted(pieces):
        symbols = [*piece[:-1], piece[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            tokens.append(merged)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_TEXT_MAX_LENGTH)


def tiny_clip_config(vocab_size: int | None = None, bos_token_id: int = 0, eos_token_id: int = 1) -> CLIPConfig:
    """A 2-layer CLIP (text and vision hidden size 32/64, 32x32 images in 8x8 patches, projection 32).

    `vocab_size` defaults to the size of `build_tiny_clip_tokenizer()`, whose bos/eos ids are the defaults here.
    """
    if vocab_size is None:
        vocab_size = len(build_tiny_clip_tokenizer())
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TINY_TEXT_MAX_LENGTH,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=32,
        # ln(100): the value trained CLIP checkpoints reach (the init value, ln(1/0.07), gives too flat logits).
        logit_scale_init_value=4.6052,
    )


def tiny_t5_config(vocab_size: int | None = None) -> T5Config:
    """A 2+2-layer T5 shaped like Flan-T5 (gated GELU, untied embeddings, dropout 0.1), d_model 32.

    `vocab_size` defaults to the size of `build_tiny_t5_tokenizer()`.
    """
    if vocab_size is None:
        vocab_size = len(build_tiny_t5_tokenizer())
    return T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_clip_processor() -> transformers.CLIPImageProcessor:
    """The CLIP image pre-processing (resize shortest edge, centre crop, CLIP mean/std) at the tiny image size."""
    # Looked up when called, not imported with this module: without torchvision, transformers warns on the first
    # access to `CLIPImageProcessor` (falling back to its PIL backend), which at import time would reach the console
    # of every process importing saft_hf.finetuning before a study can quiet it (`quiet_console`).
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer, transformers.CLIPImageProcessor]:
    """A randomly initialised tiny `CLIPModel` with its tokenizer and image processor (same seed, same weights)."""
    tokenizer = build_tiny_clip_tokenizer()
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = _seeded(seed, lambda: CLIPModel(config))
    return model.eval(), tokenizer, tiny_clip_processor()


def build_tiny_t5(seed: int = 0, words: Iterable[str] | None = None) -> tuple[T5ForConditionalGeneration, T5Tokenizer]:
    """A randomly initialised tiny `T5ForConditionalGeneration` with its tokenizer."""
    tokenizer = build_tiny_t5_tokenizer(words)
    model = _seeded(seed, lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))))
    return model.eval(), tokenizer


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny CLIP folder (config, safetensors, tokenizer, image processor) to `path`."""
    model, tokenizer, processor = build_tiny_clip(seed)
    for part in (model, tokenizer, processor):
        part.save_pretrained(path)
    return Path(path)


def save_tiny_t5(path: str | Path, seed: int = 0, words: Iterable[str] | None = None) -> Path:
    """Write a complete tiny T5 folder (config, generation config, safetensors, tokenizer) to `path`."""
    model, tokenizer = build_tiny_t5(seed, words)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
