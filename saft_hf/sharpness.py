"""(A)SAM perturbation math as pure functions over tensors.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021):
    e = rho * g / ||g||
ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
Networks", ICML 2021):
    T = |w| + eta,   e = rho * T^2 g / ||T g||
The norm is one global L2 norm over every perturbed tensor. Under FSDP each rank holds shards, so the squared local
norms are all-reduced before the square root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

# Keeps `rho / norm` finite for an all-zero gradient (then e = 0); far below any real gradient norm.
NORM_EPS = 1e-12


@dataclass
class PerturbationStats:
    """Norms of one perturbation, as 0-dim float32 tensors (kept on device to avoid a host sync per step)."""

    grad_norm: torch.Tensor  # ||T g|| for ASAM, ||g|| for SAM: the norm `e` is divided by
    perturbation_norm: torch.Tensor  # ||e||
    finite: bool


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: the local shard of an FSDP2 `DTensor`, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def global_l2_norm(tensors: Sequence[torch.Tensor], sharded: bool = False) -> torch.Tensor:
    """L2 norm of all `tensors` taken as one vector, in float32.

    With `sharded=True` the tensors are this rank's shards of a model split across the default process group:
    the squared local norms are summed over ranks (one all-reduce) before the square root.
    """
    device = local_tensor(tensors[0]).device if tensors else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for tensor in tensors:
        squared += local_tensor(tensor).detach().float().pow(2).sum()
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(squared, op=dist.ReduceOp.SUM)
    return squared.sqrt()


def adaptive_scale(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """ASAM's element-wise scale `T = |w| + eta`."""
    return weight.detach().abs().add_(eta)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average `tensors` in place over the default process group (one global perturbation under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)


@torch.no_grad()
def gradients_to_perturbation_(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    mode: Literal["asam", "sam"],
    rho: float,
    eta: float = 0.01,
    adaptive: Sequence[bool] | None = None,
    sharded: bool = False,
) -> PerturbationStats:
    """Overwrite each gradient in `grads` with its share of the (A)SAM perturbation `e`.

    `adaptive[i]` says whether tensor i gets ASAM's `|w| + eta` scaling (default: all); tensors without it use
    `T = 1`, as the official ASAM code does for biases. When the gradient norm is not finite (an fp16 overflow,
    a divergent batch) the gradients are left as they are and `finite=False` is returned: the caller must not
    perturb. The direction is invariant to a loss scale, so fp16 gradients need no unscaling first.
    """
    if adaptive is None:
        adaptive = [True] * len(weights)
    scaled = mode == "asam"
    if scaled:
        for weight, grad, is_adaptive in zip(weights, grads, adaptive):
            if is_adaptive:
                grad.mul_(adaptive_scale(weight, eta))
    grad_norm = global_l2_norm(grads, sharded=sharded)
    finite = bool(torch.isfinite(grad_norm))
    if not finite:
        return PerturbationStats(grad_norm, torch.full_like(grad_norm, float("nan")), False)
    factor = rho / (grad_norm + NORM_EPS)
    for weight, grad, is_adaptive in zip(weights, grads, adaptive):
        if scaled and is_adaptive:
            grad.mul_(adaptive_scale(weight, eta))
        grad.mul_(factor.to(grad.dtype))
    return PerturbationStats(grad_norm, global_l2_norm(grads, sharded=sharded), True)

