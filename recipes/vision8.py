"""The SAFT paper's 8-task CLIP experiment (Sec. 4, Tables 1, 2 and C4).

    accelerate launch recipes/vision8.py --config recipes/configs/vision8.yaml        # GPU machine with Hub access
    python recipes/vision8.py --base_model tiny-clip/ --tasks digits_0to4 digits_5to9 ...  # offline

CLIP ViT-B/32's vision tower is fine-tuned on Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397 and SVHN under
frozen zero-shot heads (recipes/finetune.py, configs/clip_vit_b32.yaml): plain fine-tuning — or, with
`finetuned: tanganke/clip-vit-base-patch32_{task}` in the config, the public fine-tunes — and SAFT (ASAM), and
optionally their FTLO versions. Each family is merged with weight averaging, task arithmetic and TIES, coefficients
searched on the validation splits (paper grid: alpha in {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}, TIES pruning 70/80/90%) and
at the fixed alpha = 0.4 (App. C.6). Every model is scored on each task's test split.

Output (under output_dir): `table_merged_searched.{md,csv}` — per task absolute and normalized accuracy and their
averages for every method and family (Tables 1 and 2) — and `table_merged_alpha0.4.{md,csv}` (Table C4), plus
`scores.json`, the fine-tunes, task vectors and merged models (each with merge_config.yaml and a README.md card).
Resumable: rerunning reuses every finished fine-tune, task vector, merge and score.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from saft_hf.entrypoint import run_main
from saft_hf.experiments import run_experiment
from saft_hf.experiments.config import config_from_args, parse_experiment_args

CONFIG = Path(__file__).parent / "configs" / "vision8.yaml"


def main(argv: list[str] | None = None):
    args = parse_experiment_args(argv, CONFIG, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = run_experiment(config_from_args(args))
    for table in result.tables.values():
        print(table.read_text())
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="vision8.py"))
