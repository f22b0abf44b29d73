"""Loss along planes and lines through weight space.

- Joint-task loss landscape (SAFT paper Fig. 4-5, Eq. 13): ``L(theta_merge; D_1) + L(theta_merge; D_2)`` over the
  ``(a_1, a_2)`` grid of ``theta_merge = theta_0 + a_1 tau_1 + a_2 tau_2 (+ 0.3 sum_{s > 2} tau_s)``.
- Loss barrier (Fig. C2): along ``theta(g) = (1 - g) theta_start + g theta_end`` (merged model -> task model),
  the excess ``L(theta(g)) - ((1 - g) L(theta_start) + g L(theta_end))`` and its maximum, the barrier. A convex
  loss has barrier 0 (the endpoints); a bump between the endpoints makes it positive.
- Linear interpolation of two models and the performance gain of the second paper (optimizer implicit bias):
  ``f(theta_merge) - f(theta_single)`` with ``theta_merge = (1 - a) theta_A + a theta_B``; ``theta_single`` is
  each endpoint and the gain is taken against their mean (both endpoints are reported).
- Task-arithmetic gain: accuracy of ``theta_0 + alpha sum_t tau_t`` on each task minus that of the task's own
  model ``theta_0 + tau_t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .disentanglement import OTHER_TASKS_ALPHA
from .results import CurveResult, GridResult, check_coefficients, coefficient_grid
from .tasks import AnalysisTask
from .weights import Weights, accuracy, analysed_base, combine, difference, iter_merge_grid, mean_loss


def joint_loss_landscape(
    tasks: Sequence[AnalysisTask],
    task_vectors: Sequence[Weights],
    *,
    base: Weights | None = None,
    alphas: Sequence[float] | None = None,
    other_alpha: float = OTHER_TASKS_ALPHA,
    progress: bool = False,
) -> GridResult:
    """``L(theta_merge; D_1) + L(theta_merge; D_2)`` on the grid ``alphas x alphas`` (default: the paper's 21x21
    from -0.5 to 1.5). ``task_vectors[0:2]`` are the pair's; further ones are merged with ``other_alpha``."""
    if len(tasks) != 2 or tasks[0].name == tasks[1].name:
        raise ValueError(f"joint_loss_landscape: needs two differently named tasks, got {[t.name for t in tasks]}.")
    if len(task_vectors) < 2:
        raise ValueError(f"joint_loss_landscape: needs at least two task vectors, got {len(task_vectors)}.")
    alphas = check_coefficients(alphas if alphas is not None else coefficient_grid(), label="alphas")
    base = analysed_base(tasks, task_vectors, base)
    components = {task.name: np.zeros((len(alphas), len(alphas))) for task in tasks}
    for i, j, merged in iter_merge_grid(base, task_vectors, alphas, other_alpha, progress=progress):
        for task in tasks:
            components[task.name][i, j] = mean_loss(task, merged)
    metadata = {"num_task_vectors": len(task_vectors)}
    if len(task_vectors) > 2:
        metadata["other_alpha"] = other_alpha
    return GridResult(
        quantity="joint_loss",
        tasks=(tasks[0].name, tasks[1].name),
        alphas=alphas,
        values=sum(components.values()),
        components=components,
        metadata=metadata,
    )


def _segment(task: AnalysisTask, start: Weights, end: Weights) -> tuple[dict, dict]:
    start = analysed_base([task], [start, end], start)
    return start, difference(end, start)


