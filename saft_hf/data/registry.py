"""Tasks: what data a fine-tuning run uses, how it is split, and how it becomes model inputs.

A task is an `ImageClassificationTask` (for the CLIP zero-shot classifier: class names and prompt templates) or a
`TextToTextTask` (for Flan-T5: an input template and one label word per class). Tasks are registered by name;
`get_task(name)` is what the recipes call. Every task's `load()` returns a `DatasetDict` with `train`,
`validation` and `test` splits, the validation split being 10% of the source's train split drawn with seed 0 (the
SAFT paper's protocol).

The paper's tasks are registered by `saft_hf.data.vision` (the eight CLIP tasks) and `saft_hf.data.glue` (GLUE as
text-to-text); `saft_hf.data.digits` registers the offline demo tasks.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict

from ..errors import UnknownTaskError
from ..models.t5 import tokenize_text_to_text
from .transforms import CachedImageInputs, CLIPImageTransform

SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0

SplitLoader = Callable[[str | None], DatasetDict]


def split_validation(train: Dataset, fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED) -> DatasetDict:
    """Split `train` into `train` and `validation` (a random `fraction` of it, drawn with `seed`)."""
    parts = train.train_test_split(test_size=fraction, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hub (or a local copy of it) and how to turn it into a task's splits.

    Calling it with `source=None` loads `path`; a `source` replaces `path` with another Hub id, a local folder of
    data files (parquet, csv, json, an image folder), or a folder written by `DatasetDict.save_to_disk`.
    `label_map` turns each source label into the task's class index (e.g. binning STS-B's similarity scores).
    """

    path: str
    name: str | None = None  # the dataset's configuration, e.g. "sst2" for "nyu-mll/glue"
    columns: Mapping[str, str] = field(default_factory=dict)  # renames {source column: task column}
    test_split: str = "test"  # GLUE test labels are hidden, so GLUE tasks evaluate on its "validation"
    label_map: Callable[[Any], int] | None = None

    def __call__(self, source: str | None = None) -> DatasetDict:
        source = source or self.path
        if (Path(source) / "dataset_dict.json").is_file():
            raw = datasets.load_from_disk(source)
        else:
            try:
                raw = datasets.load_dataset(source, self._configuration(source))
            except ConnectionError as error:  # offline, or the Hub unreachable: not a bug, say what to do
                raise FileNotFoundError(
                    f"dataset {source!r}: {error}; go online, or give a local copy (a folder written by "
                    "DatasetDict.save_to_disk; saft-hf evaluate --dataset_path TASK=PATH)"
                ) from error
        for split in ("train", self.test_split):
            if split not in raw:
                raise ValueError(f"Dataset {source!r} has no {split!r} split (it has: {', '.join(raw)}).")
        # Columns a split lacks are left for the task's check, which names them.
        renamed = {
            split: raw[split].rename_columns(
                {old: new for old, new in self.columns.items() if old in raw[split].column_names}
            )
            for split in ("train", self.test_split)
        }
        if self.label_map is not None:
            renamed = {split: self._map_labels(dataset) for split, dataset in renamed.items()}
        return DatasetDict(**split_validation(renamed["train"]), test=renamed[self.test_split])

    def _map_labels(self, dataset: Dataset) -> Dataset:
        if "label" not in dataset.column_names:
            return dataset  # the task's column check names it
        features = dataset.features.copy()
        features["label"] = datasets.Value("int64")
        return dataset.map(
            lambda labels: {"label": [self.label_map(label) for label in labels]},
            input_columns="label",
            batched=True,
            features=features,
        )

    def _configuration(self, source: str) -> str | None:
        # A local folder of plain data files holds one configuration (`default`); a local clone of the Hub
        # repository declares the same configurations as the Hub one.
        if Path(source).is_dir() and self.name not in datasets.get_dataset_config_names(source):
            return None
        return self.name


def _check_splits(task_name: str, splits: DatasetDict, columns: list[str]) -> None:
    for split in SPLITS:
        if split not in splits:
            raise ValueError(f"Task {task_name!r}: the data has no {split!r} split.")
        if len(splits[split]) == 0:
            raise ValueError(f"Task {task_name!r}: the {split!r} split is empty.")
        missing = [column for column in columns if column not in splits[split].column_names]
        if missing:
            raise ValueError(
                f"Task {task_name!r}: the {split!r} split lacks column(s) {missing} "
                f"(it has {splits[split].column_names})."
            )


