"""Reading and writing checkpoint folders one tensor at a time.

Shared by task vectors and the merge engine: a lazy, memory-mapped reader for (sharded) safetensors folders, a
sharded writer that produces the standard ``*.safetensors.index.json`` layout, atomic folder replacement, key
alignment between a base model and another checkpoint (tied names, sub-model towers), and base fingerprints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import OutsideFolderError

MODEL_WEIGHTS_NAME = "model"
SAFE_INDEX_SUFFIX = ".safetensors.index.json"
# Searched in this order; the first one present is the folder's checkpoint.
_SAFETENSORS_CANDIDATES = ("model", "task_vector")
_PICKLE_CANDIDATES = ("pytorch_model.bin.index.json", "pytorch_model.bin")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"`` (powers of 1000) or ``"500MiB"`` (powers of 1024)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size: expected a size such as '2GB' or a number of bytes, got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size: must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: expected a size such as '2GB' or '500MiB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if unit.endswith("IB") else 1000
    if number <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return int(number * base**power)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are produced on access; shapes and dtypes are known without producing them."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError


class ComputedStateDict(LazyStateDict):
    """Tensors computed by ``compute(name)`` each time they are read (nothing is cached)."""

    def __init__(self, names: Iterable[str], compute: Callable[[str], torch.Tensor],
                 shape: Callable[[str], tuple[int, ...]], dtype: Callable[[str], torch.dtype]):  # fmt: skip
        self._names = list(names)
        self._name_set = set(self._names)
        self._compute, self._shape, self._dtype = compute, shape, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._name_set:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype(name)


def _check_shard_name(index: Path, tensor: str, shard: object) -> None:
    """Refuse a shard an index names outside its own folder, judged on the name alone (lexically): a Hub snapshot's
    files are symlinks into the cache's blobs, so resolving links would say nothing about what the repo named."""
    if not isinstance(shard, str) or not shard:
        raise ValueError(f"{index}: weight_map[{tensor!r}] is {shard!r}, expected the name of a shard file")
    if shard.startswith("/") or "\\" in shard or re.match(r"[A-Za-z]:", shard) or ".." in shard.split("/"):
        raise OutsideFolderError(
            f"{index}: names shard {shard!r} (for {tensor!r}), which is not a file inside the index's folder; an index "
            "may only name relative paths inside its folder, without '..', '\\' or a drive"
        )


class CheckpointReader(LazyStateDict):
    """Lazy view of the weights in a model folder (or a single weight file).

    Tensors are memory-mapped and read on access, one at a time: ``reader[name]`` costs the pages of that tensor,
    not the model. Sharded folders are followed through their index. Pickle ``.bin`` weights are refused unless
    ``allow_pickle`` (then loaded with ``torch.load(weights_only=True, mmap=True)``).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._weight_map: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self._index_assignment: dict[str, Path] | None = None
        files, index_metadata = self._discover(allow_pickle)
        for file in files:
            self._open(file)
        self._verify_index()
        if index_metadata:
            self.metadata = {**self.metadata, **{k: str(v) for k, v in index_metadata.items() if k != "total_size"}}

    def _discover(self, allow_pickle: bool) -> tuple[list[Path], dict]:
        if self.path.is_file():
            if self.path.suffix == ".bin" and not allow_pickle:
                raise ValueError(f"{self.path}: pickle weights can run arbitrary code; set allow_pickle to load them")
            return [self.path], {}
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such checkpoint folder or file")
        for stem in _SAFETENSORS_CANDIDATES:
            index = self.path / f"{stem}{SAFE_INDEX_SUFFIX}"
            if index.is_file():
                return self._read_index(index)
            single = self.path / f"{stem}.safetensors"
            if single.is_file():
                return [single], {}
        others = sorted(self.path.glob("*.safetensors"))
        if len(others) == 1:
            return others, {}
        pickles = [self.path / name for name in _PICKLE_CANDIDATES if (self.path / name).is_file()]
        if pickles and not allow_pickle:
            raise ValueError(
                f"{self.path}: only pickle weights ({pickles[0].name}); loading pickles can run arbitrary code, "
                "set allow_pickle: true to load them anyway"
            )
        if pickles and pickles[0].name.endswith(".json"):
            return self._read_index(pickles[0])
        if pickles:
            return pickles, {}
        found = sorted(p.name for p in self.path.iterdir())
        raise FileNotFoundError(f"{self.path}: no model.safetensors, task_vector.safetensors or index (found {found})")

    def _read_index(self, index: Path) -> tuple[list[Path], dict]:
        try:
            content = json.loads(index.read_text())
            weight_map = content["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a valid checkpoint index ({error})") from error
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is {type(weight_map).__name__}, expected a mapping of tensor names "
                             "to shard file names")  # fmt: skip
        for name, shard in weight_map.items():
            _check_shard_name(index, name, shard)
        files = sorted({index.parent / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index}: lists shard {file.name}, which is missing")
        self._index_assignment = {name: index.parent / file for name, file in weight_map.items()}
        return files, content.get("metadata") or {}

    def _open(self, file: Path) -> None:
        if file.suffix == ".bin":
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a broken pickle
                raise ValueError(f"{file}: cannot load pickle checkpoint ({error})") from error
            self._pickled[file] = state
            names = list(state)
        else:
            try:
                handle = safe_open(file, framework="pt")
            except SafetensorError as error:
                raise ValueError(f"{file}: corrupt or truncated safetensors file ({error})") from error
            self._handles[file] = handle
            names = list(handle.keys())
            if not self.metadata:
                self.metadata = dict(handle.metadata() or {})
        for name in names:
            if name in self._weight_map:
                raise ValueError(f"{file}: tensor {name!r} is also stored in {self._weight_map[name].name}")
            self._weight_map[name] = file

    def _verify_index(self) -> None:
        expected = self._index_assignment
        if expected is None:
            return
        for name, file in self._weight_map.items():
            if expected.get(name) != file:
                raise ValueError(f"{file}: holds tensor {name!r}, which the index does not assign to it")
        missing = sorted(set(expected) - set(self._weight_map))
        if missing:
            raise ValueError(f"{self.path}: the index lists tensor {missing[0]!r}, missing from {expected[missing[0]]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if file in self._pickled:
            return self._pickled[file][name]
        try:
            return self._handles[file].get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"{file}: cannot read tensor {name!r} ({error})") from error

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._weight_map[name]
        if file in self._pickled:
            return tuple(self._pickled[file][name].shape)
        return tuple(self._handles[file].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        file = self._weight_map[name]
        if file in self._pickled:
            return self._pickled[file][name].dtype
        code = self._handles[file].get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]


def tensor_shape(source: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Shape of ``source[name]``, without producing the tensor when ``source`` is lazy."""
    return source.shape(name) if isinstance(source, LazyStateDict) else tuple(source[name].shape)


