"""The largest Hessian eigenvalues of a task's loss, by Lanczos on Hessian-vector products (SAFT paper App. D,
Fig. D1), and the Hessian trace by Hutchinson's estimator.

The Hessian is never formed: ``H v`` is the gradient of ``grad L . v`` (double backward through
``torch.func.functional_call``, with attention on the math kernel, the only one with a double backward), summed
over the task's batches and divided by the number of examples, so it is the Hessian of the mean loss over the whole
evaluation set. The sharpness of the paper's Theorem 1, ``lambda_max``, is the largest *algebraic* eigenvalue: away
from a minimum the Hessian has negative eigenvalues, possibly of larger magnitude, which power iteration would
return instead. ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos, ``which="LA"``) targets the largest
algebraic ones and stops on the residual ``||H v - lambda v|| <= tolerance * |lambda|``, which bounds the error of
``lambda``; each estimate reports its residual, measured with one more product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel

from .results import CurveResult, check_coefficients, coefficient_grid
from .tasks import AnalysisTask
from .weights import Weights, analysed_base, call_at, combine, evaluation_mode


@dataclass(frozen=True)
class EigenvalueEstimate:
    """One Hessian eigenvalue: ``residual`` is ``||H v - lambda v|| / ||v||`` for its Ritz vector ``v``,
    ``hessian_vector_products`` the products the whole computation used, ``converged`` whether ``residual <=
    tolerance * |eigenvalue|``. Without convergence within the restarts, ``eigenvalue`` and ``residual`` are NaN."""

    eigenvalue: float
    residual: float
    hessian_vector_products: int
    converged: bool


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of ``tr H``: the mean of ``z^T H z`` over ``samples`` Rademacher vectors ``z``, and the
    standard error of that mean (the sample standard deviation over ``sqrt(samples)``)."""

    trace: float
    standard_error: float
    samples: int


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


class _FlatHessian:
    """``H`` as a map on flat float64 numpy vectors (what scipy works in) over the floating-point tensors of
    ``weights``, in their own dtype and device on the model side; counts the products."""

    def __init__(self, task: AnalysisTask, weights: Weights, caller: str):
        self.task = task
        self.weights = {name: tensor for name, tensor in weights.items() if tensor.is_floating_point()}
        if not self.weights:
            raise ValueError(f"{caller}: no floating-point weights to differentiate.")
        self.size = sum(tensor.numel() for tensor in self.weights.values())
        self.products = 0

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        vector, offset = {}, 0
        for name, tensor in self.weights.items():
            piece = torch.from_numpy(np.ascontiguousarray(flat[offset : offset + tensor.numel()]))
            vector[name] = piece.reshape(tensor.shape).to(dtype=tensor.dtype, device=tensor.device)
            offset += tensor.numel()
        product = hessian_vector_product(self.task, self.weights, vector)
        self.products += 1
        return torch.cat([value.reshape(-1).double().cpu() for value in product.values()]).numpy()