@dataclass(frozen=True)
class ImageClassificationTask:
    """Images with integer labels, classified by a zero-shot head built from `class_names` x `templates`.

    `cache_inputs`: build model inputs through `CachedImageInputs` (each image decoded and each crop resized once
    per process, the same tensors): for small datasets of small images such as the digits demo, whose fine-tunes
    otherwise spend about a third of their time re-decoding and resizing 8x8 images every step.
    """

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    load_splits: SplitLoader
    cache_inputs: bool = False

    def load(self, source: str | None = None) -> DatasetDict:
        """The task's train/validation/test splits with `image` and `label` columns."""
        splits = self.load_splits(source)
        _check_splits(self.name, splits, ["image", "label"])
        for split, dataset in splits.items():
            feature = dataset.features["label"]
            if isinstance(feature, ClassLabel) and feature.num_classes != len(self.class_names):
                raise ValueError(
                    f"Task {self.name!r}: the {split!r} split's label column has {feature.num_classes} classes, the "
                    f"task names {len(self.class_names)}; is this the task's dataset?"
                )
        return splits

    def prepare(
        self,
        splits: DatasetDict,
        image_processor: Any,
        augment: Collection[str] = ("train",),
    ) -> DatasetDict:
        """Splits that yield `pixel_values` and `labels`, transformed on the fly with the CLIP preprocessing of
        `image_processor` (a `CLIPImageProcessor`, or a `CLIPImageTransform`): random resized crops for the splits
        in `augment`, resize + centre crop for the others."""
        if isinstance(image_processor, CLIPImageTransform):
            transform = image_processor
        else:
            transform = CLIPImageTransform.from_processor(image_processor)

        def model_inputs(train: bool, images: Callable[..., torch.Tensor]) -> Callable[[dict], dict[str, torch.Tensor]]:
            def to_model_inputs(batch: dict[str, list]) -> dict[str, torch.Tensor]:
                return {"pixel_values": images(batch["image"], train=train), "labels": torch.tensor(batch["label"])}

            return to_model_inputs

        prepared = {}
        for split, dataset in splits.items():
            images: Callable[..., torch.Tensor] = transform
            feature = dataset.features["image"]
            if self.cache_inputs and isinstance(feature, datasets.Image) and feature.decode:
                # The transform reads the encoded images; `CachedImageInputs` decodes each once with the feature.
                images = CachedImageInputs(transform, feature.decode_example, decode_key=feature.mode)
                dataset = dataset.cast_column("image", datasets.Image(mode=feature.mode, decode=False))
            prepared[split] = dataset.with_transform(model_inputs(split in augment, images))
        return DatasetDict(prepared)


@dataclass(frozen=True)
class TextToTextTask:
    """Texts with integer labels; the model generates `label_words[label]` from `input_template.format(**row)`.

    `metrics` names the task's secondary metrics besides accuracy (`saft_hf.metrics` names: GLUE reports
    `matthews_correlation` for CoLA, `f1` of class 1 for MRPC and QQP).
    """

    name: str
    label_words: tuple[str, ...]
    input_template: str
    load_splits: SplitLoader
    metrics: tuple[str, ...] = ()

    @property
    def input_columns(self) -> list[str]:
        """The columns the input template reads."""
        return [name for _, name, _, _ in string.Formatter().parse(self.input_template) if name]

    def load(self, source: str | None = None) -> DatasetDict:
        """The task's train/validation/test splits with the template's columns and `label`."""
        splits = self.load_splits(source)
        _check_splits(self.name, splits, [*self.input_columns, "label"])
        return splits

    def format_inputs(self, batch: Mapping[str, list]) -> list[str]:
        """The model input text of each row of a batch (a dict of columns)."""
        columns = self.input_columns
        return [
            self.input_template.format(**dict(zip(columns, values)))
            for values in zip(*(batch[column] for column in columns))
        ]

    def prepare(self, splits: DatasetDict, tokenizer: Any, max_source_length: int) -> DatasetDict:
        """Tokenised splits: `input_ids`, `attention_mask`, and the label words' token ids as `labels`."""

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            return tokenize_text_to_text(
                tokenizer, self.format_inputs(batch), batch["label"], self.label_words, max_source_length
            )

        return DatasetDict(
            {
                split: dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
                for split, dataset in splits.items()
            }
        )


Task = ImageClassificationTask | TextToTextTask
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` available to `get_task` and the recipes under `task.name`."""
    if task.name in TASKS:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"Unknown task {name!r}. Registered tasks: {', '.join(sorted(TASKS))}.") from None


def task_dataset(task: Task) -> str | None:
    """The Hub dataset id `task` loads by default (for model cards), or None for data the project generates."""
    return task.load_splits.path if isinstance(task.load_splits, HubDataset) else None