def tensor_dtype(source: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    return source.dtype(name) if isinstance(source, LazyStateDict) else source[name].dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedSafetensorsWriter:
    """Stream tensors straight to ``{prefix}.safetensors``, or to ``{prefix}-0000i-of-0000n.safetensors`` shards
    plus ``{prefix}.safetensors.index.json`` (the layout ``from_pretrained`` reads), holding none of them.

    The writer is given every tensor's name, shape and dtype up front (a merge knows them from the base), so it
    plans the shards (a new shard starts before one would exceed ``max_shard_size``; a larger tensor gets its
    own) and writes each shard's safetensors header first; tensors then go to disk as they are produced, in plan
    order. Memory stays at one tensor whatever the shard size. Files are read back with the safetensors library.
    """

    def __init__(self, folder: Path, specs: Iterable[TensorSpec], *, prefix: str = MODEL_WEIGHTS_NAME,
                 max_shard_size: int | str = "2GB", metadata: Mapping[str, str] | None = None):  # fmt: skip
        self.folder = Path(folder)
        self.metadata = dict(metadata or {"format": "pt"})
        self._specs = list(specs)
        limit = parse_size(max_shard_size)
        shards: list[list[TensorSpec]] = [[]]
        filled = 0  # bytes in the last shard
        for spec in self._specs:
            if shards[-1] and filled + spec.nbytes > limit:
                shards.append([])
                filled = 0
            shards[-1].append(spec)
            filled += spec.nbytes
        count = len(shards)
        names = [f"{prefix}.safetensors"] if count == 1 else [
            f"{prefix}-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)
        ]  # fmt: skip
        self._shards = list(zip(names, shards))
        self._index = self.folder / f"{prefix}{SAFE_INDEX_SUFFIX}" if count > 1 else None
        self._position = 0  # next spec to write
        self._file = None
        first_positions = [sum(len(specs) for specs in shards[:i]) for i in range(count)]
        self._opens_shard = {position: shard for shard, position in enumerate(first_positions)}
        self._closes_shard = {position + len(specs) - 1 for position, specs in zip(first_positions, shards)}

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for spec in self._specs)

    def _open_shard(self, file_name: str, specs: list[TensorSpec]) -> None:
        header: dict[str, object] = {}
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": _SAFETENSORS_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
        self._file = open(self.folder / file_name, "wb")
        self._file.write(len(encoded).to_bytes(8, "little") + encoded)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan (names, shapes and dtypes must follow it)."""
        if self._position >= len(self._specs):
            raise ValueError(f"tensor {name!r}: all {len(self._specs)} planned tensors were already written")
        spec = self._specs[self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(f"tensor {name!r} {list(tensor.shape)} {tensor.dtype} is not the planned "
                             f"{spec.name!r} {list(spec.shape)} {spec.dtype}")  # fmt: skip
        if self._position in self._opens_shard:
            self._open_shard(*self._shards[self._opens_shard[self._position]])
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(raw.numpy().data)
        if self._position in self._closes_shard:
            self._file.close()
        self._position += 1

    def close(self) -> list[Path]:
        """Check that every planned tensor was written, write the index if sharded; return the files."""
        if self._position != len(self._specs):
            raise ValueError(f"only {self._position} of {len(self._specs)} planned tensors were written")
        files = [self.folder / file_name for file_name, _ in self._shards]
        if self._index is not None:
            weight_map = {spec.name: file_name for file_name, specs in self._shards for spec in specs}
            metadata = {"total_size": self.total_size, **{k: v for k, v in self.metadata.items() if k != "format"}}
            self._index.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
            files.append(self._index)
        return files


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; move it into place only if the block succeeds.

    On error the temporary folder is removed and ``target`` is left as it was. An existing ``target`` is replaced
    only when it is empty or was written by saft_hf (holds ``merge_config.yaml`` or a task vector); anything
    else raises ``FileExistsError`` before work starts, so a typo cannot wipe an unrelated folder.
    """
    target = Path(target).resolve()
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_OWNED_MARKERS = ("merge_config.yaml", "task_vector.safetensors", f"task_vector{SAFE_INDEX_SUFFIX}")


