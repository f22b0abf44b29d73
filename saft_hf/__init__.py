"""saft_hf: sharpness-aware fine-tuning for models that will be merged."""

from .config import SAFTConfig
from .evaluation import evaluate_model
from .merging import MergeConfig, merge, search_coefficients
from .metrics import load_metric
from .modes import apply_finetune_mode, load_linearized
from .task_vectors import TaskVector
from .trainer import SAFTTrainer

__version__ = "0.1.0"

__all__ = [
    "MergeConfig",
    "SAFTConfig",
    "SAFTTrainer",
    "TaskVector",
    "__version__",
    "apply_finetune_mode",
    "evaluate_model",
    "load_linearized",
    "load_metric",
    "merge",
    "search_coefficients",
]
