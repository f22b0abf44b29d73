"""The experiment pipeline shared by the demo, the GLUE text-to-text and the 8-task CLIP recipes.

For every family (e.g. plain fine-tuning and SAFT) it fine-tunes every task from the common `base_model` with
`saft_hf.finetuning.run` (the code path of `recipes/finetune.py`, from a command line), saves the task vectors
(`TaskVector`), merges each family with every configured method — coefficients searched on the validation splits
over the paper's grid (`search_coefficients`), and at the fixed alpha of App. C.6 — scores every model on every
task's test split with `evaluate_model`, and writes the tables (`saft_hf.experiments.tables`).

Every fine-tuning mode runs (`Family.finetune_mode`): a merge records its family's mode and is scored with the
forward that mode needs (FTTS merges linearised around `base_model`). LoRA fine-tunes are PEFT adapters, scored as
adapters on `base_model`; their task vectors are the dense deltas `B @ A * scaling` (`TaskVector.from_lora`), so
their merges are plain models of the base's architecture, scored with the plain forward.

Resumable by content, not by folder: every stage (fine-tune, task vector, merge) writes `<output>.stage.json` beside
its output folder (outside it: the folder itself holds only what its stage wrote), recording the resolved settings
that produced it (command line, the text of the config files, the identity of the weights it started from, the
merge grid, ...). A rerun reuses a stage whose record matches what it would do
now, and redoes one whose settings changed, logging one line that names what changed; a stage's settings include
the records of the stages it consumes, so a change propagates downstream. Scores are cached by the scored model's
stage record, so a redone model is never scored from a stale entry. Layout under `output_dir`:

    finetuned/<family>/<task>/        saft_hf.finetuning output (model, finetune_config.yaml, all_results.json)
    logs/<family>_<task>.log          a fine-tune's console output, when `run_experiment(quiet=True)`
    task_vectors/<family>/<task>/     TaskVector folders
    merged/<family>/<method>[_alpha<a>]/  merged model folder: weights, merge_config.yaml, README.md card
    evaluations.json                  cache of every test/validation score
    scores.json, table_*.md/csv       the results
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import DatasetDict

from ..data import Task, TextToTextTask, get_task
from ..evaluation import evaluate_model, label_word_max_new_tokens, load_processor, load_text_to_text
from ..finetuning import RESOLVED_CONFIG_FILE
from ..finetuning import run as run_finetune
from ..io import write_atomically
from ..layout import RECIPE_NAME, is_task_vector_folder
from ..merging import get_method, merge, search_coefficients, task_accuracy_evaluator
from ..merging.search import paper_grid
from ..models import generate_texts, match_label_words
from ..modes import LORA_MODE
from ..task_vectors import TaskVector
from .config import ExperimentConfig, Family
from .tables import FINETUNED, PRETRAINED, Score, scores_to_records, summary_rows, write_table

logger = logging.getLogger(__name__)

COMPLETED_RESULTS_FILE = "all_results.json"
SEARCHED = "searched"
NO_COEFFICIENT = "-"  # the setting of methods with nothing to search (weight averaging)
STAGE_RECORD_SUFFIX = ".stage.json"
StageFn = Callable[[str], None]  # told a description of each stage as it finishes (progress bars)


@dataclass
class ExperimentResult:
    scores: list[Score]
    tables: dict[str, Path]  # table name -> Markdown file (a CSV sits beside it)
    merged: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (family, method, setting) -> folder
    task_vectors: dict[str, dict[str, Path]] = field(default_factory=dict)  # family -> task -> folder


def is_finetuned(run_dir: Path) -> bool:
    """A fine-tune is complete once saft_hf.finetuning wrote its test results (its last step before saving)."""
    results = run_dir / COMPLETED_RESULTS_FILE
    if not results.is_file():
        return False
    try:
        return "test_accuracy" in json.loads(results.read_text())
    except json.JSONDecodeError:
        return False


def finetune_argv(config: ExperimentConfig, family: Family, task: str, run_dir: Path) -> list[str]:
    """The fine-tuning command line of one run (`saft_hf.finetuning.run`, recipes/finetune.py): the config files,
    then the run's own flags."""
    argv = [f"--config={path}" for path in config.finetune_configs]
    argv += [
        "--model_name_or_path",
        config.base_model,
        "--task",
        task,
        "--output_dir",
        str(run_dir),
        "--sam_mode",
        family.sam_mode,
        "--finetune_mode",
        family.finetune_mode,
    ]
    if task in config.dataset_paths:
        argv += ["--dataset_path", config.dataset_paths[task]]
    return argv + list(config.finetune_args) + list(family.finetune_args)


