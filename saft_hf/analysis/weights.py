"""Points in weight space and evaluating a task's model at them.

Every analysis moves along lines and planes through weight space: ``theta_0 + a_1 tau_1 + a_2 tau_2`` on a grid,
``(1 - g) theta_A + g theta_B`` on a segment. Weights are plain mappings from the model's own state-dict names to
tensors; names a mapping lacks keep the model's current values. The model is never modified: weights are
substituted for one call with :func:`torch.func.functional_call`, so the same module object can be evaluated at
many points, and gradients with respect to the substituted tensors flow (the Hessian analysis needs that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from ..checkpoints import find_name_map

if TYPE_CHECKING:
    from .tasks import AnalysisTask

Weights = Mapping[str, torch.Tensor]


def combine(origin: Weights, directions: Sequence[Weights], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """``origin + sum_k coefficients[k] * directions[k]`` name by name, computed in float64 and cast back to each
    origin tensor's dtype. A direction may cover a subset of the origin's names (the rest are zero in it).

    Raises ``ValueError`` naming the tensor when a direction has a name the origin lacks or another shape.
    """
    if len(directions) != len(coefficients):
        raise ValueError(f"combine: {len(directions)} directions but {len(coefficients)} coefficients.")
    for index, direction in enumerate(directions):
        for name, tensor in direction.items():
            if name not in origin:
                raise ValueError(f"combine: direction {index} has tensor {name!r}, which the origin weights lack.")
            if tuple(tensor.shape) != tuple(origin[name].shape):
                raise ValueError(
                    f"combine: direction {index} tensor {name!r} has shape {list(tensor.shape)}, "
                    f"the origin's has {list(origin[name].shape)}."
                )
    result = {}
    for name, tensor in origin.items():
        total = tensor.to(torch.float64, copy=True)
        for direction, coefficient in zip(directions, coefficients):
            if name in direction and coefficient != 0:
                total.add_(direction[name].to(device=total.device, dtype=torch.float64), alpha=float(coefficient))
        result[name] = total.to(tensor.dtype)
    return result


def difference(end: Weights, start: Weights) -> dict[str, torch.Tensor]:
    """``end - start`` over ``start``'s names, in float64 (the direction of the segment ``start -> end``)."""
    missing = [name for name in start if name not in end]
    if missing:
        raise ValueError(f"difference: the end weights lack tensor {missing[0]!r}, which the start weights have.")
    return {name: end[name].to(torch.float64) - start[name].to(torch.float64) for name in start}


def align_to_model(tensors: Mapping[str, torch.Tensor], model: nn.Module, *, label: str) -> dict[str, torch.Tensor]:
    """Read ``tensors`` (a state dict, a lazy checkpoint, a :class:`~saft_hf.task_vectors.TaskVector`) into memory
    under ``model``'s state-dict names, on the model's device and in its dtypes.

    Checkpoints may name tensors with another prefix than the module (``vision_model.`` or not); one prefix
    change is inferred as :func:`saft_hf.checkpoints.find_name_map` does. Raises ``ValueError`` naming the tensor
    (and ``label``) when a name has no counterpart or a shape differs.
    """
    own = model.state_dict()
    name_map = find_name_map(own, tensors)
    aligned = {}
    for name in tensors:
        own_name = name_map.to_base(name)
        if own_name not in own:
            raise ValueError(f"{label}: tensor {name!r} matches no tensor of the {type(model).__name__} analysed.")
        target = own[own_name]
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{label}: tensor {name!r} has shape {list(tensor.shape)}, the model's {own_name!r} has "
                f"{list(target.shape)}."
            )
        aligned[own_name] = tensor.to(device=target.device, dtype=target.dtype)
    return aligned


def current_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the model's tensors called ``names`` (its weights now, e.g. the pre-trained ``theta_0``)."""
    own = model.state_dict()
    missing = [name for name in names if name not in own]
    if missing:
        raise ValueError(f"The {type(model).__name__} analysed has no tensor {missing[0]!r}.")
    return {name: own[name].detach().clone() for name in names}


class _BoundCall(nn.Module):
    """``function(model, batch)`` as a module, so that ``functional_call`` substitutes weights for the whole call,
    including any ``generate`` loop the function runs."""

    def __init__(self, model: nn.Module, function: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, batch: Any) -> Any:
        return self.function(self.model, batch)


