"""The SAFT paper's Flan-T5 GLUE text-to-text experiment (App. C.8, Table C6).

    accelerate launch recipes/glue_t2t.py --config recipes/configs/glue_t2t.yaml   # GPU machine with Hub access
    python recipes/glue_t2t.py --base_model tiny-t5/ --tasks sst2 rte --dataset_path sst2=data/sst2 ... # offline

Flan-T5-base is fine-tuned on CoLA, MRPC, RTE and SST-2 (the model generates the label word) with plain fine-tuning
(`sgd`), SAFT (`saft`, ASAM) and their FTLO versions (attention projections only) — and FTTS (the first-order
linearisation, which generates with its linearised forward) when the config names it — through saft_hf.finetuning
with the paper's settings (configs/flan_t5_base.yaml). Each family's task vectors are merged with task arithmetic,
alpha searched on the validation splits; every model is scored on each task's test split (GLUE validation).

Output (under output_dir): `table_merged_searched.{md,csv}` shaped like Table C6 (per task absolute and normalized
accuracy, averages), `label_words.{md,csv}` (fraction of outputs that are no label word of the task, and that are
another task's label word), `scores.json`, and the fine-tunes, task vectors and merged models. Resumable: rerunning
reuses every finished fine-tune, task vector, merge and score.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from saft_hf.entrypoint import run_main
from saft_hf.experiments import run_experiment
from saft_hf.experiments.config import config_from_args, parse_experiment_args

CONFIG = Path(__file__).parent / "configs" / "glue_t2t.yaml"


def main(argv: list[str] | None = None):
    args = parse_experiment_args(argv, CONFIG, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = config_from_args(args)
    result = run_experiment(config)
    for table in result.tables.values():
        print(table.read_text())
    print(f"[glue_t2t] tables and merged models: {config.output_path}")
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="glue_t2t.py"))
