"""What a merged folder keeps of its inputs' fine-tuning: the mode they record and the zero-shot head they share.

The same merged weights are different functions under different forwards: a merge of FTTS fine-tunes is the
linearised model around the merge's base, ``f(w0) + J(w0) (w - w0)``, not ``f(w)``. So the merged folder records
the inputs' mode in ``config.json`` (``saft_finetune_mode``; for FTTS also ``saft_base_model``, the recipe's
``base_model``), which :func:`saft_hf.evaluation.evaluate_model` and :func:`saft_hf.modes.load_linearized` read.
Inputs of different recorded modes are refused: no single forward scores their merge. An input that records no mode
(a public fine-tune) merges with plain-forward modes, never with FTTS. The recipe's ``allow_mixed_finetune_modes:
true`` merges them anyway: the merged folder then records no mode (nor an FTTS base) and is scored with the plain
forward ``f(w)``. LoRA inputs (adapter folders, or task vectors of adapters) are dense deltas: their merge is a
plain model of the base's architecture, scored with the plain forward; it records ``lora`` as provenance.

CLIP classifier inputs carry their zero-shot head in ``zero_shot_head.safetensors``; the merge copies it when every
input carries the same one (same tensors, class names and templates), since scoring needs it and the base may have
none.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .. import hub
from ..layout import FTTS_MODE, HEAD_FILE

MODE_FIELD = "saft_finetune_mode"
BASE_FIELD = "saft_base_model"


def common_finetune_mode(modes: Mapping[str, str | None], *, allow_mixed: bool = False) -> str | None:
    """The one fine-tuning mode of the inputs, given what each records (``{label: mode or None}``: a model's
    ``config.saft_finetune_mode``, a task vector's ``finetune_mode`` metadata, ``lora`` for an adapter), None when
    none records one. Inputs no one forward fits raise naming each input and its mode, unless ``allow_mixed``
    (the recipe's ``allow_mixed_finetune_modes``): their merge then records no mode, a plain model scored with the
    plain forward."""
    recorded = set(modes.values()) - {None}
    if len(recorded) > 1 or (FTTS_MODE in recorded and None in modes.values()):
        if allow_mixed:
            return None
        listing = "; ".join(f"{label}: {mode or 'none recorded'}" for label, mode in modes.items())
        raise ValueError(
            f"models: inputs of different fine-tuning modes score with different forwards and cannot be merged into "
            f"one model ({listing}); set allow_mixed_finetune_modes: true in the recipe to merge them into a plain "
            "model (recording no mode, scored with the plain forward)"
        )
    return recorded.pop() if recorded else None


def record_finetune_mode(folder: Path, mode: str | None, base_model: str, *, pushed: bool = False) -> None:
    """Record the inputs' ``mode`` in ``folder/config.json`` (copied from the base); FTTS also records
    ``base_model``, the point the merge is linearised around: its absolute path when local, unless the folder is
    ``pushed`` (no local path leaves the machine), where a local base is not recorded and scoring needs ``base=``."""
    config_path = folder / "config.json"
    if config_path.is_file():
        model_config = json.loads(config_path.read_text())
        # The merge is the inputs' kind of model, whatever the base folder itself was.
        model_config.pop(MODE_FIELD, None)
        model_config.pop(BASE_FIELD, None)
        if mode is not None:
            model_config[MODE_FIELD] = mode
        if mode == FTTS_MODE and not (pushed and hub.is_local(base_model)):
            model_config[BASE_FIELD] = _base_reference(base_model)
        config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    elif mode == FTTS_MODE:
        raise ValueError(f"base_model: {base_model} has no config.json to record the FTTS mode in")


def _base_reference(base_model: str) -> str:
    """Where ``load_linearized`` finds ``w0`` from any working directory: an absolute path or the Hub id."""
    return hub.parse_model_ref(hub.absolute_ref(base_model))[0]


def copy_shared_head(folder: Path, heads: Mapping[str, Path | None]) -> None:
    """Copy into ``folder`` the zero-shot head every input carries (``{label: its head file or None}``), when they
    all carry the same one; warn otherwise."""
    carried = {label: path for label, path in heads.items() if path is not None}
    if not carried:
        return
    first, *others = [_head_content(path) for path in carried.values()]
    if len(carried) == len(heads) and all(_same_head(first, other) for other in others):
        shutil.copyfile(next(iter(carried.values())), folder / HEAD_FILE)
        return
    without = [label for label, head in heads.items() if head is None]
    listing = ", ".join(carried)
    reason = f"only {listing} of the inputs have one" if without else f"{listing} hold different heads"
    warnings.warn(
        f"models: the merged folder gets no input's {HEAD_FILE}: {reason}; score it with head= or a full "
        "CLIPModel base_model",
        stacklevel=2,
    )


class MergedStateDict(dict):
    """Merged tensors by name, with the fine-tuning mode of the inputs they came from (``finetune_mode``), which
    :func:`saft_hf.evaluation.evaluate_model` reads to score them with the right forward."""

    def __init__(self, tensors, finetune_mode: str | None):
        super().__init__(tensors)
        self.finetune_mode = finetune_mode


def _head_content(path: Path) -> tuple[dict, dict]:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}


def _same_head(first: tuple[dict, dict], other: tuple[dict, dict]) -> bool:
    """Equal heads by content: safetensors writes the metadata keys in no fixed order, so equal heads need not be
    equal bytes."""
    (tensors, metadata), (other_tensors, other_metadata) = first, other
    return (
        metadata == other_metadata
        and tensors.keys() == other_tensors.keys()
        and all(
            tensor.dtype == other_tensors[name].dtype and torch.equal(tensor, other_tensors[name])
            for name, tensor in tensors.items()
        )
    )
