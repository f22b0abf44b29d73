"""Analyse fine-tuned models for merging: weight disentanglement, cross-task linearity, joint-task loss landscape,
loss barrier, Hessian eigenvalues, and task-arithmetic gain against the effective noise scale.

Offline demo (after `recipes/finetune.py` runs of two digits tasks with plain fine-tuning and with SAFT):

    python recipes/analyze.py --base out/demo/pretrained --tasks digits_0to4 digits_5to9 \\
        --family sgd out/demo/sgd/digits_0to4 out/demo/sgd/digits_5to9 \\
        --family saft out/demo/saft/digits_0to4 out/demo/saft/digits_5to9 \\
        --output-dir out/analysis

GPU machine with Hub access (fine-tunes may be model folders, task-vector folders, or Hub ids):

    python recipes/analyze.py --base openai/clip-vit-base-patch32 --tasks eurosat mnist \\
        --finetuned tanganke/clip-vit-base-patch32_eurosat tanganke/clip-vit-base-patch32_mnist \\
        --device cuda --max-examples 1024 --output-dir out/analysis_vitb32

`--base` is the pre-trained model (a full `CLIPModel` for image tasks, its text tower builds the zero-shot heads;
a seq2seq LM for text-to-text tasks). Each family (`--family LABEL PATH...`, or `--finetuned PATH...` for one
family called `--label`) gives one fine-tune per task, in the order of `--tasks`. With more than two tasks, the
pair `--pair I J` is analysed and the grid analyses are repeated with the other task vectors merged at
`--other-alpha` (xi_all, paper Eq. 10). Every result is written as CSV and JSON, every figure as PNG (families side
by side or as one line each); `summary.json` lists them with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saft_hf.analysis import (
    AnalysisTask,
    GridResult,
    align_to_model,
    build_analysis_tasks,
    coefficient_grid,
    combine,
    cross_task_linearity,
    current_weights,
    disentanglement_error,
    hessian_eigenvalues_along_line,
    joint_loss_landscape,
    logged_noise_scale,
    loss_barrier,
    plot_grid,
    plot_hessian_eigenvalues,
    plot_linearity,
    plot_loss_barrier,
    plot_merge_gain_vs_noise,
    task_arithmetic_gain,
)
from saft_hf.checkpoints import write_atomically
from saft_hf.entrypoint import run_main
from saft_hf.layout import is_task_vector_folder
from saft_hf.task_vectors import TaskVector

ANALYSES = ("disentanglement", "landscape", "linearity", "barrier", "hessian", "gain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="Pre-trained model folder or Hub id (theta_0).")
    parser.add_argument("--tasks", nargs="+", required=True, help="Registered task names, one per fine-tune.")
    parser.add_argument("--finetuned", nargs="+", help="One family of fine-tuned model or task-vector folders.")
    parser.add_argument("--label", default="finetuned", help="Name of the --finetuned family in tables and figures.")
    parser.add_argument("--family", nargs="+", action="append", default=[], metavar=("LABEL", "PATH"),
                        help="A named family of fine-tunes, one per task; repeat to compare families.")  # fmt: skip
    parser.add_argument("--output-dir", required=True, help="Folder for the CSV/JSON tables and PNG figures.")
    parser.add_argument("--analyses", nargs="+", choices=ANALYSES, default=list(ANALYSES), help="What to compute.")
    parser.add_argument("--pair", nargs=2, type=int, default=[0, 1], metavar=("I", "J"),
                        help="Indices (into --tasks) of the pair for the grid and linearity analyses.")  # fmt: skip
    parser.add_argument("--split", default="test", help="Data split to evaluate on.")
    parser.add_argument("--max-examples", type=int, default=256,
                        help="Examples per task (the first ones of the split); 0 for all.")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid-points", type=int, default=21, help="Points per axis of the coefficient grid.")
    parser.add_argument("--grid-range", nargs=2, type=float, default=[-0.5, 1.5], metavar=("MIN", "MAX"))
    parser.add_argument("--other-alpha", type=float, default=0.3, help="Coefficient of the non-pair task vectors.")
    parser.add_argument("--merge-alpha", type=float, default=0.3,
                        help="Task-arithmetic coefficient of the merged model (loss barrier, gain).")  # fmt: skip
    parser.add_argument("--ctl-lambda", type=float, default=0.3, help="lambda of cross-task linearity (Eq. 12).")
    parser.add_argument("--layers", nargs="+", help="Module names for cross-task linearity (default: all blocks).")
    parser.add_argument("--barrier-points", type=int, default=11, help="Points on the merged -> task model line.")
    parser.add_argument("--hessian-gammas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--hessian-iterations", type=int, default=20,
                        help="Lanczos restarts at most for lambda_max (each ~15 Hessian-vector products).")  # fmt: skip
    args = parser.parse_args(argv)
    families = {}
    if args.finetuned:
        families[args.label] = args.finetuned
    for label, *paths in args.family:
        if label in families:
            parser.error(f"family {label!r} is given twice")
        families[label] = paths
    if not families:
        parser.error("give the fine-tuned models with --finetuned or --family")
    for label, paths in families.items():
        if len(paths) != len(args.tasks):
            parser.error(f"family {label!r} has {len(paths)} fine-tunes for {len(args.tasks)} tasks (--tasks)")
    if len(args.tasks) < 2:
        parser.error("the analyses need at least two tasks")
    i, j = args.pair
    if i == j or not (0 <= i < len(args.tasks) and 0 <= j < len(args.tasks)):
        parser.error(f"--pair {i} {j} must name two different task indices below {len(args.tasks)}")
    args.families = families
    return args


def load_task_vectors(base: str, paths: list[str], model) -> list[dict]:
    """Each fine-tune's task vector (from a task-vector folder, or fine-tuned minus base) in memory, under the
    analysed model's tensor names."""
    vectors = []
    for path in paths:
        vector = TaskVector.load(path) if is_task_vector_folder(path) else TaskVector.from_models(base, path)
        vectors.append(align_to_model(vector, model, label=str(path)))
    return vectors


