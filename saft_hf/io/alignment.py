"""Key alignment between a base model and another checkpoint: tied names, sub-model towers (a CLIP vision tower
against a full CLIP), shapes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .reading import tensor_dtype, tensor_shape


def instantiate_on_meta(folder: Path) -> torch.nn.Module | None:
    """The model class named in ``folder/config.json`` built on the meta device (no memory), or None if unknown."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
        if model_class is None:
            return None
        with torch.device("meta"):
            return model_class(config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError, RuntimeError):
        return None  # unknown or unbuildable architecture: no declared ties, names must then match as they are


def tied_aliases(folder: Path | None) -> dict[str, str]:
    """``{tied name: source name}`` declared by the model in ``folder`` (e.g. T5 ``lm_head.weight`` ->
    ``shared.weight``)."""
    model = instantiate_on_meta(folder) if folder is not None and (folder / "config.json").is_file() else None
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def shared_storage_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for tensors in an in-memory state dict that share storage (tied parameters)."""
    first_by_view: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if view in first_by_view:
            aliases[name] = first_by_view[view]
        else:
            first_by_view[view] = name
    return aliases


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_submodel(base_config: Mapping, other_config: Mapping) -> bool:
    """Whether ``other`` is a sub-model of the base: its ``model_type`` is that of one of the base's sub-configs
    (a ``CLIPVisionModel``, ``clip_vision_model``, of a ``CLIPModel`` base with its ``vision_config``)."""
    model_type = other_config.get("model_type")
    if model_type is None or model_type == base_config.get("model_type"):
        return False
    return any(isinstance(sub, Mapping) and sub.get("model_type") == model_type for sub in base_config.values())


@dataclass(frozen=True)
class NameMap:
    """How another checkpoint names the base's tensors: ``other = add + base.removeprefix(strip)``.

    transformers 5 saves a ``CLIPVisionModel`` as ``embeddings.*``, ``encoder.*`` while ``CLIPModel`` (and
    checkpoints written by transformers 4, like the public CLIP fine-tunes) use ``vision_model.embeddings.*``.
    """

    strip: str = ""
    add: str = ""

    def to_other(self, base_name: str) -> str | None:
        return self.add + base_name[len(self.strip) :] if base_name.startswith(self.strip) else None

    def to_base(self, other_name: str) -> str | None:
        return self.strip + other_name[len(self.add) :] if other_name.startswith(self.add) else None


def find_name_map(base_names: Iterable[str], other_names: Iterable[str]) -> NameMap:
    """The single prefix change under which most of ``other_names`` are base names (identity when none helps)."""
    base_names, other_names = set(base_names), sorted(other_names)
    if not other_names:
        return NameMap()
    candidates = [NameMap()]
    for sample in other_names[:3]:  # a few samples, in case one is a tensor the base does not have
        candidates += [NameMap(strip=name[: -len(sample)]) for name in base_names if name.endswith("." + sample)]
        parts = sample.split(".")
        candidates += [NameMap(add=".".join(parts[:i]) + ".") for i in range(1, len(parts))]

    def mapped(name_map: NameMap) -> int:
        return sum(name_map.to_base(name) in base_names for name in other_names)

    return max(candidates, key=mapped)  # max keeps the first (identity) on ties


@dataclass
class KeyAlignment:
    """How another checkpoint's tensors line up with the base's floating-point tensors."""

    mapping: dict[str, str]  # base name -> name in the other checkpoint
    base_ties: dict[str, str] = field(default_factory=dict)  # base name stored twice -> base name in ``mapping``


def align_keys(
    base: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    other_label: str,
    aliases: Mapping[str, str] | None = None,
    name_map: NameMap = NameMap(),
    required: Callable[[str], bool] | None = None,
) -> KeyAlignment:
    """Map each floating-point base tensor that ``other`` must provide to its name in ``other``.

    ``required(base_name)`` limits which base tensors ``other`` must provide (default: all), e.g. the vision part
    of a CLIP base for a vision-tower fine-tune. ``aliases`` (tied name -> source name, base names) let either
    side store a tied tensor under another of its names; a tied tensor is mapped once (a base storing it twice
    gets the second name in ``base_ties``). Raises ``ValueError`` naming the first tensor found on one side only.
    """
    groups: dict[str, set[str]] = {}
    for alias, source in (aliases or {}).items():
        group = groups.get(source) or groups.get(alias) or {source}
        group.update((alias, source))
        groups[alias] = groups[source] = group
    alignment, mapped_by_other = KeyAlignment({}), {}
    for name in base:
        if not tensor_dtype(base, name).is_floating_point or (required is not None and not required(name)):
            continue
        candidates = [name_map.to_other(candidate) for candidate in [name, *sorted(groups.get(name, set()) - {name})]]
        found = next((candidate for candidate in candidates if candidate is not None and candidate in other), None)
        if found is None:
            missing = candidates[0] or name
            also = "" if missing == name else f" (the base's {name!r})"
            raise ValueError(f"{other_label}: has no tensor {missing!r}, which the base has{also}")
        if found in mapped_by_other:
            alignment.base_ties[name] = mapped_by_other[found]
            continue
        if not tensor_dtype(other, found).is_floating_point:
            raise ValueError(f"{other_label}: tensor {found!r} is {tensor_dtype(other, found)}, the base's is float")
        alignment.mapping[name] = found
        mapped_by_other.update({name_map.to_other(n) or n: name for n in groups.get(name, {name})})
        mapped_by_other[found] = name
    for name in other:
        if name not in mapped_by_other and tensor_dtype(other, name).is_floating_point:
            raise ValueError(f"{other_label}: has tensor {name!r}, which matches no floating-point tensor of the base")
    return alignment


def covered_by(base_names: Iterable[str]) -> Callable[[str], bool]:
    """Predicate: a base name lies under one of the top-level modules of ``base_names`` (a sub-model's part)."""
    modules = {name.split(".", 1)[0] for name in base_names}
    return lambda name: name.split(".", 1)[0] in modules


def check_shapes(
    base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], mapping: Mapping[str, str], *, other_label: str
) -> None:
    for base_name, other_name in mapping.items():
        base_shape, other_shape = tensor_shape(base, base_name), tensor_shape(other, other_name)
        if base_shape != other_shape:
            raise ValueError(
                f"{other_label}: tensor {other_name!r} has shape {list(other_shape)}, the base's "
                f"{base_name!r} has {list(base_shape)}"
            )


def float_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name in tensors if tensor_dtype(tensors, name).is_floating_point]
