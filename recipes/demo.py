"""The embedded offline demo: does sharpness-aware fine-tuning (SAFT) make task vectors merge better?

    python recipes/demo.py --output_dir outputs/demo            # `make demo`; a few minutes on 2 CPU cores
    python recipes/demo.py --output_dir outputs/demo_s1 --seed 1

No network, no GPU, real data (scikit-learn's bundled handwritten digits):

1. pre-train a tiny CLIP on half of the digits' train split (cached in <output_dir>/pretrained);
2. fine-tune four tasks on the held-out half (digits 0-4, digits 5-9, even/odd, small/large) from that common start,
   once with plain fine-tuning (family `sgd`) and once with SAFT (ASAM; family `saft`), through recipes/finetune.py;
3. save their task vectors; merge each family with weight averaging, task arithmetic and TIES (coefficients searched
   on the validation splits over the paper's grid, and at the fixed alpha = 0.4);
4. score every model on every task's test split and print absolute and normalized accuracy;
5. draw the weight-disentanglement error heat-map of the even/odd and small/large task vectors (recipes/analyze.py).

A rerun with the same --output_dir reuses everything already done (pre-training, fine-tunes, task vectors, merges,
scores). The demo is not tuned to make SAFT win: it reports what it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers

import analyze
import finetune
from saft_hf.entrypoint import run_main
from saft_hf.experiments import ExperimentConfig, run_experiment
from saft_hf.experiments.demo import pretrain_tiny_clip, register_demo_tasks
from saft_hf.experiments.pipeline import SEARCHED
from saft_hf.experiments.tables import FINETUNED, PRETRAINED, summary_rows, to_markdown

CONFIG = Path(__file__).parent / "configs" / "demo_experiment.yaml"
HEATMAP_TASKS = ("demo_parity", "demo_small_large")
SHOWN_MERGE = ("saft", "ties", SEARCHED)  # (family, method, setting) of the merged model whose paths are printed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="Everything is written (and cached) here.")
    parser.add_argument("--config", type=Path, default=CONFIG, help="The experiment config (tasks, families, merges).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the tiny CLIP's initialisation, its pre-training and every fine-tune.")  # fmt: skip
    parser.add_argument("--pretraining_steps", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=None, help="Fine-tuning steps (default: the config's).")
    parser.add_argument("--grid_points", type=int, default=11,
                        help="Points per axis of the heat-map grid over [-0.5, 1.5] (the paper's is 21; 11 keeps "
                        "the demo within a few minutes).")  # fmt: skip
    parser.add_argument("--heatmap_examples", type=int, default=128, help="Test examples per task for the heat-map.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models).")
    parser.add_argument("--quick", action="store_true",
                        help="A smoke run: 20 pre-training and 10 fine-tuning steps, 5x5 heat-map grid.")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.pretraining_steps, args.max_steps, args.grid_points, args.heatmap_examples = 20, 10, 5, 32
    return args


def build_config(args: argparse.Namespace, pretrained: Path) -> ExperimentConfig:
    flags = ["--seed", str(args.seed), "--torch_num_threads", str(args.threads)]
    if args.max_steps is not None:
        flags += ["--max_steps", str(args.max_steps), "--eval_steps", str(max(1, args.max_steps // 3)),
                  "--save_steps", str(max(1, args.max_steps // 3)), "--warmup_steps", str(args.max_steps // 10)]  # fmt: skip
    config = ExperimentConfig.from_yaml(args.config, base_model=str(pretrained), output_dir=args.output_dir)
    config.finetune_args = list(config.finetune_args) + flags
    return config


def headline(scores) -> list[dict]:
    """Per merge method and setting: each family's average absolute and normalized test accuracy (%)."""
    tasks = list(dict.fromkeys(score.task for score in scores))
    rows = summary_rows([s for s in scores if s.method != PRETRAINED], tasks)
    merged = [row for row in rows if row["method"] != FINETUNED]
    by_key: dict[tuple, dict] = {}
    for row in merged:
        entry = by_key.setdefault((row["method"], row["setting"]), {"method": row["method"], "setting": row["setting"]})
        entry[f"{row['family']} avg"] = row["avg"]
        entry[f"{row['family']} avg (norm)"] = row["avg (norm)"]
    return list(by_key.values())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    register_demo_tasks()

    print(f"[demo] 1/4 pre-training a tiny CLIP on half of the digits train split (seed {args.seed}) ...", flush=True)
    pretrained = pretrain_tiny_clip(output_dir / "pretrained", seed=args.seed, max_steps=args.pretraining_steps)
    config = build_config(args, pretrained)
    print(f"[demo] 2/4 fine-tuning {len(config.tasks)} tasks x {len(config.families)} families, saving task vectors, "
          f"merging ({', '.join(config.merge_methods)}) and scoring ...", flush=True)  # fmt: skip
    result = run_experiment(config, finetune.main)

    print("[demo] 3/4 weight-disentanglement heat-map ...", flush=True)
    pair = HEATMAP_TASKS if set(HEATMAP_TASKS) <= set(config.tasks) else config.tasks[:2]
    family_flags = []
    for family, vectors in result.task_vectors.items():
        family_flags += ["--family", family, *(str(vectors[task]) for task in pair)]
    summary = analyze.main(["--base", str(pretrained), "--tasks", *pair, *family_flags,
                            "--analyses", "disentanglement", "--output-dir", str(output_dir / "analysis"),
                            "--max-examples", str(args.heatmap_examples), "--grid-points", str(args.grid_points)])  # fmt: skip
    heatmaps = [output_dir / "analysis" / name for name in summary["disentanglement"]["figures"]]

    wall = time.perf_counter() - started
    comparison = headline(result.scores)
    print("\n[demo] 4/4 results (test split)\n")
    for table in result.tables.values():
        print(table.read_text())
    print(to_markdown(comparison, "SAFT vs plain fine-tuning (sgd) after merging: average test accuracy (%)"))
    shown = SHOWN_MERGE if SHOWN_MERGE in result.merged else next(iter(result.merged))
    merged = result.merged[shown]
    print(f"[demo] merged model ({', '.join(shown)}): {merged}")
    print(f"[demo] its model card:                        {merged / 'README.md'}")
    print(f"[demo] its merge recipe:                      {merged / 'merge_config.yaml'}")
    print(f"[demo] all merged models:                     {output_dir / 'merged'}")
    print(f"[demo] task vectors:                          {output_dir / 'task_vectors'}")
    print(f"[demo] tables (Markdown + CSV):               {', '.join(str(p) for p in result.tables.values())}")
    for heatmap in heatmaps:
        print(f"[demo] disentanglement heat-map:              {heatmap}")
    print(f"[demo] wall time: {wall:.0f} s")
    record = {"seed": args.seed, "wall_time_seconds": wall, "comparison": comparison,
              "tables": {k: str(v) for k, v in result.tables.items()}, "heatmaps": [str(p) for p in heatmaps]}  # fmt: skip
    (output_dir / "demo_summary.json").write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="demo.py"))
