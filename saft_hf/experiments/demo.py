"""The offline demo's ingredients: a tiny CLIP pre-trained by the demo itself, and tasks on held-out digits.

scikit-learn's bundled handwritten digits (real data, no download) are split once (`saft_hf.data.digits`: train /
validation / test). Half of the train split (seed 0) pre-trains the tiny CLIP; the demo tasks train on the other half
and are validated and tested on the shared validation and test splits, so no pre-training image is ever a task image.

Pre-training is CLIP-style zero-shot classification with both towers trainable: an image's logits are the scaled
cosine similarities between its embedding and each digit's class embedding, built exactly as the frozen zero-shot
head is later built from the text tower (every prompt embedded and normalised, averaged per class, normalised).

`DemoSeedSetup` prepares one seed of the demo study (`saft_hf.experiments.study`): its own tiny CLIP (initialised
and pre-trained with that seed) and the experiment config whose fine-tunes use that seed for their data order.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from torch import nn
from transformers import CLIPModel, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.modeling_outputs import ImageClassifierOutput

from ..data import DIGIT_NAMES, DIGIT_TEMPLATES, TASKS, get_task, load_digits_splits, make_digits_task, register_task
from ..evaluation import classification_metrics
from ..io import atomic_output_dir
from ..layout import PRETRAINING_RECORD_NAME
from ..testing import build_tiny_clip
from .config import ExperimentConfig

logger = logging.getLogger(__name__)

PRETRAINING_FRACTION = 0.5
PRETRAINING_SEED = 0
PRETRAINING_TASK = "demo_pretraining"
# Four tasks over the held-out digits, two of which (parity, small/large) the pre-training never named.
DEMO_TASKS = ("demo_0to4", "demo_5to9", "demo_parity", "demo_small_large")


@lru_cache(maxsize=1)
def _train_halves() -> DatasetDict:
    splits = load_digits_splits()
    halves = splits["train"].train_test_split(test_size=PRETRAINING_FRACTION, seed=PRETRAINING_SEED)
    return DatasetDict(pretraining=halves["test"], tasks=halves["train"])


def pretraining_splits() -> DatasetDict:
    """The pre-training half of the train split, with the shared validation and test splits."""
    splits = load_digits_splits()
    return DatasetDict(train=_train_halves()["pretraining"], validation=splits["validation"], test=splits["test"])


def held_out_splits() -> DatasetDict:
    """The other half of the train split (the demo tasks' training data), with the shared validation and test."""
    splits = load_digits_splits()
    return DatasetDict(train=_train_halves()["tasks"], validation=splits["validation"], test=splits["test"])


def register_demo_tasks() -> tuple[str, ...]:
    """Register the pre-training task and the four demo tasks (idempotent); return the demo task names."""
    if PRETRAINING_TASK in TASKS:
        return DEMO_TASKS
    register_task(
        make_digits_task(PRETRAINING_TASK, DIGIT_NAMES, {d: d for d in range(10)}, source_splits=pretraining_splits)
    )
    definitions = [
        ("demo_0to4", DIGIT_NAMES[:5], {d: d for d in range(5)}, DIGIT_TEMPLATES),
        ("demo_5to9", DIGIT_NAMES[5:], {d: d - 5 for d in range(5, 10)}, DIGIT_TEMPLATES),
        (
            "demo_parity",
            ("even", "odd"),
            {d: d % 2 for d in range(10)},
            ("a photo of an {} number.", "a handwritten {} digit."),
        ),
        (
            "demo_small_large",
            ("small", "large"),
            {d: int(d >= 5) for d in range(10)},
            ("a photo of a {} number.", "a handwritten {} digit."),
        ),
    ]
    for name, class_names, class_of_digit, templates in definitions:
        register_task(make_digits_task(name, class_names, class_of_digit, templates, source_splits=held_out_splits))
    return DEMO_TASKS


class ZeroShotPretraining(nn.Module):
    """A CLIPModel trained to classify images against its own text tower's class embeddings (both towers learn)."""

    def __init__(self, clip: CLIPModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_classes: int):
        super().__init__()
        self.clip = clip
        self.num_classes = num_classes
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_mask", prompt_mask, persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        pooled = self.clip.text_model(input_ids=self.prompt_ids, attention_mask=self.prompt_mask).pooler_output
        prompts = F.normalize(self.clip.text_projection(pooled), dim=-1)
        classes = F.normalize(prompts.view(self.num_classes, -1, prompts.shape[-1]).mean(dim=1), dim=-1)
        image_pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        images = F.normalize(self.clip.visual_projection(image_pooled), dim=-1)
        logits = self.clip.logit_scale.exp() * images @ classes.T
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def pretrain_tiny_clip(
    output_dir: str | Path, *, seed: int = 0, max_steps: int = 300, learning_rate: float = 2e-3, batch_size: int = 64
) -> Path:
    """Build a tiny CLIP (`saft_hf.testing`, `seed`), pre-train it on the pre-training digits and save it as a
    complete CLIPModel folder (weights, tokenizer, image processor, `pretraining.json`) at `output_dir`.

    Cached by content: a folder whose `pretraining.json` records the same settings is returned as is; one made with
    other settings is replaced when saft_hf's manifest shows it untouched (one logged line says so), and the stages
    built on it see new weights and are redone
    (`saft_hf.experiments.pipeline.model_identity`). The folder appears atomically, so an interrupted run leaves
    nothing behind.
    """
    output_dir = Path(output_dir)
    settings = {
        "seed": seed,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "task": PRETRAINING_TASK,
        "fraction_of_train_split": PRETRAINING_FRACTION,
    }
    record = output_dir / PRETRAINING_RECORD_NAME
    if record.is_file():
        recorded = json.loads(record.read_text()).get("settings")
        if recorded == settings:
            return output_dir
        logger.warning(
            "%s was pre-trained with other settings (%s): redoing it",
            output_dir,
            ", ".join(f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in settings.items() if recorded.get(k) != v),
        )
    register_demo_tasks()
    task = get_task(PRETRAINING_TASK)
    clip, tokenizer, processor = build_tiny_clip(seed)
    prompts = [template.format(name) for name in task.class_names for template in task.templates]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    model = ZeroShotPretraining(clip.train(), tokens["input_ids"], tokens["attention_mask"], len(task.class_names))
    splits = task.prepare(task.load(), processor)
    with atomic_output_dir(output_dir, kind="pretrained_model") as staging:
        args = TrainingArguments(
            output_dir=str(staging / "trainer"),
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=256,
            learning_rate=learning_rate,
            weight_decay=0.1,
            lr_scheduler_type="cosine",
            warmup_steps=max_steps // 10,
            logging_steps=max(1, max_steps // 5),
            save_strategy="no",
            seed=seed,
            use_cpu=True,
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        set_seed(seed)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits["validation"],
            compute_metrics=classification_metrics,
        )
        trainer.remove_callback(PrinterCallback)  # its loss dicts would drown the demo's console; logs stay in state
        trainer.train()
        metrics = trainer.evaluate()
        logger.info("pre-training: validation accuracy %.4f", metrics["eval_accuracy"])
        for part in (clip.eval(), tokenizer, processor):
            part.save_pretrained(staging)
        (staging / PRETRAINING_RECORD_NAME).write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2))
        shutil.rmtree(staging / "trainer")
    return output_dir


@dataclass(frozen=True)
class DemoSeedSetup:
    """Prepares seed `s` of the demo study (a `saft_hf.experiments.study.SeedSetup`; picklable, so seeds can run in
    worker processes): pre-trains `<output_dir>/seed_<s>/pretrained` with seed `s` and returns the experiment
    config of `config_path` writing to `<output_dir>/seed_<s>`, its fine-tunes seeded with `s`."""

    config_path: str
    output_dir: str
    pretraining_steps: int = 200
    finetune_args: tuple[str, ...] = ()

    def __call__(self, seed: int) -> ExperimentConfig:
        register_demo_tasks()
        folder = Path(self.output_dir) / f"seed_{seed}"
        pretrained = pretrain_tiny_clip(folder / "pretrained", seed=seed, max_steps=self.pretraining_steps)
        config = ExperimentConfig.from_yaml(self.config_path, base_model=str(pretrained), output_dir=str(folder))
        config.finetune_args = [*config.finetune_args, "--seed", str(seed), *self.finetune_args]
        return config
