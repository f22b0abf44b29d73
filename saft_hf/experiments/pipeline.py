"""The experiment pipeline shared by the demo, the GLUE text-to-text and the 8-task CLIP recipes.

For every family (e.g. plain fine-tuning and SAFT) it fine-tunes every task from the common `base_model` through
`recipes/finetune.py` (passed in as `finetune_fn`, so the exact recipe code path runs), saves the task vectors
(`TaskVector`), merges each family with every configured method — coefficients searched on the validation splits
over the paper's grid (`search_coefficients`), and at the fixed alpha of App. C.6 — scores every model on every
task's test split with `evaluate_model`, and writes the tables (`saft_hf.experiments.tables`).

Everything is resumable: a fine-tune whose results file is complete, a saved task vector, a finished merge folder
and a cached evaluation are reused, never recomputed. Layout under `output_dir`:

    finetuned/<family>/<task>/        recipes/finetune.py output (model, finetune_config.yaml, all_results.json)
    task_vectors/<family>/<task>/     TaskVector folders
    merged/<family>/<method>[_alpha<a>]/  merged model folder: weights, merge_config.yaml, README.md card
    evaluations.json                  cache of every test/validation score
    scores.json, table_*.md/csv       the results
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import DatasetDict

from ..checkpoints import write_atomically
from ..data import Task, TextToTextTask, get_task
from ..evaluation import evaluate_model, label_word_max_new_tokens, load_processor, load_text_to_text
from ..merging import get_method, merge, search_coefficients, task_accuracy_evaluator
from ..merging.engine import RECIPE_NAME
from ..merging.search import paper_grid
from ..models import generate_texts, match_label_words
from ..task_vectors import TaskVector, is_task_vector_folder
from .config import ExperimentConfig, Family
from .tables import FINETUNED, PRETRAINED, Score, scores_to_records, summary_rows, write_table

logger = logging.getLogger(__name__)

FinetuneFn = Callable[[list[str]], None]
COMPLETED_RESULTS_FILE = "all_results.json"
RESOLVED_FINETUNE_CONFIG = "finetune_config.yaml"
SEARCHED = "searched"
NO_COEFFICIENT = "-"  # the setting of methods with nothing to search (weight averaging)
MERGEABLE_MODES = ("full", "ftlo")


@dataclass
class ExperimentResult:
    scores: list[Score]
    tables: dict[str, Path]  # table name -> Markdown file (a CSV sits beside it)
    merged: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (family, method, setting) -> folder
    task_vectors: dict[str, dict[str, Path]] = field(default_factory=dict)  # family -> task -> folder


def is_finetuned(run_dir: Path) -> bool:
    """A fine-tune is complete once recipes/finetune.py wrote its test results (its last step before saving)."""
    results = run_dir / COMPLETED_RESULTS_FILE
    if not results.is_file():
        return False
    try:
        return "test_accuracy" in json.loads(results.read_text())
    except json.JSONDecodeError:
        return False


def finetune_argv(config: ExperimentConfig, family: Family, task: str, run_dir: Path) -> list[str]:
    """The recipes/finetune.py command line of one run: the config files, then the run's own flags."""
    argv = [f"--config={path}" for path in config.finetune_configs]
    argv += ["--model_name_or_path", config.base_model, "--task", task, "--output_dir", str(run_dir),
             "--sam_mode", family.sam_mode, "--finetune_mode", family.finetune_mode]  # fmt: skip
    if task in config.dataset_paths:
        argv += ["--dataset_path", config.dataset_paths[task]]
    return argv + list(config.finetune_args) + list(family.finetune_args)


def finetune_family(config: ExperimentConfig, family: Family, finetune_fn: FinetuneFn) -> dict[str, str]:
    """Each task's fine-tuned model (folder or Hub id): pulled when the family names existing fine-tunes, reused
    when already complete in the output folder, trained otherwise."""
    if family.finetune_mode not in MERGEABLE_MODES:
        raise ValueError(
            f"families.{family.name}.finetune_mode={family.finetune_mode!r}: the experiment pipeline merges and "
            f"scores {MERGEABLE_MODES} fine-tunes (merged FTTS/LoRA models need their own forward); run that mode "
            "with recipes/finetune.py and merge with recipes/merge.py."
        )
    models = {}
    for task in config.tasks:
        existing = family.finetuned_model(task)
        if existing is not None:
            models[task] = existing
            continue
        run_dir = config.output_path / "finetuned" / family.name / task
        if is_finetuned(run_dir):
            logger.info("reusing the fine-tune of %s (%s) in %s", task, family.name, run_dir)
        else:
            finetune_fn(finetune_argv(config, family, task, run_dir))
            if not is_finetuned(run_dir):
                missing = run_dir / COMPLETED_RESULTS_FILE
                raise RuntimeError(f"Fine-tuning {task} ({family.name}) finished without {missing}.")
        models[task] = str(run_dir)
    return models


