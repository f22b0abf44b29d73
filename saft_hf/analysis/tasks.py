"""What the analyses need to know about a task: a model, its evaluation batches, and how to score them.

An :class:`AnalysisTask` is deliberately small so that any model fits: the CLIP zero-shot classifier, Flan-T5, or
a two-line module in a test. The callables receive the model with the analysed weights substituted (see
:func:`saft_hf.analysis.weights.call_at`), so they must reach the weights through the module they are given (or
the same module object), never through copies taken beforehand.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = Mapping[str, Any]


@dataclass(frozen=True)
class AnalysisTask:
    """One task as the analyses see it.

    Attributes:
        name: the task's name (used in tables and figure labels).
        model: the module evaluated; every task of one analysis must share the analysed tensor names.
        batches: returns a fresh iterable over the evaluation batches on each call (same order every time).
        forward: one forward pass on a batch; its layer outputs are what cross-task linearity hooks.
        loss: per-example losses of a batch, shape ``[batch]``, differentiable (the Hessian needs it).
        predict: per-example predictions of a batch (first dimension = batch), compared for equality.
        targets: the correct predictions of a batch, for accuracy; ``None`` when the task has none.
    """

    name: str
    model: nn.Module
    batches: Callable[[], Iterable[Batch]]
    forward: Callable[[nn.Module, Batch], Any]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    predict: Callable[[nn.Module, Batch], torch.Tensor]
    targets: Callable[[Batch], torch.Tensor] | None = None


def _model_inputs(batch: Batch, label_key: str) -> dict[str, Any]:
    return {key: value for key, value in batch.items() if key != label_key}


def classification_task(
    name: str, model: nn.Module, batches: Callable[[], Iterable[Batch]], *, label_key: str = "labels"
) -> AnalysisTask:
    """A task for a classifier called as ``model(**inputs).logits`` (any transformers ``...ForXClassification``
    or the CLIP zero-shot classifier): cross-entropy loss, arg-max predictions, ``batch[label_key]`` targets."""

    def logits(module: nn.Module, batch: Batch) -> torch.Tensor:
        return module(**_model_inputs(batch, label_key)).logits

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits(module, batch).float(), batch[label_key], reduction="none")

    return AnalysisTask(
        name=name,
        model=model,
        batches=batches,
        forward=logits,
        loss=loss,
        predict=lambda module, batch: logits(module, batch).argmax(dim=-1),
        targets=lambda batch: batch[label_key],
    )


def text_to_text_task(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    label_words: Sequence[str],
    batches: Callable[[], Iterable[Batch]],
) -> AnalysisTask:
    """A task for a seq2seq LM that answers with label words (Flan-T5 on GLUE, paper App. C.8).

    Batches are collated ``input_ids``, ``attention_mask`` and ``labels`` (label-word token ids padded with -100).
    The loss of an example is its mean token cross-entropy; a prediction is the index of the label word greedy
    generation produces (-1 when it is none), as :func:`saft_hf.models.predict_label_words` scores it.
    """
    from ..evaluation import label_word_max_new_tokens
    from ..models.t5 import match_label_words

    max_new_tokens = label_word_max_new_tokens(tokenizer, label_words)

    def forward(module: nn.Module, batch: Batch) -> Any:
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        logits = forward(module, batch).logits.float()
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        counts = (labels != -100).sum(dim=1).clamp_min(1)
        return tokens.sum(dim=1) / counts

    def decode_indices(token_ids: torch.Tensor) -> torch.Tensor:
        texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return torch.tensor(match_label_words(texts, label_words))

    def predict(module: nn.Module, batch: Batch) -> torch.Tensor:
        generated = module.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        return decode_indices(generated)

    def targets(batch: Batch) -> torch.Tensor:
        labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
        return decode_indices(labels)

    return AnalysisTask(name, model, batches, forward, loss, predict, targets)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _sliced_batches(
    dataset: Any, batch_size: int, device: torch.device, collate: Callable[[list], Batch] | None
) -> Callable[[], Iterator[Batch]]:
    def batches() -> Iterator[Batch]:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            rows = dataset[start:stop] if collate is None else collate([dataset[i] for i in range(start, stop)])
            yield _to_device(rows, device)

    return batches


def build_analysis_tasks(
    base_model: str | os.PathLike,
    task_names: Sequence[str],
    *,
    split: str = "test",
    max_examples: int | None = None,
    batch_size: int = 64,
    max_source_length: int = 512,
    device: str | torch.device = "cpu",
) -> list[AnalysisTask]:
    """Analysis tasks for registered tasks (``saft_hf.data.get_task``) on the pre-trained ``base_model`` folder.

    Image tasks share one CLIP vision tower (from a full ``CLIPModel`` folder, whose text tower builds each task's
    zero-shot head); text-to-text tasks share one seq2seq LM. The first ``max_examples`` of ``split`` are used.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

    from ..data import ImageClassificationTask, TextToTextTask, get_task
    from ..models import CLIPVisionClassifier, build_zero_shot_head, load_text_to_text_model, text_to_text_collator

    if not task_names:
        raise ValueError("build_analysis_tasks: no task names given.")
    tasks = [get_task(name) for name in task_names]
    device = torch.device(device)

    def first_examples(dataset: Any) -> Any:
        if len(dataset) == 0:
            raise ValueError(f"The {split!r} split of a task is empty.")
        return dataset.select(range(min(len(dataset), max_examples or len(dataset))))

    if all(isinstance(task, ImageClassificationTask) for task in tasks):
        model_type = AutoConfig.from_pretrained(base_model).model_type
        if model_type != "clip":
            raise ValueError(
                f"Image tasks need the full pre-trained CLIPModel as base (its text tower builds the zero-shot "
                f"heads); {base_model} is a {model_type!r} model."
            )
        clip = CLIPModel.from_pretrained(base_model)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        processor = AutoImageProcessor.from_pretrained(base_model)
        vision_config = clip.config.vision_config
        vision_tower = None
        analysis_tasks = []
        for task in tasks:
            head = build_zero_shot_head(clip, task.class_names, task.templates, tokenizer)
            classifier = CLIPVisionClassifier(vision_config, head, vision_tower or clip.vision_model).to(device)
            vision_tower = classifier.vision_model
            data = first_examples(task.prepare(task.load(), processor)[split])
            analysis_tasks.append(
                classification_task(task.name, classifier.eval(), _sliced_batches(data, batch_size, device, None))
            )
        return analysis_tasks
    if all(isinstance(task, TextToTextTask) for task in tasks):
        model, tokenizer = load_text_to_text_model(base_model)
        model = model.to(device).eval()
        collate = text_to_text_collator(tokenizer, model)
        analysis_tasks = []
        for task in tasks:
            data = first_examples(task.prepare(task.load(), tokenizer, max_source_length)[split])
            batches = _sliced_batches(data, batch_size, device, collate)
            analysis_tasks.append(text_to_text_task(task.name, model, tokenizer, task.label_words, batches))
        return analysis_tasks
    kinds = {task.name: type(task).__name__ for task in tasks}
    raise ValueError(f"Tasks of one analysis must all be image or all be text-to-text tasks, got {kinds}.")
