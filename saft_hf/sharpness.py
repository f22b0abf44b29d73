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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# Keeps `rho / norm` finite for an all-zero gradient (then e = 0); far below any real gradient norm.
NORM_EPS = 1e-12
# Elements per slice of the element-wise (A)SAM arithmetic (4 MB of float32 temporaries).
CHUNK_ELEMENTS = 1 << 20


@dataclass
class PerturbationStats:
    """Norms of one perturbation, as 0-dim float32 tensors on the gradients' device (logging syncs them lazily)."""

    grad_norm: torch.Tensor  # ||T g|| for ASAM, ||g|| for SAM: the norm `e` is divided by
    perturbation_norm: torch.Tensor  # ||e||
    finite: bool


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: the local shard of an FSDP2 `DTensor`, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def flat_buffers_like(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like each tensor's local values (its shard for a `DTensor`), as views of one flat
    buffer per dtype and device: a single allocation rather than one per tensor, which fragments the heap."""
    values = [local_tensor(tensor) for tensor in tensors]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault((value.device, value.dtype), []).append(index)
    buffers: list[torch.Tensor] = [torch.empty(0)] * len(values)
    for (device, dtype), indices in groups.items():
        sizes = [values[i].numel() for i in indices]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        for i, chunk in zip(indices, flat.split(sizes)):
            buffers[i] = chunk.view(values[i].shape)
    return buffers


def is_fully_sharded(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bool:
    """Whether the tensors are FSDP2 shards (`DTensor`s sharded over every process of the default group), for which
    `sharded=True` gives the global norm. Other `DTensor` placements (tensor parallel, HSDP replicas) raise."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sharded = False
    for name, tensor in named_tensors:
        if not isinstance(tensor, DTensor):
            continue
        if tensor.device_mesh.size() != world_size or not all(p.is_shard() for p in tensor.placements):
            raise NotImplementedError(
                f"{name} is a DTensor placed {tensor.placements} on a mesh of {tensor.device_mesh.size()} of "
                f"{world_size} processes (tensor parallel or HSDP): only tensors sharded over all processes (FSDP) "
                "are supported, for which one all-reduce of the squared local norms gives the global norm."
            )
        sharded = True
    return sharded


def _squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(local_tensor(tensor).detach(), dtype=torch.float32).square()


def _all_reduce_sum_(tensor: torch.Tensor, sharded: bool) -> torch.Tensor:
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_l2_norm(tensors: Iterable[torch.Tensor], sharded: bool = False) -> torch.Tensor:
    """L2 norm of all `tensors` taken as one vector, in float32.

    With `sharded=True` the tensors are this rank's shards of a model split across the default process group:
    the squared local norms are summed over ranks (one all-reduce) before the square root.
    """
    squared = torch.zeros((), dtype=torch.float32)
    for tensor in tensors:
        local = _squared_norm(tensor)
        squared = squared.to(local.device).add_(local)
    return _all_reduce_sum_(squared, sharded).sqrt()


def adaptive_scale(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """ASAM's element-wise scale `T = |w| + eta`, in float32 at least (fp16 `T * g` can overflow)."""
    return weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32)).add_(eta)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average `tensors` in place over the default process group (one global perturbation under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    pending = [dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True) for tensor in tensors]
    for work, tensor in zip(pending, tensors):
        work.wait()
        tensor.div_(world_size)


def _mul_in_float32_(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    """`tensor *= factor` computed in float32: a 0-dim float32 factor would otherwise be rounded to the tensor's
    dtype first, and `rho / ||g||` can exceed the fp16 range."""
    product = tensor.to(torch.promote_types(tensor.dtype, torch.float32)).mul_(factor)
    if product is not tensor:
        tensor.copy_(product)


def _chunks(weight: torch.Tensor, grad: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat slices of `weight` and `grad` of at most `CHUNK_ELEMENTS` (the whole tensors if either is not
    contiguous): the temporaries made per slice stay small enough for the allocator to recycle without touching
    fresh pages, which costs more than the arithmetic on CPU."""
    if not (weight.is_contiguous() and grad.is_contiguous()):
        yield weight, grad
        return
    weight, grad = weight.view(-1), grad.view(-1)
    for start in range(0, grad.numel(), CHUNK_ELEMENTS):
        yield weight[start : start + CHUNK_ELEMENTS], grad[start : start + CHUNK_ELEMENTS]


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
    a divergent batch) the gradients are left untouched and `finite=False` is returned: the caller must not
    perturb. The direction is invariant to a loss scale, so fp16 gradients need no unscaling first.

    Memory: temporaries of at most `CHUNK_ELEMENTS` float32 values at a time (`T` is recomputed in the second loop
    rather than kept). FSDP2 `DTensor`s are handled through their local shards; pass `sharded=True` for the global
    norm.
    """
    if mode not in ("asam", "sam"):
        raise ValueError(f"mode must be 'asam' or 'sam', got {mode!r}.")
    if adaptive is None:
        adaptive = [True] * len(weights)
    if not len(weights) == len(grads) == len(adaptive):
        raise ValueError(
            f"weights, grads and adaptive must have one entry per tensor, got {len(weights)}, {len(grads)} and "
            f"{len(adaptive)}."
        )
    weights = [local_tensor(weight) for weight in weights]
    grads = [local_tensor(grad) for grad in grads]
    scaled = [mode == "asam" and is_adaptive for is_adaptive in adaptive]

    # One pass gives ||T g|| (what `e` is divided by) and ||T^2 g|| (so ||e|| needs no second pass), reduced over
    # ranks together.
    squared = [torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)]
    for weight, grad, is_scaled in zip(weights, grads, scaled):
        for weight_chunk, grad_chunk in _chunks(weight, grad):
            if is_scaled:
                scale = adaptive_scale(weight_chunk, eta)
                scaled_grad = scale * grad_chunk
                norms = (_squared_norm(scaled_grad), _squared_norm(scaled_grad.mul_(scale)))
            else:
                norms = (_squared_norm(grad_chunk),) * 2
            squared = [total.to(norm.device).add_(norm) for total, norm in zip(squared, norms)]
    grad_norm, scaled_norm = _all_reduce_sum_(torch.stack(squared), sharded).sqrt().unbind()
    if not bool(torch.isfinite(grad_norm)):
        return PerturbationStats(grad_norm, torch.full_like(grad_norm, float("nan")), False)

    factor = rho / (grad_norm + NORM_EPS)
    for weight, grad, is_scaled in zip(weights, grads, scaled):
        for weight_chunk, grad_chunk in _chunks(weight, grad):
            scale = adaptive_scale(weight_chunk, eta).square_().mul_(factor) if is_scaled else factor
            _mul_in_float32_(grad_chunk, scale)
    return PerturbationStats(grad_norm, factor * scaled_norm, True)
