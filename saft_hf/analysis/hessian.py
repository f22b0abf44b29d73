"""Dominant Hessian eigenvalue of a task's loss, by power iteration on Hessian-vector products (SAFT paper App. D,
Fig. D1).

The Hessian is never formed: ``H v`` is the gradient of ``grad L . v`` (double backward through
``torch.func.functional_call``, with attention on the math kernel, the only one with a double backward), summed
over the task's batches and divided by the number of examples, so it is the Hessian of the mean loss over the whole
evaluation set. Power iteration converges to the eigenvalue of
largest magnitude (the Rayleigh quotient ``v^T H v`` of the last iterate), as PyHessian does; near a minimum that is
the largest positive one, ``lambda_max`` in the paper's Theorem 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .results import CurveResult, check_coefficients, coefficient_grid
from .tasks import AnalysisTask
from .weights import Weights, analysed_base, call_at, combine, evaluation_mode


@dataclass(frozen=True)
class EigenvalueEstimate:
    """A power-iteration result: the eigenvalue, the iterations used, and whether the tolerance was met."""

    eigenvalue: float
    iterations: int
    converged: bool


def hessian_vector_product(
    task: AnalysisTask, weights: Weights, vector: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``H v`` of the task's mean loss at ``weights``, with respect to exactly the tensors of ``weights``."""
    names = list(weights)
    total = {name: torch.zeros_like(weights[name]) for name in names}
    examples = 0
    # The fused scaled-dot-product-attention kernels have no double backward; the math kernel does.
    with evaluation_mode(task.model), sdpa_kernel(SDPBackend.MATH):
        for batch in task.batches():
            leaves = {name: weights[name].detach().requires_grad_(True) for name in names}
            losses = call_at(task.model, leaves, task.loss, batch)
            if losses.ndim != 1:
                raise ValueError(
                    f"Task {task.name!r}: loss must return one value per example, got shape {list(losses.shape)}."
                )
            gradients = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=True, allow_unused=True)
            dot = sum(
                (gradient * vector[name]).sum() for name, gradient in zip(names, gradients) if gradient is not None
            )
            if isinstance(dot, torch.Tensor) and dot.requires_grad:
                products = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
                for name, product in zip(names, products):
                    if product is not None:
                        total[name] += product.detach()
            examples += losses.shape[0]
    if examples == 0:
        raise ValueError(f"Task {task.name!r}: its batches are empty.")
    return {name: value / examples for name, value in total.items()}


def _dot(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return sum((first[name].double() * second[name].double()).sum().item() for name in first)


def dominant_hessian_eigenvalue(
    task: AnalysisTask,
    weights: Weights,
    *,
    max_iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> EigenvalueEstimate:
    """The eigenvalue of largest magnitude of the Hessian of the task's mean loss with respect to the tensors of
    ``weights`` (the others stay the model's), at ``weights``.

    Stops when the relative change of the estimate falls below ``tolerance`` or after ``max_iterations`` HVPs.
    The start vector is Gaussian from ``seed``.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}.")
    weights = {name: tensor for name, tensor in weights.items() if tensor.is_floating_point()}
    if not weights:
        raise ValueError("dominant_hessian_eigenvalue: no floating-point weights to differentiate.")
    generator = torch.Generator().manual_seed(seed)
    vector = {
        name: torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype).to(tensor.device)
        for name, tensor in weights.items()
    }
    norm = _dot(vector, vector) ** 0.5
    vector = {name: value / norm for name, value in vector.items()}
    estimate = None
    for iteration in range(1, max_iterations + 1):
        product = hessian_vector_product(task, weights, vector)
        rayleigh = _dot(vector, product)
        norm = _dot(product, product) ** 0.5
        if norm == 0.0:
            return EigenvalueEstimate(0.0, iteration, True)
        if estimate is not None and abs(rayleigh - estimate) <= tolerance * abs(rayleigh):
            return EigenvalueEstimate(rayleigh, iteration, True)
        estimate = rayleigh
        vector = {name: value / norm for name, value in product.items()}
    return EigenvalueEstimate(estimate, max_iterations, False)


def hessian_eigenvalues_along_line(
    task: AnalysisTask,
    task_vector: Weights,
    *,
    base: Weights | None = None,
    gammas: Sequence[float] | None = None,
    max_iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> CurveResult:
    """``lambda_max`` at ``theta_0 + g tau`` (``tau = theta_t - theta_0``) for each ``g`` in ``gammas`` (default
    0, 0.25, ..., 1: pre-trained to fine-tuned, paper Fig. D1), with respect to the tensors ``tau`` covers."""
    gammas = check_coefficients(gammas if gammas is not None else coefficient_grid(0.0, 1.0, 5), label="gammas")
    base = analysed_base([task], [task_vector], base)
    estimates = [
        dominant_hessian_eigenvalue(
            task, combine(base, [task_vector], [gamma]), max_iterations=max_iterations, tolerance=tolerance, seed=seed
        )
        for gamma in gammas
    ]
    return CurveResult(
        x_name="gamma",
        x=gammas,
        series={
            "eigenvalue": np.array([e.eigenvalue for e in estimates]),
            "iterations": np.array([e.iterations for e in estimates]),
            "converged": np.array([e.converged for e in estimates]),
        },
        metadata={"task": task.name, "max_iterations": max_iterations, "tolerance": tolerance, "seed": seed},
    )