def call_at(model: nn.Module, weights: Weights, function: Callable[[nn.Module, Any], Any], batch: Any) -> Any:
    """``function(model, batch)`` with ``weights`` in place of the model's tensors of the same names."""
    bound = _BoundCall(model, function)
    return functional_call(bound, {f"model.{name}": tensor for name, tensor in weights.items()}, (batch,))


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration (no dropout), restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batch_values(task: AnalysisTask, weights: Weights, function: Callable[[nn.Module, Any], Any]) -> torch.Tensor:
    outputs = []
    with evaluation_mode(task.model), torch.no_grad():
        for batch in task.batches():
            outputs.append(torch.as_tensor(call_at(task.model, weights, function, batch)).detach().cpu())
    if not outputs:
        raise ValueError(f"Task {task.name!r}: its batches are empty.")
    return torch.cat(outputs)


def per_example_losses(task: AnalysisTask, weights: Weights) -> torch.Tensor:
    """The task's per-example losses over all its batches at ``weights`` (float64, shape ``[examples]``)."""
    losses = _batch_values(task, weights, task.loss).to(torch.float64)
    if losses.ndim != 1:
        raise ValueError(f"Task {task.name!r}: loss must return one value per example, got shape {list(losses.shape)}.")
    return losses


def mean_loss(task: AnalysisTask, weights: Weights) -> float:
    """``L(weights; D)``: the mean per-example loss over the task's batches."""
    return per_example_losses(task, weights).mean().item()


def predictions(task: AnalysisTask, weights: Weights) -> torch.Tensor:
    """The task's per-example predictions over all its batches at ``weights`` (first dimension = examples)."""
    return _batch_values(task, weights, task.predict)


def accuracy(task: AnalysisTask, weights: Weights) -> float:
    """Fraction of the task's examples whose prediction equals its target."""
    if task.targets is None:
        raise ValueError(f"Task {task.name!r} has no targets: accuracy is undefined for it.")
    targets = torch.cat([torch.as_tensor(task.targets(batch)).cpu() for batch in task.batches()])
    return 1.0 - disagreement(predictions(task, weights), targets, label=task.name).item()


def disagreement(first: torch.Tensor, second: torch.Tensor, *, label: str) -> torch.Tensor:
    """Fraction of examples (rows) whose predictions differ anywhere: Ortiz-Jimenez et al.'s prediction error
    ``E[1(y_1 != y_2)]``."""
    if first.shape != second.shape:
        raise ValueError(
            f"Task {label!r}: predictions of shape {list(first.shape)} and {list(second.shape)} cannot be compared."
        )
    differs = (first != second).reshape(first.shape[0], -1).any(dim=1)
    return differs.to(torch.float64).mean()


def analysed_base(
    tasks: Sequence[AnalysisTask], directions: Sequence[Weights], base: Weights | None
) -> dict[str, torch.Tensor]:
    """The origin ``theta_0`` of an analysis: ``base`` if given, else the first task's model's current tensors of
    the names the directions cover. Checks that every task's model has each name with the same shape."""
    names = list(dict.fromkeys(name for direction in directions for name in direction))
    if not names:
        raise ValueError("The task vectors are empty: there is no weight to move.")
    for task in tasks:
        own = task.model.state_dict()
        for name in names:
            if name not in own:
                raise ValueError(f"Task {task.name!r}: its model has no tensor {name!r}, which a task vector has.")
            shape = tuple(next(d[name] for d in directions if name in d).shape)
            if tuple(own[name].shape) != shape:
                raise ValueError(
                    f"Task {task.name!r}: tensor {name!r} has shape {list(own[name].shape)} in its model, "
                    f"{list(shape)} in a task vector."
                )
    if base is None:
        return current_weights(tasks[0].model, names)
    missing = [name for name in names if name not in base]
    if missing:
        raise ValueError(f"The base weights lack tensor {missing[0]!r}, which a task vector has.")
    return {name: base[name] for name in names}


def iter_merge_grid(
    base: Weights,
    task_vectors: Sequence[Weights],
    alphas: Sequence[float],
    other_alpha: float,
    *,
    progress: bool = False,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """``(i, j, theta_0 + alphas[i] tau_1 + alphas[j] tau_2 + other_alpha * sum_{s > 2} tau_s)`` over the grid
    (paper App. A.3: the two-task and the all-task settings)."""
    from tqdm.auto import tqdm

    others = [other_alpha] * (len(task_vectors) - 2)
    points = [(i, j) for i in range(len(alphas)) for j in range(len(alphas))]
    for i, j in tqdm(points, desc="grid", disable=not progress):
        yield i, j, combine(base, task_vectors, [alphas[i], alphas[j], *others])