def loss_barrier(
    task: AnalysisTask, start: Weights, end: Weights, *, gammas: Sequence[float] | None = None
) -> CurveResult:
    """The loss on ``task`` along ``start -> end`` (default 11 points) with the excess over the straight line
    between the endpoint losses; ``summary["barrier"]`` is the largest excess (>= 0: the endpoints have 0)."""
    gammas = check_coefficients(gammas if gammas is not None else coefficient_grid(0.0, 1.0, 11), label="gammas")
    if min(gammas) != 0.0 or max(gammas) != 1.0:
        raise ValueError(f"loss_barrier: gammas must include both endpoints 0 and 1, got {list(gammas)}.")
    start, direction = _segment(task, start, end)
    losses = np.array([mean_loss(task, combine(start, [direction], [gamma])) for gamma in gammas])
    gamma_array = np.asarray(gammas)
    first, last = losses[gamma_array == 0.0][0], losses[gamma_array == 1.0][0]
    linear = (1 - gamma_array) * first + gamma_array * last
    excess = losses - linear
    return CurveResult(
        x_name="gamma",
        x=gammas,
        series={"loss": losses, "linear": linear, "excess": excess},
        summary={"barrier": float(excess.max()), "loss_start": float(first), "loss_end": float(last)},
        metadata={"task": task.name},
    )


def linear_interpolation(
    task: AnalysisTask,
    model_a: Weights,
    model_b: Weights,
    *,
    alphas: Sequence[float] | None = None,
    merge_alpha: float = 0.5,
) -> CurveResult:
    """Loss (and accuracy when the task has targets) of ``(1 - a) theta_A + a theta_B`` for each ``a`` in
    ``alphas`` (default 0, 0.1, ..., 1), with the performance gain at ``merge_alpha`` over the endpoints' mean:
    ``summary["loss_gain"]`` (negative is better) and ``summary["accuracy_gain"]`` (positive is better)."""
    alphas = check_coefficients(alphas if alphas is not None else coefficient_grid(0.0, 1.0, 11), label="alphas")
    alphas = tuple(sorted(set(alphas) | {0.0, 1.0, float(merge_alpha)}))
    start, direction = _segment(task, model_a, model_b)
    points = [combine(start, [direction], [alpha]) for alpha in alphas]
    series = {"loss": np.array([mean_loss(task, point) for point in points])}
    if task.targets is not None:
        series["accuracy"] = np.array([accuracy(task, point) for point in points])
    index = {alpha: k for k, alpha in enumerate(alphas)}
    summary = {"merge_alpha": float(merge_alpha)}
    for metric, values in series.items():
        endpoints = (values[index[0.0]], values[index[1.0]])
        summary[f"{metric}_merged"] = float(values[index[float(merge_alpha)]])
        summary[f"{metric}_single_a"], summary[f"{metric}_single_b"] = map(float, endpoints)
        summary[f"{metric}_gain"] = float(values[index[float(merge_alpha)]] - np.mean(endpoints))
    return CurveResult(x_name="alpha", x=alphas, series=series, summary=summary, metadata={"task": task.name})


def task_arithmetic_gain(
    tasks: Sequence[AnalysisTask], task_vectors: Sequence[Weights], *, alpha: float, base: Weights | None = None
) -> CurveResult:
    """Per task ``t``: accuracy of ``theta_0 + alpha sum_s tau_s`` minus accuracy of ``theta_0 + tau_t`` on task
    ``t`` (``tasks[t]`` belongs to ``task_vectors[t]``); ``summary["mean_gain"]`` averages over tasks."""
    if len(tasks) != len(task_vectors):
        raise ValueError(f"task_arithmetic_gain: {len(tasks)} tasks but {len(task_vectors)} task vectors.")
    base = analysed_base(tasks, task_vectors, base)
    merged = combine(base, task_vectors, [alpha] * len(task_vectors))
    merged_accuracy = np.array([accuracy(task, merged) for task in tasks])
    single_accuracy = np.array(
        [accuracy(task, combine(base, [vector], [1.0])) for task, vector in zip(tasks, task_vectors)]
    )
    gain = merged_accuracy - single_accuracy
    return CurveResult(
        x_name="task",
        x=tuple(task.name for task in tasks),
        series={"accuracy_merged": merged_accuracy, "accuracy_single": single_accuracy, "gain": gain},
        summary={"alpha": alpha, "mean_gain": float(gain.mean())},
    )
