"""Scoring a model on a task split: `evaluate_model`, and the same metrics inside the fine-tuning `Trainer`.

- Image tasks: top-1 accuracy of the CLIP vision tower under the task's zero-shot head, on images preprocessed by
  resize + centre crop (`saft_hf.data.CLIPImageTransform`).
- Text-to-text tasks: greedy generation, normalised, exact match with the label word → accuracy; the fraction of
  outputs that are none of the task's label words (`off_label_fraction`, the SAFT paper's Appendix C.8 analysis of
  merged models answering with another task's labels); and the task's secondary metrics (Matthews correlation for
  CoLA, F1 of class 1 for MRPC and QQP), computed on the matched label indices with off-label outputs as a class
  of their own (always wrong).

All metrics go through the project's offline `evaluate` modules (`saft_hf.metrics.load_metric`).

Models are scored as the fine-tuning mode that produced them needs (`saft_hf.modes`): plain folders directly, FTTS
folders (fine-tunes, and merges of them, which record the mode too) through their linearised forward
(`load_linearized`; a text-to-text one generates with it at every step), LoRA adapter folders on their base model
(`PeftModel`). Merged weights handed over as a `state_dict` are linearised around the loaded model when they are
FTTS weights (`finetune_mode="ftts"`, or the state dict's own `finetune_mode` attribute, which the coefficient
search sets).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from peft import PeftConfig, PeftModel
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    EvalPrediction,
    PreTrainedTokenizerBase,
)
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.utils import cached_file

from .data import SPLITS, ImageClassificationTask, Task, TextToTextTask, get_task
from .layout import ADAPTER_CONFIG_NAME
from .metrics import load_metric
from .models import (
    HEAD_FILE,
    NOT_A_LABEL_WORD,
    CLIPVisionClassifier,
    ZeroShotHead,
    build_zero_shot_head,
    generate_texts,
    match_label_words,
)
from .modes import FINETUNE_MODES, FTTS_MODE, LinearizedModel, load_linearized, saved_finetune_mode

DEFAULT_BATCH_SIZE = 64
# Keyword arguments of the secondary metrics. F1 is GLUE's: of class 1 (MRPC "equivalent", QQP "duplicate");
# restricting it to that label keeps off-label predictions (-1) as "not class 1" rather than an error.
_METRIC_ARGS: dict[str, dict[str, Any]] = {"f1": {"labels": [1], "average": "micro"}}

ModelOrPath = str | os.PathLike | nn.Module


@cache
def _metric(name: str) -> evaluate.EvaluationModule:
    return load_metric(name)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _has_file(name_or_path: str, filename: str) -> bool:
    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False) is not None


def _is_full_clip(name_or_path: str) -> bool:
    try:
        return AutoConfig.from_pretrained(name_or_path).model_type == "clip"
    except (OSError, ValueError):
        return False


def _folder_stamp(name_or_path: str) -> tuple:
    """The name, size and modification time of a local folder's files (empty for a Hub id): a folder rewritten with
    other weights gets another stamp."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


_LOADED_CLIP: dict[tuple, tuple[CLIPModel, PreTrainedTokenizerBase]] = {}


def _full_clip_copy(name_or_path: str) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """A fresh copy of the full CLIPModel at `name_or_path`, with its tokenizer (shared: only read), loaded once per
    process and folder content. A coefficient search scores dozens of merged state dicts on one base, and loading
    the base from disk costs more than scoring a small model; one base is kept at a time, bounding the memory to one
    extra copy."""
    key = (name_or_path, _folder_stamp(name_or_path))
    if key not in _LOADED_CLIP:
        _LOADED_CLIP.clear()
        _LOADED_CLIP[key] = CLIPModel.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
    clip, tokenizer = _LOADED_CLIP[key]
    return copy.deepcopy(clip), tokenizer


def _adapter_base(path: str, base: str | os.PathLike | None) -> str:
    if base is not None:
        return str(base)
    recorded = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not recorded:
        raise ValueError(f"LoRA adapter {path} does not name its base model (base_model_name_or_path); pass base=.")
    return recorded


def _ftts_base(path: str, base: str | os.PathLike | None) -> str:
    if base is not None:
        return str(base)
    recorded = getattr(AutoConfig.from_pretrained(path), "saft_base_model", None)
    if not recorded:
        raise ValueError(f"FTTS model {path} does not name its base model (config.saft_base_model); pass base=.")
    return recorded


# ---- loading ---------------------------------------------------------------------------------------------------


