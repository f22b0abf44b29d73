"""Reading and writing checkpoint folders one tensor at a time.

Shared by task vectors and the merge engine: a lazy, memory-mapped reader for (sharded) safetensors folders, a
sharded writer that produces the standard ``*.safetensors.index.json`` layout, atomic output folders (which replace
only what saft_hf wrote and never an input), key alignment between a base model and another checkpoint (tied names,
sub-model towers), and base fingerprints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from . import hub
from .errors import NonFiniteError, OutsideFolderError, UnsafeOutputError
from .layout import OUTPUT_MANIFEST_NAME, PRETRAINING_RECORD_NAME

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

    def __init__(
        self,
        folder: Path,
        specs: Iterable[TensorSpec],
        *,
        prefix: str = MODEL_WEIGHTS_NAME,
        max_shard_size: int | str = "2GB",
        metadata: Mapping[str, str] | None = None,
    ):
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
        names = (
            [f"{prefix}.safetensors"]
            if count == 1
            else [f"{prefix}-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
        )
        self._shards = list(zip(names, shards))
        self._index = self.folder / f"{prefix}{SAFE_INDEX_SUFFIX}" if count > 1 else None
        self._position = 0  # next spec to write
        self._file = None
        first_positions = [sum(len(specs) for specs in shards[:i]) for i in range(count)]
        self._opens_shard = {position: shard for shard, position in enumerate(first_positions)}
        self._closes_shard = {position + len(specs) - 1 for position, specs in zip(first_positions, shards)}

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._file is None or self._file.closed:
            return
        try:
            self._close_shard()
        except OSError:
            if exc_type is None:
                raise
            # The error already propagating (often the same full disk) is the one to report.

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for spec in self._specs)

    def _open_shard(self, file_name: str, specs: list[TensorSpec]) -> None:
        header: dict[str, object] = {}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": _SAFETENSORS_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
        self._file = open(self.folder / file_name, "wb")
        self._write(len(encoded).to_bytes(8, "little") + encoded)

    def _write(self, data: bytes | memoryview) -> None:
        with self._naming_failures():
            self._file.write(data)

    def _close_shard(self) -> None:
        with self._naming_failures():  # buffered bytes reach the disk here
            self._file.close()

    @contextlib.contextmanager
    def _naming_failures(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if error.filename is not None:
                raise
            # A failed write (a full disk) names no file; the user needs to know where space ran out.
            raise OSError(error.errno, error.strerror, self._file.name) from error

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan (names, shapes and dtypes must follow it)."""
        if self._position >= len(self._specs):
            raise ValueError(f"tensor {name!r}: all {len(self._specs)} planned tensors were already written")
        spec = self._specs[self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(
                f"tensor {name!r} {list(tensor.shape)} {tensor.dtype} is not the planned "
                f"{spec.name!r} {list(spec.shape)} {spec.dtype}"
            )
        if self._position in self._opens_shard:
            self._open_shard(*self._shards[self._opens_shard[self._position]])
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._write(raw.numpy().data)
        if self._position in self._closes_shard:
            self._close_shard()
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


# ---- output folders ----------------------------------------------------------------------------------------------
#
# saft_hf replaces an existing output folder only when it can show that everything in it is its own: every folder it
# writes records the files it holds (name, size, mtime) in a manifest, and a folder is replaceable only while it
# still holds exactly those files, unchanged. A folder is built in a staging folder beside the target, named after
# its owner (pid@host), and swapped in with renames; a later run removes the staging folders of dead owners.

_MANIFEST_FORMAT = "saft_hf.output/1"
# What saft_hf wrote before it kept a manifest: such a folder may hold files added since, so it is not replaced.
# Files only saft_hf writes (a merge's recipe, a task vector, the demo's pre-training record): a folder holding one but
# no manifest was written before manifests existed.
_LEGACY_MARKERS = (
    "merge_config.yaml",
    "task_vector.safetensors",
    f"task_vector{SAFE_INDEX_SUFFIX}",
    PRETRAINING_RECORD_NAME,
)
_LISTED_NAMES = 3  # names shown in a refusal before "(+N more)"


def check_outside_inputs(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], *, field: str
) -> None:
    """Raise :class:`UnsafeOutputError` when ``output`` is, contains or lies inside one of ``inputs`` (``(label,
    path)`` pairs): writing there would replace, delete or add to an input. Paths are compared resolved."""
    output = Path(output).expanduser().resolve()
    for label, path in inputs:
        folder = Path(path).expanduser().resolve()
        if output == folder:
            relation = "is"
        elif output.is_relative_to(folder):
            relation = "is inside"
        elif folder.is_relative_to(output):
            relation = "contains"
        else:
            continue
        where = "" if str(folder) in label else f" ({folder})"
        raise UnsafeOutputError(
            f"{field}: {output} {relation} the folder of input {label}{where}; writing there would replace or "
            f"change that input, choose another {field}"
        )


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    *,
    kind: str,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    field: str = "output folder",
) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``target``; move it into place only if the block succeeds.

    Before any work: ``target`` must lie apart from ``inputs`` (:func:`check_outside_inputs`) and, if it exists, be
    replaceable (:func:`check_replaceable`), which is checked again right before the swap. On success the folder
    gets a manifest of its files (``kind`` says what it holds) and the umask's permissions; on error or SIGTERM the
    staging folder is removed and ``target`` is left as it was. Staging left by dead processes (SIGKILL) for this
    target is removed first.
    """
    target = Path(target).expanduser().resolve()
    check_outside_inputs(target, inputs, field=field)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target)
    with _sigterm_interrupts():
        staging = _owned_dir_beside(target, "tmp")
        try:
            yield staging
            write_manifest(staging, kind)
            check_replaceable(target)  # the folder may have changed during a long run
            replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def write_manifest(folder: Path, kind: str) -> None:
    """Record every file under ``folder`` (relative posix path, size, mtime_ns) in its manifest."""
    files = {name: {"size": info.st_size, "mtime_ns": info.st_mtime_ns} for name, info in _files_under(folder)}
    manifest = {"format": _MANIFEST_FORMAT, "kind": kind, "files": files}
    (folder / OUTPUT_MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _files_under(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative posix path, lstat)`` of every non-folder entry under ``folder`` but the manifest (links are
    not followed)."""
    for directory, subfolders, names in os.walk(folder):
        subfolders.sort()
        for name in sorted(names):
            path = Path(directory, name)
            relative = path.relative_to(folder).as_posix()
            if relative != OUTPUT_MANIFEST_NAME:
                yield relative, path.lstat()


