"""The SAFT paper's eight vision tasks (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN) for the CLIP
zero-shot classifier: Hub datasets listed in docs/conventions.md, class names in label order (`vision_classnames`)
and prompt templates.

The templates are ours, in the CLIP style (Radford et al. 2021): a few short captions per task that say what kind
of picture it is (satellite image, traffic sign, texture, ...) with the class name in place of `{}`. The
zero-shot head averages the text embeddings of all of a class's prompts.
"""

from __future__ import annotations

from .registry import HubDataset, ImageClassificationTask, register_task
from .vision_classnames import (
    DIGIT_CLASSES,
    DTD_CLASSES,
    EUROSAT_CLASSES,
    GTSRB_CLASSES,
    RESISC45_CLASSES,
    STANFORD_CARS_CLASSES,
    SUN397_CLASSES,
)

VISION_TASK_NAMES = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")

_TEMPLATES = {
    "cars": (
        "a photo of a {}.",
        "a photo of the {}, a type of car.",
        "a close-up photo of a {}.",
        "a street photo of a {}.",
        "a photo of my {}.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a close-up photo of a {} surface.",
        "a photo of a {} pattern.",
        "a photo of something {}.",
    ),
    "eurosat": (
        "a satellite photo of {}.",
        "a centered satellite image of {}.",
        "an aerial view of {}.",
    ),
    "gtsrb": (
        'a photo of a "{}" traffic sign.',
        'a close-up photo of a "{}" road sign.',
        'a centered photo of a "{}" traffic sign.',
    ),
    "mnist": (
        'a photo of the number: "{}".',
        "a handwritten digit {}.",
        'a black and white image of the handwritten number "{}".',
    ),
    "resisc45": (
        "satellite imagery of {}.",
        "an aerial photo of {}.",
        "a satellite view of a {}.",
        "aerial imagery of the {}.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}, a type of place.",
        "a picture of a {} scene.",
    ),
    "svhn": (
        'a photo of the number: "{}".',
        'a street photo of the house number "{}".',
        "a photo of the digit {} on a sign.",
    ),
}

_CLASS_NAMES = {
    "cars": STANFORD_CARS_CLASSES,
    "dtd": DTD_CLASSES,
    "eurosat": EUROSAT_CLASSES,
    "gtsrb": GTSRB_CLASSES,
    "mnist": DIGIT_CLASSES,
    "resisc45": RESISC45_CLASSES,
    "sun397": SUN397_CLASSES,
    "svhn": DIGIT_CLASSES,
}

_DATASETS = {
    "cars": HubDataset("tanganke/stanford_cars"),
    "dtd": HubDataset("tanganke/dtd"),
    "eurosat": HubDataset("tanganke/eurosat"),
    "gtsrb": HubDataset("tanganke/gtsrb"),
    "mnist": HubDataset("ylecun/mnist"),
    "resisc45": HubDataset("tanganke/resisc45"),
    "sun397": HubDataset("tanganke/sun397"),
    "svhn": HubDataset("ufldl-stanford/svhn", name="cropped_digits"),
}

VISION_TASKS = tuple(
    register_task(ImageClassificationTask(name, _CLASS_NAMES[name], _TEMPLATES[name], _DATASETS[name]))
    for name in VISION_TASK_NAMES
)
