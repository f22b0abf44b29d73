"""Fine-tune one model on one task with SAFT (sharpness-aware fine-tuning) or plain fine-tuning, in any
fine-tuning mode: `full`, `ftlo` (attention projections only), `ftts` (linearised model) or `lora` (PEFT).

Launch (GPU machine with Hub access):

    accelerate launch recipes/finetune.py --config recipes/configs/clip_vit_b32.yaml --task eurosat \\
        --finetune_mode ftlo --sam_mode asam
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml recipes/finetune.py \\
        --config recipes/configs/flan_t5_base.yaml --task sst2 --sam_mode none
    accelerate launch recipes/finetune.py --config recipes/configs/clip_vit_b16.yaml \\
        --config recipes/configs/lora.yaml --task dtd

Several `--config` files apply in order (later files override earlier ones); `lora.yaml` holds the LoRA settings.

Offline demo (tiny CLIP built from a config, real handwritten digits, CPU, about a minute):

    python recipes/finetune.py --config recipes/configs/demo.yaml

Every field of `ModelArguments`, `DataArguments` and `SAFTConfig` (which includes all of `TrainingArguments`) is a
command-line flag. `--config FILE.yaml` supplies values for any of them; flags given on the command line override
the file. The run writes to `output_dir`:

- the fine-tuned model with its image processor or tokenizer, scored by `saft_hf.evaluation.evaluate_model`:
  image tasks, `full`/`ftlo`/`ftts`: a `CLIPVisionModel` folder plus `zero_shot_head.safetensors` (`ftts` records
  `saft_finetune_mode` and the base model in its config); `lora`: the PEFT adapter plus the head file; text tasks:
  a seq2seq LM folder (`ftts` records its mode and base as above, and generates with its linearised forward), or
  the adapter for `lora`;
- `finetune_config.yaml`: the resolved configuration (file values and flags; `--config` it to re-run);
- `trainer_state.json` (the log history, including `sam/*` metrics), `{train,eval,test}_results.json` and
  `all_results.json`: accuracy on the validation (`eval_*`) and test splits (text tasks: generation accuracy,
  `off_label_fraction` and the task's secondary metrics);
- `pretrained/` when the model was built from a config (`tiny_model_seed`): the model fine-tuning started from.

Everything is checked before anything is written: the fields, the task and the mode, `output_dir`'s placeholders,
`resume_from_checkpoint` (a folder holding `trainer_state.json` and readable weights), and `output_dir` itself: a
folder that already holds a run (`finetune_config.yaml`, `checkpoint-*` folders or model weights) is refused unless
the run resumes from one of its checkpoints, so a new run cannot overwrite a finished one. `finetune_config.yaml` is
written once the data and the model have loaded, just before training starts. A user error prints one line,
`finetune.py: error: ...`, and exits with status 1; `SAFT_HF_DEBUG=1` shows its traceback (`--debug` is the
Trainer's own option here).

With `load_best_model_at_end`, the checkpoint kept is the best on the validation split by `metric_for_best_model`;
`accuracy` is the generation accuracy for text tasks (`saft_hf.evaluation.GenerativeEvaluationMixin`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import DatasetDict
from transformers import AutoImageProcessor, HfArgumentParser, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from saft_hf import SAFTConfig, SAFTTrainer
from saft_hf.analysis import add_noise_scale_logging
from saft_hf.checkpoints import CheckpointReader
from saft_hf.data import ImageClassificationTask, Task, TextToTextTask, get_task
from saft_hf.entrypoint import run_main
from saft_hf.errors import UnsafeOutputError
from saft_hf.evaluation import (
    GenerativeEvaluationMixin,
    classification_metrics,
    label_word_max_new_tokens,
    label_word_metrics,
)
from saft_hf.models import HEAD_FILE, CLIPVisionClassifier, load_text_to_text_model, text_to_text_collator
from saft_hf.modes import FINETUNE_MODES, apply_finetune_mode
from saft_hf.testing import save_tiny_clip, save_tiny_t5

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_FILE = "finetune_config.yaml"
# The weight files the Trainer resumes a checkpoint from (Trainer._load_from_checkpoint), and that a saved run holds.
WEIGHTS_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)


@dataclass
class ModelArguments:
    """Which pre-trained model to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the pre-trained model: a full CLIPModel for image tasks (its text "
            "tower builds the frozen zero-shot head, its vision tower is fine-tuned), a seq2seq LM such as Flan-T5 "
            "for text tasks."
        },
    )
    tiny_model_seed: int | None = field(
        default=None,
        metadata={
            "help": "Instead of model_name_or_path: build a tiny randomly initialised model of the task's family "
            "(saft_hf.testing) with this seed, save it to <output_dir>/pretrained and fine-tune it. For offline "
            "demos and tests; the same seed always gives the same model, so runs on several tasks share it."
        },
    )
    head_batch_size: int = field(
        default=256, metadata={"help": "Prompts embedded per batch when building the zero-shot head."}
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads torch may use (torch.set_num_threads); default: torch's choice. 1 is fastest for "
            "tiny models, and far faster than several threads on a CPU shared with other jobs."
        },
    )
    finetune_mode: str = field(
        default="full",
        metadata={
            "help": "What trains (saft_hf.modes): 'full' (every weight of the model; for CLIP the vision tower), "
            "'ftlo' (the attention modules' linear projections only), 'ftts' (the first-order Taylor linearisation "
            "around the pre-trained weights; image tasks only), 'lora' (PEFT LoRA adapters).",
            "choices": list(FINETUNE_MODES),
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (finetune_mode lora)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator: updates scale by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the linear modules LoRA adapts (last name component, e.g. q_proj v_proj); default: "
            "the attention query and value projections (CLIP q_proj/v_proj, T5 q/v)."
        },
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.tiny_model_seed is None):
            raise ValueError("Set exactly one of model_name_or_path and tiny_model_seed.")
        for name in ("head_batch_size", "torch_num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got {self.finetune_mode!r}.")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class DataArguments:
    """Which task to fine-tune on, and where its data comes from."""

    task: str = field(
        metadata={
            "help": "Registered task name (saft_hf.data.TASKS): image tasks cars, dtd, eurosat, gtsrb, mnist, "
            "resisc45, sun397, svhn; GLUE text-to-text tasks cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb; offline "
            "demo tasks digits, digits_0to4, digits_5to9, digits_parity, digits_small_large."
        }
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Load the task's data from this Hub id or local folder (data files, or a DatasetDict saved with "
            "save_to_disk) instead of the task's own Hub dataset."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation and test examples (quick runs)."}
    )
    max_source_length: int = field(
        default=256, metadata={"help": "Text tasks: truncate model inputs to this many tokens."}
    )

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "max_source_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")


