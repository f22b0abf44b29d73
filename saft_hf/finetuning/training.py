"""Fine-tune one model on one task with SAFT or plain fine-tuning, in any fine-tuning mode (`full`, `ftlo`, `ftts`,
`lora`): the code path of `recipes/finetune.py` and of the experiment pipeline's fine-tunes.

`run(argv)` checks everything first (the fields, the task, `output_dir`'s placeholders,
`resume_from_checkpoint`, and that `output_dir` holds no other run unless the run resumes from one of its
checkpoints), then writes to `output_dir`:

- the fine-tuned model with its image processor or tokenizer, scored by `saft_hf.evaluation.evaluate_model`:
  image tasks, `full`/`ftlo`/`ftts`: a `CLIPVisionModel` folder plus `zero_shot_head.safetensors` (`ftts` records
  `saft_finetune_mode` and the base model in its config); `lora`: the PEFT adapter plus the head file; text tasks:
  a seq2seq LM folder (`ftts` records its mode and base as above, and generates with its linearised forward), or
  the adapter for `lora`;
- `finetune_config.yaml`: the resolved configuration (written once the data and the model have loaded, just before
  training starts; `--config` it to re-run);
- `trainer_state.json` (the log history, including `sam/*` and `noise/effective_scale`), `{train,eval,test}_results
  .json` and `all_results.json`: accuracy on the validation (`eval_*`) and test splits (text tasks: generation
  accuracy, `off_label_fraction` and the task's secondary metrics);
- `pretrained/` when the model was built from a config (`tiny_model_seed`): the model fine-tuning started from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import AutoImageProcessor, set_seed

from ..analysis import add_noise_scale_logging
from ..config import SAFTConfig
from ..data import ImageClassificationTask, Task, TextToTextTask, task_dataset
from ..evaluation import (
    GenerativeEvaluationMixin,
    classification_metrics,
    label_word_max_new_tokens,
    label_word_metrics,
)
from ..models import HEAD_FILE, CLIPVisionClassifier, load_text_to_text_model, text_to_text_collator
from ..modes import apply_finetune_mode
from ..testing import save_tiny_clip, save_tiny_t5
from ..trainer import SAFTTrainer
from .arguments import DataArguments, ModelArguments, parse_finetune_args, write_resolved_config
from .checks import check_output_dir, check_resume_checkpoint, find_task

logger = logging.getLogger(__name__)


def _limit(splits: DatasetDict, data_args: DataArguments) -> DatasetDict:
    caps = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_eval_samples,
    }
    return DatasetDict(
        {
            split: dataset.select(range(min(len(dataset), caps[split]))) if caps[split] else dataset
            for split, dataset in splits.items()
        }
    )


def _pretrained_path(task: Task, model_args: ModelArguments, output_dir: Path, writes: bool) -> str:
    """The pre-trained model's Hub id or absolute local path: FTTS configs and LoRA adapters record it as their base
    model, and must find it from any working directory."""
    if model_args.model_name_or_path is not None:
        local = Path(model_args.model_name_or_path)
        return str(local.resolve()) if local.is_dir() else model_args.model_name_or_path
    path = (output_dir / "pretrained").resolve()
    if writes:
        save_tiny = save_tiny_clip if isinstance(task, ImageClassificationTask) else save_tiny_t5
        save_tiny(path, seed=model_args.tiny_model_seed)
    return str(path)


def apply_mode(model: torch.nn.Module, model_args: ModelArguments, model_path: str) -> torch.nn.Module:
    """`model` turned into what trains under `model_args.finetune_mode` (saft_hf.modes)."""
    options = {
        "lora": dict(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
        ),
        "ftts": dict(base_model_name_or_path=model_path),
    }.get(model_args.finetune_mode, {})
    return apply_finetune_mode(model, model_args.finetune_mode, **options)


class TextToTextTrainer(GenerativeEvaluationMixin, SAFTTrainer):
    """SAFTTrainer whose evaluation generates, so `accuracy` can select the best checkpoint."""


def finetune_image_classifier(
    task: ImageClassificationTask,
    splits: DatasetDict,
    model_path: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: SAFTConfig,
    resolved: dict[str, Any],
) -> None:
    """Fine-tune the CLIP vision tower under the task's zero-shot head; evaluate accuracy on validation and test."""
    classifier = CLIPVisionClassifier.from_clip(
        model_path, task.class_names, task.templates, batch_size=model_args.head_batch_size
    )
    classifier.name_or_path = model_path  # what a LoRA adapter records as its base model
    image_processor = AutoImageProcessor.from_pretrained(model_path)
    prepared = task.prepare(splits, image_processor)
    trainer = SAFTTrainer(
        model=apply_mode(classifier, model_args, model_path),
        args=training_args,
        train_dataset=prepared["train"],
        eval_dataset=prepared["validation"],
        processing_class=image_processor,
        compute_metrics=classification_metrics,
    )
    if model_args.finetune_mode == "lora":
        # The adapter folder holds only the LoRA weights; the frozen head goes beside it in every saved folder, so
        # checkpoints and pushes carry it too.
        trainer.add_model_file(lambda folder: classifier.head.save(Path(folder) / HEAD_FILE))
    _train(trainer, training_args, resolved)
    _evaluate(trainer, prepared)
    _save(trainer, task, data_args)


