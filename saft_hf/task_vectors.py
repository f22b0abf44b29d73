"""Task vectors: ``tau = theta_finetuned - theta_base`` over floating-point tensors, saved as safetensors.

A :class:`TaskVector` is a lazy mapping from the base model's tensor names to deltas. Built from two models, it
reads one tensor of each at a time; loaded (``from_pretrained``, a folder or a Hub repo), it memory-maps the file;
arithmetic (``+``, ``-``, scalar ``*``, negation) composes lazily, so ``(tv_a + tv_b).save_pretrained(...)``
streams. Integer and boolean buffers are not part of a task vector.

Dtypes (the merge engine's rule too): the base and the fine-tune may hold any floating-point dtypes, mixed (a
bfloat16 fine-tune of a float32 base is fine); differences and ``base + alpha * tau`` are computed in float64 and
stored in the base's dtype unless ``dtype=`` asks for another.

Non-finite numbers are refused: a NaN or infinity in the fine-tune or the base (:meth:`TaskVector.from_models`, when
the tensor is computed, i.e. on access or :meth:`~TaskVector.save_pretrained`), in the vector itself or in a result
(:meth:`~TaskVector.apply_to`, e.g. a huge ``alpha``) raises :class:`~saft_hf.errors.NonFiniteError` naming the
tensor and the counts, unless ``allow_nonfinite=True``.

Every vector records a fingerprint of the base weights it was computed from; applying it to a base with another
fingerprint, or applying a vector that records none, raises unless ``allow_other_base=True``. Loading checks the
``tied_weights`` metadata (a JSON object naming, for each base name that holds a tied copy, the tensor the vector
stores it as); applying checks that each such name is a base tensor of the stored tensor's shape.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import hub
from .cards import task_vector_card
from .errors import NonFiniteError
from .io import (
    CheckpointReader,
    ComputedStateDict,
    KeyAlignment,
    LazyStateDict,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    base_fingerprint,
    check_finite,
    check_shapes,
    find_name_map,
    float_names,
    shared_storage_aliases,
    tensor_dtype,
    tensor_shape,
)
from .layout import ADAPTER_CONFIG_NAME, TASK_VECTOR_WEIGHT_FILES, TASK_VECTOR_WEIGHTS_NAME, is_task_vector_listing
from .model_weights import ModelWeights, align_models, open_model_weights

TASK_VECTOR_FORMAT = "saft_hf.task_vector"
METADATA_FIELDS = (
    "format",
    "base_model",
    "base_revision",
    "task",
    "finetune_mode",
    "sam_mode",
    "sam_rho",
    "sam_eta",
    "saft_hf_version",
    "base_fingerprint",
    "source",
)
TIED_WEIGHTS_FIELD = "tied_weights"  # JSON {base name stored twice: name of the tensor in the vector}
_KEEP_NONFINITE = "pass allow_nonfinite=True (saft-hf: --allow_nonfinite) to compute with such values as they are"

ModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


def _library_version() -> str:
    try:
        return importlib.metadata.version("saft_hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class TaskVector(LazyStateDict):
    """``fine_tuned - base`` per floating-point tensor, keyed by the base's tensor names.

    ``metadata`` holds the string fields written into the safetensors header (see ``METADATA_FIELDS``);
    ``tied_weights`` maps base names that hold a tied copy of a tensor to the name the vector stores it under;
    ``source_folders`` are ``(label, folder)`` of the local folders its tensors are read from, which :meth:`save`
    never writes into; ``path`` is the file :meth:`from_pretrained` read the metadata from (named in errors).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        tied_weights: Mapping[str, str] | None = None,
        source_folders: Iterable[tuple[str, Path]] = (),
        *,
        path: str | os.PathLike | None = None,
    ):
        self._tensors = tensors
        self.metadata = {"format": TASK_VECTOR_FORMAT, **{k: _text(v) for k, v in (metadata or {}).items()}}
        self.tied_weights = dict(tied_weights or {})
        self.source_folders = list(source_folders)
        self.path = None if path is None else Path(path)

    # ---- mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self._tensors, name)

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self._tensors, name)

    @property
    def task(self) -> str:
        return self.metadata.get("task", "")

    @property
    def where(self) -> str:
        """How errors name this vector: the file it was loaded from, else its task."""
        return str(self.path) if self.path is not None else f"task vector {self.task!r}"

    def __repr__(self) -> str:
        return f"TaskVector(task={self.task!r}, base_model={self.metadata.get('base_model')!r}, tensors={len(self)})"

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_models(
        cls,
        base: ModelLike,
        finetuned: ModelLike,
        *,
        base_revision: str | None = None,
        finetuned_revision: str | None = None,
        task: str | None = None,
        finetune_mode: str | None = None,
        sam_mode: str | None = None,
        sam_rho: float | None = None,
        sam_eta: float | None = None,
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        token: str | bool | None = None,
    ) -> TaskVector:
        """``finetuned - base``. Either side may be a local folder, a Hub reference (``org/name@rev``), a model or a
        state dict. Tensors are read lazily; the result is computed on access (or streamed by :meth:`save`).

        The fine-tune may be a sub-model of the base (a ``CLIPVisionModel`` of a ``CLIPModel``): the vector then
        covers the sub-model's tensors. Either side may hold any floating-point dtypes; ``dtype`` (of the stored
        differences) defaults to the base's; pass ``torch.float64`` for a vector whose :meth:`apply_to` with
        ``alpha=1`` reproduces the fine-tune bit for bit.

        Raises ``ValueError`` naming the tensor on a key or shape mismatch, and (when the tensor is computed)
        :class:`~saft_hf.errors.NonFiniteError` on a NaN or infinity in either model or in a difference cast to
        ``dtype``, unless ``allow_nonfinite``.
        """
        base_weights = open_model_weights(base, base_revision, allow_pickle=allow_pickle, token=token)
        tuned = open_model_weights(finetuned, finetuned_revision, allow_pickle=allow_pickle, token=token)
        label = f"fine-tuned model {tuned.label}"
        alignment = align_models(base_weights, tuned, other_label=label)

        def storage_dtype(name: str) -> torch.dtype:
            return dtype or tensor_dtype(base_weights.tensors, name)

        def compute(name: str) -> torch.Tensor:
            tuned_name = alignment.mapping[name]
            tuned_tensor, base_tensor = tuned.tensors[tuned_name], base_weights.tensors[name]
            if not allow_nonfinite:
                check_finite(tuned_tensor, where=f"{label}: tensor {tuned_name!r}", advice=_KEEP_NONFINITE)
                check_finite(base_tensor, where=f"base {base_weights.label}: tensor {name!r}", advice=_KEEP_NONFINITE)
            difference = _float64(tuned_tensor).sub_(base_tensor.double()).to(storage_dtype(name))
            if not allow_nonfinite:
                check_finite(
                    difference,
                    where=f"{label}: the difference for tensor {name!r} in {storage_dtype(name)}",
                    advice="it exceeds the range of that dtype; pass a wider dtype= (e.g. torch.float32), or "
                    f"{_KEEP_NONFINITE}",
                )
            return difference

        tensors = ComputedStateDict(
            alignment.mapping, compute, shape=lambda name: tensor_shape(base_weights.tensors, name), dtype=storage_dtype
        )
        metadata = _metadata(
            base_weights,
            list(alignment.mapping),
            source=tuned.label,
            task=task,
            finetune_mode=finetune_mode,
            sam_mode=sam_mode,
            sam_rho=sam_rho,
            sam_eta=sam_eta,
        )
        return cls(tensors, metadata, alignment.base_ties, _folders(("base", base_weights), ("finetuned", tuned)))

    @classmethod
    def from_lora(
        cls,
        base: ModelLike,
        adapter: str | os.PathLike,
        *,
        base_revision: str | None = None,
        adapter_revision: str | None = None,
        task: str | None = None,
        finetune_mode: str = "lora",
        sam_mode: str | None = None,
        sam_rho: float | None = None,
        sam_eta: float | None = None,
        allow_pickle: bool = False,
        allow_other_base: bool = False,
        allow_nonfinite: bool = False,
        token: str | bool | None = None,
    ) -> TaskVector:
        """The dense task vector of a PEFT LoRA adapter folder (or Hub reference) over ``base``.

        Each adapted weight gets ``B @ A * scaling`` (transposed for ``fan_in_fan_out`` / GPT-2 ``Conv1D`` and for
        embeddings), with ``r`` and ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` and ``scaling = alpha / r``
        or ``alpha / sqrt(r)`` with rsLoRA; trained biases and ``modules_to_save`` give ``saved - base``. This
        equals ``merge_and_unload() - base``. DoRA and other variants a weight delta cannot express are refused.

        An adapter whose ``base_model_name_or_path`` provably names another model than ``base`` (a folder or Hub
        id; see :func:`saft_hf.hub.names_another_model`) is refused before the base is opened, unless
        ``allow_other_base``. A delta holding NaN or infinity is refused when computed, unless ``allow_nonfinite``.
        """
        folder, adapter_config = _read_adapter_config(str(adapter), adapter_revision, allow_pickle, token)
        if not allow_other_base and isinstance(base, str | os.PathLike):
            recorded = adapter_config.get("base_model_name_or_path")
            field = f"{ADAPTER_CONFIG_NAME} base_model_name_or_path"
            hub.check_recorded_base(f"adapter {adapter}", recorded, field, os.fspath(base))
        base_weights = open_model_weights(base, base_revision, allow_pickle=allow_pickle, token=token)
        tensors, source = _lora_deltas(
            base_weights, str(adapter), adapter_revision, folder, adapter_config, allow_pickle, allow_nonfinite, token
        )
        metadata = _metadata(
            base_weights,
            list(tensors),
            source=source,
            task=task,
            finetune_mode=finetune_mode,
            sam_mode=sam_mode,
            sam_rho=sam_rho,
            sam_eta=sam_eta,
        )
        return cls(tensors, metadata, source_folders=[*_folders(("base", base_weights)), (f"adapter {source}", folder)])

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> TaskVector:
        """Open a saved task vector lazily (tensors are memory-mapped and read on access) from a local folder or a
        Hub repo (``org/name``, ``org/name@revision``, or ``revision=``), as :meth:`push_to_hub` wrote it.

        A Hub reference is pinned to the commit its revision resolves to, and its file listing is checked before
        anything is downloaded: a repo without ``task_vector.safetensors`` (or its index), or with a model
        ``config.json``, raises ``FileNotFoundError``. Only the weights and their index are downloaded.
        """
        ref = os.fspath(ref)
        listing = hub.list_hub_files(ref, revision, token=token)
        if listing is None:
            if revision is not None:
                raise ValueError(
                    f"task vector {ref}: revision={revision!r} is for Hub repos, and this is a local "
                    "folder; drop revision= (or name a Hub repo)"
                )
            return cls._open_folder(hub.resolve_model(ref))
        if not is_task_vector_listing(listing.files):
            raise FileNotFoundError(
                f"Hub repo '{listing.repo_id}@{listing.commit}' holds no saft_hf task vector (it needs "
                f"{TASK_VECTOR_WEIGHT_FILES[1]} or {TASK_VECTOR_WEIGHT_FILES[0]} and no config.json); "
                f"files: {sorted(listing.files)}"
            )
        return cls._open_folder(hub.resolve_model(listing.repo_id, listing.commit, token=token))

    load = from_pretrained

    @classmethod
    def _open_folder(cls, path: Path) -> TaskVector:
        reader = CheckpointReader(path)
        if reader.metadata.get("format") != TASK_VECTOR_FORMAT:
            raise ValueError(
                f"{path}: not a saft_hf task vector (safetensors metadata format is "
                f"{reader.metadata.get('format')!r}, expected {TASK_VECTOR_FORMAT!r})"
            )
        # The index's metadata (of a sharded vector) is read over the shards'.
        header = next((path / name for name in TASK_VECTOR_WEIGHT_FILES if (path / name).is_file()), path)
        tied = _parse_tied_weights(reader.metadata.get(TIED_WEIGHTS_FIELD) or "{}", reader, where=str(header))
        metadata = {k: v for k, v in reader.metadata.items() if k != TIED_WEIGHTS_FIELD}
        return cls(reader, metadata, tied, [(f"task vector {path}", path)], path=header)

    # ---- saving --------------------------------------------------------------------------------------------
    def header_metadata(self) -> dict[str, str]:
        metadata = dict(self.metadata)
        if self.tied_weights:
            metadata[TIED_WEIGHTS_FIELD] = json.dumps(self.tied_weights, sort_keys=True)
        return metadata

    def save_pretrained(
        self, path: str | os.PathLike, *, max_shard_size: int | str = "2GB", progress: bool = False
    ) -> Path:
        """Write ``task_vector.safetensors`` (or shards plus ``task_vector.safetensors.index.json``) into ``path``,
        one tensor at a time. Atomic: the folder appears complete or not at all.

        Raises :class:`~saft_hf.errors.UnsafeOutputError` before writing when ``path`` is, contains or lies inside a
        folder the vector is read from, or is a folder saft_hf may not replace (see
        :func:`saft_hf.io.atomic_output_dir`)."""
        from tqdm.auto import tqdm

        output = atomic_output_dir(path, kind="task_vector", inputs=self.source_folders, field="task vector folder")
        with output as staging:
            specs = [TensorSpec(name, self.shape(name), self.dtype(name)) for name in self]
            with ShardedSafetensorsWriter(
                staging,
                specs,
                prefix=TASK_VECTOR_WEIGHTS_NAME,
                max_shard_size=max_shard_size,
                metadata=self.header_metadata(),
            ) as writer:
                for name in tqdm(list(self), desc="task vector", unit="tensor", disable=not progress):
                    writer.add(name, self[name])
                writer.close()
        return Path(path)

    save = save_pretrained

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        max_shard_size: int | str = "2GB",
    ) -> str:
        """Upload the weights and a model card to ``repo_id`` in one commit; return the commit sha.

        The pushed copy names local models by folder (:func:`saft_hf.hub.public_ref`) in its metadata and card,
        never by absolute path. ``repo_id`` must be new, empty or a task vector saft_hf pushed, and not the base or
        source model (:func:`saft_hf.hub.check_push_target`), checked before anything is built. The copy is built
        in a temporary folder: when the upload fails, ``PushError`` says so, and the vector is on disk only where
        :meth:`save` put it.
        """
        hub.check_repo_id(repo_id, "repo_id")
        if revision is not None:
            hub.check_revision(revision, "revision")
        references = {key: self.metadata[key] for key in ("base_model", "source") if self.metadata.get(key)}
        hub.check_push_target(repo_id, "task-vector", token=token, revision=revision, inputs=list(references.items()))
        shown = {key: hub.public_ref(ref) for key, ref in references.items()}
        pushed = TaskVector(self, {**self.metadata, **shown}, self.tied_weights)
        with tempfile.TemporaryDirectory(prefix="saft_hf-task-vector-") as scratch:
            folder = pushed.save_pretrained(Path(scratch) / "task_vector", max_shard_size=max_shard_size)
            task_vector_card({**pushed.metadata, "repo_id": repo_id}).save(folder / "README.md")
            message = commit_message or f"Upload task vector {self.task or ''}".strip()
            local_output = (
                "the pushed copy was built in a temporary folder, now deleted: the task vector is on disk only where "
                f"TaskVector.save_pretrained() wrote it; retry with push_to_hub('{repo_id}'"
                f"{', private=True' if private else ''}{f', revision={revision!r}' if revision else ''})"
            )
            with hub.reporting_push_failure(repo_id, local_output):
                return hub.push_folder(
                    folder, repo_id, private=private, commit_message=message, token=token, revision=revision
                )

    # ---- arithmetic ----------------------------------------------------------------------------------------
    def _combine(
        self, other: TaskVector, operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], symbol: str
    ) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        mine, theirs = self.metadata.get("base_fingerprint"), other.metadata.get("base_fingerprint")
        if mine and theirs and mine != theirs:
            raise ValueError(
                f"cannot combine task vectors of different bases: {self.metadata.get('base_model')!r} ({mine}) "
                f"and {other.metadata.get('base_model')!r} ({theirs})"
            )
        for name in self:
            if name not in other:
                raise ValueError(f"task vector {other.task!r} has no tensor {name!r}, which {self.task!r} has")
            if self.shape(name) != other.shape(name):
                raise ValueError(f"tensor {name!r}: shape {list(self.shape(name))} vs {list(other.shape(name))}")
        for name in other:
            if name not in self:
                raise ValueError(f"task vector {self.task!r} has no tensor {name!r}, which {other.task!r} has")
        tensors = ComputedStateDict(
            list(self),
            lambda name: operation(self[name], other[name]),
            shape=self.shape,
            dtype=lambda name: torch.promote_types(self.dtype(name), other.dtype(name)),
        )
        metadata = {}
        for key in METADATA_FIELDS:
            a, b = self.metadata.get(key, ""), other.metadata.get(key, "")
            if key in ("task", "source"):
                metadata[key] = f"({a} {symbol} {b})"
            elif key == "base_fingerprint":  # a part without one makes the sum uncheckable
                metadata[key] = a if a == b else ""
            else:
                metadata[key] = a if a == b or not b else (b if not a else "mixed")
        return TaskVector(
            tensors,
            metadata,
            {**other.tied_weights, **self.tied_weights},
            [*self.source_folders, *other.source_folders],
        )

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.add, "+")

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.sub, "-")

    def __mul__(self, scale: float) -> TaskVector:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            return NotImplemented

        def scaled(name: str) -> torch.Tensor:
            tensor = self[name]
            result = tensor * scale
            if not bool(torch.isfinite(result).all()) and bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"tensor {name!r}: {scale:g} times the task vector overflows {tensor.dtype}; scale by less, or "
                    "compute the vector in float32 (dtype=torch.float32)"
                )
            return result

        tensors = ComputedStateDict(list(self), scaled, shape=self.shape, dtype=self.dtype)
        metadata = {
            **self.metadata,
            "task": f"{scale:g}*{self.task}",
            "source": f"{scale:g}*{self.metadata.get('source', '')}",
        }
        return TaskVector(tensors, metadata, self.tied_weights, self.source_folders)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> TaskVector:
        return self * (1.0 / scale)

    def __neg__(self) -> TaskVector:
        return self * -1

    # ---- application ---------------------------------------------------------------------------------------
    def apply_to(
        self,
        base: ModelLike,
        alpha: float = 1.0,
        *,
        allow_other_base: bool = False,
        revision: str | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        token: str | bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """``base + alpha * tau`` as a full state dict (tensors the vector does not cover are the base's own).

        Computed in float64 and cast to each base tensor's dtype. Raises ``ValueError`` when the base's fingerprint
        differs from the one recorded or none is recorded (unless ``allow_other_base``), or a tensor is missing or
        has another shape; :class:`~saft_hf.errors.NonFiniteError` on a NaN or infinity in the vector, in a base
        tensor it updates or in a result (e.g. a huge ``alpha``), unless ``allow_nonfinite``.
        """
        target = open_model_weights(base, revision, allow_pickle=allow_pickle, token=token)
        label = f"base {target.label}"
        alignment = self.alignment_with(target, label=label)
        self.check_base(target.tensors, label=label, alignment=alignment, allow_other_base=allow_other_base)
        in_vector = {
            **alignment.mapping,
            **{tie: alignment.mapping.get(source) for tie, source in alignment.base_ties.items()},
        }
        shared = shared_storage_aliases(target.tensors)
        result, updated = {}, {}
        for name, original in target.tensors.items():
            source = in_vector.get(name) or in_vector.get(shared.get(name))
            if source is None:
                result[name] = original
                continue
            if source not in updated:
                delta = self[source]
                if not allow_nonfinite:
                    check_finite(delta, where=f"{self.where}: tensor {source!r}", advice=_KEEP_NONFINITE)
                    check_finite(original, where=f"{label}: tensor {name!r}", advice=_KEEP_NONFINITE)
                applied = _float64(original).add_(delta.double(), alpha=alpha).to(original.dtype)
                if not allow_nonfinite:
                    check_finite(
                        applied,
                        where=f"{label}: tensor {name!r} plus {alpha!r} times the task vector",
                        advice=f"alpha is out of range or the result exceeds the range of {original.dtype}; "
                        f"use a smaller alpha, or {_KEEP_NONFINITE}",
                    )
                updated[source] = applied
            result[name] = updated[source]
        return result

    def alignment_with(self, base: ModelWeights | Mapping[str, torch.Tensor], *, label: str) -> KeyAlignment:
        """How ``base`` names this vector's tensors (``mapping``: base name -> name in the vector; ``base_ties``: a
        tied base name -> its base name in ``mapping``); raises naming a tensor ``base`` lacks or has with another
        shape, or a ``tied_weights`` name that is not a base tensor of the stored tensor's shape. A tied name the
        base does not store is accepted only when the base's architecture (known from a :class:`ModelWeights`)
        declares it tied to that tensor: the checkpoint holds the copy once (a vector made from in-memory models
        records every tied name of their state dicts)."""
        weights, base = (base, base.tensors) if isinstance(base, ModelWeights) else (None, base)
        name_map = find_name_map(float_names(base), list(self))
        mapping = {}
        for name in self:
            base_name = name_map.to_base(name)
            if base_name is None or base_name not in base:
                raise ValueError(f"{label}: has no tensor {name!r}, which the task vector has")
            mapping[base_name] = name
        check_shapes(base, self, mapping, other_label="task vector")
        ties = {}
        field = f"{self.where}: metadata field {TIED_WEIGHTS_FIELD}"
        for alias, name in self.tied_weights.items():
            base_alias, base_name = name_map.to_base(alias), name_map.to_base(name)
            if base_alias is None or base_alias not in base:
                declared = weights.declared_ties if weights is not None else {}
                source = declared.get(base_name, base_name)
                if base_alias is not None and declared.get(base_alias, base_alias) == source:
                    continue  # re-tied when the base loads: no separate copy to update
                raise ValueError(
                    f"{field}: {alias!r} (a tied copy of {name!r}) is not a tensor of the {label}; "
                    "remove the entry or apply the vector to its own base"
                )
            shape, base_shape = list(self.shape(name)), list(tensor_shape(base, base_alias))
            if base_shape != shape:
                raise ValueError(
                    f"{field}: {alias!r} is a tied copy of {name!r} of shape {shape}, but the {label} has "
                    f"it with shape {base_shape}"
                )
            ties[base_alias] = base_name
        return KeyAlignment(mapping, ties)

    def check_base(
        self,
        base: Mapping[str, torch.Tensor],
        *,
        label: str,
        alignment: KeyAlignment | None = None,
        allow_other_base: bool = False,
    ) -> None:
        """Raise unless ``base`` has the fingerprint this vector was computed against (or ``allow_other_base``);
        ``alignment`` (from :meth:`alignment_with`) says how ``base`` names the vector's tensors (default: as is)."""
        expected = self.metadata.get("base_fingerprint")
        if allow_other_base:
            return
        if not expected:
            raise ValueError(
                f"{self.where}: metadata field base_fingerprint is missing or empty, so the base it is applied to "
                f"({label}) cannot be checked against the one it was computed from. Pass allow_other_base=True "
                "(recipe: allow_other_base: true) to apply it anyway."
            )
        to_base = {name: base_name for base_name, name in alignment.mapping.items()} if alignment is not None else {}
        actual = base_fingerprint(base, [to_base.get(name, name) for name in sorted(self)])
        if actual != expected:
            raise ValueError(
                f"{label}: weights differ from the base this task vector was computed from "
                f"({self.metadata.get('base_model')!r}, fingerprint {expected}; this base: {actual}). "
                "Pass allow_other_base=True (recipe: allow_other_base: true; saft-hf: --allow_other_base) to apply "
                "it anyway."
            )


def _parse_tied_weights(text: str, names: Mapping[str, torch.Tensor], *, where: str) -> dict[str, str]:
    """The ``tied_weights`` metadata field: a JSON object {tied base name: name of a tensor the vector stores}."""
    field = f"{where}: metadata field {TIED_WEIGHTS_FIELD}"
    try:
        tied = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{field}: not valid JSON ({error})") from error
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise ValueError(f"{field}: expected a JSON object of tensor name -> tensor name, got {text[:80]!r}")
    for alias, name in tied.items():
        if name not in names:
            raise ValueError(f"{field}: {alias!r} is a tied copy of {name!r}, which the vector does not store")
        if alias in names:
            raise ValueError(f"{field}: {alias!r} is listed as a tied copy of {name!r} but is stored itself")
    return tied


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64, copy=True)


