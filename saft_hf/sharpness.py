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

import logging
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

# Keeps `rho / norm` finite for an all-zero gradient (then e = 0); far below any real gradient norm.
NORM_EPS = 1e-12
# Elements per batch of the element-wise (A)SAM arithmetic on CPU (see `_batches`): a batch's weights, gradients
# and saved weights in float32 (1.5 MB) fit a 2 MB L2 cache. Measured on ViT-B/32's 87.5M parameters, one thread:
# 0.27 s per perturbation in batches of 2^16 or 2^17, 0.33 s of 2^20, 0.39 s unbatched.
CHUNK_ELEMENTS = 1 << 17
# Compiled graphs per fused sweep function (see `_CompiledOnFirstUse`).
RECOMPILE_LIMIT = 64


@dataclass
class PerturbationStats:
    """Norms of one perturbation, as 0-dim float32 tensors on the gradients' device (logging syncs them lazily)."""

    grad_norm: torch.Tensor  # ||T g|| for ASAM, ||g|| for SAM: the norm `e` is divided by
    perturbation_norm: torch.Tensor  # ||e||
    finite: bool  # whether the weights were perturbed


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


def _all_reduce_sum_(tensor: torch.Tensor, sharded: bool) -> torch.Tensor:
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average `tensors` in place over the default process group (one global perturbation under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    pending = [dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True) for tensor in tensors]
    for work, tensor in zip(pending, tensors):
        work.wait()
        tensor.div_(world_size)


def _grouped(
    keys: Sequence[Hashable], *lists: Sequence[torch.Tensor]
) -> dict[Hashable, tuple[list[torch.Tensor], ...]]:
    """The aligned `lists` split by `keys[i]` (device and dtype at least): a `torch._foreach_*` op is one fused kernel
    launch only over tensors of one device and dtype."""
    groups: dict[Hashable, tuple[list[torch.Tensor], ...]] = {}
    for key, *aligned in zip(keys, *lists):
        for group, tensor in zip(groups.setdefault(key, tuple([] for _ in lists)), aligned):
            group.append(tensor)
    return groups


def _batches(*lists: list[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], ...]]:
    """The aligned `lists` (matching shapes, one device) in batches for the element-wise ops. On CPU, flat slices of
    at most `CHUNK_ELEMENTS` elements in all (tensors whole where one of them is not contiguous): a batch stays in
    cache through the several ops applied to it, rather than each op streaming every tensor from memory. Elsewhere
    the whole lists: one kernel launch per op."""
    if not lists[0] or lists[0][0].device.type != "cpu":
        yield lists
        return
    batch: tuple[list[torch.Tensor], ...] = tuple([] for _ in lists)
    size = 0
    for aligned in zip(*lists):
        if all(tensor.is_contiguous() for tensor in aligned):
            pieces = zip(*(tensor.view(-1).split(CHUNK_ELEMENTS) for tensor in aligned))
        else:
            pieces = iter([aligned])
        for piece in pieces:
            if size and size + piece[0].numel() > CHUNK_ELEMENTS:
                yield batch
                batch, size = tuple([] for _ in lists), 0
            for views, view in zip(batch, piece):
                views.append(view)
            size += piece[0].numel()
    if batch[0]:
        yield batch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors (fp16 `T * g` overflows, `rho / ||g||` can exceed the fp16 range), the
    tensor's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _is_half(dtype: torch.dtype) -> bool:
    return _compute_dtype(dtype) != dtype