def check_replaceable(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in _OWNED_MARKERS):
        raise FileExistsError(f"{target}: exists, is not empty and is not a saft_hf output; choose another path")


def replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an old ``target`` is renamed away first and deleted only afterwards."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


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
    """``{tied name: source name}`` declared by the model in ``folder`` (e.g. T5 ``lm_head.weight -> shared.weight``)."""
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


def align_keys(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, other_label: str,
               aliases: Mapping[str, str] | None = None, name_map: NameMap = NameMap(),
               required: Callable[[str], bool] | None = None) -> KeyAlignment:  # fmt: skip
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


def check_shapes(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], mapping: Mapping[str, str], *,
                 other_label: str) -> None:  # fmt: skip
    for base_name, other_name in mapping.items():
        base_shape, other_shape = tensor_shape(base, base_name), tensor_shape(other, other_name)
        if base_shape != other_shape:
            raise ValueError(
                f"{other_label}: tensor {other_name!r} has shape {list(other_shape)}, the base's "
                f"{base_name!r} has {list(base_shape)}"
            )


_FINGERPRINT_SAMPLES = 4096


def base_fingerprint(base: Mapping[str, torch.Tensor], names: Iterable[str]) -> str:
    """Identify base weights cheaply: sha256 over the shapes, dtypes and an evenly strided sample of the bytes (at
    most 4096 elements) of ``base[name]`` for ``names`` in the given order. Names are left out, so the vision tower
    of a CLIP base hashes the same whether it is named ``vision_model.*`` or ``*``. Deterministic across machines
    (exact bytes, no floating-point reductions), and two different bases differ with certainty."""
    digest = hashlib.sha256()
    for name in names:
        flat = base[name].detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].contiguous().cpu()
        digest.update(f"{str(flat.dtype)}|{list(base[name].shape)}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


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


def open_model_weights(model: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module,
                       revision: str | None = None, *, allow_pickle: bool = False,
                       token: str | bool | None = None) -> ModelWeights:  # fmt: skip
    """Open a local folder or Hub reference lazily (downloading through :func:`saft_hf.hub.resolve_model`), or wrap
    an in-memory model or state dict."""
    if isinstance(model, torch.nn.Module):
        tensors = model.state_dict()
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") or f"in-memory {type(model).__name__}"
        return ModelWeights(tensors, name, config=config.to_dict() if config is not None else {},
                            aliases=shared_storage_aliases(tensors), in_memory_model=model)  # fmt: skip
    if isinstance(model, Mapping):
        return ModelWeights(model, "in-memory state dict", aliases=shared_storage_aliases(model))
    from . import hub

    ref = str(model)
    folder = hub.resolve_model(ref, revision, allow_pickle=allow_pickle, token=token)
    return ModelWeights(
        CheckpointReader(folder, allow_pickle=allow_pickle), ref, hub.resolved_revision(ref, revision, token=token),
        folder, read_config(folder),
    )  # fmt: skip


def float_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name in tensors if tensor_dtype(tensors, name).is_floating_point]


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
    alignment = align_keys(base.tensors, other.tensors, other_label=other_label, aliases=aliases, name_map=name_map,
                           required=required)  # fmt: skip
    check_shapes(base.tensors, other.tensors, alignment.mapping, other_label=other_label)
    return alignment


def write_atomically(path: str | os.PathLike, write: Any, *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it to ``path`` when it succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text_options = {} if binary else {"newline": "", "encoding": "utf-8"}
        with os.fdopen(handle, "wb" if binary else "w", **text_options) as f:
            write(f)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path