def zero_shot_head_for(
    task: ImageClassificationTask,
    head: ZeroShotHead | str | os.PathLike | None = None,
    sources: Sequence[str] = (),
) -> ZeroShotHead:
    """The zero-shot head to score `task` with: `head` (a head or its file), else the first `sources` folder with a
    `zero_shot_head.safetensors`, else one built with the text tower of the first source that is a full `CLIPModel`
    from the task's class names and templates. Its class names must be the task's."""
    if isinstance(head, ZeroShotHead):
        resolved = head
    elif head is not None:
        resolved = ZeroShotHead.load(head)
    else:
        head_source = next((source for source in sources if _has_file(source, HEAD_FILE)), None)
        if head_source is not None:
            resolved = ZeroShotHead.load(cached_file(head_source, HEAD_FILE))
        else:
            clip_source = next((source for source in sources if _is_full_clip(source)), None)
            if clip_source is None:
                raise ValueError(
                    f"Task {task.name!r}: none of {list(sources)} has a {HEAD_FILE} or is a full CLIPModel to build "
                    "the zero-shot head from; pass head= (a ZeroShotHead or its file) or base= (the pre-trained "
                    "CLIPModel)."
                )
            resolved = build_zero_shot_head(clip_source, task.class_names, task.templates)
    _check_classes(task, resolved.class_names, "the zero-shot head")
    return resolved


def _check_classes(task: ImageClassificationTask, class_names: Sequence[str], what: str) -> None:
    if tuple(class_names) != tuple(task.class_names):
        raise ValueError(
            f"Task {task.name!r} has {len(task.class_names)} classes ({', '.join(task.class_names[:3])}, ...), but "
            f"{what} classifies {len(class_names)} ({', '.join(class_names[:3])}, ...): it belongs to another task."
        )


def load_image_classifier(
    model_or_path: ModelOrPath,
    task: ImageClassificationTask,
    *,
    base: str | os.PathLike | None = None,
    head: ZeroShotHead | str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    finetune_mode: str | None = None,
) -> nn.Module:
    """The model whose `forward(pixel_values=...)` returns the task's logits, with `state_dict` loaded into it
    (linearised around the loaded model when `finetune_mode` is "ftts", see `load_state`).

    From a folder or Hub id: a `CLIPVisionClassifier` folder (vision tower + head), a plain `CLIPVisionModel`
    fine-tune or a full `CLIPModel` (e.g. a merge) with the head from `head` / `base`, an FTTS folder as its
    linearised model around `base` (default: its `config.saft_base_model`), or a LoRA adapter folder on `base`
    (default: the adapter's `base_model_name_or_path`). In memory: any such model, or a `CLIPVisionModel` + `head`.

    A full `CLIPModel` folder without a head file, given a `state_dict` that holds a text tower (a merge of full
    CLIP models), builds the head from that text tower: the same model as the merged folder would be.
    """
    finetune_mode = _state_dict_mode(state_dict, finetune_mode)
    if (
        state_dict is not None
        and finetune_mode != FTTS_MODE  # FTTS merges leave the text tower alone: the head is the base's
        and head is None
        and _is_path(model_or_path)
        and any(name.startswith("text_model.") for name in state_dict)
        and not _has_file(str(model_or_path), HEAD_FILE)
        and _is_full_clip(str(model_or_path))
    ):
        clip, tokenizer = _full_clip_copy(str(model_or_path))
        load_weights_(clip, state_dict)
        merged_head = build_zero_shot_head(clip, task.class_names, task.templates, tokenizer)
        return CLIPVisionClassifier(clip.config.vision_config, merged_head, clip.vision_model)
    return load_state(_image_classifier(model_or_path, task, base, head), state_dict, finetune_mode)


def _image_classifier(model_or_path, task, base, head) -> nn.Module:
    if not _is_path(model_or_path):
        if isinstance(model_or_path, CLIPVisionModel):
            if head is None:
                raise ValueError("A CLIPVisionModel has no zero-shot head: pass head= to score it on a task.")
            resolved = zero_shot_head_for(task, head)
            return CLIPVisionClassifier(model_or_path.config, resolved, model_or_path)
        if head is not None:
            raise ValueError(f"head= applies to folders and CLIPVisionModel objects, not to a {type(model_or_path)}.")
        classifier = next((m for m in model_or_path.modules() if isinstance(m, CLIPVisionClassifier)), None)
        if classifier is None:
            raise TypeError(f"{type(model_or_path).__name__} holds no CLIPVisionClassifier to score an image task.")
        _check_classes(task, classifier.class_names, type(model_or_path).__name__)
        return model_or_path

    path = str(model_or_path)
    if _has_file(path, ADAPTER_CONFIG_NAME):
        adapter_base = _adapter_base(path, base)
        resolved = zero_shot_head_for(task, head, [path, adapter_base])
        return PeftModel.from_pretrained(CLIPVisionClassifier.from_pretrained(adapter_base, head=resolved), path)
    if saved_finetune_mode(path) == FTTS_MODE:
        ftts_base = _ftts_base(path, base)
        resolved = zero_shot_head_for(task, head, [path, ftts_base])
        return load_linearized(
            path, ftts_base, load_model=lambda source: CLIPVisionClassifier.from_pretrained(source, head=resolved)
        )
    sources = [path] if base is None else [path, str(base)]
    return CLIPVisionClassifier.from_pretrained(path, head=zero_shot_head_for(task, head, sources))


