"""Flan-T5 text-to-text classification: label words as generation targets, evaluated by generate-and-match.

The SAFT paper fine-tunes Flan-T5-base on GLUE tasks cast as text-to-text, with one label word per class as the
target (e.g. SST-2 `negative`/`positive`), and scores a prediction as correct when the generated text, normalised,
is exactly the label word. Outputs that are no label word at all count as wrong (index -1 here); the paper's
Appendix C.8 tracks how often merged models produce them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BatchEncoding,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

NOT_A_LABEL_WORD = -1


def load_text_to_text_model(
    model_name_or_path: str | os.PathLike, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`AutoModelForSeq2SeqLM` and its tokenizer from a local folder or Hub id (kwargs go to the model)."""
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path, **kwargs)
    return model, tokenizer


def _check_labels(labels: Sequence[int], label_words: Sequence[str]) -> None:
    for label in labels:
        if not 0 <= label < len(label_words):
            raise ValueError(
                f"Label {label} has no label word (label_words: {list(label_words)}); unlabeled rows such as GLUE "
                "test splits (label -1) cannot be training or evaluation targets."
            )


def tokenize_text_to_text(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    labels: Sequence[int],
    label_words: Sequence[str],
    max_source_length: int,
) -> BatchEncoding:
    """Tokenise the inputs (truncated to `max_source_length`) and the label word of each label as `labels`."""
    _check_labels(labels, label_words)
    encoding = tokenizer(list(sources), max_length=max_source_length, truncation=True)
    encoding["labels"] = tokenizer(text_target=[label_words[label] for label in labels])["input_ids"]
    return encoding


def text_to_text_collator(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> DataCollatorForSeq2Seq:
    """Pads inputs with the pad token and `labels` with -100 (ignored by the loss); builds `decoder_input_ids`."""
    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)


def normalize_prediction(text: str) -> str:
    """Lower-case, strip, and collapse inner whitespace: what must equal a label word for a match."""
    return " ".join(text.lower().split())


def match_label_words(texts: Sequence[str], label_words: Sequence[str]) -> list[int]:
    """Index of the label word each text is (after `normalize_prediction`), or -1 if it is none of them."""
    index = {normalize_prediction(word): i for i, word in enumerate(label_words)}
    if len(index) != len(label_words):
        raise ValueError(f"label_words {list(label_words)} are not distinct after normalisation.")
    return [index.get(normalize_prediction(text), NOT_A_LABEL_WORD) for text in texts]


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    max_source_length: int | None = None,
) -> list[str]:
    """Greedy generation for each input text, decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=max_source_length is not None,
            max_length=max_source_length,
            return_tensors="pt",
        ).to(device)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def predict_label_words(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    max_source_length: int | None = None,
) -> list[int]:
    """Generate for each text and map the output to the index of its label word (-1: not a label word).

    `max_new_tokens` defaults to the longest label word's token count including the end-of-sequence token: one
    token past any label word, so an output that only starts with a label word is not mistaken for it.
    """
    if max_new_tokens is None:
        max_new_tokens = max(len(ids) for ids in tokenizer(text_target=list(label_words))["input_ids"])
    generated = generate_texts(model, tokenizer, texts, max_new_tokens, batch_size, max_source_length)
    return match_label_words(generated, label_words)
