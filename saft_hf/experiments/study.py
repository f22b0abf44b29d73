"""A multi-seed study: run one experiment per seed and report each family's merges with intervals.

Each seed is a whole experiment (`run_experiment`): its own pre-training or initialisation (done by the caller's
`setup`), data order, fine-tunes, merges and scores, in `<output_dir>/seed_<s>/`. Per family and merge method the
study reports, over the seeds (`saft_hf.experiments.statistics`: Student t 95% intervals):

- the family's own fine-tune accuracy (average over tasks), next to its merges: a family whose fine-tunes are more
  than `parity_margin` points below the baseline's is flagged, since its merges then do not test the claim;
- the merged model's absolute and normalized accuracy (average over tasks);
- the paired difference to the baseline family on the same seed, its interval and the seeds it won, with a
  decision: better / worse (the interval excludes 0), or undecided, saying when the interval is too wide to detect
  an effect of `effect` points;
- the family's fine-tuning time (sum of the Trainer's `train_runtime` over its tasks);
- for each searched merge, also its test accuracy averaged over the chosen alpha and its grid neighbours
  (`grid_neighbour_scores`, setting `SMOOTHED`): less noise from the choice, so tighter paired intervals.

The summary records each family's resolved fine-tuning budget and SAM settings (`finetune_settings`), which the
README text states.

Outputs: `study.md` / `study.csv` (the table), `study_summary.json` (everything, with the verdict sentences),
`study_merged.png` (merged accuracy and the paired difference with error bars, method x family) and
`study_cost_gain.png` (each family's gain over the baseline against its fine-tuning time relative to the baseline's,
`cost_gain_points`; the points are in the summary too). The verdict is computed from the numbers.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import platform
import queue
import resource
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ..evaluation import evaluate_model
from ..finetuning import RESOLVED_CONFIG_FILE
from ..io import write_atomically
from ..merging import MergeConfig, get_method
from ..merging.engine import MergePlan
from ..merging.finetuning import MergedStateDict
from ..merging.search import paper_grid
from .config import ExperimentConfig
from .pipeline import (
    COMPLETED_RESULTS_FILE,
    SEARCHED,
    ExperimentResult,
    Scorer,
    merged_parameters,
    run_experiment,
)
from .statistics import CONFIDENCE, Interval, PairedDifference, paired_difference, t_interval
from .tables import FINETUNED, PRETRAINED, Score, summary_rows, to_csv, to_markdown

SeedSetup = Callable[[int], ExperimentConfig]  # prepares a seed (e.g. pre-trains its model), returns its config
SUMMARY_FILE = "study_summary.json"
INTERVAL_METHOD = "Student t on the per-seed values (two-sided 95%)"
SMOOTHED = "searched, ±1 grid step"  # the setting of `grid_neighbour_scores`
DEFAULT_EFFECT = 1.0  # points of accuracy: the paper's gain for task arithmetic on ViT-B/32 is +1.2


@dataclass
class SeedResult:
    """One seed's experiment: its scores and each family's fine-tuning time (seconds, summed over its tasks)."""

    seed: int
    scores: list[Score]
    training_seconds: dict[str, float]
    output_dir: str
    finetune_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # family: `finetune_settings(...)`


@dataclass
class StudyRow:
    """One family under one merge method (or FINETUNED), summarised over the seeds (accuracies in %)."""

    method: str
    setting: str
    family: str
    finetuned: Interval
    merged: Interval
    merged_normalized: Interval
    training_seconds: Interval
    difference: PairedDifference | None = None  # merged minus the baseline's, per seed
    difference_normalized: PairedDifference | None = None
    finetuned_difference: PairedDifference | None = None
    notes: list[str] = field(default_factory=list)


def quiet_console() -> None:
    """Only warnings and errors from loggers, no per-load progress bars, no library warnings: a study's console
    shows its own progress bar and tables (the process log level, not `basicConfig(INFO)`)."""
    import datasets
    import transformers

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes (the seed workers): with other
    jobs on the machine, the wall time says little, the CPU time what the study cost."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def training_seconds(config: ExperimentConfig) -> dict[str, float]:
    """Each family's fine-tuning time: the sum over tasks of the Trainer's `train_runtime` (NaN for families that
    pull existing fine-tunes)."""
    seconds = {}
    for family in config.families:
        total = 0.0
        for task in config.tasks:
            results = config.output_path / "finetuned" / family.name / task / COMPLETED_RESULTS_FILE
            total += json.loads(results.read_text())["train_runtime"] if results.is_file() else math.nan
        seconds[family.name] = total
    return seconds


FINETUNE_SETTINGS = (
    "max_steps",
    "warmup_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "sam_rho",
    "sam_eta",
    "sam_interval",
)


def finetune_settings(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Each family's training budget and SAM settings as its fine-tunes resolved them (the first task's
    `finetune_config.yaml`: the same for every task of a family), with its `sam_mode`."""
    settings = {}
    for family in config.families:
        path = config.output_path / "finetuned" / family.name / config.tasks[0] / RESOLVED_CONFIG_FILE
        resolved = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        settings[family.name] = {
            "sam_mode": family.sam_mode,
            **{name: resolved[name] for name in FINETUNE_SETTINGS if name in resolved},
        }
    return settings


