"""The analysis suite of `recipes/analyze.py`: weight disentanglement, joint-task loss landscape, cross-task
linearity, loss barrier, Hessian eigenvalues and task-arithmetic gain against the effective noise scale, for one or
more families of fine-tunes (one per task), every result written as CSV and JSON and every figure as PNG, with
`summary.json` listing them and their headline numbers."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints import write_atomically
from ..layout import is_task_vector_folder
from ..task_vectors import TaskVector
from .disentanglement import disentanglement_error
from .hessian import hessian_eigenvalues_along_line
from .landscape import joint_loss_landscape, loss_barrier, task_arithmetic_gain
from .linearity import cross_task_linearity
from .noise import logged_noise_scale
from .plots import (
    plot_grid,
    plot_hessian_eigenvalues,
    plot_linearity,
    plot_loss_barrier,
    plot_merge_gain_vs_noise,
)
from .results import GridResult, coefficient_grid
from .tasks import AnalysisTask, build_analysis_tasks
from .weights import align_to_model, combine, current_weights

logger = logging.getLogger(__name__)

ANALYSES = ("disentanglement", "landscape", "linearity", "barrier", "hessian", "gain")
SUMMARY_FILE = "summary.json"


@dataclass
class AnalysisArguments:
    """What to analyse (the pre-trained model, the tasks, the families of fine-tunes), and how finely."""

    base: str = field(metadata={"help": "Pre-trained model folder or Hub id (theta_0)."})
    tasks: list[str] = field(metadata={"help": "Registered task names, one per fine-tune of each family."})
    output_dir: str = field(metadata={"help": "Folder for the CSV/JSON tables and PNG figures."})
    finetuned: list[str] | None = field(
        default=None, metadata={"help": "One family of fine-tuned model or task-vector folders (or Hub ids)."}
    )
    label: str = field(default="finetuned", metadata={"help": "Name of the --finetuned family in tables and figures."})
    # Each --family adds one list [LABEL, PATH, ...] (argparse's append; HfArgumentParser types the items).
    family: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A named family of fine-tunes, one per task; repeat to compare families.",
            "action": "append",
            "metavar": ("LABEL", "PATH"),
        },
    )
    analyses: list[str] = field(
        default_factory=lambda: list(ANALYSES), metadata={"help": "What to compute.", "choices": list(ANALYSES)}
    )
    pair: list[int] = field(
        default_factory=lambda: [0, 1],
        metadata={"help": "Indices (into tasks) of the pair for the grid and linearity analyses."},
    )
    split: str = field(default="test", metadata={"help": "Data split to evaluate on."})
    max_examples: int = field(default=256, metadata={"help": "Examples per task (the first of the split); 0: all."})
    batch_size: int = field(default=64, metadata={"help": "Examples per forward pass."})
    device: str = field(default="cpu", metadata={"help": "Device of the models."})
    grid_points: int = field(default=21, metadata={"help": "Points per axis of the coefficient grid."})
    grid_range: list[float] = field(
        default_factory=lambda: [-0.5, 1.5], metadata={"help": "MIN MAX of the coefficient grid."}
    )
    other_alpha: float = field(default=0.3, metadata={"help": "Coefficient of the non-pair task vectors."})
    merge_alpha: float = field(
        default=0.3, metadata={"help": "Task-arithmetic coefficient of the merged model (loss barrier, gain)."}
    )
    ctl_lambda: float = field(default=0.3, metadata={"help": "lambda of cross-task linearity (Eq. 12)."})
    layers: list[str] | None = field(
        default=None, metadata={"help": "Module names for cross-task linearity (default: all blocks)."}
    )
    barrier_points: int = field(default=11, metadata={"help": "Points on the merged -> task model line."})
    hessian_gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    hessian_iterations: int = field(
        default=20, metadata={"help": "Lanczos restarts at most for lambda_max (each ~15 Hessian-vector products)."}
    )
    families: dict[str, list[str]] = field(init=False)  # label -> one fine-tune per task

    def __post_init__(self):
        self.families = {self.label: list(self.finetuned)} if self.finetuned else {}
        for label, *paths in self.family:
            if label in self.families:
                raise ValueError(f"family {label!r} is given twice.")
            self.families[label] = paths
        if not self.families:
            raise ValueError("Give the fine-tuned models with --finetuned or --family.")
        if len(self.tasks) < 2:
            raise ValueError(f"tasks: the analyses need at least two tasks, got {self.tasks}.")
        for label, paths in self.families.items():
            if len(paths) != len(self.tasks):
                raise ValueError(f"family {label!r} has {len(paths)} fine-tunes for {len(self.tasks)} tasks.")
        if len(self.pair) != 2 or self.pair[0] == self.pair[1] or not all(0 <= i < len(self.tasks) for i in self.pair):
            raise ValueError(f"pair {self.pair} must be two different task indices below {len(self.tasks)}.")
        if len(self.grid_range) != 2:
            raise ValueError(f"grid_range must be MIN MAX, got {self.grid_range}.")


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
        return write_atomically(self.folder / SUMMARY_FILE, lambda f: f.write(text + "\n"))


def _grid_settings(args: AnalysisArguments, vectors: list[dict]) -> list[tuple[str, list[dict]]]:
    """The pair alone (xi, two-task landscape), and with the other task vectors too when there are any."""
    i, j = args.pair
    pair = [vectors[i], vectors[j]]
    settings = [("pair", pair)]
    others = [vector for k, vector in enumerate(vectors) if k not in (i, j)]
    if others:
        settings.append(("all", pair + others))
    return settings


def run_grid_analysis(
    args: AnalysisArguments, outputs: Outputs, analysis: str, tasks: list[AnalysisTask], families: dict
) -> None:
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


def run_linearity(args: AnalysisArguments, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
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


def run_barrier(args: AnalysisArguments, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    gammas = coefficient_grid(0.0, 1.0, args.barrier_points)
    results: list[dict] = [{} for _ in tasks]  # per task: family -> result
    for label, vectors in families.items():
        # The tasks share the analysed weights (the vectors are aligned to tasks[0].model): one merge per family.
        base = current_weights(tasks[0].model, list(dict.fromkeys(name for vector in vectors for name in vector)))
        merged = combine(base, vectors, [args.merge_alpha] * len(vectors))
        for t, task in enumerate(tasks):
            result = loss_barrier(task, merged, combine(base, [vectors[t]], [1.0]), gammas=gammas)
            results[t][label] = result
            outputs.table(
                "barrier",
                f"barrier_{label}_{task.name}",
                result,
                {f"{label}/{task.name}/barrier": result.summary["barrier"]},
            )
    for task, by_family in zip(tasks, results):
        outputs.figure("barrier", plot_loss_barrier(by_family, outputs.folder / f"barrier_{task.name}.png"))


def run_hessian(args: AnalysisArguments, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    for t, task in enumerate(tasks):
        results = {}
        for label, vectors in families.items():
            result = hessian_eigenvalues_along_line(
                task, vectors[t], gammas=args.hessian_gammas, max_iterations=args.hessian_iterations
            )
            results[label] = result
            headline = {
                f"{label}/{task.name}/lambda_max_at_gamma_{args.hessian_gammas[-1]}": float(
                    result.series["eigenvalue"][-1]
                )
            }
            outputs.table("hessian", f"hessian_{label}_{task.name}", result, headline)
        outputs.figure("hessian", plot_hessian_eigenvalues(results, outputs.folder / f"hessian_{task.name}.png"))


def run_gain(args: AnalysisArguments, outputs: Outputs, tasks: list[AnalysisTask], families: dict) -> None:
    points = {}
    for label, vectors in families.items():
        result = task_arithmetic_gain(tasks, vectors, alpha=args.merge_alpha)
        outputs.table("gain", f"gain_{label}", result, {f"{label}/mean_gain": result.summary["mean_gain"]})
        try:
            noise = sum(logged_noise_scale(path) for path in args.families[label]) / len(tasks)
        except (FileNotFoundError, ValueError) as error:
            logger.warning("no effective noise scale for family %r (%s); not in the gain plot.", label, error)
            continue
        points[label] = [(noise, result.summary["mean_gain"])]
    if points:
        figure = plot_merge_gain_vs_noise(
            points, outputs.folder / "gain_vs_noise.png", ylabel=f"task-arithmetic gain (α = {args.merge_alpha})"
        )
        outputs.figure("gain", figure)


def run_analyses(args: AnalysisArguments) -> dict[str, Any]:
    """Run `args.analyses` on every family; returns the summary written to `<output_dir>/summary.json`: per analysis
    its table and figure file names and headline numbers."""
    tasks = build_analysis_tasks(
        args.base,
        args.tasks,
        split=args.split,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        device=args.device,
    )
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
        logger.info("analysis: %s", analysis)
        runners[analysis]()
    outputs.write_summary()
    return outputs.summary
