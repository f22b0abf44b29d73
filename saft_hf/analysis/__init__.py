"""Analyses of why merging works, from the SAFT paper (Sec. 5, App. A.3, C, D) and the optimizer-implicit-bias paper.

Everything operates on weights as mappings ``{state-dict name: tensor}`` (task vectors included) and on
:class:`AnalysisTask` objects (a model, evaluation batches, loss and prediction callables), so the same code runs on
the CLIP zero-shot classifier, Flan-T5, or a tiny test module. Results save as CSV + JSON; ``plots`` draws them.
"""

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

__all__ = [
    "NOISE_SCALE_LOG_KEY",
    "AnalysisTask",
    "CurveResult",
    "EffectiveNoiseScaleCallback",
    "EigenvalueEstimate",
    "TraceEstimate",
    "GridResult",
    "accuracy",
    "add_noise_scale_logging",
    "align_to_model",
    "block_names",
    "build_analysis_tasks",
    "classification_task",
    "coefficient_grid",
    "combine",
    "cross_task_linearity",
    "current_weights",
    "disentanglement_error",
    "dominant_hessian_eigenvalue",
    "effective_noise_scale",
    "hessian_eigenvalues_along_line",
    "hessian_trace",
    "hessian_vector_product",
    "joint_loss_landscape",
    "linear_interpolation",
    "logged_noise_scale",
    "loss_barrier",
    "mean_loss",
    "optimizer_momentum",
    "plot_grid",
    "plot_hessian_eigenvalues",
    "plot_interpolation",
    "plot_linearity",
    "plot_loss_barrier",
    "plot_merge_gain_vs_noise",
    "predictions",
    "task_arithmetic_gain",
    "text_to_text_task",
    "top_hessian_eigenvalues",
]