def grid_neighbour_scores(config: ExperimentConfig, result: ExperimentResult) -> list[Score]:
    """Each searched merge's test accuracy averaged over the alpha chosen on validation and its neighbours on the
    search grid (the grid values either side of it, other parameters as chosen): setting `SMOOTHED`.

    The choice is still made on validation; averaging the test scores around it removes most of the noise of the
    choice itself (a validation split of ~70-140 images often tips between neighbouring alphas whose test scores
    differ by points), so the paired differences of the study are more precise. The searched rows stay the paper's
    protocol; these rows estimate the same merge's accuracy with less selection noise."""
    scorer = Scorer(config)
    tested = {(s.family, s.method, s.setting, s.task): s.accuracy for s in result.scores}
    smoothed = []
    for (family, method, setting), folder in result.merged.items():
        coefficient = get_method(method).coefficient
        grid = config.search_grid.get(method) or (paper_grid(method) if coefficient else None)
        if setting != SEARCHED or not grid or coefficient not in grid:
            continue
        chosen = merged_parameters(folder)
        values = sorted(grid[coefficient])
        index = values.index(chosen[coefficient])
        neighbours = values[max(0, index - 1) : index] + values[index + 1 : index + 2]
        recipe = {
            "base_model": config.base_model,
            "method": method,
            "parameters": {},
            "output_dir": str(folder),
            "models": [str(result.task_vectors[family][task]) for task in config.tasks],
        }
        plan = MergePlan(MergeConfig.coerce(recipe))
        per_task = {task: [tested[(family, method, setting, task)]] for task in config.tasks}
        for value in neighbours:
            merged = MergedStateDict(plan.merged_tensors({**chosen, coefficient: value}), plan.finetune_mode)
            for task in config.tasks:
                scored = evaluate_model(config.base_model, task, "test", state_dict=merged, **scorer.options(task))
                per_task[task].append(scored["accuracy"])
        smoothed += [
            Score(
                family,
                method,
                SMOOTHED,
                task,
                math.fsum(accuracies) / len(accuracies),
                {**chosen, f"{coefficient}_averaged": [chosen[coefficient], *neighbours]},
            )
            for task, accuracies in per_task.items()
        ]
    return smoothed


def run_seed(setup: SeedSetup, seed: int, events: Any = None, *, smooth: bool = True) -> SeedResult:
    """One seed's experiment (with `grid_neighbour_scores` when `smooth`); `events` (a queue, or a callable) is
    told each finished stage."""
    report = events.put if hasattr(events, "put") else events
    config = setup(seed)
    if report is not None:
        report(f"seed {seed}: prepared")
    on_stage = None if report is None else lambda stage: report(f"seed {seed}: {stage}")
    result = run_experiment(config, quiet=True, on_stage=on_stage)
    scores = result.scores + (grid_neighbour_scores(config, result) if smooth else [])
    return SeedResult(seed, scores, training_seconds(config), str(config.output_path), finetune_settings(config))