def load_text_to_text(
    model_or_path: ModelOrPath,
    *,
    base: str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    finetune_mode: str | None = None,
) -> nn.Module:
    """The seq2seq model that generates the label words, with `state_dict` loaded into it (see `load_state`): a
    model folder or Hub id, an FTTS folder as its linearised model around `base` (default: its
    `config.saft_base_model`), a LoRA adapter folder on `base` (default: the adapter's `base_model_name_or_path`),
    or a model in memory."""
    return load_state(_text_to_text(model_or_path, base), state_dict, _state_dict_mode(state_dict, finetune_mode))


def _text_to_text(model_or_path: ModelOrPath, base: str | os.PathLike | None) -> nn.Module:
    if not _is_path(model_or_path):
        return model_or_path
    path = str(model_or_path)
    if _has_file(path, ADAPTER_CONFIG_NAME):
        return PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(_adapter_base(path, base)), path)
    if saved_finetune_mode(path) == FTTS_MODE:
        return load_linearized(path, _ftts_base(path, base), load_model=AutoModelForSeq2SeqLM.from_pretrained)
    return AutoModelForSeq2SeqLM.from_pretrained(path)


def _processor_sources(model_or_path: ModelOrPath, base: Any) -> list[str]:
    sources = []
    if _is_path(model_or_path):
        path = str(model_or_path)
        sources.append(path)
        if _has_file(path, ADAPTER_CONFIG_NAME):
            sources.append(PeftConfig.from_pretrained(path).base_model_name_or_path or "")
        elif saved_finetune_mode(path) == FTTS_MODE:
            sources.append(getattr(AutoConfig.from_pretrained(path), "saft_base_model", None) or "")
    if _is_path(base):
        sources.append(str(base))
    if not _is_path(model_or_path):
        sources.append(getattr(model_or_path, "name_or_path", "") or "")
    return [source for source in dict.fromkeys(sources) if source]


def load_processor(model_or_path: ModelOrPath, task: Task, *, base: Any = None) -> Any:
    """The image processor (image tasks) or tokenizer (text tasks) saved with the model, else with its base."""
    auto = AutoImageProcessor if isinstance(task, ImageClassificationTask) else AutoTokenizer
    sources = _processor_sources(model_or_path, base)
    for source in sources:
        try:
            return auto.from_pretrained(source)
        except (OSError, ValueError):
            continue
    kind = "image processor" if auto is AutoImageProcessor else "tokenizer"
    raise ValueError(f"Found no {kind} in {sources or 'the model'}; pass processor=.")


def _state_dict_mode(state_dict: Mapping[str, torch.Tensor] | None, finetune_mode: str | None) -> str | None:
    """`finetune_mode`, else the one the state dict carries (a coefficient search's merged weights do)."""
    if finetune_mode is None:
        finetune_mode = getattr(state_dict, "finetune_mode", None)
    elif state_dict is None:
        raise ValueError(f"finetune_mode={finetune_mode!r} describes the weights of state_dict, and none was given.")
    if finetune_mode is not None and finetune_mode not in FINETUNE_MODES:
        raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES} or None, got {finetune_mode!r}.")
    return finetune_mode


def load_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None, finetune_mode: str | None = None
) -> nn.Module:
    """`model` with `state_dict` loaded (`load_weights_`). FTTS weights (`finetune_mode="ftts"`, e.g. a merge of
    FTTS fine-tunes) are a linearised model's `w`: unless `model` is linearised already, it becomes
    `LinearizedModel` around its own weights `w0` (the pre-trained model the merge started from), holding `w`."""
    if state_dict is None:
        return model
    linearize = finetune_mode == FTTS_MODE and not any(isinstance(m, LinearizedModel) for m in model.modules())
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()} if linearize else None
    load_weights_(model, state_dict)
    return LinearizedModel(model, base_weights=base_weights) if linearize else model


