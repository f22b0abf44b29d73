"""The arguments of a fine-tune (`ModelArguments`, `DataArguments`, and `SAFTConfig` for training), parsed from
`--config` files and flags by `SaftParser`, and the resolved configuration a run records (`finetune_config.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SAFTConfig
from ..modes import FINETUNE_MODES
from ..parser import SaftParser

RESOLVED_CONFIG_FILE = "finetune_config.yaml"


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
            "around the pre-trained weights), 'lora' (PEFT LoRA adapters).",
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


def parse_finetune_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SAFTConfig, dict[str, Any]]:
    """The three argument dataclasses of `argv` (`--config` files, then flags: every field of the three is a flag),
    and the resolved configuration (`SaftParser.parse_config`, with `output_dir`'s placeholders filled): what
    `finetune_config.yaml` records."""
    parser = SaftParser((ModelArguments, DataArguments, SAFTConfig))
    resolved = parser.parse_config(argv)
    if resolved.get("output_dir"):
        defaults = {name: parser.fields[name].default for name in ("sam_mode", "finetune_mode")}
        placeholders = {name: resolved.get(name, defaults.get(name)) for name in ("task", "sam_mode", "finetune_mode")}
        resolved["output_dir"] = fill_output_dir(resolved["output_dir"], **placeholders)
    model_args, data_args, training_args = parser.parse_dict(resolved)
    return model_args, data_args, training_args, resolved


def fill_output_dir(template: str, **fields: str) -> str:
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
