"""saft_hf: sharpness-aware fine-tuning for models that will be merged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

if TYPE_CHECKING:
    from .config import SAFTConfig
    from .evaluation import evaluate_model
    from .merging import MergeConfig, merge, search_coefficients
    from .metrics import load_metric
    from .modes import apply_finetune_mode, load_linearized
    from .task_vectors import TaskVector
    from .trainer import SAFTTrainer

__version__ = "0.1.0"

# Imported on first use (saft_hf.lazy), so that `import saft_hf` and `saft-hf --help` start fast.
_EXPORTS = {
    ".config": ("SAFTConfig",),
    ".evaluation": ("evaluate_model",),
    ".merging": ("MergeConfig", "merge", "search_coefficients"),
    ".metrics": ("load_metric",),
    ".modes": ("apply_finetune_mode", "load_linearized"),
    ".task_vectors": ("TaskVector",),
    ".trainer": ("SAFTTrainer",),
}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = ["__version__", *sorted(name for names in _EXPORTS.values() for name in names)]
