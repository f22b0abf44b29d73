"""CLIP zero-shot image classifier: the CLIP vision tower under a frozen head built from class-name prompts.

The head follows the SAFT paper's protocol (Lee et al., ICLR 2025, after Ilharco et al.'s task arithmetic code):
each class name is put in every prompt template, each prompt is embedded with the CLIP text tower and its text
projection, L2-normalised, averaged over templates, normalised again, and the logits are
`logit_scale.exp() * normalize(visual_projection(pooled vision output)) @ class_embeddings.T`.

Only the vision tower trains. The head lives in non-persistent buffers, so the model's state dict (and every
Trainer checkpoint) is exactly a `CLIPVisionModel` state dict with `vision_model.*` keys — the format of the public
`tanganke/clip-vit-base-patch32_<task>` fine-tunes — and the head is saved beside it in `zero_shot_head.safetensors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from transformers import AutoTokenizer, CLIPModel, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
from transformers.utils import cached_file

from ..io import write_atomically
from ..layout import HEAD_FILE

_HEAD_TENSORS = ("visual_projection", "class_embeddings", "logit_scale")


@dataclass
class ZeroShotHead:
    """The frozen part of the classifier, as saved in `zero_shot_head.safetensors`."""

    visual_projection: torch.Tensor  # (projection_dim, vision hidden_size): CLIP's `visual_projection.weight`
    class_embeddings: torch.Tensor  # (num_classes, projection_dim), unit-norm rows
    logit_scale: torch.Tensor  # 0-dim: CLIP's `logit_scale` parameter; the logits are scaled by its exp()
    class_names: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self):
        num_classes, projection_dim = self.class_embeddings.shape
        if num_classes != len(self.class_names):
            raise ValueError(
                f"class_embeddings has {num_classes} rows but there are {len(self.class_names)} class_names."
            )
        if self.visual_projection.ndim != 2 or self.visual_projection.shape[0] != projection_dim:
            raise ValueError(
                f"visual_projection has shape {tuple(self.visual_projection.shape)}; expected "
                f"({projection_dim}, hidden_size) to match class_embeddings of shape "
                f"{tuple(self.class_embeddings.shape)}."
            )
        if self.logit_scale.ndim != 0:
            raise ValueError(f"logit_scale must be a scalar tensor, got shape {tuple(self.logit_scale.shape)}.")

    def save(self, path: str | os.PathLike) -> None:
        """Write the head to the safetensors file `path` (atomically: a failed write leaves no partial file)."""
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in _HEAD_TENSORS}
        metadata = {"class_names": json.dumps(list(self.class_names)), "templates": json.dumps(list(self.templates))}
        write_atomically(path, lambda f: f.write(save(tensors, metadata=metadata)), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZeroShotHead:
        """Read a head written by `save`."""
        with safe_open(path, framework="pt") as f:
            missing = [name for name in _HEAD_TENSORS if name not in f.keys()]
            metadata = f.metadata() or {}
            missing += [key for key in ("class_names", "templates") if key not in metadata]
            if missing:
                raise ValueError(f"{path} is not a zero-shot head file: it lacks {', '.join(missing)}.")
            tensors = {name: f.get_tensor(name) for name in _HEAD_TENSORS}
        return cls(
            **tensors,
            class_names=tuple(json.loads(metadata["class_names"])),
            templates=tuple(json.loads(metadata["templates"])),
        )


def _check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
    if not class_names:
        raise ValueError("class_names is empty: a zero-shot head needs at least one class.")
    if not templates:
        raise ValueError("templates is empty: a zero-shot head needs at least one prompt template.")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"Prompt template {template!r} must contain exactly one '{{}}' for the class name.")


@torch.no_grad()
def build_zero_shot_head(
    clip_model: CLIPModel | str | os.PathLike,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 256,
) -> ZeroShotHead:
    """Embed every `template.format(class_name)` prompt with CLIP's text tower and build the zero-shot head.

    `clip_model` is a `CLIPModel` or a local folder / Hub id of one (its tokenizer is then loaded from the same
    place unless `tokenizer` is given). Prompts are embedded in batches of `batch_size`.
    """
    _check_prompts(class_names, templates)
    if not isinstance(clip_model, CLIPModel):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(clip_model)
        clip_model = CLIPModel.from_pretrained(clip_model)
    if tokenizer is None:
        raise ValueError("build_zero_shot_head needs a tokenizer when clip_model is a model object.")
    was_training = clip_model.training
    clip_model.eval()
    device = clip_model.text_projection.weight.device
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        pooled = clip_model.text_model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        ).pooler_output
        embeddings.append(F.normalize(clip_model.text_projection(pooled).float(), dim=-1))
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)
    class_embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
    clip_model.train(was_training)
    return ZeroShotHead(
        visual_projection=clip_model.visual_projection.weight.detach().clone(),
        class_embeddings=class_embeddings,
        logit_scale=clip_model.logit_scale.detach().clone(),
        class_names=tuple(class_names),
        templates=tuple(templates),
    )


class CLIPVisionClassifier(CLIPPreTrainedModel):
    """CLIP vision tower (`self.vision_model`, trainable) + frozen zero-shot head (non-persistent buffers).

    `forward(pixel_values, labels=None)` returns an `ImageClassifierOutput` with the cross-entropy loss when labels
    are given, so the stock `Trainer` trains it. `save_pretrained` writes a plain `CLIPVisionModel` folder plus
    `zero_shot_head.safetensors`; `from_pretrained` reads both (or takes a `head` for a folder without one, such as
    a public vision-tower fine-tune).
    """

    config: CLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: CLIPVisionConfig, head: ZeroShotHead, vision_model: CLIPVisionModel | None = None):
        super().__init__(config)
        if head.visual_projection.shape[1] != config.hidden_size:
            raise ValueError(
                f"The head's visual_projection expects vision features of size {head.visual_projection.shape[1]}, "
                f"but the vision tower's hidden_size is {config.hidden_size}."
            )
        self.vision_model = vision_model if vision_model is not None else CLIPVisionModel(config)
        dtype = next(self.vision_model.parameters()).dtype
        for name in _HEAD_TENSORS:
            self.register_buffer(name, getattr(head, name).detach().clone().to(dtype), persistent=False)
        self.class_names = head.class_names
        self.templates = head.templates
        self.post_init()
        # The blocks FSDP auto-wrap and device maps keep whole. CLIP's shared list also names the text embeddings,
        # which this model lacks, and FSDP's transformer auto-wrap refuses class names it cannot find.
        self._no_split_modules = {"CLIPEncoderLayer", "CLIPVisionEmbeddings"}

    @property
    def head(self) -> ZeroShotHead:
        """The frozen head, as currently held by the buffers."""
        return ZeroShotHead(
            **{name: getattr(self, name) for name in _HEAD_TENSORS},
            class_names=self.class_names,
            templates=self.templates,
        )

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised `visual_projection(pooled vision output)`."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(F.linear(pooled, self.visual_projection), dim=-1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.logit_scale.exp() * self.image_embeddings(pixel_values) @ self.class_embeddings.T
        loss = F.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """Save as a plain `CLIPVisionModel` folder (`architectures: ["CLIPVisionModel"]`, `vision_model.*`
        tensors) with the head in `zero_shot_head.safetensors` beside it."""
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "CLIPVisionClassifier.save_pretrained does not push: save locally, then upload the folder "
                "(e.g. with huggingface_hub.upload_folder) so the head file goes in the same commit."
            )
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            # `PreTrainedModel.save_pretrained` names this class; the weights are a CLIPVisionModel's.
            self.config.architectures = ["CLIPVisionModel"]
            self.config.save_pretrained(save_directory)
            self.head.save(Path(save_directory) / HEAD_FILE)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, head: ZeroShotHead | None = None, **kwargs
    ) -> CLIPVisionClassifier:
        """Load a classifier folder (or Hub id) written by `save_pretrained`.

        With `head`, any `CLIPVisionModel` checkpoint works, e.g. a public fine-tune holding only the vision tower.
        Other keyword arguments go to `CLIPVisionModel.from_pretrained` (`revision`, `dtype`, `cache_dir`, ...).
        """
        if head is None:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            head_file = cached_file(
                pretrained_model_name_or_path, HEAD_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
            if head_file is None:
                raise FileNotFoundError(
                    f"{pretrained_model_name_or_path} has no {HEAD_FILE}: it is a plain CLIPVisionModel. Pass "
                    "`head=` (e.g. `build_zero_shot_head(base_clip, class_names, templates)`) to classify with it."
                )
            head = ZeroShotHead.load(head_file)
        vision_model = CLIPVisionModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(vision_model.config, head, vision_model)

    @classmethod
    def from_clip(
        cls,
        clip_model_name_or_path: str | os.PathLike,
        class_names: Sequence[str],
        templates: Sequence[str],
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 256,
        **kwargs,
    ) -> CLIPVisionClassifier:
        """Load a full `CLIPModel` (local folder or Hub id), build the zero-shot head from `class_names` x
        `templates` with its text tower, and keep its vision tower. Keyword arguments go to
        `CLIPModel.from_pretrained`."""
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(clip_model_name_or_path)
        clip_model = CLIPModel.from_pretrained(clip_model_name_or_path, **kwargs)
        head = build_zero_shot_head(clip_model, class_names, templates, tokenizer, batch_size)
        return cls(clip_model.config.vision_config, head, clip_model.vision_model)
