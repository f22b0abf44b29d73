"""A model's weights opened lazily from a local folder or a Hub reference (resolved through saft_hf.hub), or wrapped
from an in-memory model, with what is known about where they come from."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub
from .io.alignment import (
    KeyAlignment,
    align_keys,
    check_shapes,
    covered_by,
    find_name_map,
    float_names,
    instantiate_on_meta,
    is_submodel,
    read_config,
    shared_storage_aliases,
    tied_aliases,
)
from .io.reading import CheckpointReader
from .layout import is_task_vector_folder


@dataclass
class ModelWeights:
    """A model's tensors (lazy when read from a folder) with what is known about where they come from."""

    tensors: Mapping[str, torch.Tensor]
    ref: str  # as the user named it: Hub id, folder, or a description of an in-memory model
    revision: str | None = None  # resolved commit sha for Hub models
    folder: Path | None = None
    config: dict = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied names known from shared storage
    in_memory_model: torch.nn.Module | None = None

    def module(self) -> torch.nn.Module | None:
        """The model object: the in-memory one, or the folder's architecture built on the meta device."""
        if self.in_memory_model is not None:
            return self.in_memory_model
        return instantiate_on_meta(self.folder) if self.folder is not None else None

    @property
    def label(self) -> str:
        return self.ref if self.revision is None else f"{self.ref}@{self.revision}"

    @functools.cached_property
    def declared_ties(self) -> dict[str, str]:
        """Tied names the model's architecture declares (built on the meta device once), plus shared storage."""
        return {**tied_aliases(self.folder), **self.aliases}


def open_model_weights(
    model: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    token: str | bool | None = None,
) -> ModelWeights:
    """Open a local folder or Hub reference lazily (downloading through :func:`saft_hf.hub.resolve_model`), or wrap
    an in-memory model or state dict."""
    if isinstance(model, torch.nn.Module):
        tensors = model.state_dict()
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") or f"in-memory {type(model).__name__}"
        return ModelWeights(
            tensors,
            name,
            config=config.to_dict() if config is not None else {},
            aliases=shared_storage_aliases(tensors),
            in_memory_model=model,
        )
    if isinstance(model, Mapping):
        return ModelWeights(model, "in-memory state dict", aliases=shared_storage_aliases(model))
    ref = str(model)
    folder = hub.resolve_model(ref, revision, allow_pickle=allow_pickle, token=token)
    if is_task_vector_folder(folder):  # its tensors have the model's names and shapes, but are differences
        raise ValueError(
            f"{ref} holds a saft_hf task vector, not a model: load it with TaskVector.from_pretrained, or list it as "
            "a merge input"
        )
    return ModelWeights(
        CheckpointReader(folder, allow_pickle=allow_pickle),
        ref,
        hub.resolved_revision(ref, revision, token=token),
        folder,
        read_config(folder),
    )


def align_models(base: ModelWeights, other: ModelWeights, *, other_label: str) -> KeyAlignment:
    """Align ``other``'s floating-point tensors with the base's and check their shapes.

    ``other`` must provide every float tensor of the base, or, when it is a sub-model of the base (by config), the
    base's tensors under the top-level modules it has. Names may differ by one prefix (see :class:`NameMap`);
    tied names are resolved through the models' declared ties, looked up only when the name sets differ.
    """
    base_float, other_float = float_names(base.tensors), float_names(other.tensors)
    name_map = find_name_map(base_float, other_float)
    mapped = {name_map.to_base(name) for name in other_float} - {None}
    required = covered_by(mapped) if is_submodel(base.config, other.config) else None
    aliases = {**base.aliases, **other.aliases}
    if mapped != set(base_float):
        aliases = {**base.declared_ties, **other.declared_ties, **aliases}
    alignment = align_keys(
        base.tensors, other.tensors, other_label=other_label, aliases=aliases, name_map=name_map, required=required
    )
    check_shapes(base.tensors, other.tensors, alignment.mapping, other_label=other_label)
    return alignment