def save_task_vectors(config: ExperimentConfig, family: Family, models: Mapping[str, str]) -> dict[str, Path]:
    """`task_vectors/<family>/<task>`: fine-tuned minus base, with the family's fine-tuning settings as metadata."""
    folders = {}
    for task, model in models.items():
        folder = config.output_path / "task_vectors" / family.name / task
        if not is_task_vector_folder(folder):
            resolved = _resolved_finetune_config(Path(model))
            vector = TaskVector.from_models(
                config.base_model, model, task=task, finetune_mode=family.finetune_mode, sam_mode=family.sam_mode,
                sam_rho=resolved.get("sam_rho"), sam_eta=resolved.get("sam_eta"),
            )  # fmt: skip
            vector.save(folder)
        folders[task] = folder
    return folders


def _resolved_finetune_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESOLVED_FINETUNE_CONFIG
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


class Scorer:
    """Scores models on task splits with `evaluate_model`, each task's data loaded once, every score cached in
    `evaluations.json` (keyed by model, task, split and sample cap) so a rerun recomputes nothing."""

    def __init__(self, config: ExperimentConfig):
        self.config = config
        self.cache_path = config.output_path / "evaluations.json"
        self.cache: dict[str, dict[str, float]] = (
            json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        )
        self._data: dict[str, DatasetDict] = {}

    def data(self, task: str) -> DatasetDict:
        if task not in self._data:
            self._data[task] = get_task(task).load(self.config.dataset_paths.get(task))
        return self._data[task]

    def options(self, task: str) -> dict[str, Any]:
        """`evaluate_model` keyword arguments for `task`."""
        return dict(data=self.data(task), batch_size=self.config.eval_batch_size,
                    max_samples=self.config.eval_max_samples, max_source_length=self.config.max_source_length,
                    progress=False)  # fmt: skip

    def score(self, model: str | Path, task: str, split: str = "test") -> dict[str, float]:
        key = f"{model}|{task}|{split}|{self.config.eval_max_samples or 'all'}"
        if key not in self.cache:
            self.cache[key] = evaluate_model(model, task, split, base=self.config.base_model, **self.options(task))
            if self.config.label_word_confusion and isinstance(get_task(task), TextToTextTask):
                self.cache[key]["other_task_label_fraction"] = self.other_task_label_fraction(model, task, split)
            self._save()
        return self.cache[key]

    def other_task_label_fraction(self, model: str | Path, task: str, split: str) -> float:
        """Fraction of `model`'s outputs on `task` that are a label word of another task of the experiment and none
        of `task`'s (the SAFT paper's App. C.8 observation on merged Flan-T5)."""
        own = get_task(task)
        others = [word for name in self.config.tasks if name != task for word in _label_words(name)
                  if word not in own.label_words]  # fmt: skip
        if not others:
            return 0.0
        rows = self.data(task)[split]
        if self.config.eval_max_samples is not None:
            rows = rows.select(range(min(len(rows), self.config.eval_max_samples)))
        seq2seq = load_text_to_text(model, base=self.config.base_model)
        tokenizer = load_processor(model, own, base=self.config.base_model)
        max_new_tokens = label_word_max_new_tokens(tokenizer, list(own.label_words) + others)
        texts = own.format_inputs(rows[:])
        with torch.no_grad():
            generated = generate_texts(seq2seq, tokenizer, texts, max_new_tokens, self.config.eval_batch_size,
                                       self.config.max_source_length)  # fmt: skip
        matched = match_label_words(generated, others)
        return sum(index >= 0 for index in matched) / len(matched)

    def validation_accuracy(self) -> Callable[[Mapping[str, torch.Tensor]], float]:
        """The coefficient search's score: mean validation accuracy over the tasks of a merged state dict."""
        evaluators = [
            task_accuracy_evaluator([task], model=self.config.base_model, split="validation", **self.options(task))
            for task in self.config.tasks
        ]
        return lambda state_dict: sum(evaluate(state_dict) for evaluate in evaluators) / len(evaluators)

    def _save(self) -> None:
        text = json.dumps(self.cache, indent=1, sort_keys=True)
        write_atomically(self.cache_path, lambda f: f.write(text))


def _label_words(task: str) -> tuple[str, ...]:
    found = get_task(task)
    return found.label_words if isinstance(found, TextToTextTask) else ()


def merge_settings(config: ExperimentConfig, method: str) -> list[tuple[str, dict[str, Any] | None]]:
    """`(setting, fixed parameters)` of each merge of `method`: the searched one (parameters None; a method without
    alpha has nothing to search and is merged once) and the fixed-alpha one."""
    has_alpha = any(parameter.name == "alpha" for parameter in get_method(method).parameters)
    if not has_alpha:
        return [(NO_COEFFICIENT, {})]
    settings: list[tuple[str, dict[str, Any] | None]] = [(SEARCHED, None)]
    if config.fixed_alpha is not None:
        settings.append((f"alpha={config.fixed_alpha:g}", {"alpha": config.fixed_alpha}))
    return settings


