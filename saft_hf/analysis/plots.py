"""Figures of the analyses (PNG, matplotlib's Agg canvas; pyplot and its global backend are not touched).

Every function takes one result or a mapping ``{label: result}`` (e.g. ``{"SGD": ..., "SAFT": ...}``, drawn side by
side or as one line each, as in the paper's figures), writes the PNG atomically and returns its path.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..checkpoints import write_atomically
from .results import CurveResult, GridResult

SEARCH_BOX = (0.1, 1.0)  # the task-arithmetic coefficient search range of the paper (App. A.2), its red box
_GRID_LABELS = {
    "xi": "disentanglement error ξ(α₁, α₂)",
    "xi_all": "disentanglement error ξ_all(α₁, α₂)",
    "joint_loss": "joint-task loss L(θ; D₁) + L(θ; D₂)",
}


def _labelled(results, kind: type) -> dict:
    labelled = {"": results} if isinstance(results, kind) else dict(results)
    if not labelled:
        raise ValueError("Nothing to plot: no results given.")
    for label, result in labelled.items():
        if not isinstance(result, kind):
            raise TypeError(f"Result {label!r} is a {type(result).__name__}, expected a {kind.__name__}.")
    return labelled


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=120), binary=True)


def plot_grid(
    results: GridResult | Mapping[str, GridResult],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    search_box: tuple[float, float] | None = SEARCH_BOX,
    levels: int = 20,
) -> Path:
    """Filled contour heat-maps of grid results (disentanglement error, joint-task loss) on one colour scale,
    ``alpha_1`` across and ``alpha_2`` up, with the coefficient search range outlined in red."""
    panels = _labelled(results, GridResult)
    low = min(float(np.nanmin(r.values)) for r in panels.values())
    high = max(float(np.nanmax(r.values)) for r in panels.values())
    if not high > low:  # a constant map still needs an increasing list of contour levels
        high = low + 1.0
    contour_levels = MaxNLocator(levels).tick_values(low, high)  # round numbers on the colour bar
    figure = Figure(figsize=(4.4 * len(panels) + 1.2, 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, result) in zip(axes, panels.items()):
        alphas = np.asarray(result.alphas)
        filled = ax.contourf(alphas, alphas, result.values.T, levels=contour_levels, cmap="viridis", extend="neither")
        if search_box is not None:
            lo, hi = search_box
            ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="red", linewidth=1.5))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(5, steps=[1, 2.5, 5, 10]))
        ax.set_xlabel(f"α₁ ({result.tasks[0]})")
        ax.set_ylabel(f"α₂ ({result.tasks[1]})")
        ax.set_title(label or _GRID_LABELS.get(result.quantity, result.quantity))
        ax.set_aspect("equal")
    quantity = next(iter(panels.values())).quantity
    figure.colorbar(filled, ax=list(axes), label=_GRID_LABELS.get(quantity, quantity))
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _short_names(names: Sequence[str]) -> tuple[str, list[str]]:
    """The module-path prefix all names share, and the names without it (the root module, named "", as
    "(model)")."""
    prefix = posixpath.commonprefix([str(name) for name in names]) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix, [str(name)[len(prefix) :] or str(name) or "(model)" for name in names]


def _plot_curves(
    results: CurveResult | Mapping[str, CurveResult],
    path: str | os.PathLike,
    *,
    series: str,
    xlabel: str,
    ylabel: str,
    title: str | None,
    legend_summary: str | None = None,
    categorical: bool = False,
    logx: bool = False,
) -> Path:
    lines = _labelled(results, CurveResult)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    for label, result in lines.items():
        if series not in result.series:
            raise ValueError(f"Result {label!r} has no {series!r} values (it has {list(result.series)}).")
        x = np.arange(len(result.x)) if categorical else np.asarray(result.x, dtype=float)
        if legend_summary is not None:
            label = f"{label} ({legend_summary} {result.summary[legend_summary]:.3g})".strip()
        ax.plot(x, np.asarray(result.series[series], dtype=float), marker="o", label=label or None)
    if categorical:
        prefix, names = _short_names(next(iter(lines.values())).x)
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
        xlabel = f"{xlabel} ({prefix}*)" if prefix else xlabel
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend()
    return _save(figure, path)


def plot_linearity(
    results: CurveResult | Mapping[str, CurveResult],
    path: str | os.PathLike,
    *,
    title: str | None = "Cross-task linearity per layer",
) -> Path:
    """``E[1 - cos]`` per layer (paper Fig. 3); lower is more linear."""
    lam = next(iter(_labelled(results, CurveResult).values())).metadata.get("lambda")
    return _plot_curves(
        results, path, series="ctl", xlabel="layer", ylabel=f"E[1 − cos] (λ = {lam})", title=title, categorical=True
    )


def plot_loss_barrier(
    results: CurveResult | Mapping[str, CurveResult],
    path: str | os.PathLike,
    *,
    title: str | None = "Loss from the merged model (γ = 0) to the task model (γ = 1)",
) -> Path:
    """Loss along merged -> task model with each line's barrier in the legend (paper Fig. C2)."""
    return _plot_curves(results, path, series="loss", xlabel="γ", ylabel="loss", title=title, legend_summary="barrier")


def plot_hessian_eigenvalues(
    results: CurveResult | Mapping[str, CurveResult],
    path: str | os.PathLike,
    *,
    title: str | None = "Dominant Hessian eigenvalue along θ₀ + γ(θₜ − θ₀)",
) -> Path:
    """``lambda_max`` against ``gamma`` (paper Fig. D1)."""
    return _plot_curves(results, path, series="eigenvalue", xlabel="γ", ylabel="λ_max", title=title)


def plot_interpolation(
    results: CurveResult | Mapping[str, CurveResult],
    path: str | os.PathLike,
    *,
    metric: str = "accuracy",
    title: str | None = None,
) -> Path:
    """``metric`` of ``(1 - a) theta_A + a theta_B`` against ``a``, with each line's gain in the legend."""
    title = title or "Linear interpolation between two models"
    return _plot_curves(
        results, path, series=metric, xlabel="α", ylabel=metric, title=title, legend_summary=f"{metric}_gain"
    )


def plot_merge_gain_vs_noise(
    points: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    ylabel: str = "merge gain (accuracy)",
    title: str | None = "Merge gain against effective noise scale",
) -> Path:
    """Merge gain against effective noise scale ``S = lr / (B (1 - mu)^2)`` on a log axis: ``points`` maps a label
    (e.g. the swept hyper-parameter) to ``(noise scale, gain)`` pairs (second paper, Fig. 1c)."""
    curves = {}
    for label, pairs in points.items():
        if not pairs:
            raise ValueError(f"plot_merge_gain_vs_noise: no (noise scale, gain) points for {label!r}.")
        scales, gains = zip(*sorted(pairs))
        curves[label] = CurveResult("noise_scale", scales, {"gain": np.array(gains)})
    return _plot_curves(
        curves,
        path,
        series="gain",
        xlabel="effective noise scale lr / (B (1 − μ)²)",
        ylabel=ylabel,
        title=title,
        logx=True,
    )
