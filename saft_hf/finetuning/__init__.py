"""Fine-tuning one model on one task: the arguments (`ModelArguments`, `DataArguments`, `SAFTConfig`) parsed from
config files and flags, the checks made before anything is written, and the run itself (`run(argv)`, the code path
of `recipes/finetune.py` and of the experiment pipeline)."""

from .arguments import (
    RESOLVED_CONFIG_FILE,
    DataArguments,
    ModelArguments,
    fill_output_dir,
    parse_finetune_args,
    public_config,
    write_resolved_config,
)
from .checks import (
    WEIGHTS_FILES,
    check_output_dir,
    check_resume_checkpoint,
    find_task,
    holds_a_run,
)
from .training import TextToTextTrainer, apply_mode, finetune, finetune_image_classifier, finetune_text_to_text, run

__all__ = [
    "RESOLVED_CONFIG_FILE",
    "WEIGHTS_FILES",
    "DataArguments",
    "ModelArguments",
    "TextToTextTrainer",
    "apply_mode",
    "check_output_dir",
    "check_resume_checkpoint",
    "fill_output_dir",
    "find_task",
    "finetune",
    "finetune_image_classifier",
    "finetune_text_to_text",
    "holds_a_run",
    "parse_finetune_args",
    "public_config",
    "run",
    "write_resolved_config",
]
