"""Lazy package attributes (PEP 562): a package's public names import their submodule on first use.

``import saft_hf`` (and so ``saft-hf --help``) would otherwise import torch, transformers, datasets, evaluate,
matplotlib and PEFT up front, several seconds before anything runs. This module is a leaf: it imports nothing from
saft_hf.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_attributes(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package named ``package``: ``exports`` maps each submodule (relative, such
    as ``".merging"``) to the public names it defines; the first access to a name imports its submodule and stores
    the value in the package, so later accesses are plain attribute lookups."""
    source = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in source:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *source})

    return __getattr__, __dir__