def _folders(*models: tuple[str, ModelWeights]) -> list[tuple[str, Path]]:
    """``(label, folder)`` of the models read from a folder (in-memory ones have none)."""
    return [(f"{role} {weights.label}", weights.folder) for role, weights in models if weights.folder is not None]


def _metadata(base: ModelWeights, names: list[str], *, source: str, **fields: Any) -> dict[str, str]:
    return {
        "format": TASK_VECTOR_FORMAT,
        "base_model": hub.absolute_ref(base.ref),
        "source": hub.absolute_ref(source),
        "base_revision": base.revision,
        "saft_hf_version": _library_version(),
        "base_fingerprint": base_fingerprint(base.tensors, sorted(names)),
        **fields,
    }


# ---- LoRA adapters -----------------------------------------------------------------------------------------------

_LORA_PREFIX = "base_model.model."
_LORA_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "A"),
    (".lora_embedding_B", "B"),
)
# adapter_config.json options under which the merged weight is not base + B @ A * scaling (or not input-independent).
_UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)


def _read_adapter_config(
    adapter: str, revision: str | None, allow_pickle: bool, token: str | bool | None
) -> tuple[Path, dict[str, Any]]:
    """The folder of the adapter at ``adapter`` and its ``adapter_config.json``, refused unless it is a LoRA a weight
    delta can express."""
    folder = hub.resolve_model(adapter, revision, allow_pickle=allow_pickle, token=token)
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG_NAME}; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object (PEFT's adapter config), got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters have task vectors here"
        )
    for option in _UNSUPPORTED_LORA_OPTIONS:
        if config.get(option):
            raise ValueError(
                f"{config_path}: {option}={config[option]!r} is not supported: a task vector is a fixed weight "
                "difference, and only plain LoRA and rsLoRA merge into one (base + B @ A * scaling)"
            )
    for field in ("r", "lora_alpha"):  # PEFT writes both into every adapter_config.json it saves
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{config_path}: {field} must be a positive number, got {value!r}")
    return folder, config


