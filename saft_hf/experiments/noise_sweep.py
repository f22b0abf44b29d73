"""Merge gain against the effective noise scale (the optimizer-implicit-bias paper, Fig. 1c, 6 and 8): the sweep of
`recipes/noise_sweep.py`.

For every setting of a grid over learning rate x batch size x weight decay, fine-tune from one common pre-trained
model with `saft_hf.finetuning.run` (which logs `noise/effective_scale = lr / (B (1 - beta1)^2)` at every training
log), then measure two merge gains:

- linear interpolation (paper Sec. 3, App. A.1): two runs of `interpolation_task` that differ only in their data
  order (`data_seeds`), merged as `(1 - a) theta_A + a theta_B`; the gain is the accuracy at `interpolation_alpha`
  minus the mean of the two endpoints' accuracies (`saft_hf.analysis.linear_interpolation`);
- task arithmetic (paper Sec. 4.2): one run per task of `arithmetic_tasks`, merged as
  `theta_0 + alpha sum_t tau_t`; the gain is the merged model's accuracy on each task minus that task's own
  fine-tune's, averaged over the tasks (`saft_hf.analysis.task_arithmetic_gain`).

The x-axis is the noise scale each run logged, averaged over its logs and over the setting's runs (with a decaying
schedule it is below the peak `lr / (B (1 - beta1)^2)`).

The whole sweep is repeated for every seed of `seeds` (seed s fine-tunes with `--seed s`, and from its own tiny
model `--tiny_model_seed s` when the configs build one), and each setting's gains are reported as a multi-seed study
reports them (`saft_hf.experiments.statistics`): the gain is the paired difference, seed by seed, between the merged
model's accuracy and the single models' (the endpoints' mean; each task's own fine-tune), so the table gives its mean,
95% Student t interval over the seeds and the seeds where merging won (`gain_statistics`).

Outputs in `output_dir`: `runs/<setting>/seed<s>/<task>_data<d>/` (one fine-tune each, with its
`trainer_state.json`), `runs/<setting>/seed<s>/interpolation.{csv,json}` and `task_arithmetic.{csv,json}`, the table
`merge_gain_vs_noise.{csv,json}` (one row per setting with the statistics over seeds; the JSON also holds every
seed's row), the figures `merge_gain_vs_noise_interpolation.png` (mean gains),
`merge_gain_vs_noise_task_arithmetic.png` and `interpolation_curves.png`, and `noise_sweep_config.yaml` (the resolved
arguments; `--config` it to run the sweep again).

Resumable: a run whose folder holds `noise_sweep_run.json` (written when its fine-tune finished) is reused if it was
trained with the configuration asked for now, and refused with the differing fields otherwise; a run folder
without it (an interrupted fine-tune) is deleted and trained again. The gains are recomputed on every invocation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from ..analysis import (
    AnalysisTask,
    CurveResult,
    build_analysis_tasks,
    coefficient_grid,
    combine,
    current_weights,
    linear_interpolation,
    logged_noise_scale,
    plot_interpolation,
    plot_merge_gain_vs_noise,
    task_arithmetic_gain,
)
from ..analysis.suite import load_task_vectors
from ..config import SAFTConfig
from ..data import get_task
from ..finetuning import RESOLVED_CONFIG_FILE, ModelArguments, parse_finetune_args, public_config
from ..finetuning import run as run_finetune
from ..io import write_atomically
from ..parser import SaftParser
from .statistics import Interval, paired_difference, t_interval

logger = logging.getLogger(__name__)

RUN_COMPLETE_FILE = "noise_sweep_run.json"
TABLE_STEM = "merge_gain_vs_noise"
SWEEP_CONFIG_FILE = "noise_sweep_config.yaml"


@dataclass
class NoiseSweepArguments:
    """The grid, the two merges measured, and where the runs and results go."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Folder of the runs, the table and the figures (required)."}
    )
    finetune_configs: list[str] | None = field(
        default=None,
        metadata={
            "help": "recipes/finetune.py config files every run uses, layered in order (required). In the sweep's "
            "config file, relative paths are relative to that file."
        },
    )
    learning_rates: list[float] | None = field(default=None, metadata={"help": "Peak learning rates of the grid."})
    batch_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "Samples per optimizer step of the grid (per-device batch x gradient accumulation x processes)."
        },
    )
    weight_decays: list[float] | None = field(default=None, metadata={"help": "Weight decays of the grid."})
    interpolation_task: str | None = field(
        default=None, metadata={"help": "Task whose two runs (one per data seed) are linearly interpolated."}
    )
    arithmetic_tasks: list[str] | None = field(
        default=None, metadata={"help": "Two or more tasks whose task vectors are merged by task arithmetic."}
    )
    data_seeds: list[int] = field(
        default_factory=lambda: [0, 1],
        metadata={
            "help": "The two data orders (TrainingArguments.data_seed) of the interpolated runs; task-arithmetic "
            "runs use the first, so the interpolation task's first run serves both merges when it is one of them."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={
            "help": "Repetitions of the sweep: seed s fine-tunes with --seed s (and --tiny_model_seed s when the "
            "configs build a tiny model); gains are reported with their 95% Student t interval over the seeds."
        },
    )
    interpolation_alpha: float = field(
        default=0.5, metadata={"help": "Interpolation coefficient a of the merged model (the paper uses 0.5)."}
    )
    interpolation_points: int = field(
        default=11, metadata={"help": "Evenly spaced coefficients in [0, 1] of the saved interpolation curve."}
    )
    arithmetic_alpha: float = field(
        default=0.5, metadata={"help": "Task-arithmetic coefficient alpha, shared by every task vector."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split the merged and single models are scored on."})
    max_eval_examples: int = field(
        default=0, metadata={"help": "Score on the first N examples of eval_split of each task; 0 for all."}
    )
    eval_batch_size: int = field(default=128, metadata={"help": "Batch size of the scoring."})
    device: str = field(default="cpu", metadata={"help": "Device of the scoring (training follows the configs)."})

    def __post_init__(self):
        required = (
            "output_dir",
            "finetune_configs",
            "learning_rates",
            "batch_sizes",
            "weight_decays",
            "interpolation_task",
            "arithmetic_tasks",
        )
        for name in required:
            if not getattr(self, name):
                raise ValueError(f"{name} is required: set it in the --config file or with --{name}.")
        for name in ("learning_rates", "batch_sizes", "weight_decays", "data_seeds", "seeds"):
            _refuse_repeats(name, getattr(self, name))
        if any(value <= 0 for value in self.learning_rates):
            raise ValueError(f"learning_rates must be > 0, got {self.learning_rates}.")
        if any(value < 1 for value in self.batch_sizes):
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}.")
        if any(value < 0 for value in self.weight_decays):
            raise ValueError(f"weight_decays must be >= 0, got {self.weight_decays}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")
        if len(self.data_seeds) != 2:
            raise ValueError(f"data_seeds must be two different seeds, got {self.data_seeds}.")
        if len(self.arithmetic_tasks) < 2 or len(set(self.arithmetic_tasks)) != len(self.arithmetic_tasks):
            raise ValueError(f"arithmetic_tasks must be two or more different tasks, got {self.arithmetic_tasks}.")
        for name in (self.interpolation_task, *self.arithmetic_tasks):
            try:
                get_task(name)
            except KeyError as error:
                raise ValueError(f"interpolation_task/arithmetic_tasks: {error.args[0]}") from None
        if not 0.0 <= self.interpolation_alpha <= 1.0:
            raise ValueError(f"interpolation_alpha must be in [0, 1], got {self.interpolation_alpha}.")
        if self.interpolation_points < 2:
            raise ValueError(f"interpolation_points must be >= 2, got {self.interpolation_points}.")
        if self.max_eval_examples < 0 or self.eval_batch_size < 1:
            raise ValueError("max_eval_examples must be >= 0 and eval_batch_size >= 1.")
        for config in self.finetune_configs:
            if not Path(config).is_file():
                raise ValueError(f"finetune_configs: {config} is not a file.")


def _refuse_repeats(name: str, values: list) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated values: {values}.")


def parse_noise_sweep_args(argv: list[str] | None = None, **parser_options: Any) -> NoiseSweepArguments:
    """`--config FILE.yaml` files and flags (which override them), `SaftParser`; in a config file, `finetune_configs`
    are relative to that file."""
    parser = SaftParser(NoiseSweepArguments, paths_relative_to_config=("finetune_configs",), **parser_options)
    args, _ = parser.parse_args_and_config(argv)
    return args


@dataclass(frozen=True)
class Setting:
    """One grid point."""

    learning_rate: float
    batch_size: int
    weight_decay: float

    @property
    def name(self) -> str:
        return f"lr{self.learning_rate:g}_bs{self.batch_size}_wd{self.weight_decay:g}"

    @property
    def line(self) -> str:
        """The figures' line label: what stays fixed while the learning rate varies."""
        return f"B = {self.batch_size}, wd = {self.weight_decay:g}"


@dataclass(frozen=True)
class Run:
    """One fine-tune of the sweep."""

    setting: Setting
    task: str
    data_seed: int
    folder: Path
    seed: int = 0


def grid(args: NoiseSweepArguments) -> list[Setting]:
    settings = [
        Setting(lr, batch, wd) for batch in args.batch_sizes for wd in args.weight_decays for lr in args.learning_rates
    ]
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"Grid values too close to tell apart in run folder names: {names}.")
    return settings


def runs_of(args: NoiseSweepArguments, setting: Setting, seed: int) -> tuple[tuple[Run, Run], tuple[Run, ...]]:
    """The setting's two interpolated runs and its task-arithmetic runs of `seed` (a run both merges need appears
    once)."""
    folder = Path(args.output_dir) / "runs" / setting.name / f"seed{seed}"

    def run(task: str, data_seed: int) -> Run:
        return Run(setting, task, data_seed, folder / f"{task}_data{data_seed}", seed)

    first, second = args.data_seeds
    return (run(args.interpolation_task, first), run(args.interpolation_task, second)), tuple(
        run(task, first) for task in args.arithmetic_tasks
    )


def _config_flags(args: NoiseSweepArguments) -> list[str]:
    return [item for config in args.finetune_configs for item in ("--config", config)]


def finetune_argv(args: NoiseSweepArguments, run: Run, per_device_batch_size: int, builds_model: bool) -> list[str]:
    """The fine-tuning command line of `run` (`saft_hf.finetuning.run`, recipes/finetune.py); `builds_model`: the
    configs build a tiny model from a seed (`tiny_model_seed`), so each seed starts from its own."""
    return [
        *_config_flags(args),
        "--seed",
        str(run.seed),
        *(["--tiny_model_seed", str(run.seed)] if builds_model else []),
        "--task",
        run.task,
        "--learning_rate",
        repr(run.setting.learning_rate),
        "--per_device_train_batch_size",
        str(per_device_batch_size),
        "--weight_decay",
        repr(run.setting.weight_decay),
        "--data_seed",
        str(run.data_seed),
        "--output_dir",
        str(run.folder),
    ]


def common_finetune_arguments(args: NoiseSweepArguments) -> tuple[ModelArguments, SAFTConfig]:
    """What the finetune configs set for every run (the model, gradient accumulation, processes)."""
    model_args, _, training_args, _ = parse_finetune_args(
        [*_config_flags(args), "--task", args.interpolation_task, "--output_dir", str(Path(args.output_dir) / "runs")]
    )
    return model_args, training_args


def per_device_batch_size(batch_size: int, training_args: SAFTConfig) -> int:
    """The per-device batch giving `batch_size` samples per optimizer step under the configs' gradient accumulation
    and the launched processes."""
    per_step = training_args.gradient_accumulation_steps * training_args.world_size
    if batch_size % per_step:
        raise ValueError(
            f"batch_sizes: {batch_size} samples per step cannot be split over gradient_accumulation_steps "
            f"{training_args.gradient_accumulation_steps} x {training_args.world_size} process(es)."
        )
    return batch_size // per_step


def _differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    return [
        f"{name}: trained {recorded.get(name)!r}, asked {requested.get(name)!r}"
        for name in sorted(set(recorded) | set(requested))
        if recorded.get(name) != requested.get(name)
    ]


def ensure_trained(args: NoiseSweepArguments, run: Run, batch: int, builds_model: bool, state: PartialState) -> bool:
    """Fine-tune `run` unless its folder holds a finished run of the same configuration; True if it trained."""
    argv = finetune_argv(args, run, batch, builds_model)
    _, _, _, resolved = parse_finetune_args(argv)
    requested = public_config(resolved)
    if (run.folder / RUN_COMPLETE_FILE).is_file():
        recorded = yaml.safe_load((run.folder / RESOLVED_CONFIG_FILE).read_text())
        differences = _differences(recorded, requested)
        if differences:
            raise ValueError(
                f"Run folder {run.folder} holds a fine-tune of another configuration ({'; '.join(differences)}). "
                "Delete it or choose another output_dir."
            )
        return False
    if state.is_main_process and run.folder.exists():
        logger.warning("%s holds an unfinished run: training it again.", run.folder)
        shutil.rmtree(run.folder)
    state.wait_for_everyone()
    if state.is_main_process:
        logger.info("fine-tuning %s", run.folder)
    run_finetune(argv)
    if state.is_main_process:
        record = {
            "task": run.task,
            "data_seed": run.data_seed,
            "seed": run.seed,
            **asdict(run.setting),
            "noise_scale": logged_noise_scale(run.folder),
        }
        text = json.dumps(record, indent=2)
        write_atomically(run.folder / RUN_COMPLETE_FILE, lambda f: f.write(text + "\n"))
    state.wait_for_everyone()
    return True


def base_model_of(run: Run, model_name_or_path: str | None) -> str:
    """The pre-trained model the run started from: the configs' model, or the tiny model it built from a seed."""
    return model_name_or_path or str(run.folder / "pretrained")


def with_prepared_batches(task: AnalysisTask) -> AnalysisTask:
    """`task` with its evaluation batches decoded and preprocessed once, kept in memory on the scoring device: every
    model of the sweep is scored on the same examples, and image preprocessing costs more than a tiny model's
    forward pass."""
    batches = list(task.batches())
    return replace(task, batches=lambda: batches)


def measure_setting(
    args: NoiseSweepArguments,
    setting: Setting,
    seed: int,
    tasks: dict[str, AnalysisTask],
    model_name_or_path: str | None,
) -> tuple[dict[str, Any], CurveResult, CurveResult]:
    """The row of one setting and seed, with its interpolation curve and per-task task-arithmetic result (`tasks`
    hold the seed's pre-trained model: the runs' common start)."""
    interpolated, arithmetic = runs_of(args, setting, seed)
    model = tasks[args.interpolation_task].model
    vectors = {
        run.folder: load_task_vectors(base_model_of(run, model_name_or_path), [str(run.folder)], model)[0]
        for run in (*interpolated, *arithmetic)
    }
    theta_0 = current_weights(model, list(dict.fromkeys(name for vector in vectors.values() for name in vector)))
    model_a, model_b = (combine(theta_0, [vectors[run.folder]], [1.0]) for run in interpolated)
    curve = linear_interpolation(
        tasks[args.interpolation_task],
        model_a,
        model_b,
        alphas=coefficient_grid(0.0, 1.0, args.interpolation_points),
        merge_alpha=args.interpolation_alpha,
    )
    merged = task_arithmetic_gain(
        [tasks[run.task] for run in arithmetic],
        [vectors[run.folder] for run in arithmetic],
        alpha=args.arithmetic_alpha,
        base=theta_0,
    )
    noise_scales = [logged_noise_scale(folder) for folder in vectors]
    single = merged.series["accuracy_single"]
    row = {
        "setting": setting.name,
        "seed": seed,
        **asdict(setting),
        "noise_scale": sum(noise_scales) / len(noise_scales),
        "interpolation_accuracy_a": curve.summary["accuracy_single_a"],
        "interpolation_accuracy_b": curve.summary["accuracy_single_b"],
        "interpolation_accuracy_single": (curve.summary["accuracy_single_a"] + curve.summary["accuracy_single_b"]) / 2,
        "interpolation_accuracy_merged": curve.summary["accuracy_merged"],
        "interpolation_accuracy_gain": curve.summary["accuracy_gain"],
        "interpolation_loss_gain": curve.summary["loss_gain"],
        "arithmetic_accuracy_single": float(single.mean()),
        "arithmetic_accuracy_merged": float(merged.series["accuracy_merged"].mean()),
        "arithmetic_accuracy_gain": merged.summary["mean_gain"],
        "arithmetic_normalized_accuracy": float((merged.series["accuracy_merged"] / single).mean()),
    }
    return row, curve, merged


MERGES = ("interpolation", "arithmetic")  # the per-seed rows' column prefixes of the two merges


def gain_statistics(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's row over its seeds' rows (`measure_setting`): mean noise scale, and per merge the mean merged
    accuracy and the gain as the paired difference of merged minus single accuracy over the seeds (mean, 95% Student
    t interval, NaN bounds with one seed, and the seeds where the merge beat the single models)."""
    first = per_seed[0]
    row = {name: first[name] for name in ("setting", "learning_rate", "batch_size", "weight_decay")}
    row |= {"seeds": len(per_seed), "noise_scale": t_interval([r["noise_scale"] for r in per_seed]).mean}
    for merge in MERGES:
        merged = {r["seed"]: r[f"{merge}_accuracy_merged"] for r in per_seed}
        gain = paired_difference(merged, {r["seed"]: r[f"{merge}_accuracy_single"] for r in per_seed})
        row |= {
            f"{merge}_accuracy_merged": t_interval(list(merged.values())).mean,
            f"{merge}_accuracy_gain": gain.interval.mean,
            f"{merge}_accuracy_gain_low": gain.interval.low,
            f"{merge}_accuracy_gain_high": gain.interval.high,
            f"{merge}_accuracy_gain_wins": gain.wins,
        }
    row["interpolation_loss_gain"] = t_interval([r["interpolation_loss_gain"] for r in per_seed]).mean
    row["arithmetic_normalized_accuracy"] = t_interval([r["arithmetic_normalized_accuracy"] for r in per_seed]).mean
    return row


def write_table(
    rows: list[dict[str, Any]], args: NoiseSweepArguments, runs: list[dict[str, Any]], per_seed: list[dict[str, Any]]
) -> Path:
    """`merge_gain_vs_noise.csv` (one row per setting, `gain_statistics`) and `.json` (those rows, every seed's row,
    the sweep's arguments, every run)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    folder = Path(args.output_dir)
    csv_path = write_atomically(folder / f"{TABLE_STEM}.csv", lambda f: f.write(buffer.getvalue()))
    document = {"arguments": asdict(args), "rows": rows, "per_seed": per_seed, "runs": runs}
    text = json.dumps(document, indent=2, default=lambda value: None if value != value else value)
    write_atomically(folder / f"{TABLE_STEM}.json", lambda f: f.write(text + "\n"))
    return csv_path


def plot_gains(rows: list[dict[str, Any]], settings: list[Setting], args: NoiseSweepArguments) -> list[Path]:
    """Both gains (the mean over seeds) against the noise scale, one line per batch size and weight decay."""
    figures = []
    for merge, stem, ylabel in (
        ("interpolation", "interpolation", f"linear-interpolation accuracy gain (a = {args.interpolation_alpha:g})"),
        ("arithmetic", "task_arithmetic", f"task-arithmetic accuracy gain (α = {args.arithmetic_alpha:g})"),
    ):
        ylabel += f", mean of {len(args.seeds)} seed(s)"
        points: dict[str, list[tuple[float, float]]] = {}
        for setting, row in zip(settings, rows):
            points.setdefault(setting.line, []).append((row["noise_scale"], row[f"{merge}_accuracy_gain"]))
        path = Path(args.output_dir) / f"{TABLE_STEM}_{stem}.png"
        figures.append(plot_merge_gain_vs_noise(points, path, ylabel=ylabel))
    return figures


def format_table(rows: list[dict[str, Any]]) -> str:
    """The headline columns as a Markdown table: accuracies in %, gains in pp with their 95% interval over the seeds
    and the seeds won."""
    header = ["setting", "noise_scale", "seeds"] + [f"{merge} {what}" for merge in MERGES for what in ("acc", "gain")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["setting"], f"{row['noise_scale']:.3g}", str(row["seeds"])]
        for merge in MERGES:
            name = f"{merge}_accuracy_gain"
            gain = Interval(*(100 * row[name + suffix] for suffix in ("", "_low", "_high")), row["seeds"])
            cells += [
                f"{100 * row[f'{merge}_accuracy_merged']:.2f}",
                f"{gain.format(signed=True)} pp, {row[name + '_wins']}/{row['seeds']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_noise_sweep(args: NoiseSweepArguments) -> dict[str, Any]:
    """Train what is missing, measure every setting and seed, write the tables and figures; returns the rows (over
    seeds, `gain_statistics`), every seed's row, the runs trained now, every run and the files written (on the main
    process; the others return no rows)."""
    settings = grid(args)
    model_args, training_args = common_finetune_arguments(args)
    batches = {batch: per_device_batch_size(batch, training_args) for batch in args.batch_sizes}
    builds_model = model_args.tiny_model_seed is not None
    state = PartialState()  # the one the fine-tunes' TrainingArguments set up
    output_dir = Path(args.output_dir)
    trained, runs = [], []
    for seed in args.seeds:
        for setting in settings:
            interpolated, arithmetic = runs_of(args, setting, seed)
            for run in dict.fromkeys((*interpolated, *arithmetic)):
                if ensure_trained(args, run, batches[setting.batch_size], builds_model, state):
                    trained.append(str(run.folder))
                runs.append(
                    {
                        "folder": str(run.folder),
                        "task": run.task,
                        "data_seed": run.data_seed,
                        "seed": seed,
                        "setting": setting.name,
                        "noise_scale": logged_noise_scale(run.folder),
                    }
                )
    if not state.is_main_process:
        return {"rows": [], "per_seed": [], "trained": trained, "runs": runs, "files": []}

    task_names = list(dict.fromkeys((args.interpolation_task, *args.arithmetic_tasks)))
    per_seed, curves = [], {}
    for seed in args.seeds:
        # The seed's pre-trained model (every run of a seed starts from it): the analysis model and its heads.
        base = base_model_of(runs_of(args, settings[0], seed)[0][0], model_args.model_name_or_path)
        analysis_tasks = build_analysis_tasks(
            base,
            task_names,
            split=args.eval_split,
            max_examples=args.max_eval_examples or None,
            batch_size=args.eval_batch_size,
            device=args.device,
        )
        tasks = {name: with_prepared_batches(task) for name, task in zip(task_names, analysis_tasks)}
        for setting in settings:
            logger.info("measuring the merges of %s, seed %d", setting.name, seed)
            row, curve, merged = measure_setting(args, setting, seed, tasks, model_args.model_name_or_path)
            seed_folder = output_dir / "runs" / setting.name / f"seed{seed}"
            curve.save(seed_folder, "interpolation")
            merged.save(seed_folder, "task_arithmetic")
            per_seed.append(row)
            curves.setdefault(setting.name, curve)  # the figure of curves shows the first seed's
    rows = [gain_statistics([row for row in per_seed if row["setting"] == setting.name]) for setting in settings]
    config_text = yaml.safe_dump(asdict(args), sort_keys=False)
    files = [write_table(rows, args, runs, per_seed), *plot_gains(rows, settings, args)]
    files.append(write_atomically(output_dir / SWEEP_CONFIG_FILE, lambda f: f.write(config_text)))
    title = f"{args.interpolation_task}: (1 − a) θ_A + a θ_B of two data orders (seed {args.seeds[0]})"
    files.append(plot_interpolation(curves, output_dir / "interpolation_curves.png", title=title))
    return {
        "rows": rows,
        "per_seed": per_seed,
        "trained": trained,
        "runs": runs,
        "files": [str(path) for path in files],
    }
