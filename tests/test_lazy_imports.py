"""Startup: `import saft_hf` and `saft-hf --help` import no heavy library; the lazy names resolve to the real ones."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import saft_hf
import saft_hf.analysis

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "evaluate", "matplotlib", "peft", "scipy", "sklearn")


def imported_heavy_modules(code: str) -> list[str]:
    """The HEAVY libraries a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    ["import saft_hf", "import saft_hf.cli; saft_hf.cli.build_parser().format_help()", "import saft_hf.analysis"],
)
def test_startup_imports_no_heavy_library(code):
    assert imported_heavy_modules(code) == []


def test_merging_imports_torch_and_no_model_library():
    # `saft-hf merge` streams tensors from files: transformers' model code (a second or more to import) is not needed
    assert imported_heavy_modules("import saft_hf.merging") == ["torch"]


def test_one_analysis_name_imports_only_its_module():
    code = "from saft_hf.analysis import add_noise_scale_logging"
    imported = imported_heavy_modules(code)
    assert "transformers" in imported and "matplotlib" not in imported  # plots are not imported


def type_checking_names(package) -> set[str]:
    """Names the package's `if TYPE_CHECKING:` block imports (what type checkers and IDEs see)."""
    tree = ast.parse(Path(package.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.name for node in ast.walk(block) if isinstance(node, ast.ImportFrom) for alias in node.names}


@pytest.mark.parametrize("package", [saft_hf, saft_hf.analysis])
def test_every_lazy_name_resolves_to_its_definition(package):
    exported = {name for names in package._EXPORTS.values() for name in names}
    assert type_checking_names(package) == exported
    assert set(package.__all__) - {"__version__"} == exported
    for module, names in package._EXPORTS.items():
        source = importlib.import_module(module, package.__name__)
        for name in names:
            assert getattr(package, name) is getattr(source, name)
            assert name in vars(package)  # stored: the next lookup does not go through __getattr__
    assert exported <= set(dir(package))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'saft_hf' has no attribute 'TaskVectors'"):
        saft_hf.TaskVectors  # noqa: B018
    with pytest.raises(ImportError, match="cannot import name 'TaskVectors'"):
        from saft_hf import TaskVectors  # noqa: F401