class Outputs:
    """Writes tables and figures into the output folder and remembers them for `summary.json`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.summary: dict[str, dict] = {}

    def table(self, analysis: str, stem: str, result, headline: dict | None = None) -> None:
        csv_path, json_path = result.save(self.folder, stem)
        entry = self.summary.setdefault(analysis, {"tables": [], "figures": [], "numbers": {}})
        entry["tables"] += [csv_path.name, json_path.name]
        entry["numbers"].update(headline or {})

    def figure(self, analysis: str, path: Path) -> None:
        self.summary.setdefault(analysis, {"tables": [], "figures": [], "numbers": {}})["figures"].append(path.name)

    def write_summary(self) -> Path:
        text = json.dumps(self.summary, indent=2)
        return write_atomically(self.folder / "summary.json", lambda f: f.write(text + "\n"))


def _grid_settings(args, vectors: list[dict]) -> list[tuple[str, list[dict]]]:
    """The pair alone (xi, two-task landscape), and with the other task vectors too when there are any."""
    i, j = args.pair
    pair = [vectors[i], vectors[j]]
    settings = [("pair", pair)]
    others = [vector for k, vector in enumerate(vectors) if k not in (i, j)]
    if others:
        settings.append(("all", pair + others))
    return settings


def run_grid_analysis(args, outputs: Outputs, analysis: str, tasks: list[AnalysisTask], families: dict) -> None:
    measure = disentanglement_error if analysis == "disentanglement" else joint_loss_landscape
    alphas = coefficient_grid(*args.grid_range, args.grid_points)
    i, j = args.pair
    by_setting: dict[str, dict[str, GridResult]] = {}
    for label, vectors in families.items():
        for setting, grid_vectors in _grid_settings(args, vectors):
            result = measure([tasks[i], tasks[j]], grid_vectors, alphas=alphas, other_alpha=args.other_alpha)
            by_setting.setdefault(setting, {})[label] = result
            headline = {f"{label}/{result.quantity}_mean": float(result.values.mean())}
            outputs.table(analysis, f"{analysis}_{setting}_{label}", result, headline)
    for setting, results in by_setting.items():
        outputs.figure(analysis, plot_grid(results, outputs.folder / f"{analysis}_{setting}.png"))


def run_linearity(args, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    i, j = args.pair
    results = {}
    for label, vectors in families.items():
        result = cross_task_linearity(
            [tasks[i], tasks[j]], [vectors[i], vectors[j]], layers=args.layers, lam=args.ctl_lambda
        )
        results[label] = result
        headline = {f"{label}/ctl_mean": float(result.series["ctl"].mean())}
        outputs.table("linearity", f"linearity_{label}", result, headline)
    outputs.figure("linearity", plot_linearity(results, outputs.folder / "linearity.png"))


def run_barrier(args, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    gammas = coefficient_grid(0.0, 1.0, args.barrier_points)
    results: list[dict] = [{} for _ in tasks]  # per task: family -> result
    for label, vectors in families.items():
        # The tasks share the analysed weights (the vectors are aligned to tasks[0].model): one merge per family.
        base = current_weights(tasks[0].model, list(dict.fromkeys(name for vector in vectors for name in vector)))
        merged = combine(base, vectors, [args.merge_alpha] * len(vectors))
        for t, task in enumerate(tasks):
            result = loss_barrier(task, merged, combine(base, [vectors[t]], [1.0]), gammas=gammas)
            results[t][label] = result
            outputs.table("barrier", f"barrier_{label}_{task.name}", result,
                          {f"{label}/{task.name}/barrier": result.summary["barrier"]})  # fmt: skip
    for task, by_family in zip(tasks, results):
        outputs.figure("barrier", plot_loss_barrier(by_family, outputs.folder / f"barrier_{task.name}.png"))


def run_hessian(args, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    for t, task in enumerate(tasks):
        results = {}
        for label, vectors in families.items():
            result = hessian_eigenvalues_along_line(
                task, vectors[t], gammas=args.hessian_gammas, max_iterations=args.hessian_iterations
            )
            results[label] = result
            headline = {f"{label}/{task.name}/lambda_max_at_gamma_{args.hessian_gammas[-1]}":
                        float(result.series["eigenvalue"][-1])}  # fmt: skip
            outputs.table("hessian", f"hessian_{label}_{task.name}", result, headline)
        outputs.figure("hessian", plot_hessian_eigenvalues(results, outputs.folder / f"hessian_{task.name}.png"))


def run_gain(args, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    points = {}
    for label, vectors in families.items():
        result = task_arithmetic_gain(tasks, vectors, alpha=args.merge_alpha)
        outputs.table("gain", f"gain_{label}", result, {f"{label}/mean_gain": result.summary["mean_gain"]})
        try:
            noise = sum(logged_noise_scale(path) for path in args.families[label]) / len(tasks)
        except (FileNotFoundError, ValueError) as error:
            print(f"[analyze] no effective noise scale for family {label!r} ({error}); not in the gain plot.")
            continue
        points[label] = [(noise, result.summary["mean_gain"])]
    if points:
        figure = plot_merge_gain_vs_noise(points, outputs.folder / "gain_vs_noise.png",
                                          ylabel=f"task-arithmetic gain (α = {args.merge_alpha})")  # fmt: skip
        outputs.figure("gain", figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = build_analysis_tasks(
        args.base, args.tasks, split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
        device=args.device,
    )  # fmt: skip
    families = {label: load_task_vectors(args.base, paths, tasks[0].model) for label, paths in args.families.items()}
    outputs = Outputs(Path(args.output_dir))
    runners = {
        "disentanglement": lambda: run_grid_analysis(args, outputs, "disentanglement", tasks, families),
        "landscape": lambda: run_grid_analysis(args, outputs, "landscape", tasks, families),
        "linearity": lambda: run_linearity(args, outputs, tasks, families),
        "barrier": lambda: run_barrier(args, outputs, tasks, families),
        "hessian": lambda: run_hessian(args, outputs, tasks, families),
        "gain": lambda: run_gain(args, outputs, tasks, families),
    }
    for analysis in args.analyses:
        print(f"[analyze] {analysis} ...", flush=True)
        runners[analysis]()
    summary_path = outputs.write_summary()
    for analysis, entry in outputs.summary.items():
        for name in entry["figures"]:
            print(f"[analyze] {analysis}: {outputs.folder / name}")
    print(f"[analyze] tables and headline numbers: {summary_path}")
    return outputs.summary


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="analyze.py"))