@torch.no_grad()
def load_weights_(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place.

    Every tensor of the model's state dict must be given (tied tensors, such as T5's shared embeddings, by any one of
    their names); keys the model lacks are ignored, so a merged full `CLIPModel` state dict serves a vision
    classifier (its text tower is not part of it).
    """
    current = model.state_dict()
    aliases: dict[tuple, list[str]] = {}
    for name, tensor in current.items():
        aliases.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.stride()), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(name in state_dict for name in names)]
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensor(s) of {type(model).__name__}, e.g. {missing[:5]}.")
    for name, tensor in current.items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"state_dict[{name!r}] has shape {tuple(state_dict[name].shape)}, the model's {tuple(tensor.shape)}."
            )
    model.load_state_dict({name: state_dict[name] for name in current if name in state_dict}, strict=False)


# ---- scoring ---------------------------------------------------------------------------------------------------


def score_label_words(task: TextToTextTask, generated: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy (normalised exact match), `off_label_fraction` and the task's secondary metrics of generated texts
    against integer labels."""
    bad = sorted({label for label in labels if not 0 <= label < len(task.label_words)})
    if bad:
        raise ValueError(f"Task {task.name!r}: labels {bad} have no label word (unlabeled rows cannot be scored).")
    references = [task.label_words[label] for label in labels]
    scores = _metric("label_words").compute(
        predictions=list(generated), references=references, label_words=list(task.label_words)
    )
    result = {"accuracy": scores["exact_match"], "off_label_fraction": scores["off_label_fraction"]}
    predicted = match_label_words(generated, task.label_words)
    for name in task.metrics:
        result |= _metric(name).compute(predictions=predicted, references=list(labels), **_METRIC_ARGS.get(name, {}))
    return result


def label_word_max_new_tokens(tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str]) -> int:
    """Tokens to generate: the longest label word's, end-of-sequence included (an output that merely starts with a
    label word then does not match it)."""
    return max(len(ids) for ids in tokenizer(text_target=list(label_words))["input_ids"])


def _split_rows(
    task: Task, split: str, data: Dataset | DatasetDict | None, dataset_path: str | None, max_samples: int | None
) -> Dataset:
    if data is None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        data = task.load(dataset_path)[split]
    elif isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"data has no {split!r} split (it has: {', '.join(data)}).")
        data = data[split]
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
        data = data.select(range(min(len(data), max_samples)))
    if len(data) == 0:
        raise ValueError(f"Task {task.name!r}: the {split!r} split is empty.")
    return data


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _classify(model, task, rows, image_processor, batch_size, device, num_workers, progress, desc) -> list[int]:
    prepared = task.prepare(DatasetDict(split=rows), image_processor, augment=())["split"]
    batches = DataLoader(
        prepared,
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(range(len(rows))), batch_size, drop_last=False),
        num_workers=num_workers,
    )
    dtype = _floating_dtype(model)
    predictions = []
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        logits = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype)).logits
        predictions += logits.argmax(dim=-1).tolist()
    return predictions


