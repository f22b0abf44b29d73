"""GLUE (Wang et al. 2019) as text-to-text tasks for Flan-T5, from `nyu-mll/glue`.

The model reads an instruction built from the row (our templates, which name the answers) and generates one label
word per class. The label words are GLUE's own class names; for CoLA, MRPC, RTE and SST-2 they are the SAFT
paper's (App. C.8). GLUE's test labels are hidden, so its validation split is the test split here (MNLI: the matched
one) and validation is 10% of train (seed 0).

STS-B is a regression task (similarity 0-5): it is cast as six classes by rounding the score to the nearest integer
(halves round up), label words "0".."5". Its accuracy is that of the rounded score, not GLUE's Pearson/Spearman
correlation.
"""

from __future__ import annotations

import math

from .registry import HubDataset, TextToTextTask, register_task

GLUE_TASK_NAMES = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
STSB_MAX_SCORE = 5


def stsb_class(score: float) -> int:
    """The STS-B class of a similarity score: the nearest integer, halves rounded up, clipped to 0..5."""
    if not math.isfinite(score):
        raise ValueError(f"STS-B score {score!r} is not a finite number (unlabeled test rows have no score).")
    return min(max(math.floor(score + 0.5), 0), STSB_MAX_SCORE)


# name: (label words in label order, input template, secondary metrics)
_GLUE = {
    "cola": (
        ("unacceptable", "acceptable"),
        "Is this sentence grammatically acceptable or unacceptable? Sentence: {sentence}",
        ("matthews_correlation",),
    ),
    "mnli": (
        ("entailment", "neutral", "contradiction"),
        "Does the premise entail the hypothesis, contradict it, or neither? Answer entailment, neutral or "
        "contradiction. Premise: {premise} Hypothesis: {hypothesis}",
        (),
    ),
    "mrpc": (
        ("not_equivalent", "equivalent"),
        "Do these two sentences mean the same thing? Answer equivalent or not_equivalent. "
        "Sentence 1: {sentence1} Sentence 2: {sentence2}",
        ("f1",),
    ),
    "qnli": (
        ("entailment", "not_entailment"),
        "Does the sentence contain the answer to the question? Answer entailment or not_entailment. "
        "Question: {question} Sentence: {sentence}",
        (),
    ),
    "qqp": (
        ("not_duplicate", "duplicate"),
        "Do these two questions ask the same thing? Answer duplicate or not_duplicate. "
        "Question 1: {question1} Question 2: {question2}",
        ("f1",),
    ),
    "rte": (
        ("entailment", "not_entailment"),
        "Does the premise entail the hypothesis? Answer entailment or not_entailment. "
        "Premise: {sentence1} Hypothesis: {sentence2}",
        (),
    ),
    "sst2": (
        ("negative", "positive"),
        "Is the sentiment of this sentence positive or negative? Sentence: {sentence}",
        (),
    ),
    "stsb": (
        tuple(str(score) for score in range(STSB_MAX_SCORE + 1)),
        "How similar are these two sentences, from 0 (unrelated) to 5 (same meaning)? "
        "Sentence 1: {sentence1} Sentence 2: {sentence2}",
        (),
    ),
}

_TEST_SPLITS = {"mnli": "validation_matched"}
_LABEL_MAPS = {"stsb": stsb_class}

GLUE_TASKS = tuple(
    register_task(
        TextToTextTask(
            name=name,
            label_words=label_words,
            input_template=template,
            load_splits=HubDataset(
                "nyu-mll/glue",
                name=name,
                test_split=_TEST_SPLITS.get(name, "validation"),
                label_map=_LABEL_MAPS.get(name),
            ),
            metrics=metrics,
        )
    )
    for name, (label_words, template, metrics) in _GLUE.items()
)