def run_seeds(
    setup: SeedSetup, seeds: Sequence[int], *, stages_per_seed: int, processes: int = 1, progress: bool = True
) -> list[SeedResult]:
    """Every seed's experiment, `processes` at a time (each in its own spawned process with one torch thread:
    on a CPU, tiny models train faster as parallel single-threaded runs). `setup` must be importable
    (module-level) when `processes` > 1. One progress bar counts the stages of all seeds."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds: need distinct seeds, got {list(seeds)}")
    bar = tqdm(
        total=len(seeds) * (stages_per_seed + 1), desc="study", unit="stage", disable=not progress, dynamic_ncols=True
    )

    def advance(stage: str) -> None:
        bar.set_postfix_str(stage, refresh=False)
        bar.update()

    try:
        if processes <= 1:
            return [run_seed(setup, seed, advance) for seed in seeds]
        context = multiprocessing.get_context("spawn")  # torch and fork do not mix
        with (
            context.Manager() as manager,
            ProcessPoolExecutor(min(processes, len(seeds)), mp_context=context, initializer=_worker_init) as pool,
        ):
            events = manager.Queue()
            futures = [pool.submit(run_seed, setup, seed, events) for seed in seeds]
            while not all(future.done() for future in futures) or not events.empty():
                try:
                    advance(events.get(timeout=0.2))
                except queue.Empty:
                    pass
            return [future.result() for future in futures]
    finally:
        bar.close()


def _worker_init() -> None:
    import torch

    quiet_console()
    torch.set_num_threads(1)


# ---- statistics over seeds ---------------------------------------------------------------------------------------


def _averages(seeds: Sequence[SeedResult], tasks: Sequence[str]) -> dict[tuple[str, str, str], dict[int, tuple]]:
    """{(method, setting, family): {seed: (average accuracy %, average normalized accuracy %)}}."""
    values: dict[tuple[str, str, str], dict[int, tuple]] = {}
    for result in seeds:
        for row in summary_rows([s for s in result.scores if s.method != PRETRAINED], tasks):
            values.setdefault((row["method"], row["setting"], row["family"]), {})[result.seed] = (
                row["avg"],
                row["avg (norm)"],
            )
    return values


def summarize(
    seeds: Sequence[SeedResult],
    tasks: Sequence[str],
    baseline: str,
    *,
    parity_margin: float = 1.0,
    confidence: float = CONFIDENCE,
) -> list[StudyRow]:
    """One row per merge method, setting and family (fine-tunes first), with the seeds' intervals and the paired
    differences to `baseline` (see the module docstring)."""
    values = _averages(seeds, tasks)
    families = list(dict.fromkeys(family for (_, _, family) in values))
    if baseline not in families:
        raise ValueError(f"baseline: {baseline!r} is not a family of the study ({', '.join(families)})")
    finetuned = {
        family: {seed: pair[0] for seed, pair in values[(FINETUNED, "", family)].items()} for family in families
    }
    seconds = {family: {r.seed: r.training_seconds.get(family, math.nan) for r in seeds} for family in families}
    rows = []
    for (method, setting, family), per_seed in values.items():
        merged = {seed: pair[0] for seed, pair in per_seed.items()}
        normalized = {seed: pair[1] for seed, pair in per_seed.items()}
        row = StudyRow(
            method,
            setting,
            family,
            t_interval(list(finetuned[family].values()), confidence),
            t_interval(list(merged.values()), confidence),
            t_interval(list(normalized.values()), confidence),
            t_interval(list(seconds[family].values()), confidence),
        )
        if family != baseline:
            base = values[(method, setting, baseline)]
            row.difference = paired_difference(merged, {s: pair[0] for s, pair in base.items()}, confidence)
            row.difference_normalized = paired_difference(
                normalized, {s: pair[1] for s, pair in base.items()}, confidence
            )
            row.finetuned_difference = paired_difference(finetuned[family], finetuned[baseline], confidence)
            if row.finetuned_difference.interval.mean < -parity_margin:
                row.notes.append(
                    f"fine-tunes {-row.finetuned_difference.interval.mean:.1f} pp below {baseline}'s: "
                    "its merges do not test the claim"
                )
        rows.append(row)
    return rows


def decision(difference: PairedDifference, effect: float = DEFAULT_EFFECT) -> str:
    """What the paired interval supports, in words."""
    interval = difference.interval
    if interval.n < 2:
        return "one seed: no interval"
    if interval.low > 0:
        return "better (interval above 0)"
    if interval.high < 0:
        return "worse (interval below 0)"
    if interval.half_width > effect:
        width = interval.half_width
        return f"undecided: the interval spans 0 and is too wide (±{width:.1f} pp) to detect {effect:g} pp"
    return f"no difference detected: the interval spans 0 (±{interval.half_width:.1f} pp)"


def _label(method: str, setting: str) -> str:
    return method if setting in ("", "-") else f"{method} ({setting})"


def verdicts(rows: Sequence[StudyRow], baseline: str, effect: float = DEFAULT_EFFECT) -> list[str]:
    """One sentence per merge and family compared with the baseline, from the numbers."""
    sentences = []
    for row in rows:
        if row.difference is None or row.method == FINETUNED:
            continue
        d = row.difference
        sentence = (
            f"{_label(row.method, row.setting)}: {row.family} - {baseline} = {d.interval.format(signed=True)} "
            f"pp, {d.wins}/{d.seeds} seeds; {decision(d, effect)}"
        )
        sentences.append(sentence + "".join(f"; {note}" for note in row.notes) + ".")
    return sentences


def table_rows(rows: Sequence[StudyRow]) -> list[dict[str, object]]:
    """The study table for reading: means with their 95% intervals, as text."""
    table = []
    for row in rows:
        merged = row.method != FINETUNED
        table.append(
            {
                "method": _label(row.method, row.setting) if merged else FINETUNED,
                "family": row.family,
                "seeds": str(row.merged.n),
                "fine-tuned acc": row.finetuned.format(),
                "merged acc": row.merged.format() if merged else "",
                "merged norm": row.merged_normalized.format() if merged else "",
                "Δ vs baseline": "" if row.difference is None else row.difference.interval.format(signed=True),
                "wins": "" if row.difference is None else f"{row.difference.wins}/{row.difference.seeds}",
                "train s": row.training_seconds.format(),
                "note": "; ".join(row.notes),
            }
        )
    return table


def _interval_record(interval: Interval | None) -> dict[str, float] | None:
    return (
        None
        if interval is None
        else {
            "mean": interval.mean,
            "low": interval.low,
            "high": interval.high,
            "half_width": interval.half_width,
            "n": interval.n,
        }
    )


def _difference_record(difference: PairedDifference | None) -> dict[str, Any] | None:
    if difference is None:
        return None
    return {
        **_interval_record(difference.interval),
        "wins": difference.wins,
        "per_seed": {str(seed): value for seed, value in difference.differences.items()},
    }


def row_records(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    """The rows as numbers (the CSV and the JSON summary)."""
    return [
        {
            "method": r.method,
            "setting": r.setting,
            "family": r.family,
            "finetuned": _interval_record(r.finetuned),
            "merged": _interval_record(r.merged),
            "merged_normalized": _interval_record(r.merged_normalized),
            "training_seconds": _interval_record(r.training_seconds),
            "difference": _difference_record(r.difference),
            "difference_normalized": _difference_record(r.difference_normalized),
            "finetuned_difference": _difference_record(r.finetuned_difference),
            "notes": r.notes,
        }
        for r in rows
    ]


def _flat(record: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, value in record.items():
        if isinstance(value, Mapping) and name != "per_seed":
            flat |= _flat(value, f"{prefix}{name}_")
        elif name != "per_seed":
            flat[prefix + name] = "; ".join(value) if isinstance(value, list) else ("" if value is None else value)
    return flat


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def write_study(
    folder: Path,
    rows: Sequence[StudyRow],
    seeds: Sequence[SeedResult],
    *,
    baseline: str,
    effect: float = DEFAULT_EFFECT,
    headline: tuple[str, str] = ("task_arithmetic", "searched"),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the table (Markdown, CSV), the JSON summary and the figures; return the summary. The headline verdict
    is the first family's compared with the baseline under the `headline` (method, setting)."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences = verdicts(rows, baseline, effect)
    records = row_records(rows)
    title = f"Study over {len(seeds)} seeds: mean [95% interval] in %, Δ paired with {baseline} on the same seed"
    markdown = to_markdown(table_rows(rows), title)
    write_atomically(folder / "study.md", lambda f: f.write(markdown))
    flat = [_flat(record) for record in records]
    columns = list(dict.fromkeys(name for row in flat for name in row))  # the baseline has no difference columns
    csv_text = to_csv([{name: row.get(name, "") for name in columns} for row in flat])
    write_atomically(folder / "study.csv", lambda f: f.write(csv_text))
    first = next((r for r in rows if r.difference is not None and (r.method, r.setting) == headline), None)
    summary = {
        "seeds": [result.seed for result in seeds],
        "baseline": baseline,
        "confidence": CONFIDENCE,
        "interval": INTERVAL_METHOD,
        "effect_sought_pp": effect,
        "machine": machine(),
        "headline": None if first is None else verdicts([first], baseline, effect)[0],
        "verdicts": sentences,
        "rows": records,
        "table_markdown": markdown,
        "per_seed_folders": {str(result.seed): result.output_dir for result in seeds},
        "finetune_settings": seeds[0].finetune_settings if seeds else {},
        "cost_gain": {
            "merge": _label(*headline),
            "points": [
                {"family": p.family, "time_ratio": p.time_ratio, "gain": _interval_record(p.gain), "wins": p.wins}
                for p in cost_gain_points(rows, baseline, headline)
            ],
        },
        "figures": [str(path) for path in plot_study(folder, rows, baseline, headline)],
        **(extra or {}),
    }
    text = json.dumps(summary, indent=1, default=lambda value: None if value != value else value)
    write_atomically(folder / SUMMARY_FILE, lambda f: f.write(text))
    return summary


README_HEADING = "## What the demo shows (and does not)"


def readme_section(summary: Mapping[str, Any], summary_path: str) -> str:
    """The README section reporting a committed study run, generated from its JSON summary (never typed by hand):
    the command, machine and seeds, the table, the verdicts, and what the intervals do and do not support."""
    rows = [r for r in summary["rows"] if r["difference"] is not None and r["method"] != FINETUNED]
    kinds = {"better": 0, "worse": 0, "undecided": 0}
    for row in rows:
        low, high = row["difference"]["low"], row["difference"]["high"]
        kinds["better" if low > 0 else "worse" if high < 0 else "undecided"] += 1
    widths = [row["difference"]["half_width"] for row in rows]
    finetuned = [r for r in summary["rows"] if r["method"] == FINETUNED and r["finetuned_difference"] is not None]
    machine = summary["machine"]
    lines = [
        README_HEADING,
        "",
        f"Generated from `{summary_path}`, the summary of `{summary['command']}` (`make demo`'s settings) on "
        f"{machine['cpus']} CPU cores ({machine['platform']}), seeds {summary['seeds'][0]}-{summary['seeds'][-1]}, "
        f"{summary['wall_time_seconds']:.0f} s wall time"
        f"{' (over the 5-minute target)' if summary['wall_time_seconds'] > 300 else ''}"
        + (
            f", {summary['cpu_seconds']:.0f} s CPU time (user + system, all processes)"
            if "cpu_seconds" in summary
            else ""
        )
        + f" (load average at the end "
        f"{', '.join(f'{v:.2f}' for v in machine['load_average'])}). Each seed pre-trains its own tiny CLIP, "
        f"fine-tunes the four digit tasks with {_families_text(summary)}, merges each family and scores the merges on "
        f"the test splits. Intervals: {summary['interval']}; Δ is a family minus {summary['baseline']} on the same "
        "seed, averaged over the four tasks.",
        "",
        summary["table_markdown"].replace("### ", "**", 1).replace("\n", "**\n", 1),
        *[f"- {sentence}" for sentence in summary["verdicts"]],
        "",
        f"What the intervals support: of {len(rows)} merge comparisons, SAFT is better in {kinds['better']}, worse in "
        f"{kinds['worse']} and undecided in {kinds['undecided']} (the interval spans 0); the paired intervals are "
        f"±{min(widths):.1f} to ±{max(widths):.1f} pp wide, against an effect of about "
        f"{summary['effect_sought_pp']:g} pp to detect (the paper's +1.2 pp for task arithmetic on ViT-B/32).",
    ]
    smoothed = {(r["method"], r["family"]): r["difference"]["half_width"] for r in rows if r["setting"] == SMOOTHED}
    searched = {(r["method"], r["family"]): r["difference"]["half_width"] for r in rows if r["setting"] == SEARCHED}
    pairs = [(searched[key], width) for key, width in smoothed.items() if key in searched]
    if pairs:
        lines[-1] += (
            f" Rows '{SMOOTHED}' average each seed's test accuracy over the alpha chosen on validation and "
            "its neighbours on the search grid, which removes the noise of the choice between neighbouring "
            "alphas on a small validation split: their paired intervals are "
            + ", ".join(f"±{new:.1f} pp (searched: ±{old:.1f})" for old, new in pairs)
            + "."
        )
    for row in finetuned:
        d = row["finetuned_difference"]
        lines[-1] += (
            f" The fine-tunes themselves differ by {d['mean']:+.2f} pp [{d['low']:+.2f}, {d['high']:+.2f}] "
            f"({row['family']} - {summary['baseline']})"
            + (
                ", flagged: the merges do not test the claim."
                if row["notes"]
                else ", within the one-point parity margin, so the merges compare experts of similar accuracy"
                + (
                    " (though the interval lies below 0: its experts are still slightly less accurate)."
                    if d["high"] < 0
                    else "."
                )
            )
        )
    lines += [
        "",
        "What it does not show: this is a tiny CLIP on 8x8 digits, not the paper's ViT-B/32 or Flan-T5; an "
        "interval that spans 0 is no evidence of no effect, only that these seeds cannot tell; "
        "`python recipes/demo.py --seeds 10 --config recipes/configs/demo_experiment_study.yaml` adds SAM, "
        "smaller rho and `sam_interval` 4 and more seeds (several times longer); the paper's numbers need "
        "`recipes/vision8.py` and `recipes/glue_t2t.py` on a GPU.",
        "",
        "",
    ]
    return "\n".join(lines)


def _families_text(summary: Mapping[str, Any]) -> str:
    """'plain fine-tuning (`sgd`) and `saft` (ASAM, rho 0.5) for the same 300 steps' from the recorded settings."""
    settings = summary.get("finetune_settings") or {}
    names = []
    for name, family in settings.items():
        if family.get("sam_mode", "none") == "none":
            names.append(f"plain fine-tuning (`{name}`)")
        else:
            rho = f", rho {family['sam_rho']:g}" if "sam_rho" in family else ""
            every = f", every {family['sam_interval']} steps" if family.get("sam_interval", 1) != 1 else ""
            names.append(f"`{name}` ({family['sam_mode'].upper()}{rho}{every})")
    steps = sorted({family["max_steps"] for family in settings.values() if "max_steps" in family})
    budget = (
        f" for the same {steps[0]} steps"
        if len(steps) == 1
        else f" for {', '.join(map(str, steps))} steps"
        if steps
        else ""
    )
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names) or "each family"
    return listed + budget


@dataclass(frozen=True)
class CostGain:
    """One family's point of the cost-gain figure: its fine-tuning time relative to the baseline's and the
    headline merge's paired gain over the baseline (zero, without an interval, for the baseline itself)."""

    family: str
    time_ratio: float  # mean fine-tuning time over seeds / the baseline's
    gain: Interval  # pp
    wins: int | None = None


