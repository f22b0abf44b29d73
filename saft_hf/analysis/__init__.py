"""Analyses of why merging works, from the SAFT paper (Sec. 5, App. A.3, C, D) and the optimizer-implicit-bias paper.

Everything operates on weights as mappings ``{state-dict name: tensor}`` (task vectors included) and on
:class:`AnalysisTask` objects (a model, evaluation batches, loss and prediction callables), so the same code runs on
the CLIP zero-shot classifier, Flan-T5, or a tiny test module. Results save as CSV + JSON; ``plots`` draws them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .disentanglement import disentanglement_error
    from .hessian import (
        EigenvalueEstimate,
        TraceEstimate,
        dominant_hessian_eigenvalue,
        hessian_eigenvalues_along_line,
        hessian_trace,
        hessian_vector_product,
        top_hessian_eigenvalues,
    )
    from .landscape import joint_loss_landscape, linear_interpolation, loss_barrier, task_arithmetic_gain
    from .linearity import block_names, cross_task_linearity
    from .noise import (
        NOISE_SCALE_LOG_KEY,
        EffectiveNoiseScaleCallback,
        add_noise_scale_logging,
        effective_noise_scale,
        logged_noise_scale,
        optimizer_momentum,
    )
    from .plots import (
        plot_grid,
        plot_hessian_eigenvalues,
        plot_interpolation,
        plot_linearity,
        plot_loss_barrier,
        plot_merge_gain_vs_noise,
    )
    from .results import CurveResult, GridResult, coefficient_grid
    from .tasks import AnalysisTask, build_analysis_tasks, classification_task, text_to_text_task
    from .weights import accuracy, align_to_model, combine, current_weights, mean_loss, predictions

# Imported on first use (saft_hf.lazy): `from saft_hf.analysis import add_noise_scale_logging` in a training script
# should not import matplotlib, scipy and PEFT.
_EXPORTS = {
    ".disentanglement": ("disentanglement_error",),
    ".hessian": (
        "EigenvalueEstimate",
        "TraceEstimate",
        "dominant_hessian_eigenvalue",
        "hessian_eigenvalues_along_line",
        "hessian_trace",
        "hessian_vector_product",
        "top_hessian_eigenvalues",
    ),
    ".landscape": ("joint_loss_landscape", "linear_interpolation", "loss_barrier", "task_arithmetic_gain"),
    ".linearity": ("block_names", "cross_task_linearity"),
    ".noise": (
        "NOISE_SCALE_LOG_KEY",
        "EffectiveNoiseScaleCallback",
        "add_noise_scale_logging",
        "effective_noise_scale",
        "logged_noise_scale",
        "optimizer_momentum",
    ),
    ".plots": (
        "plot_grid",
        "plot_hessian_eigenvalues",
        "plot_interpolation",
        "plot_linearity",
        "plot_loss_barrier",
        "plot_merge_gain_vs_noise",
    ),
    ".results": ("CurveResult", "GridResult", "coefficient_grid"),
    ".tasks": ("AnalysisTask", "build_analysis_tasks", "classification_task", "text_to_text_task"),
    ".weights": ("accuracy", "align_to_model", "combine", "current_weights", "mean_loss", "predictions"),
}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
