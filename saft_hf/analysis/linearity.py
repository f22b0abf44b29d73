"""Cross-task linearity per layer (SAFT paper Eq. 12, after Zhou et al. 2024).

For task vectors ``tau_s``, ``tau_t`` and scale ``lam`` (0.3 in the paper), the layer-``l`` feature of the merged
model should be the average of the features of the two scaled task models:

    CTL_l = E_{x in D_s u D_t} [ 1 - cos( f_l(x; theta_0 + lam (tau_s + tau_t)),
                                          0.5 f_l(x; theta_0 + 2 lam tau_s) + 0.5 f_l(x; theta_0 + 2 lam tau_t) ) ]

``f_l`` is the output of the named module ``l`` (its first tensor when it returns a tuple), flattened per example
(dimension 0 is the batch). Features that are affine in the weights give exactly 0; smaller is more linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .results import CurveResult
from .tasks import AnalysisTask
from .weights import Weights, analysed_base, call_at, combine, evaluation_mode

CTL_LAMBDA = 0.3


def block_names(model: nn.Module) -> list[str]:
    """The names of the transformer blocks of ``model``: the children of its outermost ``nn.ModuleList``s
    (``vision_model.encoder.layers.0`` ... for CLIP, ``encoder.block.*`` and ``decoder.block.*`` for T5)."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    outermost = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
    blocks = [
        f"{name}.{child}" if name else child
        for name in outermost
        for child, _ in model.get_submodule(name).named_children()
    ]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks: pass the layer names to analyse.")
    return blocks


def _first_tensor(output: Any, layer: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = tuple(output.values())
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"Layer {layer!r} returns {type(output).__name__}, not a tensor (or a tuple starting with one).")


class _FeatureRecorder:
    """Forward hooks keeping the latest output of each named layer."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        for layer in layers:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no module named {layer!r}.") from None
            self.handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            self.features[layer] = _first_tensor(output, layer).detach()

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _features(
    task: AnalysisTask, weights: Weights, batch: Any, recorder: _FeatureRecorder, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    recorder.features.clear()
    call_at(task.model, weights, task.forward, batch)
    missing = [layer for layer in layers if layer not in recorder.features]
    if missing:
        raise ValueError(f"Task {task.name!r}: layer {missing[0]!r} did not run in the task's forward pass.")
    return {layer: recorder.features[layer].to(torch.float64).flatten(1) for layer in layers}


def _one_minus_cosine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    norms = first.norm(dim=1) * second.norm(dim=1)
    return 1 - (first * second).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny)


def cross_task_linearity(
    tasks: Sequence[AnalysisTask],
    task_vectors: Sequence[Weights],
    *,
    layers: Sequence[str] | None = None,
    lam: float = CTL_LAMBDA,
    base: Weights | None = None,
) -> CurveResult:
    """``E[1 - cos]`` of Eq. 12 per layer over the inputs of ``tasks`` (normally the two tasks ``s`` and ``t``).

    ``task_vectors`` is ``(tau_s, tau_t)``; ``layers`` are module names of the tasks' models (default: every
    transformer block, :func:`block_names`). The result's series ``ctl`` is over all inputs, ``ctl[<task>]`` over
    one task's inputs.
    """
    if len(task_vectors) != 2:
        raise ValueError(f"cross_task_linearity: needs two task vectors (tau_s, tau_t), got {len(task_vectors)}.")
    if not tasks:
        raise ValueError("cross_task_linearity: needs at least one task whose inputs to use.")
    if len({task.name for task in tasks}) != len(tasks):
        raise ValueError(f"cross_task_linearity: task names must differ, got {[task.name for task in tasks]}.")
    base = analysed_base(tasks, task_vectors, base)
    layers = list(layers) if layers is not None else block_names(tasks[0].model)
    tau_s, tau_t = task_vectors
    merged = combine(base, [tau_s, tau_t], [lam, lam])
    single_s = combine(base, [tau_s], [2 * lam])
    single_t = combine(base, [tau_t], [2 * lam])
    sums = {task.name: np.zeros(len(layers)) for task in tasks}
    counts = dict.fromkeys(sums, 0)
    for task in tasks:
        recorder = _FeatureRecorder(task.model, layers)
        try:
            with evaluation_mode(task.model), torch.no_grad():
                for batch in task.batches():
                    at_merged = _features(task, merged, batch, recorder, layers)
                    at_s = _features(task, single_s, batch, recorder, layers)
                    at_t = _features(task, single_t, batch, recorder, layers)
                    for k, layer in enumerate(layers):
                        average = 0.5 * at_s[layer] + 0.5 * at_t[layer]
                        sums[task.name][k] += _one_minus_cosine(at_merged[layer], average).sum().item()
                    counts[task.name] += next(iter(at_merged.values())).shape[0]
        finally:
            recorder.remove()
        if counts[task.name] == 0:
            raise ValueError(f"Task {task.name!r}: its batches are empty.")
    series = {"ctl": sum(sums.values()) / sum(counts.values())}
    series.update({f"ctl[{name}]": sums[name] / counts[name] for name in sums})
    return CurveResult(
        x_name="layer",
        x=tuple(layers),
        series=series,
        metadata={"lambda": lam, "tasks": [task.name for task in tasks], "examples": counts},
    )
