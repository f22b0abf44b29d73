"""Weight-disentanglement error over a grid of task coefficients (SAFT paper Eq. 9-10, App. A.3).

Ortiz-Jimenez et al. (2023, "Task arithmetic in the tangent space") call task vectors weight-disentangled when
adding ``tau_2`` does not change what the model predicts on task 1's inputs, and measure the failure as

    xi(a_1, a_2) = sum_{t=1,2} E_{x in X_t} [ dist(f(x; theta_0 + a_t tau_t), f(x; theta_merge)) ]

with ``theta_merge = theta_0 + a_1 tau_1 + a_2 tau_2`` and ``dist`` the prediction error ``1(y != y')`` (so each
term is the fraction of task ``t``'s examples whose prediction changes). ``xi_all`` (Eq. 10) keeps every other
task vector in the merge with a fixed coefficient (0.3 in the paper) while the single-task model stays
``theta_0 + a_t tau_t``. Lower is better; ``xi(0, 0) = 0`` always.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .results import GridResult, check_coefficients, coefficient_grid
from .tasks import AnalysisTask
from .weights import Weights, analysed_base, combine, disagreement, iter_merge_grid, predictions

OTHER_TASKS_ALPHA = 0.3


def disentanglement_error(
    tasks: Sequence[AnalysisTask],
    task_vectors: Sequence[Weights],
    *,
    base: Weights | None = None,
    alphas: Sequence[float] | None = None,
    other_alpha: float = OTHER_TASKS_ALPHA,
    progress: bool = False,
) -> GridResult:
    """``xi(a_1, a_2)`` (two task vectors) or ``xi_all(a_1, a_2)`` (more) on the grid ``alphas x alphas``.

    Args:
        tasks: the pair's two tasks; ``tasks[t]`` is evaluated on ``task_vectors[t]``'s task.
        task_vectors: ``tau_1``, ``tau_2``, then any further task vectors merged with ``other_alpha`` (``xi_all``).
        base: ``theta_0``; defaults to the first task's model's current weights.
        alphas: the coefficients of each axis; default: 21 points from -0.5 to 1.5 (paper App. A.3).
        other_alpha: the fixed coefficient of the task vectors after the first two.

    Returns a :class:`GridResult` whose components are the two per-task terms.
    """
    if len(tasks) != 2:
        raise ValueError(f"disentanglement_error: needs the two tasks of the pair, got {len(tasks)}.")
    if tasks[0].name == tasks[1].name:
        raise ValueError(f"disentanglement_error: the two tasks must have different names, both are {tasks[0].name!r}.")
    if len(task_vectors) < 2:
        raise ValueError(f"disentanglement_error: needs at least two task vectors, got {len(task_vectors)}.")
    alphas = check_coefficients(alphas if alphas is not None else coefficient_grid(), label="alphas")
    base = analysed_base(tasks, task_vectors, base)
    # The single-task model of term t depends on a_t only: one evaluation per (task, coefficient).
    single = {
        (t, alpha): predictions(task, combine(base, [task_vectors[t]], [alpha]))
        for t, task in enumerate(tasks)
        for alpha in alphas
    }
    components = {task.name: np.zeros((len(alphas), len(alphas))) for task in tasks}
    for i, j, merged in iter_merge_grid(base, task_vectors, alphas, other_alpha, progress=progress):
        for t, task in enumerate(tasks):
            reference = single[t, alphas[(i, j)[t]]]
            components[task.name][i, j] = disagreement(predictions(task, merged), reference, label=task.name).item()
    quantity = "xi" if len(task_vectors) == 2 else "xi_all"
    metadata = {"num_task_vectors": len(task_vectors), "dist": "prediction_error"}
    if len(task_vectors) > 2:
        metadata["other_alpha"] = other_alpha
    return GridResult(
        quantity=quantity,
        tasks=(tasks[0].name, tasks[1].name),
        alphas=alphas,
        values=sum(components.values()),
        components=components,
        metadata=metadata,
    )
