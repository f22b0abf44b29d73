"""The embedded offline demo: does sharpness-aware fine-tuning (SAFT) make task vectors merge better? A study over
several seeds, with 95% intervals.

    python recipes/demo.py                      # `make demo`: 6 seeds, 2 families, under 5 minutes on 2 CPU cores
    python recipes/demo.py --seeds 10 --config recipes/configs/demo_experiment_study.yaml   # six families, longer

No network, no GPU, real data (scikit-learn's bundled handwritten digits). For every seed (in parallel processes):

1. pre-train a tiny CLIP on half of the digits' train split, initialised and trained with that seed;
2. fine-tune four tasks on the held-out half (digits 0-4, digits 5-9, even/odd, small/large) from it, with plain
   fine-tuning (family `sgd`, the baseline) and with SAFT (ASAM; family `saft`), same budget, through
   saft_hf.finetuning (what recipes/finetune.py runs); save the task vectors;
3. merge each family (weight averaging; task arithmetic and TIES with alpha searched on validation), score every
   model on every task's test split.

Then `saft_hf.experiments.study` reports per family and merge: fine-tune accuracy, merged absolute and normalized
accuracy, the paired difference to plain fine-tuning on the same seed with its 95% Student t interval and the
seeds won, training time, and a verdict computed from the numbers; it writes study.md/.csv, study_summary.json and
two figures. The first seed's weight-disentanglement heat-map is drawn too (saft_hf.analysis.suite, as
recipes/analyze.py).

A rerun reuses every stage whose settings did not change and redoes the others (resumable by content). The demo is
not tuned to make SAFT win: it reports what it measures.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saft_hf.analysis.suite import AnalysisArguments, run_analyses
from saft_hf.entrypoint import run_main
from saft_hf.experiments import ExperimentConfig
from saft_hf.experiments.demo import DemoSeedSetup, register_demo_tasks
from saft_hf.experiments.pipeline import experiment_stages
from saft_hf.experiments.study import cpu_seconds, quiet_console, run_seeds, summarize, write_study
from saft_hf.parser import SaftParser

CONFIG = Path(__file__).parent / "configs" / "demo_experiment.yaml"
HEATMAP_TASKS = ("demo_parity", "demo_small_large")
BASELINE = "sgd"


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Everything is written (and cached) here."})
    config: str = field(default=str(CONFIG), metadata={"help": "The experiment config (tasks, families, merges)."})
    seeds: int = field(default=6, metadata={"help": "Seeds 0..N-1, each a whole experiment."})
    processes: int = field(default=2, metadata={"help": "Seeds run this many at a time (one per core)."})
    baseline: str = field(default=BASELINE, metadata={"help": "The family the others are compared with."})
    pretraining_steps: int = 200
    finetune_args: str = field(
        default="", metadata={"help": "Extra fine-tuning flags for every fine-tune, one string ('--max_steps 10')."}
    )
    grid_points: int = field(
        default=7,
        metadata={"help": "Points per axis of the heat-map grid over [-0.5, 1.5] (the paper's is 21); 0: none."},
    )
    heatmap_examples: int = field(default=64, metadata={"help": "Test examples per task for the heat-map."})
    quick: bool = field(
        default=False, metadata={"help": "A smoke run: 20 pre-training and 10 fine-tuning steps, 3x3 heat-map grid."}
    )

    def __post_init__(self):
        if self.seeds < 1 or self.processes < 1:
            raise ValueError(f"seeds and processes must be >= 1, got {self.seeds} and {self.processes}.")
        if self.quick:
            self.pretraining_steps, self.grid_points, self.heatmap_examples = 20, 3, 16
            self.finetune_args = f"--max_steps 10 --warmup_steps 1 {self.finetune_args}"


def main(argv: list[str] | None = None) -> dict:
    # --config is the experiment file itself here (a field), not a layer of this command's defaults.
    args, _ = SaftParser(DemoArguments, config_option=False, description=__doc__).parse_args_and_config(argv)
    started = time.perf_counter()
    quiet_console()
    torch.set_num_threads(1)  # tiny models: a second thread slows them down (the heat-map 40x with a busy core)
    register_demo_tasks()
    output_dir = Path(args.output_dir)
    setup = DemoSeedSetup(
        str(args.config), str(output_dir), args.pretraining_steps, tuple(shlex.split(args.finetune_args))
    )
    template = ExperimentConfig.from_yaml(args.config, base_model="-", output_dir=str(output_dir))
    seeds = list(range(args.seeds))
    print(
        f"[demo] {len(seeds)} seeds x ({len(template.families)} families x {len(template.tasks)} tasks fine-tuned, "
        f"merged with {', '.join(template.merge_methods)}), {args.processes} at a time ...",
        flush=True,
    )
    results = run_seeds(setup, seeds, stages_per_seed=experiment_stages(template), processes=args.processes)
    rows = summarize(results, template.tasks, args.baseline)

    heatmaps = []
    if args.grid_points:
        first = Path(results[0].output_dir)
        pair = HEATMAP_TASKS if set(HEATMAP_TASKS) <= set(template.tasks) else template.tasks[:2]
        families = [
            [family.name, *(str(first / "task_vectors" / family.name / task) for task in pair)]
            for family in template.families
        ]
        summary = run_analyses(
            AnalysisArguments(
                base=str(first / "pretrained"),
                tasks=list(pair),
                family=families,
                analyses=["disentanglement"],
                output_dir=str(output_dir / "analysis"),
                max_examples=args.heatmap_examples,
                grid_points=args.grid_points,
            )
        )
        heatmaps = [str(output_dir / "analysis" / name) for name in summary["disentanglement"]["figures"]]

    wall = time.perf_counter() - started
    command = "python recipes/demo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    extra = {"command": command.strip(), "wall_time_seconds": wall, "cpu_seconds": cpu_seconds(), "heatmaps": heatmaps}
    study = write_study(output_dir, rows, results, baseline=args.baseline, extra=extra)
    print()
    print(study["table_markdown"])
    print("Verdicts (95% Student t intervals over seeds, paired with the baseline on the same seed):")
    for sentence in study["verdicts"]:
        print(f"  {sentence}")
    print()
    print(f"[demo] table:     {output_dir / 'study.md'} (.csv beside it)")
    print(f"[demo] summary:   {output_dir / 'study_summary.json'}")
    print(f"[demo] figures:   {', '.join(study['figures'] + heatmaps)}")
    print(f"[demo] per seed:  {output_dir}/seed_<s>/ (fine-tunes, task vectors, merged models with cards, tables)")
    print(f"[demo] wall time: {wall:.0f} s")
    return study


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="demo.py"))
