"""Tasks and their data: the task registry, the paper's vision and GLUE tasks, CLIP image preprocessing, and the
offline digits demo data."""

from .digits import DIGIT_NAMES, DIGIT_TEMPLATES, DIGITS_TASKS, load_digits_splits, make_digits_task
from .glue import GLUE_TASK_NAMES, GLUE_TASKS, stsb_class
from .registry import (
    SPLITS,
    TASKS,
    HubDataset,
    ImageClassificationTask,
    Task,
    TextToTextTask,
    get_task,
    register_task,
    split_validation,
    task_dataset,
)
from .transforms import CachedImageInputs, CLIPImageTransform
from .vision import VISION_TASK_NAMES, VISION_TASKS

__all__ = [
    "DIGITS_TASKS",
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "GLUE_TASKS",
    "GLUE_TASK_NAMES",
    "SPLITS",
    "TASKS",
    "VISION_TASKS",
    "VISION_TASK_NAMES",
    "CLIPImageTransform",
    "CachedImageInputs",
    "HubDataset",
    "ImageClassificationTask",
    "Task",
    "TextToTextTask",
    "get_task",
    "load_digits_splits",
    "make_digits_task",
    "register_task",
    "split_validation",
    "task_dataset",
    "stsb_class",
]