# ---- content-keyed stages ------------------------------------------------------------------------------------------


def model_identity(model: str | Path) -> str:
    """What a model's weights are: a digest of a local folder's weight files (so a folder rewritten with other
    weights is another model), or the Hub id as given (pin a revision with `org/name@rev` to make it exact)."""
    folder = Path(model)
    if not folder.is_dir():
        return str(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no weight files (*.safetensors, *.bin) to identify the model by")
    return _digest(tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files), files)


def _digest(stamp: tuple, files: list[Path]) -> str:
    # Weight files are hashed once per process and content (the stamp changes whenever a file is rewritten).
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        _DIGESTS[stamp] = "sha256:" + digest.hexdigest()[:16]
    return _DIGESTS[stamp]


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _normalized(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def stage_record_path(folder: Path) -> Path:
    """Where the record of the stage whose output is `folder` lives: beside the folder, not in it, so a merged model
    or task vector folder holds only what saft_hf wrote for it (its manifest would refuse a stray file)."""
    return folder.with_name(folder.name + STAGE_RECORD_SUFFIX)


def recorded_settings(folder: Path) -> dict[str, Any] | None:
    """The settings a finished stage in `folder` was produced with (None: no finished stage there)."""
    path = stage_record_path(folder)
    try:
        return json.loads(path.read_text())["settings"] if path.is_file() else None
    except (json.JSONDecodeError, KeyError):
        return None


def stage_key(folder: Path) -> str | None:
    """A short digest of a finished stage's settings: what the stages consuming it record of it."""
    settings = recorded_settings(folder)
    return None if settings is None else hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stage_is_current(folder: Path, settings: Mapping[str, Any]) -> bool:
    """True when `folder` holds a stage finished with `settings`. A stage made with other settings (or before stages
    were recorded) is reported in one line naming the changed settings; the caller redoes it."""
    recorded = recorded_settings(folder)
    wanted = _normalized(settings)
    if recorded == wanted:
        return True
    stage_record_path(folder).unlink(missing_ok=True)  # the stage is redone: an interrupted redo must not look done
    if folder.exists():
        changed = "no record of its settings" if recorded is None else _differences(recorded, wanted)
        logger.warning("%s was made with other settings (%s): redoing it", folder, changed)
    return False


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    parts = []
    for name in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(name), wanted.get(name)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):  # command lines: name the tokens that differ
            matcher = difflib.SequenceMatcher(a=list(map(str, old)), b=list(map(str, new)), autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag != "equal":
                    parts.append(f"{name}: {' '.join(matcher.a[i1:i2]) or '-'} -> {' '.join(matcher.b[j1:j2]) or '-'}")
        else:
            parts.append(f"{name}: {old!r} -> {new!r}")
    return "; ".join(parts)


def record_stage(folder: Path, settings: Mapping[str, Any]) -> None:
    """Mark `folder` as a stage finished with `settings` (written last, so an interrupted stage has no record)."""
    text = json.dumps({"settings": _normalized(settings)}, indent=1, sort_keys=True)
    write_atomically(stage_record_path(folder), lambda f: f.write(text))


def finetune_settings(config: ExperimentConfig, argv: Sequence[str]) -> dict[str, Any]:
    """What a fine-tune depends on: its command line, the text of its config files and the base weights."""
    configs = {path: _file_digest(path) for path in config.finetune_configs}
    return {"argv": list(argv), "config_files": configs, "base_model": model_identity(config.base_model)}


def finetune_family(
    config: ExperimentConfig, family: Family, *, quiet: bool = False, on_stage: StageFn | None = None
) -> dict[str, str]:
    """Each task's fine-tuned model (folder or Hub id): pulled when the family names existing fine-tunes, reused
    when the output folder holds one finished with the same settings, trained otherwise. `quiet` sends each
    fine-tune's console output (Trainer logs and metrics blocks) to `logs/<family>_<task>.log`."""
    models = {}
    for task in config.tasks:
        existing = family.finetuned_model(task)
        if existing is not None:
            models[task] = existing
            continue
        run_dir = config.output_path / "finetuned" / family.name / task
        argv = finetune_argv(config, family, task, run_dir)
        settings = finetune_settings(config, argv)
        if stage_is_current(run_dir, settings) and is_finetuned(run_dir):
            logger.info("reusing the fine-tune of %s (%s) in %s", task, family.name, run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # the fine-tune must not resume a stale run
            log = config.output_path / "logs" / f"{family.name}_{task}.log" if quiet else None
            _finetune(argv, log)
            if not is_finetuned(run_dir):
                missing = run_dir / COMPLETED_RESULTS_FILE
                raise RuntimeError(f"Fine-tuning {task} ({family.name}) finished without {missing}.")
            record_stage(run_dir, settings)
        if on_stage is not None:
            on_stage(f"fine-tuned {family.name}/{task}")
        models[task] = str(run_dir)
    return models


def _finetune(argv: list[str], log: Path | None) -> None:
    """Fine-tune from a command line, its console output sent to `log` when given."""
    if log is None:
        run_finetune(argv)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        run_finetune(argv)


def model_key(model: str | Path) -> str:
    """The identity a downstream stage records of a model: its stage record's digest, else its weights' identity."""
    return stage_key(Path(model)) or model_identity(model)


def save_task_vectors(config: ExperimentConfig, family: Family, models: Mapping[str, str]) -> dict[str, Path]:
    """`task_vectors/<family>/<task>`: fine-tuned minus base (a LoRA adapter's dense delta, `TaskVector.from_lora`),
    with the family's fine-tuning settings as metadata."""
    folders = {}
    for task, model in models.items():
        folder = config.output_path / "task_vectors" / family.name / task
        settings = {
            "base_model": model_identity(config.base_model),
            "finetuned": model_key(model),
            "finetune_mode": family.finetune_mode,
            "sam_mode": family.sam_mode,
        }
        if not (stage_is_current(folder, settings) and is_task_vector_folder(folder)):
            resolved = _resolved_finetune_config(Path(model))
            from_finetune = TaskVector.from_lora if family.finetune_mode == LORA_MODE else TaskVector.from_models
            vector = from_finetune(
                config.base_model,
                model,
                task=task,
                finetune_mode=family.finetune_mode,
                sam_mode=family.sam_mode,
                sam_rho=resolved.get("sam_rho"),
                sam_eta=resolved.get("sam_eta"),
            )
            vector.save(folder)
            record_stage(folder, settings)
        folders[task] = folder
    return folders


def _resolved_finetune_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESOLVED_CONFIG_FILE
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


class Scorer:
    """Scores models on task splits with `evaluate_model`, each task's data loaded once, every score cached in
    `evaluations.json` (keyed by the model's content (`model_key`), task, split and sample cap) so a rerun
    recomputes nothing and a model redone with other settings is scored again."""

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
        return dict(
            data=self.data(task),
            batch_size=self.config.eval_batch_size,
            max_samples=self.config.eval_max_samples,
            max_source_length=self.config.max_source_length,
            progress=False,
        )

    def score(self, model: str | Path, task: str, split: str = "test") -> dict[str, float]:
        key = f"{model_key(model)}|{task}|{split}|{self.config.eval_max_samples or 'all'}"
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
        others = [
            word
            for name in self.config.tasks
            if name != task
            for word in _label_words(name)
            if word not in own.label_words
        ]
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
            generated = generate_texts(
                seq2seq, tokenizer, texts, max_new_tokens, self.config.eval_batch_size, self.config.max_source_length
            )
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


def merge_family(
    config: ExperimentConfig,
    family: Family,
    vectors: Mapping[str, Path],
    method: str,
    setting: str,
    parameters: dict[str, Any] | None,
    scorer: Scorer,
) -> Path:
    """Merge a family's task vectors with `method`: at `parameters`, or searched on validation when None. A folder
    holding a merge finished with the same settings (inputs, parameters, grid, validation data) is reused."""
    suffix = "" if setting in (SEARCHED, NO_COEFFICIENT) else "_" + setting.replace("=", "")
    output_dir = config.output_path / "merged" / family.name / f"{method}{suffix}"
    recipe = {
        "base_model": config.base_model,
        "models": [str(vectors[task]) for task in config.tasks],
        "method": method,
        "parameters": parameters or {},
        "output_dir": str(output_dir),
    }
    grid = None if parameters is not None else config.search_grid.get(method) or paper_grid(method)
    settings = {
        "recipe": recipe,
        "base_model": model_identity(config.base_model),
        "grid": grid,
        "inputs": [model_key(vectors[task]) for task in config.tasks],
    }
    if grid is not None:  # the search's score: validation accuracy as the Scorer computes it
        settings["validation"] = {
            "max_samples": config.eval_max_samples,
            "dataset_paths": config.dataset_paths,
            "max_source_length": config.max_source_length,
        }
    if stage_is_current(output_dir, settings) and (output_dir / RECIPE_NAME).is_file():
        return output_dir
    if grid is None:
        folder = merge(recipe, progress=False)
    else:
        result = search_coefficients(recipe, scorer.validation_accuracy(), grid, progress=False)
        logger.info("%s/%s: best %s (validation %.4f)", family.name, method, result.best_parameters, result.best_score)
        folder = result.output_dir
    record_stage(folder, settings)
    return folder


def merged_parameters(folder: Path) -> dict[str, Any]:
    return (yaml.safe_load((folder / RECIPE_NAME).read_text()) or {}).get("parameters", {})


def experiment_stages(config: ExperimentConfig) -> int:
    """How many times `run_experiment` calls its `on_stage` (one per fine-tune or pulled model, one per merge)."""
    merges = sum(len(merge_settings(config, method)) for method in config.merge_methods)
    return len(config.families) * (len(config.tasks) + merges)


def run_experiment(
    config: ExperimentConfig, *, quiet: bool = False, on_stage: StageFn | None = None
) -> ExperimentResult:
    """Fine-tune, save task vectors, merge, score and tabulate (see the module docstring). `quiet` keeps the
    fine-tunes' console output in `logs/`; `on_stage` is told each stage as it finishes (`experiment_stages`)."""
    tasks = [get_task(name) for name in config.tasks]  # unknown task names fail before any work
    scorer = Scorer(config)
    scores = [_score(scorer, config.base_model, "", PRETRAINED, "", task) for task in tasks]
    result = ExperimentResult(scores, {})
    for family in config.families:
        models = finetune_family(config, family, quiet=quiet, on_stage=on_stage)
        result.task_vectors[family.name] = save_task_vectors(config, family, models)
        scores += [_score(scorer, models[task.name], family.name, FINETUNED, "", task) for task in tasks]
        for method in config.merge_methods:
            for setting, parameters in merge_settings(config, method):
                folder = merge_family(
                    config, family, result.task_vectors[family.name], method, setting, parameters, scorer
                )
                result.merged[(family.name, method, setting)] = folder
                used = merged_parameters(folder)
                scores += [_score(scorer, folder, family.name, method, setting, task, used) for task in tasks]
                if on_stage is not None:
                    on_stage(f"merged {family.name}/{method} ({setting})")
    result.tables = write_tables(config, scores)
    return result


def _score(
    scorer: Scorer,
    model: str | Path,
    family: str,
    method: str,
    setting: str,
    task: Task,
    parameters: Mapping[str, Any] | None = None,
) -> Score:
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
        rows = [
            {
                "family": s.family,
                "method": s.method,
                "setting": s.setting,
                "task": s.task,
                "off_label_fraction": s.extra["off_label_fraction"],
                "other_task_label_fraction": s.extra.get("other_task_label_fraction", math.nan),
            }
            for s in confusion
        ]
        title = "Outputs that are no label word of the task, and that are another task's label word (fractions)"
        tables["label_words"] = write_table(rows, folder, "label_words", title)[0]
    return tables


__all__ = [
    "ExperimentResult",
    "STAGE_RECORD_SUFFIX",
    "Scorer",
    "finetune_argv",
    "finetune_family",
    "is_finetuned",
    "merge_family",
    "experiment_stages",
    "merge_settings",
    "model_identity",
    "record_stage",
    "stage_record_path",
    "run_experiment",
    "save_task_vectors",
    "stage_is_current",
    "write_tables",
]