def finetune_text_to_text(
    task: TextToTextTask,
    splits: DatasetDict,
    model_path: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: SAFTConfig,
    resolved: dict[str, Any],
) -> None:
    """Fine-tune a seq2seq LM to generate the label words; evaluate generation accuracy, the fraction of outputs
    that are no label word and the task's secondary metrics on validation and test."""
    model, tokenizer = load_text_to_text_model(model_path)
    prepared = task.prepare(splits, tokenizer, data_args.max_source_length)
    trainer = TextToTextTrainer(
        model=apply_mode(model, model_args, model_path),
        args=training_args,
        train_dataset=prepared["train"],
        eval_dataset=prepared["validation"],
        processing_class=tokenizer,
        data_collator=text_to_text_collator(tokenizer, model),
        compute_metrics=label_word_metrics(task, tokenizer),
        generation_max_new_tokens=label_word_max_new_tokens(tokenizer, task.label_words),
    )
    _train(trainer, training_args, resolved)
    _evaluate(trainer, prepared)
    _save(trainer, task, data_args)


def _save(trainer: SAFTTrainer, task: Task, data_args: DataArguments) -> None:
    """Save the model with its card (SAFTTrainer.create_model_card), and push both with `push_to_hub`, as the
    transformers examples end."""
    card = {"task": task.name, "dataset": data_args.dataset_path or task_dataset(task)}
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)


def _train(trainer: SAFTTrainer, training_args: SAFTConfig, resolved: dict[str, Any]) -> None:
    """Record the resolved configuration (now that the data and the model have loaded), then train."""
    if trainer.args.should_save:
        write_resolved_config(resolved, Path(training_args.output_dir))
    add_noise_scale_logging(trainer)  # logs noise/effective_scale, the noise sweep's x-axis
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    _save_metrics(trainer, "train", result.metrics)


def _evaluate(trainer: SAFTTrainer, prepared: DatasetDict) -> None:
    for split, prefix in (("validation", "eval"), ("test", "test")):
        _save_metrics(trainer, prefix, trainer.evaluate(prepared[split], metric_key_prefix=prefix))


def _save_metrics(trainer: SAFTTrainer, split: str, metrics: dict[str, float]) -> None:
    """Log and write `{split}_results.json`, merged into `all_results.json` (main process only)."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)


def finetune(
    model_args: ModelArguments, data_args: DataArguments, training_args: SAFTConfig, resolved: dict[str, Any]
) -> None:
    """Check, then fine-tune and evaluate (see the module docstring); `resolved` is what `finetune_config.yaml`
    records."""
    task = find_task(data_args.task)
    check_resume_checkpoint(training_args.resume_from_checkpoint)
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, training_args.resume_from_checkpoint)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The prepared splits hold exactly the model's inputs; image inputs are built on the fly by a dataset
    # transform, which needs its source columns, so the Trainer must not drop columns.
    training_args.remove_unused_columns = False
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)
    set_seed(training_args.seed)

    splits = _limit(task.load(data_args.dataset_path), data_args)
    with training_args.main_process_first(desc="preparing the pre-trained model"):
        model_path = _pretrained_path(task, model_args, output_dir, training_args.should_save)
    if isinstance(task, ImageClassificationTask):
        finetune_image_classifier(task, splits, model_path, model_args, data_args, training_args, resolved)
    else:
        finetune_text_to_text(task, splits, model_path, model_args, data_args, training_args, resolved)


def run(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (`--config` files and flags, `parse_finetune_args`) and fine-tune: `recipes/finetune.py`'s
    main, and what the experiment pipeline calls for each of its fine-tunes."""
    finetune(*parse_finetune_args(argv))
