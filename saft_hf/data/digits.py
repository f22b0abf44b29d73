"""Offline demo data: scikit-learn's bundled handwritten digits (1797 real 8x8 grey images, UCI ML digits).

All digits tasks share one split of the 1797 images: 20% test (seed 0), then 10% of the rest as validation
(seed 0, the paper's protocol). A task keeps the images of the digits it classifies, so no test or validation
image of one task is a training image of another — the held-out data merging experiments need.

A task is a mapping from digit to class index plus the class names (and prompt templates for the zero-shot head):
`make_digits_task("digits_parity", ("even", "odd"), {d: d % 2 for d in range(10)})`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits

from .registry import ImageClassificationTask, register_task, split_validation

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ('a photo of the number: "{}".', "a photo of the digit {}.", "a handwritten {}.")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def load_digits_splits() -> DatasetDict:
    """All ten digits as RGB PIL images (8x8; the model's image processor resizes them) with `label` = the digit,
    split into train (1293) / validation (144) / test (360)."""
    digits = load_digits()
    # Pixel values are counts 0..16 of an 8x8 grid of 4x4 blocks; scale to the 0..255 grey levels of an image.
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [PILImage.fromarray(image, mode="L").convert("RGB") for image in grey]
    features = Features({"image": Image(), "label": ClassLabel(names=list(DIGIT_NAMES))})
    full = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    parts = full.train_test_split(test_size=TEST_FRACTION, seed=SPLIT_SEED)
    return DatasetDict(**split_validation(parts["train"]), test=parts["test"])


def _digits_task_splits(
    class_of_digit: Mapping[int, int], class_names: Sequence[str], source_splits: DatasetDict
) -> DatasetDict:
    features = Features({"image": Image(), "label": ClassLabel(names=list(class_names))})

    def relabel(batch: dict[str, list]) -> dict[str, list]:
        return {"image": batch["image"], "label": [class_of_digit[digit] for digit in batch["label"]]}

    return DatasetDict(
        {
            split: dataset.filter(lambda digit: digit in class_of_digit, input_columns="label").map(
                relabel, batched=True, features=features
            )
            for split, dataset in source_splits.items()
        }
    )


def make_digits_task(
    name: str,
    class_names: Sequence[str],
    class_of_digit: Mapping[int, int],
    templates: Sequence[str] = DIGIT_TEMPLATES,
    source_splits: Callable[[], DatasetDict] = load_digits_splits,
) -> ImageClassificationTask:
    """A task on the digits data: `class_of_digit` maps each digit the task uses to its class index (digits it
    leaves out are dropped), `class_names[i]` names class `i`. `source_splits` returns the digit-labelled splits
    it draws from (default: all of `load_digits_splits`; the demo holds part of the train split out for
    pre-training). The task caches its model inputs (`ImageClassificationTask.cache_inputs`): 1797 8x8 images."""
    unknown = sorted(set(class_of_digit) - set(range(10)))
    if unknown:
        raise ValueError(f"Digits task {name!r}: class_of_digit has keys {unknown} that are not digits 0-9.")
    if sorted(set(class_of_digit.values())) != list(range(len(class_names))):
        raise ValueError(
            f"Digits task {name!r}: class_of_digit must map onto every class index 0..{len(class_names) - 1} "
            f"(one per class name), got values {sorted(set(class_of_digit.values()))}."
        )
    class_of_digit = dict(class_of_digit)
    class_names = tuple(class_names)

    def load_splits(source: str | None) -> DatasetDict:
        if source is not None:
            raise ValueError(
                f"Task {name!r} uses the digits bundled with scikit-learn; it takes no dataset source ({source!r})."
            )
        return _digits_task_splits(class_of_digit, class_names, source_splits())

    return ImageClassificationTask(name, class_names, tuple(templates), load_splits, cache_inputs=True)


DIGITS_TASKS = tuple(
    register_task(task)
    for task in (
        make_digits_task("digits", DIGIT_NAMES, {digit: digit for digit in range(10)}),
        make_digits_task("digits_0to4", DIGIT_NAMES[:5], {digit: digit for digit in range(5)}),
        make_digits_task("digits_5to9", DIGIT_NAMES[5:], {digit: digit - 5 for digit in range(5, 10)}),
        make_digits_task(
            "digits_parity",
            ("even", "odd"),
            {digit: digit % 2 for digit in range(10)},
            templates=("a photo of an {} number.", "a handwritten {} digit."),
        ),
        make_digits_task(
            "digits_small_large",
            ("small", "large"),
            {digit: int(digit >= 5) for digit in range(10)},
            templates=("a photo of a {} number.", "a handwritten {} digit."),
        ),
    )
)
