"""LoRA fine-tuning through PEFT (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

The model is wrapped by `peft.get_peft_model`, so only the `lora_A`/`lora_B` matrices of the target modules train
(and SAFT's perturbation covers exactly those), and the artifact is a standard PEFT adapter folder
(`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained(base, folder)` reloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from .ftlo import attention_projection_names

LORA_MODE = "lora"
# Query and value projections, the targets of the public `_lora-16` fine-tunes: CLIP's names, then T5's.
DEFAULT_TARGET_PAIRS = (("q_proj", "v_proj"), ("q", "v"))


def default_lora_target_modules(model: nn.Module) -> list[str]:
    """The query and value projections of `model`'s attention modules: `q_proj`/`v_proj` (CLIP) or `q`/`v` (T5)."""
    projection_names = {name.split(".")[-1] for name in attention_projection_names(model)}
    for pair in DEFAULT_TARGET_PAIRS:
        if projection_names.issuperset(pair):
            return list(pair)
    raise ValueError(
        f"lora: cannot tell the query/value projections of {type(model).__name__} (attention projections found: "
        f"{sorted(projection_names)}); pass target_modules=[...]."
    )


def apply_lora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    bias: Literal["none", "all", "lora_only"] = "none",
) -> PeftModel:
    """Wrap `model` with LoRA adapters of rank `r` and scaling `lora_alpha / r` on `target_modules`.

    `target_modules` defaults to `default_lora_target_modules(model)`. Encoder-decoder models get PEFT's
    `SEQ_2_SEQ_LM` task type (so `generate` works); other models a plain `PeftModel` that forwards every input.
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora: r must be an integer >= 1, got {r!r}.")
    if lora_alpha <= 0:
        raise ValueError(f"lora: lora_alpha must be > 0, got {lora_alpha!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora: lora_dropout must be in [0, 1), got {lora_dropout!r}.")
    targets = list(target_modules) if target_modules is not None else default_lora_target_modules(model)
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        bias=bias,
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else None,
    )
    return get_peft_model(model, config)
