"""saft_hf.analysis.hessian: Lanczos eigenvalues and Hutchinson traces against the exact eigendecomposition of small
full Hessians (quadratics, whose Hessian is their matrix, and a tiny MLP, via torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saft_hf.analysis import AnalysisTask, dominant_hessian_eigenvalue, hessian_eigenvalues_along_line
from saft_hf.analysis.hessian import hessian_trace, top_hessian_eigenvalues


def batches_of(*batches: dict) -> callable:
    return lambda: iter(batches)


class Quadratic(nn.Module):
    """``0.5 w^T A w`` per example: its Hessian is ``A`` everywhere."""

    def __init__(self, matrix: torch.Tensor, seed: int = 0):
        super().__init__()
        self.matrix = matrix
        generator = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype))

    def forward(self, c):
        return 0.5 * self.w @ self.matrix @ self.w + 0 * c


def quadratic_task(spectrum: list[float], seed: int = 4) -> tuple[AnalysisTask, torch.Tensor]:
    """A task whose Hessian is a random rotation of ``diag(spectrum)``; returns it and the matrix."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T
    model = Quadratic(matrix)
    zeros = {"c": torch.zeros(2, dtype=torch.float64)}, {"c": torch.zeros(3, dtype=torch.float64)}
    task = AnalysisTask(
        name="q",
        model=model,
        batches=batches_of(*zeros),
        forward=lambda m, b: m(**b),
        loss=lambda m, b: m(**b),
        predict=lambda m, b: m(**b),
    )
    return task, matrix


def mlp_case(seed: int, scale: float, dtype=torch.float64) -> tuple[AnalysisTask, dict, torch.Tensor]:
    """A 3-4-3 tanh MLP (31 parameters) with its weights times ``scale``, a cross-entropy task over two batches, and
    the exact eigenvalues (ascending, float64) of the Hessian of its mean loss."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    x = torch.randn(10, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    shapes = {name: p.shape for name, p in weights.items()}

    def loss_of(flat):
        params, offset = {}, 0
        for name, shape in shapes.items():
            params[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), labels)

    flat = torch.cat([p.reshape(-1) for p in weights.values()])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    model.to(dtype)
    x = x.to(dtype)
    task = AnalysisTask(
        name="mlp",
        model=model,
        batches=batches_of({"x": x[:4], "labels": labels[:4]}, {"x": x[4:], "labels": labels[4:]}),
        forward=lambda m, b: m(b["x"]),
        loss=lambda m, b: F.cross_entropy(m(b["x"]), b["labels"], reduction="none"),
        predict=lambda m, b: m(b["x"]).argmax(-1),
    )
    return task, {name: tensor.to(dtype) for name, tensor in weights.items()}, eigenvalues


def test_lambda_max_of_an_indefinite_quadratic_is_its_largest_eigenvalue_not_the_largest_magnitude():
    task, _ = quadratic_task([0.5, 0.25, 0.1, -1.0, -3.0])
    estimate = dominant_hessian_eigenvalue(task, {"w": task.model.w.detach()}, tolerance=1e-10)
    assert estimate.converged and estimate.eigenvalue == pytest.approx(0.5, rel=1e-9)
    assert estimate.residual <= 1e-10 * 0.5
    # The Hessian of a quadratic is the same everywhere on the line theta_0 + g tau.
    line = hessian_eigenvalues_along_line(
        task, {"w": torch.ones(5, dtype=torch.float64)}, gammas=(0.0, 0.5, 1.0), tolerance=1e-10
    )
    np.testing.assert_allclose(line.series["eigenvalue"], 0.5, rtol=1e-9)
    assert line.series["converged"].all() and (line.series["residual"] <= 1e-10).all()


def test_lambda_max_of_a_tiny_mlp_matches_the_full_hessian_when_a_negative_eigenvalue_dominates():
    # At these weights the spectrum runs from -2.010 to +0.496: power iteration returned -2.010 here.
    task, weights, exact = mlp_case(seed=14, scale=10.0)
    assert -exact[0] > 4 * exact[-1] > 0
    estimate = dominant_hessian_eigenvalue(task, weights, tolerance=1e-10)
    assert estimate.converged and estimate.eigenvalue == pytest.approx(exact[-1].item(), rel=1e-9)
    assert estimate.residual <= 1e-10 * exact[-1].item() and estimate.hessian_vector_products > 1


def test_top_k_of_a_tiny_mlp_are_the_k_largest_exact_eigenvalues_in_decreasing_order():
    task, weights, exact = mlp_case(seed=1, scale=1.0)
    estimates = top_hessian_eigenvalues(task, weights, 3, tolerance=1e-10)
    np.testing.assert_allclose([e.eigenvalue for e in estimates], exact.flip(0)[:3].numpy(), rtol=1e-8)
    assert all(e.converged and e.residual <= 1e-10 * abs(e.eigenvalue) for e in estimates)


def test_float32_model_agrees_with_the_float64_hessian_to_float32_precision():
    # The products run in float32 on the model, the Lanczos vectors in float64: the tolerance must stay above the
    # float32 rounding of the products, and the eigenvalue is that accurate.
    task, weights, exact = mlp_case(seed=10, scale=5.0, dtype=torch.float32)
    estimate = dominant_hessian_eigenvalue(task, weights, tolerance=1e-4)
    assert estimate.converged and estimate.eigenvalue == pytest.approx(exact[-1].item(), rel=1e-5)
    assert 0 < estimate.residual <= 1e-4 * estimate.eigenvalue


def test_no_convergence_within_the_restarts_is_reported_as_nan():
    task, weights, _ = mlp_case(seed=1, scale=1.0)
    estimate = dominant_hessian_eigenvalue(task, weights, tolerance=1e-14, max_iterations=1, lanczos_vectors=3)
    assert not estimate.converged and math.isnan(estimate.eigenvalue) and math.isnan(estimate.residual)
    assert estimate.hessian_vector_products >= 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be at least 1"),
        ({"k": 5, "lanczos_vectors": 5}, "lanczos_vectors"),
        ({"k": 5, "lanczos_vectors": 8}, "5 parameters"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_top_hessian_eigenvalues_rejects_bad_arguments(kwargs, message):
    task, _ = quadratic_task([1.0, 0.5, 0.25, 0.1, 0.05])
    with pytest.raises(ValueError, match=message):
        top_hessian_eigenvalues(task, {"w": task.model.w.detach()}, **kwargs)
    with pytest.raises(ValueError, match="no floating-point weights"):
        top_hessian_eigenvalues(task, {"w": torch.zeros(5, dtype=torch.long)})


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    task, _ = quadratic_task([2.0, -1.0, 0.5, 3.0, 0.25], seed=0)
    task.model.matrix = torch.diag(torch.tensor([2.0, -1.0, 0.5, 3.0, 0.25], dtype=torch.float64))
    # z^T D z = tr D for every Rademacher z, since z_i^2 = 1.
    estimate = hessian_trace(task, {"w": task.model.w.detach()}, samples=3)
    assert estimate.trace == pytest.approx(4.75, rel=1e-12) and estimate.standard_error == pytest.approx(0, abs=1e-12)


def test_hutchinson_trace_of_a_tiny_mlp_is_within_four_standard_errors_of_the_exact_trace():
    task, weights, exact = mlp_case(seed=1, scale=1.0)
    estimate = hessian_trace(task, weights, samples=200, seed=3)
    assert estimate.samples == 200 and estimate.standard_error > 0
    assert abs(estimate.trace - exact.sum().item()) <= 4 * estimate.standard_error
