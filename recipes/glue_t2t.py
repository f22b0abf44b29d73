"""The SAFT paper's Flan-T5 GLUE text-to-text experiment (App. C.8, Table C6).

    accelerate launch recipes/glue_t2t.py --config recipes/configs/glue_t2t.yaml   # GPU machine with Hub access
    python recipes/glue_t2t.py --base_model tiny-t5/ --tasks sst2 rte --dataset_path sst2=data/sst2 ... # offline

Flan-T5-base is fine-tuned on CoLA, MRPC, RTE and SST-2 (the model generates the label word) with plain fine-tuning
(`sgd`), SAFT (`saft`, ASAM) and their FTLO versions (attention projections only), through recipes/finetune.py with
the paper's settings (configs/flan_t5_base.yaml). Each family's task vectors are merged with task arithmetic, alpha
searched on the validation splits; every model is scored on each task's test split (GLUE validation). FTTS is not
run: a linearised Flan-T5 cannot generate, so it could not be scored (the recipe says so if a config asks for it).

Output (under output_dir): `table_merged_searched.{md,csv}` shaped like Table C6 (per task absolute and normalized
accuracy, averages), `label_words.{md,csv}` (fraction of outputs that are no label word of the task, and that are
another task's label word), `scores.json`, and the fine-tunes, task vectors and merged models. Resumable: rerunning
reuses every finished fine-tune, task vector, merge and score.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from saft_hf.data import get_task
from saft_hf.entrypoint import run_main
from saft_hf.experiments import run_experiment
from saft_hf.experiments.config import config_from_args, parse_experiment_args
from saft_hf.finetuning import check_finetune_mode

CONFIG = Path(__file__).parent / "configs" / "glue_t2t.yaml"


def main(argv: list[str] | None = None):
    args = parse_experiment_args(argv, CONFIG, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = config_from_args(args)
    runnable = []
    for family in config.families:
        try:
            for task in config.tasks:
                check_finetune_mode(get_task(task), family.finetune_mode)
        except ValueError as refusal:
            print(f"[glue_t2t] skipping family {family.name!r}: {refusal}", flush=True)
            continue
        runnable.append(family)
    if not runnable:
        raise ValueError("glue_t2t: no family of the config can be fine-tuned on text-to-text tasks.")
    config.families = runnable
    result = run_experiment(config)
    for table in result.tables.values():
        print(table.read_text())
    print(f"[glue_t2t] tables and merged models: {config.output_path}")
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="glue_t2t.py"))