def _lora_deltas(
    base: ModelWeights,
    adapter: str,
    revision: str | None,
    folder: Path,
    config: Mapping[str, Any],
    allow_pickle: bool,
    allow_nonfinite: bool,
    token: str | bool | None,
) -> tuple[ComputedStateDict, str]:
    """Dense deltas of the adapter at ``adapter`` (in ``folder``, with ``config``), keyed by base tensor names, and
    a label for the adapter; each delta is checked for NaN/Inf as it is computed unless ``allow_nonfinite``."""
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file() and (folder / "adapter_model.bin").is_file():
        weights_file = folder / "adapter_model.bin"
    adapter_tensors = CheckpointReader(weights_file, allow_pickle=allow_pickle)

    pairs: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}  # base name -> adapter key holding the whole trained tensor (biases, modules_to_save)
    for key in adapter_tensors:
        name = key.removeprefix(_LORA_PREFIX)
        for suffix, part in _LORA_SUFFIXES:
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = key
                break
        else:
            if ".lora_" in name:
                raise ValueError(
                    f"{weights_file}: tensor {key!r} belongs to a LoRA variant a task vector cannot express"
                )
            full[name.replace(".base_layer.", ".")] = key

    model = base.module()
    label = f"adapter {adapter}"
    plans: dict[str, Callable[[], torch.Tensor]] = {}
    for path, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{weights_file}: module {path!r} has lora_{next(iter(parts))} but no matching pair")
        name = f"{path}.weight"
        if name not in base.tensors:
            raise ValueError(f"{label}: adapts {path!r}, but the base {base.label} has no tensor {name!r}")
        a_shape, b_shape = tensor_shape(adapter_tensors, parts["A"]), tensor_shape(adapter_tensors, parts["B"])
        module = _submodule(model, path)
        if len(a_shape) != 2 or isinstance(module, torch.nn.modules.conv._ConvNd):
            raise ValueError(f"{label}: module {path!r} is a convolution; LoRA on convolutions is not supported")
        # PEFT's own pattern matching (get_pattern_key), as LoraModel applies rank_pattern / alpha_pattern.
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), path), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), path), config["lora_alpha"])
        if a_shape[0] != rank:
            raise ValueError(f"{weights_file}: {parts['A']!r} has rank {a_shape[0]}, adapter_config.json says {rank}")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        embedding = parts["A"].endswith("lora_embedding_A")
        if module is None:
            transpose = embedding or bool(config.get("fan_in_fan_out"))
        else:
            transpose = embedding or isinstance(module, Conv1D)
        delta_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        if delta_shape != tensor_shape(base.tensors, name):
            raise ValueError(
                f"{label}: B @ A for {name!r} has shape {list(delta_shape)}, the base tensor "
                f"{list(tensor_shape(base.tensors, name))}"
            )
        plans[name] = _lora_delta(
            adapter_tensors, parts["A"], parts["B"], transpose, scaling, tensor_dtype(base.tensors, name)
        )
    for name, key in full.items():
        if name not in base.tensors:
            raise ValueError(f"{label}: saves tensor {key!r}, but the base {base.label} has no tensor {name!r}")
        check_shapes(base.tensors, adapter_tensors, {name: key}, other_label=label)
        plans[name] = _replacement_delta(base.tensors, name, adapter_tensors, key)
    order = [name for name in base.tensors if name in plans]

    def compute(name: str) -> torch.Tensor:
        delta = plans[name]()
        if not allow_nonfinite:
            check_finite(delta, where=f"{label}: tensor {name!r}", advice=_KEEP_NONFINITE)
        return delta

    tensors = ComputedStateDict(
        order,
        compute,
        shape=lambda name: tensor_shape(base.tensors, name),
        dtype=lambda name: tensor_dtype(base.tensors, name),
    )
    revision_label = hub.resolved_revision(adapter, revision, token=token)
    repo_id = hub.parse_model_ref(adapter, revision)[0]  # `org/lora@main` is recorded as `org/lora@<its commit>`
    return tensors, adapter if revision_label is None else f"{repo_id}@{revision_label}"


def _submodule(model: torch.nn.Module | None, path: str) -> torch.nn.Module | None:
    if model is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _lora_delta(
    tensors: Mapping[str, torch.Tensor], a_key: str, b_key: str, transpose: bool, scaling: float, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    """``B @ A * scaling`` exactly as PEFT's ``get_delta_weight`` computes it (half precision via float32 on CPU)."""

    def compute() -> torch.Tensor:
        weight_a, weight_b = tensors[a_key], tensors[b_key]
        if weight_b.dtype in (torch.float16, torch.bfloat16):
            weight_a, weight_b = weight_a.float(), weight_b.float()
        product = weight_b @ weight_a
        return ((product.T if transpose else product) * scaling).to(dtype)

    return compute


def _replacement_delta(
    base: Mapping[str, torch.Tensor], name: str, tensors: Mapping[str, torch.Tensor], key: str
) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        return _float64(tensors[key]).sub_(base[name].double()).to(tensor_dtype(base, name))

    return compute


__all__ = ["TASK_VECTOR_FORMAT", "TaskVector"]