def evaluate_model(
    model_or_path: ModelOrPath,
    task: str | Task,
    split: str = "test",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    max_samples: int | None = None,
    base: str | os.PathLike | None = None,
    head: ZeroShotHead | str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    finetune_mode: str | None = None,
    processor: Any = None,
    data: Dataset | DatasetDict | None = None,
    dataset_path: str | None = None,
    max_source_length: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Score a model on a task split.

    Args:
        model_or_path: a model folder or Hub id (see `load_image_classifier` / `load_text_to_text` for the kinds
            understood: classifier, vision tower or full CLIP + head, FTTS, LoRA adapter, seq2seq LM), or a model
            object (moved to `device`; with `state_dict`, its weights are replaced in place).
        task: a registered task name or a task object.
        split: "train", "validation" or "test" (the task's splits; validation is 10% of train, seed 0).
        batch_size: examples per forward pass / generate call.
        device: default CUDA when available, else CPU.
        max_samples: score only the first N examples of the split.
        base: the pre-trained model (folder / Hub id) for FTTS and LoRA folders (default: the one they record), and
            for the zero-shot head and processor of folders that lack them.
        head: the zero-shot head (or its file) for image tasks; default: the folder's, else built from `base`.
        state_dict: weights to load into the model first (e.g. a merge), in the model's key space; see
            `load_weights_`. Scoring (a base folder, a merged state dict) equals scoring the merged folder.
        finetune_mode: the fine-tuning mode of `state_dict`'s weights (default: its `finetune_mode` attribute, if
            any): "ftts" scores them with the linearised forward around the model `model_or_path` loads, as the
            merged folder of FTTS fine-tunes is scored; other modes with the plain forward.
        processor: the image processor / tokenizer; default: the model folder's, else `base`'s.
        data: the split's rows already loaded (a `Dataset`, or a `DatasetDict` indexed by `split`), instead of
            loading the task's data.
        dataset_path: load the task's data from this Hub id or local folder instead of its own.
        max_source_length: text tasks: truncate inputs to this many tokens (default: no truncation).
        num_workers: image tasks: DataLoader workers that decode and preprocess images.
        progress: show a tqdm progress bar.

    Returns:
        `{"accuracy": ..., "num_samples": ...}`; text tasks add `off_label_fraction` and the task's secondary
        metrics (`matthews_correlation` for CoLA, `f1` for MRPC and QQP).
    """
    task = get_task(task) if isinstance(task, str) else task
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    rows = _split_rows(task, split, data, dataset_path, max_samples)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(task, ImageClassificationTask):
        model = load_image_classifier(
            model_or_path, task, base=base, head=head, state_dict=state_dict, finetune_mode=finetune_mode
        )
    else:
        model = load_text_to_text(model_or_path, base=base, state_dict=state_dict, finetune_mode=finetune_mode)
    processor = processor if processor is not None else load_processor(model_or_path, task, base=base)
    was_training = model.training
    model.to(device).eval()
    desc = f"{task.name}/{split}"
    try:
        with torch.no_grad():
            if isinstance(task, ImageClassificationTask):
                predictions = _classify(model, task, rows, processor, batch_size, device, num_workers, progress, desc)
                result = _metric("accuracy").compute(predictions=predictions, references=rows["label"])
            else:
                result = _score_generation(model, task, rows, processor, batch_size, max_source_length, progress, desc)
    finally:
        model.train(was_training)
    return result | {"num_samples": len(rows)}


def _score_generation(model, task, rows, tokenizer, batch_size, max_source_length, progress, desc) -> dict:
    texts = task.format_inputs(rows[:])
    max_new_tokens = label_word_max_new_tokens(tokenizer, task.label_words)
    generated = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = texts[start : start + batch_size]
        generated += generate_texts(model, tokenizer, chunk, max_new_tokens, batch_size, max_source_length)
    return score_label_words(task, generated, rows["label"])


# ---- inside the Trainer ----------------------------------------------------------------------------------------


def classification_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for image classifiers: top-1 accuracy of the logits."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return _metric("accuracy").compute(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)


def label_word_metrics(
    task: TextToTextTask, tokenizer: PreTrainedTokenizerBase
) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for a trainer with `GenerativeEvaluationMixin`: decodes the generated ids and the label
    ids (padding -100) and scores them as `evaluate_model` does."""

    def decode(ids: np.ndarray) -> list[str]:
        return tokenizer.batch_decode(np.where(ids == -100, tokenizer.pad_token_id, ids), skip_special_tokens=True)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        references = decode(eval_prediction.label_ids)
        labels = match_label_words(references, task.label_words)
        unknown = sorted({text for text, label in zip(references, labels) if label == NOT_A_LABEL_WORD})
        if unknown:
            raise ValueError(
                f"Task {task.name!r}: label ids decode to {unknown[:3]}, none of the label words "
                f"{list(task.label_words)}; the tokenizer does not round-trip them."
            )
        return score_label_words(task, decode(eval_prediction.predictions), labels)

    return compute_metrics


class GenerativeEvaluationMixin:
    """`Trainer` mixin (list it before the trainer class): evaluation also generates greedily, so `compute_metrics`
    gets the generated token ids as `predictions` — what `load_best_model_at_end` needs to keep the checkpoint with
    the best generation accuracy rather than the best loss. The loss is computed as usual, teacher-forced.

    `generation_max_new_tokens`: tokens to generate (`label_word_max_new_tokens`).
    """

    def __init__(self, *args, generation_max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_max_new_tokens = generation_max_new_tokens

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, _, _ = super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)
        if prediction_loss_only:
            return loss, None, None
        inputs = self._prepare_inputs(inputs)
        # Teacher-forcing inputs made from the labels would make generate continue them.
        encoder_inputs = {
            name: value
            for name, value in inputs.items()
            if name not in ("labels", "decoder_input_ids", "decoder_attention_mask")
        }
        with torch.no_grad():
            generated = self.model.generate(
                **encoder_inputs,
                max_new_tokens=self.generation_max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=is_fsdp_managed_module(self.model),
            )
        return loss, generated, inputs.get("labels")
