"""FTLO: fine-tune only the linear projections of the attention modules, everything else frozen.

Jin et al., "Fine-tuning attention modules only: Enhancing weight disentanglement in task arithmetic", ICLR 2025; one
of the merge-friendly fine-tuning baselines SAFT composes with (Lee et al., "Mitigating Parameter Interference in
Model Merging via Sharpness-Aware Fine-Tuning", ICLR 2025, Table 1). The checkpoint is a normal full model: the
frozen tensors keep their pre-trained values, so their task vector entries are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def attention_projection_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules that are direct children of an attention module.

    An attention module is one whose class name ends with `Attention`: CLIP's `CLIPAttention` (q_proj, k_proj,
    v_proj, out_proj) and T5's `T5Attention` (q, k, v, o, in both self- and cross-attention).
    """
    return [
        f"{parent_name}.{child_name}" if parent_name else child_name
        for parent_name, parent in model.named_modules()
        if type(parent).__name__.endswith("Attention")
        for child_name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def linear_modules_named(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the `nn.Linear` modules whose last name component is in `target_modules` (PEFT's suffix rule)."""
    targets = set(target_modules)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets
    ]


def apply_ftlo(model: nn.Module, target_modules: Sequence[str] | None = None) -> nn.Module:
    """Freeze `model` except the weights and biases of its attention projections; returns `model` itself.

    `target_modules` (names such as `["q_proj", "v_proj"]`, matched against the last component of each `nn.Linear`
    module's name) overrides the default, `attention_projection_names(model)`.
    """
    if target_modules is None:
        projections = attention_projection_names(model)
        if not projections:
            raise ValueError(
                f"ftlo: found no nn.Linear child of an *Attention module in {type(model).__name__}; pass "
                "target_modules=[...] with the names of the projections to train."
            )
    else:
        projections = linear_modules_named(model, target_modules)
        if not projections:
            raise ValueError(
                f"ftlo: target_modules={list(target_modules)} match no nn.Linear module of {type(model).__name__}."
            )
    model.requires_grad_(False)
    for name in projections:
        model.get_submodule(name).requires_grad_(True)
    return model
