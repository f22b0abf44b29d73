"""Analyse fine-tuned models for merging: weight disentanglement, cross-task linearity, joint-task loss landscape,
loss barrier, Hessian eigenvalues, and task-arithmetic gain against the effective noise scale
(saft_hf.analysis.suite).

Offline demo (after `recipes/finetune.py` runs of two digits tasks with plain fine-tuning and with SAFT):

    python recipes/analyze.py --base out/demo/pretrained --tasks digits_0to4 digits_5to9 \\
        --family sgd out/demo/sgd/digits_0to4 out/demo/sgd/digits_5to9 \\
        --family saft out/demo/saft/digits_0to4 out/demo/saft/digits_5to9 \\
        --output_dir out/analysis

GPU machine with Hub access (fine-tunes may be model folders, task-vector folders, or Hub ids):

    python recipes/analyze.py --base openai/clip-vit-base-patch32 --tasks eurosat mnist \\
        --finetuned tanganke/clip-vit-base-patch32_eurosat tanganke/clip-vit-base-patch32_mnist \\
        --device cuda --max_examples 1024 --output_dir out/analysis_vitb32

`--base` is the pre-trained model (a full `CLIPModel` for image tasks, its text tower builds the zero-shot heads;
a seq2seq LM for text-to-text tasks). Each family (`--family LABEL PATH...`, or `--finetuned PATH...` for one
family called `--label`) gives one fine-tune per task, in the order of `--tasks`. With more than two tasks, the
pair `--pair I J` is analysed and the grid analyses are repeated with the other task vectors merged at
`--other_alpha` (xi_all, paper Eq. 10). Every result is written as CSV and JSON, every figure as PNG (families side
by side or as one line each); `summary.json` lists them with the headline numbers. `--config FILE.yaml` supplies
any field of `AnalysisArguments` (a family as `family: [[LABEL, PATH, ...], ...]`); flags override it.
"""

import logging
import sys
from pathlib import Path

from saft_hf.analysis.suite import SUMMARY_FILE, AnalysisArguments, run_analyses
from saft_hf.entrypoint import run_main
from saft_hf.parser import SaftParser


def main(argv: list[str] | None = None) -> dict:
    args, _ = SaftParser(AnalysisArguments, description=__doc__).parse_args_and_config(argv)
    logging.basicConfig(format="[analyze] %(message)s", level=logging.INFO)
    summary = run_analyses(args)
    folder = Path(args.output_dir)
    for analysis, entry in summary.items():
        for name in entry["figures"]:
            print(f"[analyze] {analysis}: {folder / name}")
    print(f"[analyze] tables and headline numbers: {folder / SUMMARY_FILE}")
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="analyze.py"))
