"""Writing checkpoints one tensor at a time: a sharded safetensors writer producing the standard
``*.safetensors.index.json`` layout, and atomic single-file writes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .reading import MODEL_WEIGHTS_NAME, SAFE_INDEX_SUFFIX, SAFETENSORS_DTYPE_CODES


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
                "dtype": SAFETENSORS_DTYPE_CODES[spec.dtype],
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