def top_hessian_eigenvalues(
    task: AnalysisTask,
    weights: Weights,
    k: int = 1,
    *,
    tolerance: float = 1e-3,
    max_iterations: int = 20,
    lanczos_vectors: int = 16,
    seed: int = 0,
) -> list[EigenvalueEstimate]:
    """The ``k`` largest (algebraic) eigenvalues, largest first, of the Hessian of the task's mean loss with respect
    to the floating-point tensors of ``weights`` (the others stay the model's), at ``weights``.

    Lanczos keeps ``lanczos_vectors`` basis vectors (at most the number of parameters) and restarts at most
    ``max_iterations`` times (each restart costs about ``lanczos_vectors - k`` products); it stops when every
    residual is below ``tolerance`` times its eigenvalue. The start vector is Gaussian from ``seed``. Eigenvalues
    agree with the exact ones up to the float precision of the products (float32 models: about 1e-6 relative).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}.")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, got {max_iterations}.")
    if lanczos_vectors <= k:
        raise ValueError(f"lanczos_vectors must exceed k = {k}, got {lanczos_vectors}.")
    hessian = _FlatHessian(task, weights, "top_hessian_eigenvalues")
    if k >= hessian.size:
        raise ValueError(f"k must be less than the {hessian.size} parameters of the weights, got {k}.")
    operator = LinearOperator((hessian.size, hessian.size), matvec=hessian, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(hessian.size)
    try:
        eigenvalues, eigenvectors = eigsh(
            operator,
            k=k,
            which="LA",
            tol=tolerance,
            maxiter=max_iterations,
            ncv=min(lanczos_vectors, hessian.size),
            v0=start,
        )
    except ArpackNoConvergence as error:
        # Only the pairs that met the tolerance come back, possibly none.
        eigenvalues, eigenvectors = error.eigenvalues, error.eigenvectors
    # The residuals ARPACK tests come from the Lanczos recurrence; measured on the model, they also show the
    # float precision of the products.
    residuals = [
        float(np.linalg.norm(hessian(vector) - value * vector) / np.linalg.norm(vector))
        for value, vector in zip(eigenvalues, eigenvectors.T)
    ]
    estimates = sorted(
        (
            EigenvalueEstimate(float(value), residual, hessian.products, residual <= tolerance * abs(float(value)))
            for value, residual in zip(eigenvalues, residuals)
        ),
        key=lambda estimate: -estimate.eigenvalue,
    )
    missing = EigenvalueEstimate(math.nan, math.nan, hessian.products, False)
    return estimates + [missing] * (k - len(estimates))


def dominant_hessian_eigenvalue(
    task: AnalysisTask,
    weights: Weights,
    *,
    tolerance: float = 1e-3,
    max_iterations: int = 20,
    lanczos_vectors: int = 16,
    seed: int = 0,
) -> EigenvalueEstimate:
    """``lambda_max``, the largest algebraic eigenvalue of the Hessian of the task's mean loss (see
    :func:`top_hessian_eigenvalues` for the arguments)."""
    return top_hessian_eigenvalues(
        task,
        weights,
        1,
        tolerance=tolerance,
        max_iterations=max_iterations,
        lanczos_vectors=lanczos_vectors,
        seed=seed,
    )[0]


def hessian_trace(task: AnalysisTask, weights: Weights, *, samples: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of the trace of the Hessian of the task's mean loss with respect to the floating-point
    tensors of ``weights``, from ``samples`` Rademacher vectors drawn from ``seed`` (one product each). The estimate
    is exact for a diagonal Hessian; otherwise its variance is ``2 sum_{i != j} H_ij^2 / samples``."""
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (for a standard error), got {samples}.")
    hessian = _FlatHessian(task, weights, "hessian_trace")
    generator = np.random.default_rng(seed)
    quadratics = []
    for _ in range(samples):
        probe = generator.choice((-1.0, 1.0), size=hessian.size)
        quadratics.append(float(probe @ hessian(probe)))
    return TraceEstimate(float(np.mean(quadratics)), float(np.std(quadratics, ddof=1) / math.sqrt(samples)), samples)


def hessian_eigenvalues_along_line(
    task: AnalysisTask,
    task_vector: Weights,
    *,
    base: Weights | None = None,
    gammas: Sequence[float] | None = None,
    tolerance: float = 1e-3,
    max_iterations: int = 20,
    lanczos_vectors: int = 16,
    seed: int = 0,
) -> CurveResult:
    """``lambda_max`` at ``theta_0 + g tau`` (``tau = theta_t - theta_0``) for each ``g`` in ``gammas`` (default
    0, 0.25, ..., 1: pre-trained to fine-tuned, paper Fig. D1), with respect to the tensors ``tau`` covers."""
    gammas = check_coefficients(gammas if gammas is not None else coefficient_grid(0.0, 1.0, 5), label="gammas")
    base = analysed_base([task], [task_vector], base)
    estimates = [
        dominant_hessian_eigenvalue(
            task,
            combine(base, [task_vector], [gamma]),
            tolerance=tolerance,
            max_iterations=max_iterations,
            lanczos_vectors=lanczos_vectors,
            seed=seed,
        )
        for gamma in gammas
    ]
    return CurveResult(
        x_name="gamma",
        x=gammas,
        series={
            "eigenvalue": np.array([e.eigenvalue for e in estimates]),
            "residual": np.array([e.residual for e in estimates]),
            "hessian_vector_products": np.array([e.hessian_vector_products for e in estimates]),
            "converged": np.array([e.converged for e in estimates]),
        },
        metadata={
            "task": task.name,
            "tolerance": tolerance,
            "max_iterations": max_iterations,
            "lanczos_vectors": lanczos_vectors,
            "seed": seed,
        },
    )
