"""Coefficient search: merge at every point of a parameter grid, score each on validation data, keep the best.

The paper (App. A.2) searches one shared ``alpha`` in {0.1, 0.3, 0.5, 0.7, 0.9, 1.0} and, for TIES, the pruned
fraction in {0.7, 0.8, 0.9} (``density`` 0.3, 0.2, 0.1). Inputs are opened (memory-mapped) once for the whole
grid, so after the first point they are served from the page cache rather than re-read from disk; each point's
merged weights are handed to ``evaluate_fn`` in memory (or, with ``evaluate_on="folder"``, as a temporary model
folder). The best point is then written as a normal merge, with the table saved next to it.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .config import MergeConfig
from .engine import MergePlan, check_output_dir, write_merge, write_model_folder
from .finetuning import MergedStateDict
from .methods import get_method

PAPER_ALPHA_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
PAPER_TIES_DENSITY_GRID = (0.3, 0.2, 0.1)  # pruned fraction 0.7, 0.8, 0.9
SCORE_COLUMN = "score"

EvaluateFn = Callable[[Any], float]


@dataclass
class SearchResult:
    best_parameters: dict[str, Any]
    best_score: float
    table: list[dict[str, Any]]  # one row per grid point: its parameters and its score, in grid order
    output_dir: Path | None  # where the best merge was written, if it was


def paper_grid(method: str) -> dict[str, list[float]]:
    """The paper's grid for ``method``: its coefficient (``alpha``, or ``t`` for ``slerp``) over the paper's alpha
    values, and ``density`` too for ``ties``."""
    coefficient = get_method(method).coefficient
    if coefficient is None:
        raise ValueError(f"method {method!r} has no coefficient to search (alpha); pass an explicit grid")
    grid = {coefficient: list(PAPER_ALPHA_GRID)}
    if method == "ties":
        grid["density"] = list(PAPER_TIES_DENSITY_GRID)
    return grid


def _grid_points(config: MergeConfig, grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    if not grid:
        raise ValueError("grid: at least one parameter to search is required")
    method = get_method(config.method)
    for name, values in grid.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid.{name}: expected a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for point in points:
        method.resolve_parameters({**config.parameters, **point}, where="grid")
    return points


def search_coefficients(
    config: MergeConfig | dict | str | Path,
    evaluate_fn: EvaluateFn,
    grid: Mapping[str, Sequence[Any]] | None = None,
    *,
    evaluate_on: Literal["state_dict", "folder"] = "state_dict",
    write_best: bool = True,
    token: str | bool | None = None,
    progress: bool = True,
) -> SearchResult:
    """Score every grid point with ``evaluate_fn`` (higher is better) and write the best merge to ``output_dir``.

    Args:
        config: the merge recipe; its ``parameters`` give the values not searched.
        evaluate_fn: called with the merged state dict (``evaluate_on="state_dict"``, load it with
            ``model.load_state_dict``) or the path of a temporary merged model folder (``"folder"``, load it with
            ``from_pretrained``); returns a float score on validation data. A NaN score ranks last. Built in:
            :func:`task_accuracy_evaluator` (mean, or normalized, validation accuracy over the tasks). The state
            dict's ``finetune_mode`` is the inputs' mode: FTTS weights must be scored with the linearised forward
            around the base, as ``evaluate_model`` does with them; the folder records it in its config.
        grid: ``{parameter: [values]}``; default :func:`paper_grid`. Per-tensor overrides in the recipe still win.
        write_best: write the best point as a merge (recipe, card and the table as ``search_table.csv/json``);
            requires ``output_dir`` in the recipe.
    """
    config = MergeConfig.coerce(config)
    points = _grid_points(config, grid or paper_grid(config.method))
    if evaluate_on not in ("state_dict", "folder"):
        raise ValueError(f"evaluate_on: must be 'state_dict' or 'folder', got {evaluate_on!r}")
    if write_best:
        check_output_dir(config, token=token)  # fail now, not after the search
    plan = MergePlan(config, token=token)
    finetune_mode = plan.finetune_mode
    table = []
    for point in tqdm(points, desc="coefficient search", unit="point", disable=not progress):
        score = float(_evaluate(plan, point, evaluate_fn, evaluate_on, finetune_mode))
        table.append({**point, SCORE_COLUMN: score})
    best = max(table, key=lambda row: -math.inf if math.isnan(row[SCORE_COLUMN]) else row[SCORE_COLUMN])
    best_parameters = {name: best[name] for name in points[0]}
    output_dir = (
        write_merge(plan, overrides=best_parameters, progress=progress, search_table=table) if write_best else None
    )
    return SearchResult(best_parameters, best[SCORE_COLUMN], table, output_dir)


def task_accuracy_evaluator(
    tasks: Sequence[str],
    *,
    model: str | os.PathLike,
    split: str = "validation",
    reference_accuracy: Mapping[str, float] | None = None,
    **evaluate_kwargs: Any,
) -> EvaluateFn:
    """An ``evaluate_fn`` for :func:`search_coefficients`: the mean accuracy of a merged state dict over ``tasks``.

    Each task is scored with :func:`saft_hf.evaluation.evaluate_model` on ``split`` (the paper selects on
    validation data), loading the merged weights into ``model`` (e.g. the merge's base, which provides the
    architecture, the zero-shot heads and the processors; merged FTTS weights are scored with the linearised forward
    around it). With ``reference_accuracy`` (each task's accuracy of its
    own fine-tuned model) the score is the mean normalized accuracy, the paper's second metric.
    ``evaluate_kwargs`` go to ``evaluate_model`` (``max_samples``, ``batch_size``, ``base``, ``head`` ...).
    """
    # Deferred: scoring needs transformers, datasets, evaluate and PEFT (seconds to import); merging alone does not.
    from ..evaluation import evaluate_model

    missing = [task for task in tasks if reference_accuracy is not None and task not in reference_accuracy]
    if missing:
        raise ValueError(f"reference_accuracy: no accuracy for task {missing[0]!r}")

    def evaluate(state_dict: Mapping[str, torch.Tensor]) -> float:
        scores = []
        for task in tasks:
            accuracy = evaluate_model(model, task, split, state_dict=state_dict, **evaluate_kwargs)["accuracy"]
            scores.append(accuracy / reference_accuracy[task] if reference_accuracy is not None else accuracy)
        return sum(scores) / len(scores)

    return evaluate


def _evaluate(
    plan: MergePlan, point: dict[str, Any], evaluate_fn: EvaluateFn, evaluate_on: str, finetune_mode: str | None
) -> float:
    if evaluate_on == "state_dict":
        return evaluate_fn(MergedStateDict(plan.merged_tensors(point), finetune_mode))
    with tempfile.TemporaryDirectory(prefix="saft_hf-search-") as scratch:
        write_model_folder(plan, Path(scratch), overrides=point, progress=False)
        return evaluate_fn(Path(scratch))


__all__ = [
    "PAPER_ALPHA_GRID",
    "PAPER_TIES_DENSITY_GRID",
    "SearchResult",
    "paper_grid",
    "search_coefficients",
    "task_accuracy_evaluator",
]
