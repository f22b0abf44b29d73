"""The models SAFT fine-tunes: CLIP zero-shot image classifier and Flan-T5 text-to-text."""

from .clip import HEAD_FILE, CLIPVisionClassifier, ZeroShotHead, build_zero_shot_head
from .t5 import (
    NOT_A_LABEL_WORD,
    generate_texts,
    load_text_to_text_model,
    match_label_words,
    normalize_prediction,
    predict_label_words,
    text_to_text_collator,
    tokenize_text_to_text,
)

__all__ = [
    "HEAD_FILE",
    "NOT_A_LABEL_WORD",
    "CLIPVisionClassifier",
    "ZeroShotHead",
    "build_zero_shot_head",
    "generate_texts",
    "load_text_to_text_model",
    "match_label_words",
    "normalize_prediction",
    "predict_label_words",
    "text_to_text_collator",
    "tokenize_text_to_text",
]