def cost_gain_points(rows: Sequence[StudyRow], baseline: str, headline: tuple[str, str]) -> list[CostGain]:
    """The data of `study_cost_gain.png`: per family, its time ratio to the baseline and its paired gain under the
    `headline` (method, setting), in the rows' order."""
    chosen = [row for row in rows if (row.method, row.setting) == headline]
    reference = next((row.training_seconds.mean for row in chosen if row.family == baseline), math.nan)
    return [
        CostGain(
            row.family,
            row.training_seconds.mean / reference,
            row.difference.interval if row.difference else Interval(0.0, math.nan, math.nan, row.merged.n),
            row.difference.wins if row.difference else None,
        )
        for row in chosen
    ]


def plot_study(folder: Path, rows: Sequence[StudyRow], baseline: str, headline: tuple[str, str]) -> list[Path]:
    """`study_merged.png` (per merge: each family's merged accuracy and its paired difference to the baseline, with
    95% error bars) and `study_cost_gain.png` (the headline merge's gain over the baseline against fine-tuning
    time ratio, per family: `cost_gain_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = [r for r in rows if r.method != FINETUNED]
    labels = list(dict.fromkeys(_label(r.method, r.setting) for r in merges))
    families = list(dict.fromkeys(r.family for r in merges))
    width = 0.8 / len(families)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, family in enumerate(families):
        chosen = {_label(r.method, r.setting): r for r in merges if r.family == family}
        x = [labels.index(label) + (index - (len(families) - 1) / 2) * width for label in chosen]
        for axis, get in ((left, lambda r: r.merged), (right, lambda r: r.difference and r.difference.interval)):
            points = [(xi, get(r)) for xi, r in zip(x, chosen.values()) if get(r)]
            if points:  # one colour per family in both panels (the baseline has no difference to draw)
                means = [i.mean for _, i in points]
                errors = [0.0 if math.isnan(i.low) else i.half_width for _, i in points]
                axis.errorbar(
                    [p for p, _ in points], means, yerr=errors, fmt="o", capsize=3, label=family, color=f"C{index}"
                )
    for axis, ylabel in ((left, "merged test accuracy (%)"), (right, f"paired difference to {baseline} (pp)")):
        axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        axis.set_xlim(-0.5, len(labels) - 0.5)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    right.axhline(0.0, color="black", linewidth=0.8)
    left.legend()
    figure.tight_layout()
    paths = [folder / "study_merged.png"]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for point in cost_gain_points(rows, baseline, headline):
        error = 0.0 if math.isnan(point.gain.low) else point.gain.half_width
        axis.errorbar([point.time_ratio], [point.gain.mean], yerr=[[error]], fmt="o", capsize=3, label=point.family)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel(f"fine-tuning time / {baseline}'s (mean over seeds, all tasks)")
    axis.set_ylabel(f"{_label(*headline)}: gain over {baseline} (pp)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    paths.append(folder / "study_cost_gain.png")
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


__all__ = [
    "SUMMARY_FILE",
    "CostGain",
    "SeedResult",
    "SeedSetup",
    "StudyRow",
    "README_HEADING",
    "SMOOTHED",
    "cost_gain_points",
    "cpu_seconds",
    "decision",
    "finetune_settings",
    "grid_neighbour_scores",
    "quiet_console",
    "readme_section",
    "run_seed",
    "run_seeds",
    "summarize",
    "table_rows",
    "training_seconds",
    "verdicts",
    "write_study",
]
