"""A tiny CLIP whose vision tower learned a little of the digits, for tests that score models on them: a random
tower maps every image to about one class, which would hide a wrong forward or rows scored out of order."""

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from saft_hf.data import get_task, load_digits_splits
from saft_hf.models import CLIPVisionClassifier
from saft_hf.testing import save_tiny_clip


def digits_trained_clip(root: Path, *, train_rows: int, steps: int):
    """``(base folder, classifier, processor)``: the digits classifier of a seed-0 tiny CLIP after ``steps`` AdamW
    steps (batch 32) on the first ``train_rows`` digits, and that CLIP saved as a full CLIPModel folder (with its
    processor and tokenizer) at ``root / "base"``."""
    digits = get_task("digits")
    random_clip = save_tiny_clip(root / "random", seed=0)
    processor = AutoImageProcessor.from_pretrained(random_clip)
    classifier = CLIPVisionClassifier.from_clip(random_clip, digits.class_names, digits.templates)
    train = load_digits_splits()["train"].select(range(train_rows))
    pixel_values = processor(images=[image.convert("RGB") for image in train["image"]], return_tensors="pt")
    labels = torch.tensor(train["label"])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (32,), generator=generator)
        classifier(pixel_values=pixel_values["pixel_values"][batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    clip = CLIPModel.from_pretrained(random_clip)
    clip.vision_model.load_state_dict(classifier.vision_model.state_dict())
    base = root / "base"
    for part in (clip, processor, AutoTokenizer.from_pretrained(random_clip)):
        part.save_pretrained(base)
    return base, classifier, processor


def planted_labels(rows, predictions):
    """``rows`` relabelled so that ``predictions`` are right exactly on rows 0, 3, 6, ...: a score that moves with
    any changed prediction."""
    labels = [p if i % 3 == 0 else (p + 1) % 10 for i, p in enumerate(predictions)]
    return rows.remove_columns("label").add_column("label", labels)


def accuracy_of(predictions, rows):
    return sum(p == label for p, label in zip(predictions, rows["label"])) / len(predictions)
