"""Experiments on top of the library: fine-tune task families, save task vectors, merge, score, tabulate.

`run_experiment` is the pipeline `recipes/demo.py`, `recipes/glue_t2t.py` and `recipes/vision8.py` share;
`saft_hf.experiments.demo` builds the offline demo's pre-trained model and held-out digits tasks.
"""

from .config import ExperimentConfig, Family
from .pipeline import ExperimentResult, Scorer, finetune_argv, is_finetuned, run_experiment
from .tables import FINETUNED, PRETRAINED, Score, normalized_accuracy, summary_rows, to_markdown, write_table

__all__ = [
    "FINETUNED",
    "PRETRAINED",
    "ExperimentConfig",
    "ExperimentResult",
    "Family",
    "Score",
    "Scorer",
    "finetune_argv",
    "is_finetuned",
    "normalized_accuracy",
    "run_experiment",
    "summary_rows",
    "to_markdown",
    "write_table",
]