def merge_family(config: ExperimentConfig, family: Family, vectors: Mapping[str, Path], method: str, setting: str,
                 parameters: dict[str, Any] | None, scorer: Scorer) -> Path:  # fmt: skip
    """Merge a family's task vectors with `method`: at `parameters`, or searched on validation when None. A folder
    holding a finished merge (its recipe is written last) is reused."""
    suffix = "" if setting in (SEARCHED, NO_COEFFICIENT) else "_" + setting.replace("=", "")
    output_dir = config.output_path / "merged" / family.name / f"{method}{suffix}"
    if (output_dir / RECIPE_NAME).is_file():
        return output_dir
    recipe = {"base_model": config.base_model, "models": [str(vectors[task]) for task in config.tasks],
              "method": method, "parameters": parameters or {}, "output_dir": str(output_dir)}  # fmt: skip
    if parameters is not None:
        return merge(recipe, progress=False)
    grid = config.search_grid.get(method) or paper_grid(method)
    result = search_coefficients(recipe, scorer.validation_accuracy(), grid, progress=False)
    logger.info("%s/%s: best %s (validation %.4f)", family.name, method, result.best_parameters, result.best_score)
    return result.output_dir


def merged_parameters(folder: Path) -> dict[str, Any]:
    return (yaml.safe_load((folder / RECIPE_NAME).read_text()) or {}).get("parameters", {})


def run_experiment(config: ExperimentConfig, finetune_fn: FinetuneFn) -> ExperimentResult:
    """Fine-tune, save task vectors, merge, score and tabulate (see the module docstring)."""
    tasks = [get_task(name) for name in config.tasks]  # unknown task names fail before any work
    scorer = Scorer(config)
    scores = [_score(scorer, config.base_model, "", PRETRAINED, "", task) for task in tasks]
    result = ExperimentResult(scores, {})
    for family in config.families:
        models = finetune_family(config, family, finetune_fn)
        result.task_vectors[family.name] = save_task_vectors(config, family, models)
        scores += [_score(scorer, models[task.name], family.name, FINETUNED, "", task) for task in tasks]
        for method in config.merge_methods:
            for setting, parameters in merge_settings(config, method):
                folder = merge_family(config, family, result.task_vectors[family.name], method, setting, parameters,
                                      scorer)  # fmt: skip
                result.merged[(family.name, method, setting)] = folder
                used = merged_parameters(folder)
                scores += [_score(scorer, folder, family.name, method, setting, task, used) for task in tasks]
    result.tables = write_tables(config, scores)
    return result


def _score(scorer: Scorer, model: str | Path, family: str, method: str, setting: str, task: Task,
           parameters: Mapping[str, Any] | None = None) -> Score:  # fmt: skip
    metrics = scorer.score(model, task.name)
    extra = {name: value for name, value in metrics.items() if name not in ("accuracy", "num_samples")}
    return Score(family, method, setting, task.name, metrics["accuracy"], dict(parameters or {}), extra)


def write_tables(config: ExperimentConfig, scores: Sequence[Score]) -> dict[str, Path]:
    """`scores.json` (long format), and per coefficient setting a table of the merges next to the fine-tuned and
    pre-trained models (Tables 1/2/C6 for the searched coefficients, Table C4 for the fixed alpha), plus the label-word
    table for text tasks."""
    folder = config.output_path
    (folder / "scores.json").write_text(json.dumps(scores_to_records(scores), indent=1))
    references = [s for s in scores if s.method in (PRETRAINED, FINETUNED)]
    groups: dict[str, list[Score]] = {}
    for score in scores:
        if score.method not in (PRETRAINED, FINETUNED):
            searched = score.setting in (SEARCHED, NO_COEFFICIENT)
            groups.setdefault(SEARCHED if searched else score.setting, []).append(score)
    tables = {}
    for setting, merged in groups.items():
        stem = f"table_merged_{setting.replace('=', '')}"
        how = "coefficients searched on validation" if setting == SEARCHED else setting
        title = f"Merged models ({how}): test accuracy and normalized accuracy (%)"
        tables[stem] = write_table(summary_rows(references + merged, config.tasks), folder, stem, title)[0]
    confusion = [s for s in scores if "off_label_fraction" in s.extra]
    if confusion:
        rows = [{"family": s.family, "method": s.method, "setting": s.setting, "task": s.task,
                 "off_label_fraction": s.extra["off_label_fraction"],
                 "other_task_label_fraction": s.extra.get("other_task_label_fraction", math.nan)}
                for s in confusion]  # fmt: skip
        title = "Outputs that are no label word of the task, and that are another task's label word (fractions)"
        tables["label_words"] = write_table(rows, folder, "label_words", title)[0]
    return tables


__all__ = [
    "ExperimentResult",
    "FinetuneFn",
    "Scorer",
    "finetune_argv",
    "finetune_family",
    "is_finetuned",
    "merge_family",
    "merge_settings",
    "run_experiment",
    "save_task_vectors",
    "write_tables",
]