def read_config_file(path: Path, fields: Collection[str]) -> dict[str, Any]:
    """The values a YAML config file sets: a mapping whose keys must be among `fields` (an empty file sets none).
    Also reads `recipes/noise_sweep.py`'s config files."""
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"Cannot read config file {path}: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field names to values.")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"Config file {path} sets unknown field(s): {unknown}.")
    return values


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SAFTConfig, dict[str, Any]]:
    """Parse `--config FILE.yaml` (repeatable: later files override earlier ones) and flags into the three argument
    dataclasses; flags override the files.

    Also returns the resolved configuration: every value that was set by the file or a flag, or that differs
    from its field's default (what `finetune_config.yaml` records).
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", type=Path, action="append", default=[])
    known, flags = config_parser.parse_known_args(argv)

    parser = HfArgumentParser((ModelArguments, DataArguments, SAFTConfig))
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="YAML file of field values; repeat to layer files (later ones win); command-line flags override them.",
    )
    required = {action.dest for action in parser._actions if action.required}
    for action in parser._actions:
        action.required = False
    # The fields' defaults as parsed values (argparse converts string defaults with the field's type).
    defaults = vars(parser.parse_args([]))
    del defaults["config"]
    file_values = {}
    for config_file in known.config:
        file_values |= read_config_file(config_file, defaults)
    # The file's values become the parser's defaults, so any flag given on the command line wins over them.
    parser.set_defaults(**file_values)
    for action in parser._actions:
        action.required = action.dest in required and action.dest not in file_values
    namespace = parser.parse_args(flags)
    del namespace.config
    resolved = {
        name: value for name, value in vars(namespace).items() if name in file_values or value != defaults[name]
    }
    if resolved.get("output_dir"):
        resolved["output_dir"] = _fill_output_dir(
            resolved["output_dir"],
            task=namespace.task,
            sam_mode=namespace.sam_mode,
            finetune_mode=namespace.finetune_mode,
        )
    model_args, data_args, training_args = parser.parse_dict(resolved)
    return model_args, data_args, training_args, resolved


def _fill_output_dir(template: str, **fields: str) -> str:
    """`output_dir` may name the run with `{task}`, `{finetune_mode}` and `{sam_mode}`, so one config serves every
    run."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        placeholders = ", ".join(f"{{{name}}}" for name in fields)
        raise ValueError(
            f"output_dir {template!r} has an unknown placeholder ({error}); it may use {placeholders}."
        ) from None