def _adaptive_scale(weights: list[torch.Tensor], eta: float, out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """ASAM's element-wise scale `T = |w| + eta`, written into `out`, or into new float32 tensors if `out` is None
    (for half-precision weights: fp16 `T * g` can overflow)."""
    if out is None:
        out = [weight.float() for weight in weights]
    else:
        torch._foreach_copy_(out, weights)
    torch._foreach_abs_(out)
    torch._foreach_add_(out, eta)
    return out


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms, accumulated in float32 at least (an fp16 norm of loss-scaled gradients overflows)."""
    return torch._foreach_norm(tensors, 2, dtype=torch.float32 if tensors and _is_half(tensors[0].dtype) else None)


def _global_squared(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([norm.to(device, torch.float32) for norm in norms]).square().sum()


def _fused_squared_norms(weight: torch.Tensor, grad: torch.Tensor, eta: torch.Tensor, scaled: bool) -> torch.Tensor:
    """`[||T g||^2, ||T^2 g||^2]` of one tensor, `T = |w| + eta` if `scaled` else 1: one loop reading `w` and `g`
    once, writing nothing, once compiled."""
    grad = grad.to(_compute_dtype(grad.dtype))
    if not scaled:
        squared = grad.square().sum()
        return torch.stack([squared, squared])
    scale = weight.to(grad.dtype).abs() + eta
    scaled_grad = grad * scale
    return torch.stack([scaled_grad.square().sum(), (scaled_grad * scale).square().sum()])


def _fused_perturb_(
    weight: torch.Tensor, grad: torch.Tensor, saved: torch.Tensor, eta: torch.Tensor, factor: torch.Tensor, scaled: bool
) -> None:
    """Save `w` into `saved` and write `w + factor * T^2 g` into `w` (`T` recomputed rather than stored): one loop
    reading `w` and `g` once and writing `saved` and `w` once, once compiled. The same operations in the same order
    as the multi-tensor path, so the results are the same up to the summation order of the norms."""
    saved.copy_(weight)
    direction = grad.to(_compute_dtype(grad.dtype))
    if scaled:
        scale = weight.to(direction.dtype).abs() + eta
        direction = direction * scale * scale
    weight.copy_(weight.to(direction.dtype) + direction * factor)


class _CompiledOnFirstUse:
    """Runs functions compiled by `torch.compile` at their first use (dynamic shapes: one graph serves tensors of
    every size; one more per dtype, `scaled`, single-element or non-contiguous layout), or, once compiling has
    failed (no C++ compiler, an unsupported platform), eagerly: same results, slower."""

    def __init__(self):
        self.compiled: dict = {}
        self.failed = False

    def map(self, function, calls: Sequence[tuple]) -> list:
        """`function(*args)` for each `args` of `calls`, in order."""
        results = []
        if not self.failed:
            try:
                compiled = self.compiled.get(function)
                if compiled is None:
                    compiled = self.compiled[function] = torch.compile(function, dynamic=True, fullgraph=True)
                # dynamo's default of 8 graphs per function is fewer than the variants above.
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    for args in calls:
                        results.append(compiled(*args))
            except Exception as error:  # whatever stops inductor, eager gives the same numbers
                self.failed = True
                message = str(error).splitlines()[0] if str(error) else ""
                logger.warning(
                    "torch.compile of the (A)SAM perturbation failed (%s: %s); using eager ops instead.",
                    type(error).__name__,
                    message,
                )
        return results + [function(*args) for args in calls[len(results) :]]


_COMPILED = _CompiledOnFirstUse()


def _flat(*aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as 1-D views when all are contiguous (one compiled graph for every shape), as they are otherwise."""
    if all(tensor.is_contiguous() for tensor in aligned):
        return tuple(tensor.view(-1) for tensor in aligned)
    return aligned


@torch.no_grad()
def perturb_weights_(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
    *,
    mode: Literal["asam", "sam"],
    rho: float,
    eta: float = 0.01,
    adaptive: Sequence[bool] | None = None,
    sharded: bool = False,
    compiled: bool = False,
) -> PerturbationStats:
    """Save each weight `w` into `saved` and move it to `w + e`, the (A)SAM perturbation computed from `grads`;
    `restore_weights_(weights, saved)` then gives `w` back exactly.

    `saved` holds one tensor shaped like each weight's local values (see `flat_buffers_like`). `adaptive[i]` says
    whether tensor i gets ASAM's `|w| + eta` scaling (default: all); tensors without it use `T = 1`, as the official
    ASAM code does for biases. The gradients serve as scratch space and hold no meaningful values afterwards. When
    the gradient norm is not finite (an fp16 overflow, a divergent batch) the weights are left untouched and
    `finite=False` is returned. The direction is invariant to a loss scale, so fp16 gradients need no unscaling.

    Cost: fused multi-tensor (`torch._foreach_*`) ops per device and dtype, in cache-sized batches on CPU. Float32
    and float64 tensors need no temporaries: `T` is built in `saved` before `w` is saved there, and `T^2 g` in the
    gradients. Half-precision tensors are computed in float32, in batches. One host synchronisation, the
    finiteness of the norm, which also yields `rho / ||T g||` as a Python float for the update. FSDP2 `DTensor`s
    are handled through their local shards; pass `sharded=True` for the global norm.

    `compiled=True` runs each sweep over CPU tensors as one loop per tensor compiled by `torch.compile` (inductor
    generates C++; compiled at the first call in the process, 3-17 s, then cached), the memory-traffic floor of the
    computation: the first reads `w` and `g`, the second reads them again (recomputing `T`) and writes `saved` and
    `w + e`; the gradients are left untouched. Same numbers up to the summation order of the norms. If compiling
    fails, a warning is logged and eager ops are used from then on.
    """
    if mode not in ("asam", "sam"):
        raise ValueError(f"mode must be 'asam' or 'sam', got {mode!r}.")
    if adaptive is None:
        adaptive = [True] * len(weights)
    if not len(weights) == len(grads) == len(saved) == len(adaptive):
        raise ValueError(
            f"weights, grads, saved and adaptive must have one entry per tensor, got {len(weights)}, {len(grads)}, "
            f"{len(saved)} and {len(adaptive)}."
        )
    weights = [local_tensor(weight) for weight in weights]
    grads = [local_tensor(grad) for grad in grads]
    keys = [(grad.device, grad.dtype, mode == "asam" and is_adaptive) for grad, is_adaptive in zip(grads, adaptive)]
    groups = _grouped(keys, weights, grads, saved)
    # Decided once per call: the two sweeps of a group must take the same path.
    fused = compiled and not _COMPILED.failed
    eta_value = torch.tensor(eta, dtype=torch.float64)  # a tensor, so that compiled graphs take it as an input

    # One sweep gives ||T g|| (what `e` is divided by) and ||T^2 g|| (so ||e|| needs no further sweep), leaving
    # T^2 g in gradients that are not half precision (multi-tensor path).
    grad_norms: list[torch.Tensor] = []
    scaled_norms: list[torch.Tensor] = []
    fused_squared: list[torch.Tensor] = []  # [||T g||^2, ||T^2 g||^2] per tensor of the compiled path
    for (device, dtype, scaled), group in groups.items():
        if fused and device.type == "cpu":
            fused_squared += _COMPILED.map(
                _fused_squared_norms, [(*_flat(w, g), eta_value, scaled) for w, g, _ in zip(*group)]
            )
            continue
        for weight_batch, grad_batch, saved_batch in _batches(*group):
            if not scaled:
                norms = _norms(grad_batch)
                grad_norms += norms
                scaled_norms += norms
                continue
            half = _is_half(dtype)
            scale = _adaptive_scale(weight_batch, eta, None if half else saved_batch)
            scaled_grads = [grad.float() for grad in grad_batch] if half else grad_batch
            torch._foreach_mul_(scaled_grads, scale)
            grad_norms += _norms(scaled_grads)
            torch._foreach_mul_(scaled_grads, scale)
            scaled_norms += _norms(scaled_grads)
    device = grads[0].device if grads else torch.device("cpu")
    squared = torch.stack([_global_squared(grad_norms, device), _global_squared(scaled_norms, device)])
    if fused_squared:
        squared += torch.stack(fused_squared).sum(0).to(device, torch.float32)
    grad_norm, scaled_norm = _all_reduce_sum_(squared, sharded).sqrt().unbind()
    norm = float(grad_norm)  # the host synchronisation
    if not math.isfinite(norm):
        return PerturbationStats(grad_norm, torch.full_like(grad_norm, float("nan")), False)

    factor = rho / (norm + NORM_EPS)
    factor_value = torch.tensor(factor, dtype=torch.float64)
    for (device, dtype, scaled), group in groups.items():
        if fused and device.type == "cpu":
            _COMPILED.map(
                _fused_perturb_, [(*_flat(*aligned), eta_value, factor_value, scaled) for aligned in zip(*group)]
            )
            continue
        for weight_batch, grad_batch, saved_batch in _batches(*group):
            direction = grad_batch  # g, or T^2 g from the first sweep
            if _is_half(dtype):
                # In float32: `rho / ||g||` can exceed the fp16 range, so the update must not be computed in the
                # weights' dtype.
                direction = [grad.float() for grad in grad_batch]
                if scaled:
                    scale = _adaptive_scale(weight_batch, eta, None)
                    torch._foreach_mul_(direction, scale)
                    torch._foreach_mul_(direction, scale)
            torch._foreach_copy_(saved_batch, weight_batch)
            torch._foreach_add_(weight_batch, direction, alpha=factor)
    return PerturbationStats(grad_norm, scaled_norm * factor, True)


@torch.no_grad()
def restore_weights_(weights: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy the weights saved by `perturb_weights_` back (exact in every dtype)."""
    weights = [local_tensor(weight) for weight in weights]
    for weight_group, saved_group in _grouped([(w.device, w.dtype) for w in weights], weights, saved).values():
        torch._foreach_copy_(weight_group, saved_group)
