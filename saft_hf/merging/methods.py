"""Merge methods: a registry of small pure functions over one tensor name at a time.

Every method takes the base tensor ``theta_0``, the fine-tuned tensors ``theta_t`` (same shape), one weight per
model and its keyword parameters, and returns the merged tensor in float64 (in float32 when a method registered with
``float32=True`` is passed ``dtype=torch.float32``, as the engine does for float32 inputs and output). Task vectors
``tau_t = theta_t - theta_0`` are formed one model at a time inside the function and never stacked, so a method's
working memory does not grow with the number of models (the inputs themselves are memory-mapped by the engine).
Parameters registered with ``per_model=True`` (density, gamma, epsilon: mergekit's per-model parameters) take one
value or a sequence of one value per model (see ``MergeMethod.per_model_arguments``). Computing in float64 makes
``theta_0 + 1 * (theta_t - theta_0)`` reproduce ``theta_t`` exactly after the cast back to float32.

Libraries disagree on conventions (docs/conventions.md); each docstring states the one implemented, the others are
options where they are cheap. Trimming is always per tensor (as mergekit and PEFT do; the TIES paper's code trims
over the whole flattened model, which a streaming merge cannot do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

COMPUTE_DTYPE = torch.float64
# sparsify(model index, tau_t) -> sparse tau_t; deterministic per model (called again for the same model).
Sparsify = Callable[[int, torch.Tensor], torch.Tensor]
# A parameter registered with ``per_model=True``: one value for every model, or one per model in their order.
PerModel = float | Sequence[float]
_REQUIRED = object()


@dataclass(frozen=True)
class MethodParameter:
    """A declared method parameter: its type, default, and allowed values."""

    name: str
    help: str
    default: Any = _REQUIRED
    kind: type = float
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    per_model: bool = False  # may differ between models (a recipe's ``models[i].parameters``; mergekit's per-model)

    def validate(self, value: Any, *, where: str) -> Any:
        label = f"{where}.{self.name}"
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{label}: must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{label}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{label}: expected a finite number, got {value!r}")
        if self.kind is int:
            if value != int(value):
                raise ValueError(f"{label}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            relation = ">" if self.exclusive_minimum else ">="
            raise ValueError(f"{label}: must be {relation} {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{label}: must be <= {self.maximum}, got {value}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function, where it comes from, and what it accepts."""

    name: str
    function: Callable[..., torch.Tensor]
    reference: str  # the paper the method comes from
    parameters: tuple[MethodParameter, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    uses_weights: bool = True
    seeded: bool = False  # takes ``seed``; the engine derives one per tensor name
    # takes ``dtype=torch.float32``, which the engine passes when every input and the output are float32 or narrower:
    # the result then stays within one float32 rounding of the float64 result (see ``task_arithmetic``)
    float32: bool = False
    # every merged entry is NaN or infinite wherever an entry of an input or the base is (sums and scalings of all of
    # them, no masking or selection): the engine then checks the merged tensor instead of reading every input once
    # more to check it
    propagates_nonfinite: bool = False
    coefficient: str | None = "alpha"  # the scale (or interpolation) parameter a coefficient search varies
    check: Callable[[dict[str, Any], str], None] | None = field(default=None, repr=False)  # cross-parameter rules

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]

    def resolve_parameters(
        self, given: Mapping[str, Any], *, where: str = "parameters", defaults: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``defaults`` (the method's own, unless given) updated with ``given``, validated; errors name the field."""
        declared = {parameter.name: parameter for parameter in self.parameters}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise ValueError(f"{where}.{unknown[0]}: unknown parameter for method {self.name!r} (known: {known})")
        resolved = dict(defaults) if defaults is not None else {}
        for name, parameter in declared.items():
            if name in given:
                resolved[name] = parameter.validate(given[name], where=where)
            elif name not in resolved:
                if parameter.default is _REQUIRED:
                    raise ValueError(f"{where}.{name}: required by method {self.name!r}")
                resolved[name] = parameter.default
        if self.check is not None:
            self.check(resolved, where)
        return resolved

    def per_model_arguments(
        self, shared: Mapping[str, Any], models: Sequence[Mapping[str, Any]], *, where: str = "models"
    ) -> dict[str, Any]:
        """The function's keyword arguments: ``shared`` (resolved parameters), where each per-model parameter that
        some model sets (``models[i]``: that model's own values) becomes a tuple of one value per model, the
        model's own or else the shared one. Each model's combination is validated (errors name
        ``{where}[i].parameters``)."""
        declared = {parameter.name for parameter in self.parameters if parameter.per_model}
        set_somewhere = {name for values in models for name in values}
        for index, values in enumerate(models):
            for name in sorted(set(values) - declared):
                known = ", ".join(sorted(declared)) or "none"
                raise ValueError(
                    f"{where}[{index}].parameters.{name}: not a per-model parameter of method "
                    f"{self.name!r} (per-model: {known})"
                )
        if not set_somewhere:
            return dict(shared)
        resolved = [
            self.resolve_parameters(values, where=f"{where}[{index}].parameters", defaults=shared)
            for index, values in enumerate(models)
        ]
        return {**shared, **{name: tuple(values[name] for values in resolved) for name in set_somewhere}}

    def check_model_count(self, count: int) -> None:
        if count < self.min_models or (self.max_models is not None and count > self.max_models):
            wanted = (
                str(self.min_models)
                if self.min_models == self.max_models
                else (f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else ""))
            )
            raise ValueError(f"models: method {self.name!r} needs {wanted} models, got {count}")

    def __call__(
        self,
        base: torch.Tensor,
        finetuned: Sequence[torch.Tensor],
        weights: Sequence[float] | None = None,
        **parameters: Any,
    ) -> torch.Tensor:
        """Merge one tensor; a per-model parameter may be given as a list of one value per model."""
        self.check_model_count(len(finetuned))
        weights = [1.0] * len(finetuned) if weights is None else list(weights)
        if len(weights) != len(finetuned):
            raise ValueError(f"weights: {len(weights)} weights for {len(finetuned)} models")
        lists = {name: value for name, value in parameters.items() if isinstance(value, list | tuple)}
        for name, values in lists.items():
            if len(values) != len(finetuned):
                raise ValueError(f"{name}: {len(values)} values for {len(finetuned)} models")
        shared = self.resolve_parameters({name: value for name, value in parameters.items() if name not in lists})
        models = [{name: values[index] for name, values in lists.items()} for index in range(len(finetuned))]
        return self.function(base, finetuned, weights, **self.per_model_arguments(shared, models))


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str, *, reference: str, parameters: Sequence[MethodParameter] = (), **options: Any):
    """Register ``function`` under ``name`` (see :class:`MergeMethod` for ``options``)."""

    def decorator(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(name, function, reference, tuple(parameters), **options)
        return function

    return decorator


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ValueError(f"method: unknown merge method {name!r} (known: {', '.join(sorted(MERGE_METHODS))})")
    return MERGE_METHODS[name]


# ---- shared building blocks -------------------------------------------------------------------------------------


def _as_compute(tensor: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """A ``dtype`` (float64) copy we may modify in place (``.to`` alone would alias an input already of it)."""
    return tensor.to(dtype, copy=True)


def _task_vectors(base_compute: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``theta_t - theta_0`` in the dtype of ``base_compute`` (float64), one model at a time, as fresh tensors.
    Each input is converted explicitly (exact for every float dtype into float64): torch does not promote float8
    types."""
    for tensor in finetuned:
        yield _as_compute(tensor, base_compute.dtype).sub_(base_compute)


def _kth_largest(flat: torch.Tensor, k: int) -> float:
    """The k-th largest value by selection, not a full sort: numpy's introselect, which on CPU is several times
    faster than ``torch.kthvalue`` (and ``topk``) on ViT-sized tensors, with the same result."""
    position = flat.numel() - k
    return float(np.partition(flat.numpy(), position)[position])


def magnitude_band(magnitude: torch.Tensor, keep: int, drop: int = 0) -> tuple[float, float]:
    """Thresholds ``(low, high)`` selecting the ``keep`` entries ranked just below the ``drop`` largest by magnitude:
    keep ``low <= |x| < high``. Thresholds come from a selection, not a sort; entries tied with a threshold are all
    kept at the low end and all dropped at the high end (mergekit and PEFT break such ties by position)."""
    flat = magnitude.reshape(-1)
    count = flat.numel()
    drop = min(count, drop)
    last = min(count, drop + keep)
    low = _kth_largest(flat, last) if last > drop else math.inf
    high = _kth_largest(flat, drop) if drop else math.inf
    return low, high


def _model_values(value: float | Sequence[float], count: int) -> tuple[float, ...]:
    """A per-model parameter as one value per model (a single value is every model's)."""
    return tuple(value) if isinstance(value, Sequence) else (value,) * count


def _trim_count(density: float, count: int) -> int:
    """Entries TIES keeps: ``max(1, int(density * count))``, mergekit's ``sparsify.magnitude`` (PEFT's ``prune``
    keeps ``int(density * count)`` too, but none where that is 0)."""
    return max(1, int(density * count))


def _band_counts(density: float, gamma: float, count: int) -> tuple[int, int]:
    """Breadcrumbs' ``(keep, drop)`` as mergekit's ``magnitude_outliers`` defines them: keep ``int(density * n)``
    entries below the ``int(gamma * n)`` largest, dropping fewer outliers where both do not fit."""
    keep = int(density * count)
    return keep, min(int(gamma * count), count - keep)


def _magnitude_sparsifier(counts: Callable[[int, int], tuple[int, int]]) -> Sparsify:
    """Zero each task vector outside its magnitude band (``counts(model index, numel) -> (keep, drop)``), in place
    (the task vectors are fresh tensors); the band's thresholds are computed once per model."""
    bands: dict[int, tuple[float, float]] = {}

    def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
        magnitude = delta.abs()
        if index not in bands:
            bands[index] = magnitude_band(magnitude, *counts(index, delta.numel()))
        low, high = bands[index]
        keep = magnitude >= low
        if high != math.inf:
            keep &= magnitude < high
        return delta.masked_fill_(keep.logical_not_(), 0.0)  # NaN entries are not kept, as with torch.where

    return sparsify


def _model_generator(seed: int, model_index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + model_index) % 2**63)


def dare_sparsify(delta: torch.Tensor, density: float, rescale: str, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry independently with probability ``1 - density`` (keep where ``torch.rand`` in float32 is
    below ``density``) and rescale the survivors (see :func:`_rescale`, ``1 / density`` for ``"inverse_density"``)."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return _rescale(delta, torch.where(keep, delta, 0.0), rescale, density)


def _rescale(delta: torch.Tensor, kept: torch.Tensor, rescale: str, probability: float | torch.Tensor) -> torch.Tensor:
    """Rescale the kept entries of ``delta``: divided by their keep ``probability`` (``"inverse_density"``: DARE's
    and DELLA's unbiased rescale), by one factor that restores the L1 norm of ``delta`` (``"l1_norm"``, mergekit's
    ``rescale: true``; left as is when nothing is kept, where mergekit also skips norms below 1e-7), or not at all
    (``"none"``, mergekit's ``rescale: false``)."""
    if rescale == "inverse_density":
        return kept.div_(probability)
    if rescale == "l1_norm":
        norm_before, norm_after = delta.abs().sum(), kept.abs().sum()
        return kept.mul_(norm_before / norm_after) if norm_after > 0 else kept
    return kept


def _weighted_sum(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
    sparsify: Sparsify | None = None,
) -> torch.Tensor:
    """``theta_0 + alpha * sum_t w_t * sparsify(tau_t)``, computed in float64, one model at a time."""
    base64 = _as_compute(base)
    total = torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        total.add_(delta if sparsify is None else sparsify(index, delta), alpha=weight)
    return base64.add_(total, alpha=alpha)


def _sign_consensus(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
    sparsify: Sparsify,
    sign_election: str,
    disjoint_mean: str,
) -> torch.Tensor:
    """TIES steps 2-3 on sparsified task vectors: elect a sign per entry, combine the entries that agree with it.

    ``sparsify(t, tau_t)`` must be deterministic: it is called twice per model so that only one task vector is
    alive at a time. With ``"weighted"`` sign election (mergekit's ``consensus_method: sum``) the elected sign is
    that of ``sum_t w_t sparse_t`` and model t agrees where ``w_t sparse_t`` has it; with ``"unweighted"`` (PEFT's
    ``majority_sign_method="total"``) both use ``sparse_t`` alone; a zero sum elects ``+`` (both libraries), zero
    entries never agree. The agreeing ``w_t sparse_t`` are summed and divided by the agreeing weights
    (``"weight_sum"``, mergekit's ``normalize: true``), by the number of agreeing models (``"count"``, PEFT), or
    not at all (``"none"``, mergekit's ``normalize: false``); a zero divisor divides by 1 (an entry no model agrees
    on is 0). The TIES paper has no per-model weights: with all ``w_t = 1`` the two sign rules and the two means
    are its formula.
    """
    weighted = sign_election == "weighted"
    base64 = _as_compute(base)
    sign_sum = torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        sign_sum.add_(sparsify(index, delta), alpha=weight if weighted else 1.0)
    positive = sign_sum >= 0
    del sign_sum
    numerator, denominator = torch.zeros_like(base64), torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        sparse = sparsify(index, delta)
        voted = sparse * weight if weighted else sparse  # the vector whose sign counts as this model's vote
        agrees = ((voted > 0) == positive) & (voted != 0)
        numerator.add_(torch.where(agrees, sparse, 0.0), alpha=weight)
        if disjoint_mean != "none":
            denominator.add_(agrees, alpha=weight if disjoint_mean == "weight_sum" else 1.0)
    if disjoint_mean != "none":
        numerator.div_(denominator.masked_fill_(denominator == 0, 1.0))
    return base64.add_(numerator, alpha=alpha)


def _alpha(default: float) -> MethodParameter:
    return MethodParameter("alpha", "Scale of the merged task vector added to the base.", default)


def _density(default: float) -> MethodParameter:
    return MethodParameter(
        "density",
        "Fraction of entries of each task vector kept.",
        default,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        per_model=True,
    )


_SIGN_ELECTION = MethodParameter(
    "sign_election",
    "Elect signs on weighted (mergekit) or unweighted (PEFT) task vectors.",
    "weighted",
    kind=str,
    choices=("weighted", "unweighted"),
)
_DISJOINT_MEAN = MethodParameter(
    "disjoint_mean",
    "Divide the agreeing sum by the agreeing weights (mergekit), by their count (PEFT), or not.",
    "weight_sum",
    kind=str,
    choices=("weight_sum", "count", "none"),
)
_RESCALE = MethodParameter(
    "rescale",
    "Rescale kept entries by 1/density (DARE paper), to keep the L1 norm (mergekit), or not.",
    "inverse_density",
    kind=str,
    choices=("inverse_density", "l1_norm", "none"),
)
_SEED = MethodParameter("seed", "Seed of the random drop masks.", 0, kind=int)


# ---- the methods ------------------------------------------------------------------------------------------------


@register_merge_method(
    "weight_average",
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    coefficient=None,
)
def weight_average(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the fine-tuned weights: ``sum_t w_t theta_t / sum_t w_t`` (weights are normalised).

    The base only fixes the shape; with equal weights this is the plain average (``alpha_t = 1/T`` in task
    arithmetic terms).
    """
    total_weight = math.fsum(weights)
    if total_weight == 0:
        raise ValueError("models: weight_average needs weights with a non-zero sum")
    total = torch.zeros(base.shape, dtype=COMPUTE_DTYPE)
    for weight, tensor in zip(weights, finetuned):
        total.add_(tensor.to(COMPUTE_DTYPE), alpha=weight)
    return total.div_(total_weight)


@register_merge_method(
    "task_arithmetic",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    parameters=(_alpha(0.3),),
    float32=True,
    propagates_nonfinite=True,
)
def task_arithmetic(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 0.3,
    dtype: torch.dtype = COMPUTE_DTYPE,
) -> torch.Tensor:
    """``theta_0 + alpha * sum_t w_t tau_t`` (weights are not normalised; negative weights subtract a task).

    With ``dtype=torch.float32`` (the engine's choice for float32 inputs and output) each ``tau_t`` is the correctly
    rounded difference, and the sum is accumulated and added to the base in float32, block by block over all models
    at once (``_blockwise_weighted_sum``, for memory-mapped inputs): at a fraction of the memory traffic,
    the result differs from the float64 one (cast to float32) by at most float32 summation's error bound,
    ``eps * (|result| + T |alpha| sum_t |w_t tau_t|)`` (measured on 8 ViT-B/32 fine-tunes: at most 1.2e-7, one
    rounding of a weight near 1, in 13% of the entries)."""
    if max(abs(alpha), *map(abs, weights)) > torch.finfo(dtype).max:  # torch refuses such a scalar in float32
        dtype = COMPUTE_DTYPE  # the result then overflows at the cast, where the engine names the likely cause
    if dtype == COMPUTE_DTYPE:
        return _weighted_sum(base, finetuned, weights, alpha)
    return _blockwise_weighted_sum(base, finetuned, weights, alpha, dtype)


# Entries per block of `_blockwise_weighted_sum`: a block of the sum and one difference (2 x 256 KB in float32) stay
# in a core's L2 cache while every model's block is added (measured on ViT-B/32 weights: 1.5x faster than whole
# tensors, whose differences go through memory; 2**15 and 2**17 were slower).
_BLOCK = 2**16


def _blockwise_weighted_sum(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    """``theta_0 + alpha * sum_t w_t tau_t`` in ``dtype``: the operations of ``_weighted_sum`` in the same order
    (``w_1 tau_1``, then ``+ w_t tau_t`` for each next model, then ``theta_0 + alpha * sum``, each rounded to
    ``dtype``), done block by block over the flattened tensors with every model's tensor at hand. It reads all
    inputs at once, so it is for inputs that cost no memory to hold (memory-mapped: the engine's float32 path is
    taken only when every input is a model's tensor) and allocates only the result and one block."""
    inputs = [tensor.reshape(-1) for tensor in finetuned]
    flat_base = base.reshape(-1) if base.dtype == dtype else base.reshape(-1).to(dtype)
    result = torch.empty(flat_base.shape, dtype=dtype)
    delta = torch.empty(min(_BLOCK, flat_base.numel()), dtype=dtype)
    for start in range(0, flat_base.numel(), _BLOCK):
        stop = min(start + _BLOCK, flat_base.numel())
        base_block, total = flat_base[start:stop], result[start:stop]
        for index, (weight, tensor) in enumerate(zip(weights, inputs)):
            block = tensor[start:stop] if tensor.dtype.itemsize > 1 else tensor[start:stop].to(dtype)  # no float8
            if index == 0:  # 0 + w * tau is w * tau
                torch.sub(block, base_block, out=total)
                if weight != 1.0:
                    total.mul_(weight)
            else:
                total.add_(torch.sub(block, base_block, out=delta[: stop - start]), alpha=weight)
        torch.add(base_block, total, alpha=alpha, out=total)
    return result.reshape(base.shape)


@register_merge_method(
    "ties",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models (arXiv:2306.01708)",
    parameters=(_alpha(1.0), _density(0.2), _SIGN_ELECTION, _DISJOINT_MEAN),
)
def ties(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 1.0,
    density: PerModel = 0.2,
    sign_election: Literal["weighted", "unweighted"] = "weighted",
    disjoint_mean: Literal["weight_sum", "count", "none"] = "weight_sum",
) -> torch.Tensor:
    """TIES: trim, elect sign, disjoint mean, then ``theta_0 + alpha * merged``.

    Trim keeps the ``max(1, int(density * n))`` largest-magnitude entries of each ``tau_t``, per tensor of ``n``
    entries: mergekit's count, and PEFT's wherever ``density * n >= 1`` (PEFT keeps none below); rounding
    ``density * n`` to the nearest integer instead would keep one more entry wherever it rounds up. The paper's
    pruned fraction is ``1 - density``. Sign election and the disjoint mean follow the options documented in
    ``_sign_consensus`` (defaults: mergekit's ``ties``); with all weights 1 every option combination is the paper's
    formula, and ``sign_election="unweighted", disjoint_mean="count"`` is PEFT's ``ties``.
    """
    densities = _model_values(density, len(finetuned))
    trim = _magnitude_sparsifier(lambda index, count: (_trim_count(densities[index], count), 0))
    return _sign_consensus(base, finetuned, weights, alpha, trim, sign_election, disjoint_mean)


def _dare_sparsifier(densities: Sequence[float], rescale: str, seed: int) -> Sparsify:
    def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
        return dare_sparsify(delta, densities[index], rescale, _model_generator(seed, index))

    return sparsify


_DARE_PAPER = (
    "Yu et al. 2024, Language models are Super Mario: absorbing abilities from homologous models (arXiv:2311.03099)"
)


@register_merge_method(
    "dare_linear", reference=_DARE_PAPER, parameters=(_alpha(0.3), _density(0.5), _RESCALE, _SEED), seeded=True
)
def dare_linear(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 0.3,
    density: PerModel = 0.5,
    rescale: Literal["inverse_density", "l1_norm", "none"] = "inverse_density",
    seed: int = 0,
) -> torch.Tensor:
    """DARE then task arithmetic: ``theta_0 + alpha * sum_t w_t DARE(tau_t)``.

    DARE drops each entry with probability ``1 - density`` and rescales the survivors (``rescale``). Model ``t``'s
    mask is drawn from ``torch.Generator().manual_seed(seed + t)``; the engine passes a seed derived from the
    recipe's ``seed`` and the tensor name, so masks differ between tensors and do not depend on processing order.
    """
    sparsify = _dare_sparsifier(_model_values(density, len(finetuned)), rescale, seed)
    return _weighted_sum(base, finetuned, weights, alpha, sparsify)


@register_merge_method(
    "dare_ties",
    reference=_DARE_PAPER,
    parameters=(_alpha(1.0), _density(0.5), _RESCALE, _SEED, _SIGN_ELECTION, _DISJOINT_MEAN),
    seeded=True,
)
def dare_ties(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 1.0,
    density: PerModel = 0.5,
    rescale: Literal["inverse_density", "l1_norm", "none"] = "inverse_density",
    seed: int = 0,
    sign_election: Literal["weighted", "unweighted"] = "weighted",
    disjoint_mean: Literal["weight_sum", "count", "none"] = "weight_sum",
) -> torch.Tensor:
    """DARE in place of TIES' magnitude trim, then TIES sign election and disjoint mean (as in ``ties``);
    masks are seeded as in ``dare_linear``."""
    sparsify = _dare_sparsifier(_model_values(density, len(finetuned)), rescale, seed)
    return _sign_consensus(base, finetuned, weights, alpha, sparsify, sign_election, disjoint_mean)


@register_merge_method(
    "breadcrumbs",
    reference="Davari & Belilovsky 2024, Model breadcrumbs: scaling multi-task model merging with sparse masks "
    "(arXiv:2312.06795)",
    parameters=(
        _alpha(0.3),
        _density(0.9),
        MethodParameter(
            "gamma",
            "Fraction of largest-magnitude entries (outliers) removed.",
            0.01,
            minimum=0.0,
            maximum=1.0,
            per_model=True,
        ),
    ),
)
def breadcrumbs(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 0.3,
    density: PerModel = 0.9,
    gamma: PerModel = 0.01,
) -> torch.Tensor:
    """Model breadcrumbs: per tensor of ``n`` entries and model, drop the ``int(gamma * n)`` largest entries of
    ``tau_t`` by magnitude (outliers) and keep the next ``int(density * n)``, then ``theta_0 + alpha * sum_t w_t
    masked_t``: mergekit's ``magnitude_outliers`` counts, which drop fewer outliers when ``density + gamma > 1``
    so that ``density`` is kept. ``gamma = 0`` is PEFT's ``magnitude_prune`` (magnitude pruning with
    ``int(density * n)`` kept, then task arithmetic)."""
    densities, gammas = _model_values(density, len(finetuned)), _model_values(gamma, len(finetuned))
    band = _magnitude_sparsifier(lambda index, count: _band_counts(densities[index], gammas[index], count))
    return _weighted_sum(base, finetuned, weights, alpha, band)


@register_merge_method(
    "model_stock",
    reference="Jang et al. 2024, Model stock: all we need is just a few fine-tuned models (arXiv:2403.19522)",
    min_models=2,
    uses_weights=False,
    coefficient=None,
)
def model_stock(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Model stock, per tensor: ``theta_0 + t * mean_t tau_t`` with ``t = T cos / ((T - 1) cos + 1)``.

    ``cos`` is the mean pairwise cosine between the task vectors of this tensor, obtained in one pass from
    ``sum_{i<j} u_i.u_j = (|sum u_i|^2 - sum |u_i|^2) / 2`` for the unit vectors ``u_i``; a zero task vector has
    cosine 0 with every other. Where ``|(T - 1) cos + 1| < 1e-6`` the ratio has no finite estimate and the base is
    kept (mergekit's rule). mergekit also clamps each pair's ``|tau_i| |tau_j|`` at 1e-6, which shrinks the cosine
    of task vectors whose norms are below about 1e-3; this is the exact cosine. Weights are not used.
    """
    count = len(finetuned)
    base64 = _as_compute(base)
    total, unit_total, nonzero = torch.zeros_like(base64), torch.zeros_like(base64), 0
    for delta in _task_vectors(base64, finetuned):
        total.add_(delta)
        norm = torch.linalg.vector_norm(delta).item()
        if norm > 0:
            unit_total.add_(delta, alpha=1.0 / norm)
            nonzero += 1
    pair_sum = (torch.linalg.vector_norm(unit_total).item() ** 2 - nonzero) / 2
    cosine = pair_sum / (count * (count - 1) / 2)
    denominator = (count - 1) * cosine + 1
    ratio = count * cosine / denominator if abs(denominator) >= 1e-6 else 0.0
    return base64.add_(total, alpha=ratio / count)


@register_merge_method(
    "linear_interpolation",
    reference="Ainsworth et al. 2023 / the implicit-bias merging paper: theta = (1 - alpha) theta_A + alpha theta_B",
    parameters=(MethodParameter("alpha", "Position on the line from the first model (0) to the second (1).", 0.5),),
    min_models=2,
    max_models=2,
    uses_weights=False,
)
def linear_interpolation(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *, alpha: float = 0.5
) -> torch.Tensor:
    """``(1 - alpha) theta_A + alpha theta_B`` for the two listed models (the base is not used; ``alpha`` outside
    [0, 1] extrapolates). ``alpha = 0`` and ``1`` give the end points exactly."""
    first, second = finetuned
    return _as_compute(first).mul_(1.0 - alpha).add_(second.to(COMPUTE_DTYPE), alpha=alpha)


@register_merge_method(
    "slerp",
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); as model merging in "
    "mergekit (Goddard et al. 2024, arXiv:2403.13257)",
    parameters=(
        MethodParameter("t", "Position on the great arc from the first model (0) to the second (1).", 0.5),
        MethodParameter(
            "dot_threshold",
            "Above this |cosine| the models are interpolated linearly.",
            0.9995,
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    min_models=2,
    max_models=2,
    uses_weights=False,
    coefficient="t",
)
def slerp(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    t: float = 0.5,
    dot_threshold: float = 0.9995,
) -> torch.Tensor:
    """Spherical interpolation between the two listed models, each tensor flattened to one vector.

    mergekit's ``slerp``: ``sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b`` with
    ``cos(theta)`` the cosine of ``a`` and ``b`` (clamped to [-1, 1]; a norm at or below 1e-8 counts as 1). Nearly
    collinear or antipodal pairs (``|cos| > dot_threshold``) are interpolated linearly, ``(1 - t) a + t b``. The
    base is not used: mergekit's ``base_model`` is the first model (``t = 0``). Computed in float64 (mergekit:
    float32 unless the inputs are float64)."""
    first, second = (_as_compute(tensor).reshape(-1) for tensor in finetuned)
    norms = [torch.linalg.vector_norm(vector).item() for vector in (first, second)]
    norm_first, norm_second = (norm if norm > 1e-8 else 1.0 for norm in norms)
    cosine = min(1.0, max(-1.0, torch.dot(first / norm_first, second / norm_second).item()))
    if abs(cosine) > dot_threshold:
        coefficient_first, coefficient_second = 1.0 - t, t
    else:
        theta = math.acos(cosine)
        coefficient_first = math.sin((1.0 - t) * theta) / math.sin(theta)
        coefficient_second = math.sin(t * theta) / math.sin(theta)
    return first.mul_(coefficient_first).add_(second, alpha=coefficient_second).reshape(base.shape)


def _della_sparsifier(densities: Sequence[float], epsilons: Sequence[float], rescale: str, seed: int) -> Sparsify:
    def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
        density, epsilon = densities[index], epsilons[index]
        if density >= 1:  # mergekit keeps everything there
            return delta
        # 2-D and 1-D tensors are ranked as mergekit ranks them; larger ones per row of their first dimension.
        rows = delta.reshape(1 if delta.dim() < 2 else delta.shape[0], -1)
        ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(COMPUTE_DTYPE)
        spread = rows.shape[1] - 1
        position = ranks / spread if spread else torch.full_like(ranks, 0.5)
        probability = (density - epsilon) + 2 * epsilon * position
        keep = torch.rand(rows.shape, generator=_model_generator(seed, index), dtype=torch.float32) < probability
        return _rescale(rows, torch.where(keep, rows, 0.0), rescale, probability).reshape(delta.shape)

    return sparsify


def _check_della(parameters: dict[str, Any], where: str) -> None:
    density, epsilon = parameters["density"], parameters["epsilon"]  # one model's (see per_model_arguments)
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"{where}.epsilon: density - epsilon and density + epsilon must lie in (0, 1), got {density} -+ {epsilon}"
        )


_DELLA_PAPER = (
    "Deep et al. 2024, DELLA-Merging: reducing interference in model merging through magnitude-based "
    "sampling (arXiv:2406.11617)"
)
_EPSILON = MethodParameter(
    "epsilon",
    "Half-width of the keep-probability range around density (mergekit's).",
    0.15,
    minimum=0.0,
    per_model=True,
)
_DELLA_RESCALE = MethodParameter(
    "rescale",
    "Rescale kept entries by 1/their keep probability (paper), to keep the L1 norm (mergekit), or not.",
    "inverse_density",
    kind=str,
    choices=("inverse_density", "l1_norm", "none"),
)
_DELLA_DOC = """MagPrune keeps each entry of ``tau_t`` with a probability rising linearly with its magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), ranks taken within each row of a 2-D
    tensor and over all of a 1-D tensor (mergekit's ``della_magprune``; a tensor of more dimensions is ranked per
    row of its first dimension, where mergekit ranks along dimension 1 only; a single-entry row gets ``density``;
    magnitude ties are ranked by position). The paper writes the same window as drop probabilities
    ``1 - density -+ epsilon``. Kept entries are divided by their keep probability (``rescale="inverse_density"``,
    the paper) or rescaled as ``rescale`` says (``"l1_norm"`` is mergekit's ``rescale: true``). Model ``t``'s
    draws are ``torch.rand`` (float32) from ``torch.Generator().manual_seed(seed + t)``, seeded per tensor by the
    engine as in ``dare_linear``. ``density >= 1`` keeps everything. Defaults: the paper tunes density and
    epsilon; ``density`` is DARE's default here and ``epsilon`` mergekit's."""


@register_merge_method(
    "della",
    reference=_DELLA_PAPER,
    seeded=True,
    check=_check_della,
    parameters=(_alpha(1.0), _density(0.5), _EPSILON, _DELLA_RESCALE, _SEED, _SIGN_ELECTION, _DISJOINT_MEAN),
)
def della(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 1.0,
    density: PerModel = 0.5,
    epsilon: PerModel = 0.15,
    rescale: Literal["inverse_density", "l1_norm", "none"] = "inverse_density",
    seed: int = 0,
    sign_election: Literal["weighted", "unweighted"] = "weighted",
    disjoint_mean: Literal["weight_sum", "count", "none"] = "weight_sum",
) -> torch.Tensor:
    """DELLA: MagPrune each task vector, elect signs and fuse the agreeing entries as TIES does, scale by ``alpha``.

    {doc}
    """
    count = len(finetuned)
    sparsify = _della_sparsifier(_model_values(density, count), _model_values(epsilon, count), rescale, seed)
    return _sign_consensus(base, finetuned, weights, alpha, sparsify, sign_election, disjoint_mean)


@register_merge_method(
    "della_linear",
    reference=_DELLA_PAPER,
    seeded=True,
    check=_check_della,
    parameters=(_alpha(1.0), _density(0.5), _EPSILON, _DELLA_RESCALE, _SEED),
)
def della_linear(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 1.0,
    density: PerModel = 0.5,
    epsilon: PerModel = 0.15,
    rescale: Literal["inverse_density", "l1_norm", "none"] = "inverse_density",
    seed: int = 0,
) -> torch.Tensor:
    """DELLA without sign election: ``theta_0 + alpha * sum_t w_t MagPrune(tau_t)`` (mergekit's ``della_linear``).

    {doc}
    """
    count = len(finetuned)
    sparsify = _della_sparsifier(_model_values(density, count), _model_values(epsilon, count), rescale, seed)
    return _weighted_sum(base, finetuned, weights, alpha, sparsify)


della.__doc__ = della.__doc__.format(doc=_DELLA_DOC)
della_linear.__doc__ = della_linear.__doc__.format(doc=_DELLA_DOC)


# ---- SVD methods: per 2-D weight matrix, task arithmetic on every other tensor -------------------------------------


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor ``P Q^T`` of ``matrix = P S Q^T``: the closest matrix with orthonormal columns."""
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right


def _task_vector_sum(base64: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(base64)
    for delta in _task_vectors(base64, finetuned):
        total.add_(delta)
    return total


@register_merge_method(
    "tsv_m",
    reference="Gargiulo et al. 2025, Task singular vectors: reducing task interference in model merging "
    "(CVPR 2025, arXiv:2412.00081)",
    parameters=(_alpha(1.0),),
    uses_weights=False,
)
def tsv_m(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *, alpha: float = 1.0
) -> torch.Tensor:
    """Task Singular Vectors merge: each task's top singular vectors, whitened together, per 2-D weight matrix.

    Per matrix ``tau_t`` (m x n, k = min(m, n)) of T tasks: keep each task's top
    ``r = int(k / T)`` singular triplets ``U_t S_t V_t^T``, concatenate ``U = [U_1 .. U_T]``, ``S``, ``V``,
    replace ``U`` and ``V`` by their orthonormal polar factors (``U = P Q^T`` from ``U = P Sigma Q^T``, the
    closest orthonormal matrix, i.e. whitening) and return ``theta_0 + alpha * U diag(S) V^T``; with ``T > k``,
    ``r = 0`` and the merge is the base. Every other tensor (biases, norms, the conv
    stem) gets the mean task vector, as the paper's code does. ``alpha`` 1 as in the paper.

    Memory: task matrices are decomposed one at a time; the concatenated factors hold ``T r <= k`` columns, so the
    working set is one SVD plus ``(m + n) k`` numbers, constant in T. Weights are not used (the paper has none).
    """
    base64 = _as_compute(base)
    count = len(finetuned)
    if base64.dim() != 2:
        return base64.add_(_task_vector_sum(base64, finetuned), alpha=alpha / count)
    rank = min(base64.shape) // count
    if rank == 0:
        return base64
    lefts, values, rights = [], [], []
    for delta in _task_vectors(base64, finetuned):
        left, singular, right = torch.linalg.svd(delta, full_matrices=False)
        lefts.append(left[:, :rank])
        values.append(singular[:rank])
        rights.append(right[:rank])
        del left, singular, right, delta
    left, right = _polar(torch.cat(lefts, dim=1)), _polar(torch.cat(rights, dim=0).T).T
    return base64.add_(left @ torch.diag(torch.cat(values)) @ right, alpha=alpha)


_ISO_PAPER = (
    "Marczak et al. 2025, No task left behind: isotropic model merging with common and task-specific "
    "subspaces (ICML 2025, arXiv:2502.04959)"
)


@register_merge_method("iso_c", reference=_ISO_PAPER, parameters=(_alpha(1.0),), uses_weights=False)
def iso_c(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *, alpha: float = 1.0
) -> torch.Tensor:
    """Isotropic merge: the summed task matrices with a flat spectrum, per 2-D weight matrix.

    Per matrix: the task-arithmetic sum ``sum_t tau_t = U S V^T`` with every singular value
    replaced by their mean (a flat, isotropic spectrum), ``theta_0 + alpha * mean(S) U V^T``. Every other tensor
    gets ``theta_0 + alpha * sum_t tau_t`` (task arithmetic, as the paper's code). The paper selects ``alpha`` on
    validation data (default 1 here; search it). Memory: the running sum and one SVD, constant in T."""
    base64 = _as_compute(base)
    total = _task_vector_sum(base64, finetuned)
    if base64.dim() != 2:
        return base64.add_(total, alpha=alpha)
    left, singular, right = torch.linalg.svd(total, full_matrices=False)
    return base64.add_(left @ right, alpha=alpha * singular.mean().item())


@register_merge_method(
    "iso_cts",
    reference=_ISO_PAPER,
    uses_weights=False,
    parameters=(
        _alpha(1.0),
        MethodParameter(
            "common_space_fraction",
            "Fraction of each matrix's rank given to the common subspace.",
            0.8,
            minimum=0.0,
            maximum=1.0,
        ),
    ),
)
def iso_cts(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
) -> torch.Tensor:
    """Isotropic merge in a common plus task-specific subspaces, per 2-D weight matrix.

    Per matrix (m x n, k = min(m, n)) of T tasks: the common subspace is the top
    ``c = int(k * common_space_fraction)`` singular triplets of ``sum_t tau_t``; each task adds the top
    ``s = int((k - c) / T)`` singular triplets of its own matrix with the common left subspace projected out
    (``tau_t - U_c U_c^T tau_t``). The ``T s + c`` left and right vectors are orthonormalised by their polar
    factors, all singular values are replaced by their mean, and the result is ``theta_0 + alpha * U diag(mean)
    V^T``. Every other tensor gets task arithmetic, ``theta_0 + alpha * sum_t tau_t``. Paper defaults: common
    fraction 0.8; ``alpha`` is selected on validation data (1 here; search it).

    Memory: two passes over the models, one matrix at a time; the running sum, ``U_c`` and the stacked factors
    (at most ``k`` columns) are held: constant in T.
    """
    base64 = _as_compute(base)
    total = _task_vector_sum(base64, finetuned)
    if base64.dim() != 2:
        return base64.add_(total, alpha=alpha)
    size = min(base64.shape)
    common = int(size * common_space_fraction)
    per_task = (size - common) // len(finetuned)
    left, singular, right = torch.linalg.svd(total, full_matrices=False)
    common_left = left[:, :common]
    lefts, values, rights = [common_left], [singular[:common]], [right[:common]]
    del total, left, singular, right
    for delta in _task_vectors(base64, finetuned):
        specific = delta.sub_(common_left @ (common_left.T @ delta))
        left, singular, right = torch.linalg.svd(specific, full_matrices=False)
        lefts.append(left[:, :per_task])
        values.append(singular[:per_task])
        rights.append(right[:per_task])
        del left, singular, right, specific, delta
    left, right = _polar(torch.cat(lefts, dim=1)), _polar(torch.cat(rights, dim=0).T).T
    return base64.add_(left @ right, alpha=alpha * torch.cat(values).mean().item())
