"""Recipe scripts imported as modules by the tests, exactly as `python recipes/<name>.py` runs them."""

import importlib.util
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def import_recipe(name: str):
    """A recipe module as `python recipes/<name>.py` sees it (its folder on sys.path for `import finetune`)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass annotations are resolved through the module
    spec.loader.exec_module(module)
    return module
