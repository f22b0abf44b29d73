"""Reading checkpoint folders one tensor at a time: a lazy, memory-mapped reader for (sharded) safetensors
folders (and, when allowed, pickled ``pytorch_model.bin`` ones), confined to the folder it was given."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import OutsideFolderError

MODEL_WEIGHTS_NAME = "model"


SAFE_INDEX_SUFFIX = ".safetensors.index.json"


# Searched in this order; the first one present is the folder's checkpoint.
_SAFETENSORS_CANDIDATES = ("model", "task_vector")


_PICKLE_CANDIDATES = ("pytorch_model.bin.index.json", "pytorch_model.bin")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


SAFETENSORS_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are produced on access; shapes and dtypes are known without producing them."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError


class ComputedStateDict(LazyStateDict):
    """Tensors computed by ``compute(name)`` each time they are read (nothing is cached)."""

    def __init__(
        self,
        names: Iterable[str],
        compute: Callable[[str], torch.Tensor],
        shape: Callable[[str], tuple[int, ...]],
        dtype: Callable[[str], torch.dtype],
    ):
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
            raise ValueError(
                f"{index}: weight_map is {type(weight_map).__name__}, expected a mapping of tensor names "
                "to shard file names"
            )
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
