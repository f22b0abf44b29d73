"""saft_hf: sharpness-aware fine-tuning for models that will be merged."""

from .config import SAFTConfig
from .trainer import SAFTTrainer

__version__ = "0.1.0"

__all__ = ["SAFTConfig", "SAFTTrainer", "__version__"]
