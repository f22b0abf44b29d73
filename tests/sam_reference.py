"""Independent reference implementations the SAFT tests compare against.

Written from the papers' formulas, out of place and in float64, sharing no code with `saft_hf.sharpness` or
`saft_hf.trainer`:
    SAM  (Foret et al. 2021): e = rho g / ||g||
    ASAM (Kwon et al. 2021):  e = rho T^2 g / ||T g||,  T = |w| + eta
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def textbook_perturbation(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    mode: str,
    rho: float,
    eta: float = 0.01,
    adaptive: Sequence[bool] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """The perturbation `e` (float64, one tensor per weight) and the norm it is divided by."""
    if adaptive is None:
        adaptive = [True] * len(weights)
    scales = [
        weight.detach().double().abs() + eta if mode == "asam" and is_adaptive else torch.ones_like(weight).double()
        for weight, is_adaptive in zip(weights, adaptive)
    ]
    norm = torch.sqrt(sum(((scale * grad.double()) ** 2).sum() for scale, grad in zip(scales, grads)))
    return [rho * scale**2 * grad.double() / norm for scale, grad in zip(scales, grads)], float(norm)


@dataclass
class ReferenceLog:
    """What the hand-computed run measured, per micro-batch."""

    losses: list[float] = field(default_factory=list)  # per optimizer step: loss at w, summed like the Trainer's
    grad_norms: list[float] = field(default_factory=list)
    perturbation_norms: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)
    step_gradients: list[torch.Tensor] = field(default_factory=list)  # per optimizer step, clipped, flattened


@dataclass
class AdamW:
    """The Trainer's optimizer settings, for `torch.optim.AdamW` with the Trainer's weight-decay groups."""

    lr: float
    weight_decay: float
    decay_names: Sequence[str]
    max_grad_norm: float
    eps: float = 1e-8

    def build(self, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
        groups = [
            {"params": [p for n, p in named if n in self.decay_names], "weight_decay": self.weight_decay},
            {"params": [p for n, p in named if n not in self.decay_names], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.lr, eps=self.eps, foreach=False)


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _loss_and_gradients(model, batch, scale: float, perturbation=None, rng_state=None):
    """Loss (times `scale`) and its gradient, at `w + perturbation` if given; `w` is restored by copy after."""
    params = [param for _, param in _trainable(model)]
    saved = [param.detach().clone() for param in params]
    if perturbation is not None:
        with torch.no_grad():
            for param, e in zip(params, perturbation):
                param.add_(e.to(param.dtype))
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    loss = model(**batch)["loss"] * scale
    grads = list(torch.autograd.grad(loss, params))
    with torch.no_grad():
        for param, w in zip(params, saved):
            param.copy_(w)
    return loss.item(), grads


def _optimizer_step(model, optimizer: torch.optim.AdamW, settings: AdamW, gradient: list[torch.Tensor]):
    """Clip like the Trainer and step; returns the clipped gradient, flattened."""
    params = [param for _, param in _trainable(model)]
    for param, grad in zip(params, gradient):
        param.grad = grad
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    clipped = torch.cat([param.grad.reshape(-1) for param in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clipped


def reference_training(
    model: torch.nn.Module,
    steps: Sequence[Sequence[dict[str, torch.Tensor]]],
    optimizer: AdamW,
    *,
    mode: str,
    rho: float = 0.0,
    eta: float = 0.01,
    scope: str = "all",
    rng_states: Sequence[torch.Tensor] | None = None,
    scales: Sequence[Sequence[float]] | None = None,
) -> ReferenceLog:
    """Train `model` in place by hand: for each optimizer step (a list of micro-batches) and each micro-batch, the
    gradient at `w` of the loss divided by the number of micro-batches (or times `scales[step][k]`, e.g. the
    micro-batch's share of the step's label tokens for a token-weighted loss), `e` from that gradient alone, the
    gradient at `w + e` added to the step's sum; then gradient clipping and one `torch.optim.AdamW` step.
    `mode="none"` is plain training. `rng_states[i]` (one per micro-batch, in order) is set before both passes of
    micro-batch i, so dropout sees the same masks in both."""
    named = _trainable(model)
    params = [param for _, param in named]
    adaptive = [scope == "all" or "weight" in name for name, _ in named]
    adamw = optimizer.build(named)
    log = ReferenceLog()
    model.train()
    rng_iterator = iter(rng_states) if rng_states is not None else None
    for step, micro_batches in enumerate(steps):
        total = [torch.zeros_like(param) for param in params]
        log.losses.append(0.0)
        for k, batch in enumerate(micro_batches):
            rng_state = next(rng_iterator) if rng_iterator is not None else None
            scale = scales[step][k] if scales is not None else 1 / len(micro_batches)
            loss, grads = _loss_and_gradients(model, batch, scale, rng_state=rng_state)
            log.losses[-1] += loss
            if mode != "none":
                perturbation, norm = textbook_perturbation(
                    params, grads, mode=mode, rho=rho, eta=eta, adaptive=adaptive
                )
                perturbed_loss, grads = _loss_and_gradients(model, batch, scale, perturbation, rng_state)
                log.grad_norms.append(norm)
                log.perturbation_norms.append(float(torch.sqrt(sum((e**2).sum() for e in perturbation))))
                log.sharpness.append(perturbed_loss - loss)
            for accumulated, grad in zip(total, grads):
                accumulated.add_(grad)
        log.step_gradients.append(_optimizer_step(model, adamw, optimizer, total))
    return log


def reference_data_parallel_step(
    model: torch.nn.Module,
    batches: Sequence[Sequence[dict[str, torch.Tensor]]],
    optimizer: AdamW,
    *,
    synced: bool,
    mode: str = "asam",
    rho: float = 0.5,
) -> None:
    """One data-parallel optimizer step by hand, in one process. `batches[r][k]` is micro-batch k of rank r.

    For each k, rank r's perturbation comes from its own gradient (`synced=False`, the SAM paper's m-sharpness) or
    from the mean of all ranks' gradients (`synced=True`, also what FSDP's reduce-scattered gradient gives); the
    descent gradients are summed over k and averaged over ranks, as DDP and FSDP do."""
    named = _trainable(model)
    params = [param for _, param in named]
    ranks, accumulation = len(batches), len(batches[0])
    model.train()
    total = [torch.zeros_like(param) for param in params]
    for k in range(accumulation):
        ascent = [_loss_and_gradients(model, batches[r][k], 1 / accumulation)[1] for r in range(ranks)]
        if synced:
            mean = [sum(grads) / ranks for grads in zip(*ascent)]
            perturbations = [textbook_perturbation(params, mean, mode=mode, rho=rho)[0]] * ranks
        else:
            perturbations = [textbook_perturbation(params, grads, mode=mode, rho=rho)[0] for grads in ascent]
        for r in range(ranks):
            _, grads = _loss_and_gradients(model, batches[r][k], 1 / accumulation, perturbations[r])
            for accumulated, grad in zip(total, grads):
                accumulated.add_(grad / ranks)
    _optimizer_step(model, optimizer.build(named), optimizer, total)