def _read_manifest(target: Path) -> dict[str, dict[str, int]]:
    """The recorded files of ``target``'s manifest; raises :class:`UnsafeOutputError` when it is missing or invalid."""
    path = target / OUTPUT_MANIFEST_NAME
    if not path.is_file():
        if any((target / marker).exists() for marker in _LEGACY_MARKERS):
            raise UnsafeOutputError(
                f"{target}: was written by an older saft_hf, which kept no record of its files "
                f"({OUTPUT_MANIFEST_NAME}), so files added since cannot be told apart; move its contents away or "
                "choose another output folder"
            )
        raise UnsafeOutputError(
            f"{target}: is not empty and was not written by saft_hf (no {OUTPUT_MANIFEST_NAME}); move its files "
            "away or choose another output folder"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        valid = manifest["format"] == _MANIFEST_FORMAT and all(
            isinstance(name, str)
            and not name.startswith("/")
            and ".." not in name.split("/")
            and isinstance(entry["size"], int)
            and isinstance(entry["mtime_ns"], int)
            for name, entry in files.items()
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        valid = False
    if not valid:
        raise UnsafeOutputError(
            f"{target}: its {OUTPUT_MANIFEST_NAME} is not a valid saft_hf manifest, so saft_hf cannot tell its own "
            "files; move the folder's contents away or choose another output folder"
        )
    return files


def _listed(names: list[str]) -> str:
    more = f" (+{len(names) - _LISTED_NAMES} more)" if len(names) > _LISTED_NAMES else ""
    return ", ".join(names[:_LISTED_NAMES]) + more


def check_replaceable(target: Path) -> None:
    """Raise :class:`UnsafeOutputError` unless ``target`` is missing, empty, or a folder saft_hf wrote that still
    holds exactly the files its manifest records (each with its recorded size and mtime; a file removed since is
    fine, nothing of the user's is lost by replacing the rest)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UnsafeOutputError(f"{target}: exists and is not a folder; choose another output folder")
    if not any(target.iterdir()):
        return
    recorded = _read_manifest(target)
    recorded_folders = {parent.as_posix() for name in recorded for parent in PurePosixPath(name).parents}
    foreign, changed = [], []
    for directory, subfolders, names in os.walk(target):
        relative = Path(directory).relative_to(target)
        ours = [
            name
            for name in sorted(subfolders)
            if (relative / name).as_posix() in recorded_folders and not Path(directory, name).is_symlink()
        ]
        foreign += [f"{(relative / name).as_posix()}/" for name in sorted(set(subfolders) - set(ours))]
        subfolders[:] = ours
        for name in sorted(names):
            path = (relative / name).as_posix()
            if path == OUTPUT_MANIFEST_NAME:
                continue
            entry = recorded.get(path)
            if entry is None:
                foreign.append(path)
                continue
            info = (target / path).lstat()
            if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                changed.append(path)
    if foreign:
        raise UnsafeOutputError(
            f"{target}: holds files saft_hf did not write: {_listed(sorted(foreign))}; move them away or choose "
            "another output folder"
        )
    if changed:
        files = (
            f"file {changed[0]} changed since saft_hf wrote it"
            if len(changed) == 1
            else (f"files {_listed(changed)} changed since saft_hf wrote them")
        )
        raise UnsafeOutputError(f"{target}: {files}; move the folder's contents away or choose another output folder")


def replace_dir(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an old ``target`` is renamed away first and deleted only afterwards."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = _owned_dir_beside(target, "old")
    try:
        os.replace(target, retired / target.name)
        os.replace(staging, target)
    except BaseException:
        if os.path.lexists(retired / target.name) and not os.path.lexists(target):  # interrupted between the renames
            os.replace(retired / target.name, target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _owned_dir_beside(target: Path, role: str) -> Path:
    """A new folder ``.<target name>.<role>-<pid>@<host>-<random>`` beside ``target``: its name says which process
    owns it, so a later run can tell an abandoned one. Made with ``mkdir`` (mode 0o777 less the umask), as the
    finished output's permissions should be the user's usual ones, not ``mkdtemp``'s 0o700."""
    prefix = f".{target.name}.{role}-{os.getpid()}@{socket.gethostname()}-"
    while True:
        folder = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Remove the staging (``.tmp-``) and retired (``.old-``) folders of ``target`` whose owner process is gone
    (killed before it could clean up); those of live processes, other hosts and other targets are kept. Returns
    the removed folders."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:tmp|old)-(\d+)@([^@/]+)-[0-9a-f]+")
    removed = []
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _owner_alive(int(match[1]), match[2]):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _owner_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, keep its folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # no such pid can exist
    return True


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived while an output was being staged; raised so the staging folder is removed on the way out."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """In the block, SIGTERM raises (in the main thread, as Ctrl-C does) so that cleanup code runs; afterwards the
    previous handler is restored and the signal delivered to it again, so the process still ends as terminated
    (exit status 143 under the default handler). Elsewhere, or when SIGTERM is ignored, nothing changes."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise _Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise  # the previous handler returned: report the interruption
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, infinity count)`` of ``tensor``: one ``aminmax`` pass when all values are finite (the usual
    case); integer and boolean tensors are always ``(0, 0)``."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return 0, 0
    if tensor.dtype.itemsize == 1:  # torch implements isfinite/isnan/isinf for no float8 type
        tensor = tensor.float()
    # The minimum and maximum are finite exactly when every value is (a NaN propagates to both, -inf is the minimum,
    # inf the maximum); one reduction without a boolean temporary, several times faster than isfinite().all().
    low, high = torch.aminmax(tensor)
    if math.isfinite(low) and math.isfinite(high):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def check_finite(tensor: torch.Tensor, *, where: str, advice: str) -> torch.Tensor:
    """``tensor``, after checking it holds no NaN or infinity; otherwise raise :class:`NonFiniteError`
    ``"{where} has {n} NaN and {m} Inf values; {advice}"``."""
    nan, inf = nonfinite_counts(tensor)
    if nan or inf:
        raise NonFiniteError(f"{where} has {nan} NaN and {inf} Inf values; {advice}")
    return tensor


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
    return ModelWeights(
        CheckpointReader(folder, allow_pickle=allow_pickle),
        ref,
        hub.resolved_revision(ref, revision, token=token),
        folder,
        read_config(folder),
    )


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
    alignment = align_keys(
        base.tensors, other.tensors, other_label=other_label, aliases=aliases, name_map=name_map, required=required
    )
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
