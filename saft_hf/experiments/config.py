"""The configuration of a merging experiment: which tasks, which fine-tuning families, which merges."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import SAM_MODES
from ..merging import get_method
from ..parser import SaftParser


@dataclass
class Family:
    """One way of fine-tuning every task from the common start; its fine-tunes are merged with each other."""

    name: str = field(metadata={"help": "Label in tables and folder names, e.g. 'sgd' or 'saft'."})
    sam_mode: str = field(default="asam", metadata={"help": "'none' (plain fine-tuning), 'sam' or 'asam' (SAFT)."})
    finetune_mode: str = field(default="full", metadata={"help": "saft_hf.modes: full, ftlo, ftts or lora."})
    finetuned: str | None = field(
        default=None,
        metadata={
            "help": "Instead of fine-tuning: a Hub id or folder template of existing fine-tunes, with {task} (e.g. "
            "the public 'tanganke/clip-vit-base-patch32_{task}' for the plain baseline)."
        },
    )
    task_ids: dict[str, str] = field(
        default_factory=dict, metadata={"help": "What fills {task} in `finetuned` where it differs from the task name."}
    )
    finetune_args: list[str] = field(default_factory=list, metadata={"help": "Extra recipes/finetune.py flags."})

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"families: name must be a non-empty folder name, got {self.name!r}")
        if self.sam_mode not in SAM_MODES:
            raise ValueError(f"families.{self.name}.sam_mode: must be one of {SAM_MODES}, got {self.sam_mode!r}")
        if self.finetuned is not None and "{task}" not in self.finetuned:
            raise ValueError(f"families.{self.name}.finetuned: must contain {{task}}, got {self.finetuned!r}")

    def finetuned_model(self, task: str) -> str | None:
        """The existing fine-tune of `task`, if the family pulls them rather than training."""
        return None if self.finetuned is None else self.finetuned.format(task=self.task_ids.get(task, task))


@dataclass
class ExperimentConfig:
    """Fine-tune every task in every family from `base_model`, merge each family, score everything on test."""

    base_model: str = field(metadata={"help": "The common pre-trained model: Hub id or folder (full CLIPModel / T5)."})
    tasks: list[str] = field(metadata={"help": "Registered task names (saft_hf.data), at least two."})
    families: list[Family] = field(metadata={"help": "Fine-tuning families, e.g. sgd (sam_mode none) and saft."})
    output_dir: str = field(metadata={"help": "Everything goes here: finetuned/, task_vectors/, merged/, tables."})
    finetune_configs: list[str] = field(
        default_factory=list, metadata={"help": "recipes/finetune.py --config files (training settings)."}
    )
    finetune_args: list[str] = field(default_factory=list, metadata={"help": "Extra recipes/finetune.py flags."})
    dataset_paths: dict[str, str] = field(
        default_factory=dict, metadata={"help": "{task: Hub id or local folder} replacing a task's own dataset."}
    )
    merge_methods: list[str] = field(
        default_factory=lambda: ["weight_average", "task_arithmetic", "ties"],
        metadata={"help": "Registered merge methods; those with alpha are searched on validation (paper grid)."},
    )
    search_grid: dict[str, dict[str, list[float]]] = field(
        default_factory=dict, metadata={"help": "{method: {parameter: values}} replacing the paper's grid."}
    )
    fixed_alpha: float | None = field(
        default=0.4,
        metadata={
            "help": "Also merge with this alpha, unsearched (App. C.6; TIES keeps its default density 0.2, i.e. "
            "prunes 80%); null to skip."
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Examples per forward pass when scoring."})
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Score only the first N validation/test examples of each task."}
    )
    max_source_length: int | None = field(default=None, metadata={"help": "Text tasks: truncate inputs."})
    label_word_confusion: bool = field(
        default=True,
        metadata={"help": "Text tasks: also measure the fraction of outputs that are another task's label word."},
    )

    def __post_init__(self):
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: need at least two distinct tasks, got {self.tasks!r}")
        self.families = [f if isinstance(f, Family) else _build(Family, f, "families") for f in self.families]
        names = [family.name for family in self.families]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"families: need at least one, with distinct names, got {names!r}")
        for method in self.merge_methods:
            get_method(method)
        unknown = sorted(set(self.dataset_paths) - set(self.tasks))
        if unknown:
            raise ValueError(f"dataset_paths: task(s) {unknown} are not in tasks")
        if self.eval_batch_size < 1 or (self.eval_max_samples is not None and self.eval_max_samples < 1):
            raise ValueError("eval_batch_size and eval_max_samples must be >= 1")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"Cannot read experiment config {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"Experiment config {path} must hold a mapping of field names to values.")
        # Fine-tuning configs are named relative to the experiment config, so it runs from any working directory.
        folder = Path(path).parent
        values["finetune_configs"] = [str(folder / name) for name in values.get("finetune_configs") or []]
        return _build(cls, values | {k: v for k, v in overrides.items() if v is not None}, str(path))


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


@dataclass
class ExperimentArguments:
    """The command line the experiment recipes share: a config file, and overrides of its most-changed fields (so
    the same file runs the paper's setting on a GPU machine and a tiny offline one in tests)."""

    config: str | None = field(
        default=None, metadata={"help": "Experiment YAML (ExperimentConfig); default: the recipe's own."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Override output_dir."})
    base_model: str | None = field(default=None, metadata={"help": "Override base_model (Hub id or folder)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Override tasks."})
    families: list[str] | None = field(default=None, metadata={"help": "Run only these families of the config."})
    dataset_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Load TASK's data from PATH (Hub id or local folder); repeatable.",
            "metavar": "TASK=PATH",
            "action": "extend",
        },
    )
    finetune_args: str = field(
        default="", metadata={"help": "Extra fine-tuning flags for every run, one string ('--max_steps 10')."}
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Score only the first N examples of each split."}
    )
    eval_batch_size: int | None = field(default=None, metadata={"help": "Override eval_batch_size."})


def parse_experiment_args(
    argv: Sequence[str] | None,
    default_config: Path,
    description: str | None = None,
) -> ExperimentArguments:
    """`ExperimentArguments` from the command line (`SaftParser`; `--config` is the experiment file itself, so it
    is a field here, not a layer of defaults), `config` defaulting to the recipe's `default_config`."""
    parser = SaftParser(ExperimentArguments, config_option=False, description=description)
    args, _ = parser.parse_args_and_config(argv)
    args.config = args.config or str(default_config)
    return args


def config_from_args(args: ExperimentArguments) -> ExperimentConfig:
    dataset_paths = {}
    for item in args.dataset_path:
        task, separator, path = item.partition("=")
        if not separator or not task or not path:
            raise ValueError(f"--dataset_path {item!r}: expected TASK=PATH")
        dataset_paths[task] = path
    overrides = dict(
        output_dir=args.output_dir,
        base_model=args.base_model,
        tasks=args.tasks,
        eval_max_samples=args.eval_max_samples,
        eval_batch_size=args.eval_batch_size,
    )
    config = ExperimentConfig.from_yaml(args.config, **overrides)
    if dataset_paths:
        config.dataset_paths = {**config.dataset_paths, **dataset_paths}
    if args.families:
        unknown = sorted(set(args.families) - {family.name for family in config.families})
        if unknown:
            raise ValueError(f"--families: {unknown} are not families of {args.config}")
        config.families = [family for family in config.families if family.name in args.families]
    config.finetune_args = list(config.finetune_args) + shlex.split(args.finetune_args)
    config.__post_init__()  # re-validate the overridden fields
    return config