def public_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration without secrets (`*_token` fields): what `finetune_config.yaml` records."""
    return {name: value for name, value in resolved.items() if not name.endswith("_token")}


def write_resolved_config(resolved: dict[str, Any], output_dir: Path) -> None:
    """Write the resolved configuration as YAML, leaving out secrets (`public_config`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESOLVED_CONFIG_FILE).write_text(yaml.safe_dump(public_config(resolved), sort_keys=True))


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


def find_task(name: str) -> Task:
    """The registered task `name`; an unknown name is a user error about the `task` field."""
    try:
        return get_task(name)
    except KeyError as error:
        raise ValueError(f"task: {error.args[0]}") from None


def check_resume_checkpoint(checkpoint: str | None) -> None:
    """Refuse a `resume_from_checkpoint` the Trainer could not resume from, before anything is loaded or written: it
    must be a folder holding `trainer_state.json` (the step, the schedule) and weights that read back (a truncated
    file is named)."""
    if checkpoint is None:
        return
    folder = Path(checkpoint)
    advice = "pass a checkpoint-<step> folder of an earlier run."
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"resume_from_checkpoint {checkpoint} is not a folder; {advice}")
    if not folder.exists():
        raise FileNotFoundError(f"resume_from_checkpoint {checkpoint} does not exist; {advice}")
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint {checkpoint} holds no {TRAINER_STATE_NAME}, so it is not a Trainer checkpoint; "
            f"{advice}"
        )
    weights = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"resume_from_checkpoint {checkpoint} holds no model weights (one of {', '.join(WEIGHTS_FILES)})."
        )
    for file in weights:
        try:
            # An index is read with its shards; a checkpoint the run wrote itself may hold pickle weights.
            CheckpointReader(folder if file.name.endswith(".index.json") else file, allow_pickle=True)
        except (ValueError, FileNotFoundError) as error:
            message = f"resume_from_checkpoint {checkpoint}: {error}; resume from another checkpoint."
            raise ValueError(message) from error


def holds_a_run(folder: Path) -> bool:
    """True if `folder` holds (part of) a fine-tune: its resolved configuration, checkpoints or saved weights."""
    if not folder.is_dir():
        return False
    markers = (RESOLVED_CONFIG_FILE, *WEIGHTS_FILES)
    return any((folder / name).exists() for name in markers) or get_last_checkpoint(folder) is not None


def check_output_dir(output_dir: Path, resume_from_checkpoint: str | None) -> None:
    """Refuse to write into a folder that holds another run (transformers 5 would overwrite it without asking),
    unless this run resumes from one of that folder's checkpoints."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder; choose another output_dir.")
    resuming_here = resume_from_checkpoint is not None and (
        Path(resume_from_checkpoint).resolve().parent == output_dir.resolve()
    )
    if holds_a_run(output_dir) and not resuming_here:
        raise UnsafeOutputError(
            f"output_dir {output_dir} already holds a fine-tuning run; choose another output_dir, or pass "
            f"--resume_from_checkpoint {output_dir}/checkpoint-<step> to continue that run."
        )


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
    _train(trainer, training_args, resolved)
    _evaluate(trainer, prepared)
    trainer.save_model()
    if model_args.finetune_mode == "lora" and trainer.args.should_save:
        # The adapter folder holds only the LoRA weights; the frozen head goes beside it.
        classifier.head.save(Path(training_args.output_dir) / HEAD_FILE)


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
    trainer.save_model()


def _train(trainer: SAFTTrainer, training_args: SAFTConfig, resolved: dict[str, Any]) -> None:
    """Record the resolved configuration (now that the data and the model have loaded), then train."""
    if trainer.args.should_save:
        write_resolved_config(resolved, Path(training_args.output_dir))
    add_noise_scale_logging(trainer)  # logs noise/effective_scale, the noise-sweep recipe's x-axis
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


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args, resolved = parse_args(argv)
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
        finetune_image_classifier(task, splits, model_path, model_args, training_args, resolved)
    else:
        finetune_text_to_text(task, splits, model_path, model_args, data_args, training_args, resolved)


if __name__ == "__main__":
    # --debug is the Trainer's option (TrainingArguments.debug): only SAFT_HF_DEBUG=1 shows a user error's traceback.
    sys.exit(run_main(main, sys.argv[1:], prog="finetune.py", debug_flag=None))
