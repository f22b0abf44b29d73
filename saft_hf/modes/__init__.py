"""Fine-tuning modes: what part of a model `SAFTTrainer` trains, and what artifact it saves.

| mode   | trains                                        | artifact (`save_pretrained` of the returned model)       |
|--------|-----------------------------------------------|----------------------------------------------------------|
| `full` | every parameter left trainable                | normal model folder                                       |
| `ftlo` | the attention modules' linear projections     | normal model folder (frozen tensors keep base values)     |
| `ftts` | `w` of the linearisation around `w0`          | normal model folder of `w`, `config.saft_finetune_mode`   |
| `lora` | PEFT LoRA `lora_A`/`lora_B` matrices          | PEFT adapter folder                                       |

Every mode works with and without the sharpness-aware step: `SAFTTrainer` perturbs exactly the parameters that
require gradients. Saved `full`/`ftlo`/`ftts` folders record the mode in `config.saft_finetune_mode`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

from torch import nn

from .ftlo import apply_ftlo, attention_projection_names
from .ftts import (
    FTTS_MODE,
    LinearizedModel,
    LinearizedOutput,
    linearize,
    load_linearized,
    load_pretrained_model,
    saved_finetune_mode,
)
from .lora import LORA_MODE, apply_lora, default_lora_target_modules

FinetuneMode = Literal["full", "ftlo", "ftts", "lora"]


def apply_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: `model` unchanged (what is frozen, e.g. the CLIP classifier's head buffers, stays so)."""
    return model


_MODES: dict[str, Callable[..., nn.Module]] = {
    "full": apply_full,
    "ftlo": apply_ftlo,
    "ftts": linearize,
    LORA_MODE: apply_lora,
}
FINETUNE_MODES: tuple[str, ...] = tuple(_MODES)


def apply_finetune_mode(model: nn.Module, mode: FinetuneMode, **options) -> nn.Module:
    """Turn `model` into what the trainer trains under `mode`; `options` go to the mode's function.

    - `full`: no options.
    - `ftlo`: `target_modules` (default: every linear projection of the attention modules).
    - `ftts`: `base_model_name_or_path` (recorded in the saved config; default `model.name_or_path`).
    - `lora`: `r` (16), `lora_alpha` (32), `lora_dropout` (0.0), `target_modules` (query/value projections),
      `bias` ("none").
    """
    if mode not in _MODES:
        raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got {mode!r}.")
    apply = _MODES[mode]
    accepted = list(inspect.signature(apply).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"finetune_mode={mode!r} does not take option(s) {unknown}; it takes {accepted}.")
    model = apply(model, **options)
    if mode in ("full", "ftlo"):
        model.config.saft_finetune_mode = mode
    return model


__all__ = [
    "FINETUNE_MODES",
    "LORA_MODE",
    "FTTS_MODE",
    "FinetuneMode",
    "LinearizedModel",
    "LinearizedOutput",
    "apply_finetune_mode",
    "apply_ftlo",
    "apply_full",
    "apply_lora",
    "attention_projection_names",
    "default_lora_target_modules",
    "linearize",
    "load_linearized",
    "load_pretrained_model",
    "saved_finetune_mode",
]
