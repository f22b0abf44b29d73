"""Merge methods: a registry of small pure functions over one tensor name at a time.

Every method takes the base tensor ``theta_0``, the fine-tuned tensors ``theta_t`` (same shape), one weight per
model and its keyword parameters, and returns the merged tensor in float64. Task vectors ``tau_t = theta_t -
theta_0`` are formed one model at a time inside the function and never stacked, so a method's working memory does
not grow with the number of models (the inputs themselves are memory-mapped by the engine). Computing in float64
makes ``theta_0 + 1 * (theta_t - theta_0)`` reproduce ``theta_t`` exactly after the cast back to float32.

Libraries disagree on conventions (SPEC section 4); each docstring states the one implemented, the others are
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
    check: Callable[[dict[str, Any], str], None] | None = field(default=None, repr=False)  # cross-parameter rules

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]

    def resolve_parameters(self, given: Mapping[str, Any], *, where: str = "parameters",
                           defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
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

    def check_model_count(self, count: int) -> None:
        if count < self.min_models or (self.max_models is not None and count > self.max_models):
            wanted = str(self.min_models) if self.min_models == self.max_models else (
                f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise ValueError(f"models: method {self.name!r} needs {wanted} models, got {count}")

    def __call__(self, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                 weights: Sequence[float] | None = None, **parameters: Any) -> torch.Tensor:  # fmt: skip
        self.check_model_count(len(finetuned))
        weights = [1.0] * len(finetuned) if weights is None else list(weights)
        if len(weights) != len(finetuned):
            raise ValueError(f"weights: {len(weights)} weights for {len(finetuned)} models")
        return self.function(base, finetuned, weights, **self.resolve_parameters(parameters))


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


def _as_compute(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy we may modify in place (``.to`` alone would alias an input that is float64 already)."""
    return tensor.to(COMPUTE_DTYPE, copy=True)


def _task_vectors(base64: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``theta_t - theta_0`` in float64, one model at a time, as fresh tensors. Each input is converted explicitly
    (exact for every float dtype): torch does not promote float8 types."""
    for tensor in finetuned:
        yield _as_compute(tensor).sub_(base64)


def _kth_largest(flat: torch.Tensor, k: int) -> float:
    """The k-th largest value by selection, not a full sort: numpy's introselect, which on CPU is several times
    faster than ``torch.kthvalue`` (and ``topk``) on ViT-sized tensors, with the same result."""
    position = flat.numel() - k
    return float(np.partition(flat.numpy(), position)[position])


def magnitude_band(magnitude: torch.Tensor, density: float, drop_top: float = 0.0) -> tuple[float, float]:
    """Thresholds ``(low, high)`` selecting the entries ranked below the top ``drop_top`` fraction by magnitude but
    within the top ``drop_top + density`` fraction (counts rounded to the nearest integer): keep
    ``low <= |x| < high``. Thresholds come from a selection, not a sort; entries tied with a threshold are all
    kept at the low end and all dropped at the high end."""
    flat = magnitude.reshape(-1)
    count = flat.numel()
    n_drop = min(count, round(drop_top * count))
    n_keep = min(count, n_drop + round(density * count))
    low = _kth_largest(flat, n_keep) if n_keep > n_drop else math.inf
    high = _kth_largest(flat, n_drop) if n_drop else math.inf
    return low, high


def _magnitude_sparsifier(density: float, drop_top: float = 0.0) -> Sparsify:
    """Zero each task vector outside its magnitude band; the band's thresholds are computed once per model."""
    bands: dict[int, tuple[float, float]] = {}

    def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
        magnitude = delta.abs()
        if index not in bands:
            bands[index] = magnitude_band(magnitude, density, drop_top)
        low, high = bands[index]
        keep = magnitude >= low
        if high != math.inf:
            keep &= magnitude < high
        return torch.where(keep, delta, 0.0)

    return sparsify


def _model_generator(seed: int, model_index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + model_index) % 2**63)


def dare_sparsify(delta: torch.Tensor, density: float, rescale: str, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry independently with probability ``1 - density`` and rescale the survivors by
    ``1 / density`` (``"inverse_density"``, the DARE paper) or so that the L1 norm is unchanged (``"l1_norm"``)."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    kept = torch.where(keep, delta, 0.0)
    if rescale == "inverse_density":
        return kept.div_(density)
    norm_before, norm_after = delta.abs().sum(), kept.abs().sum()
    return kept.mul_(norm_before / norm_after) if norm_after > 0 else kept


def _weighted_sum(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], alpha: float,
                  sparsify: Sparsify | None = None) -> torch.Tensor:  # fmt: skip
    """``theta_0 + alpha * sum_t w_t * sparsify(tau_t)``."""
    base64 = _as_compute(base)
    total = torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        total.add_(delta if sparsify is None else sparsify(index, delta), alpha=weight)
    return base64.add_(total, alpha=alpha)


def _sign_consensus(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], alpha: float,
                    sparsify: Sparsify, sign_election: str, disjoint_mean: str) -> torch.Tensor:  # fmt: skip
    """TIES steps 2-3 on sparsified task vectors: elect a sign per entry, average the entries that agree with it.

    ``sparsify(t, tau_t)`` must be deterministic: it is called twice per model so that only one task vector is
    alive at a time. The elected sign is that of ``sum_t c_t * sparse_t`` with ``c_t = w_t`` (``"weighted"``,
    mergekit) or ``1`` (``"unweighted"``, PEFT); a zero sum elects ``+`` (both). The disjoint mean is
    ``sum_{t agrees} w_t * sparse_t`` divided by ``sum_{t agrees} w_t`` (``"weight_sum"``, mergekit) or by the
    number of agreeing models (``"count"``, PEFT); zero entries never agree, an entry no model agrees on is 0.
    The TIES paper has no per-model weights: with all ``w_t = 1`` every combination is its formula.
    """
    base64 = _as_compute(base)
    sign_sum = torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        sign_sum.add_(sparsify(index, delta), alpha=weight if sign_election == "weighted" else 1.0)
    positive = sign_sum >= 0
    del sign_sum
    numerator, denominator = torch.zeros_like(base64), torch.zeros_like(base64)
    for index, (weight, delta) in enumerate(zip(weights, _task_vectors(base64, finetuned))):
        sparse = sparsify(index, delta)
        agrees = ((sparse > 0) == positive) & (sparse != 0)
        numerator.add_(torch.where(agrees, sparse, 0.0), alpha=weight)
        denominator.add_(agrees, alpha=weight if disjoint_mean == "weight_sum" else 1.0)
    merged = numerator.div_(denominator.masked_fill_(denominator == 0, 1.0))  # no agreeing model: 0 / 1
    return base64.add_(merged, alpha=alpha)


def _alpha(default: float) -> MethodParameter:
    return MethodParameter("alpha", "Scale of the merged task vector added to the base.", default)


def _density(default: float) -> MethodParameter:
    return MethodParameter("density", "Fraction of entries of each task vector kept.", default, minimum=0.0,
                           maximum=1.0, exclusive_minimum=True)  # fmt: skip


_SIGN_ELECTION = MethodParameter(
    "sign_election", "Elect signs on weighted (mergekit) or unweighted (PEFT) task vectors.",
    "weighted", kind=str, choices=("weighted", "unweighted"),
)  # fmt: skip
_DISJOINT_MEAN = MethodParameter(
    "disjoint_mean", "Divide the agreeing sum by the agreeing weights (mergekit) or by their count (PEFT).",
    "weight_sum", kind=str, choices=("weight_sum", "count"),
)  # fmt: skip
_RESCALE = MethodParameter(
    "rescale", "Rescale kept entries by 1/density (DARE paper) or to keep the L1 norm.", "inverse_density",
    kind=str, choices=("inverse_density", "l1_norm"),
)  # fmt: skip
_SEED = MethodParameter("seed", "Seed of the random drop masks.", 0, kind=int)


# ---- the methods ------------------------------------------------------------------------------------------------


@register_merge_method("weight_average", reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)")
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


@register_merge_method("task_arithmetic", reference="Ilharco et al. 2023, Editing models with task arithmetic "
                       "(arXiv:2212.04089)", parameters=(_alpha(0.3),))  # fmt: skip
def task_arithmetic(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *,
                    alpha: float = 0.3) -> torch.Tensor:  # fmt: skip
    """``theta_0 + alpha * sum_t w_t tau_t`` (weights are not normalised; negative weights subtract a task)."""
    return _weighted_sum(base, finetuned, weights, alpha)


@register_merge_method(
    "ties", reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models (arXiv:2306.01708)",
    parameters=(_alpha(1.0), _density(0.2), _SIGN_ELECTION, _DISJOINT_MEAN),
)  # fmt: skip
def ties(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *, alpha: float = 1.0,
         density: float = 0.2, sign_election: Literal["weighted", "unweighted"] = "weighted",
         disjoint_mean: Literal["weight_sum", "count"] = "weight_sum") -> torch.Tensor:  # fmt: skip
    """TIES: trim, elect sign, disjoint mean, then ``theta_0 + alpha * merged``.

    Trim keeps the top ``density`` fraction of each ``tau_t`` by magnitude, per tensor (the paper's pruned
    fraction is ``1 - density``). Sign election and the disjoint mean follow the options documented in
    ``_sign_consensus`` (defaults: mergekit's); with all weights 1 every option combination is the paper's
    formula, and ``sign_election="unweighted", disjoint_mean="count"`` is PEFT's ``ties``.
    """
    return _sign_consensus(
        base, finetuned, weights, alpha, _magnitude_sparsifier(density), sign_election, disjoint_mean
    )


def _dare_sparsifier(density: float, rescale: str, seed: int) -> Sparsify:
    def sparsify(index: int, delta: torch.Tensor) -> torch.Tensor:
        return dare_sparsify(delta, density, rescale, _model_generator(seed, index))

    return sparsify


_DARE_PAPER = "Yu et al. 2024, Language models are Super Mario: absorbing abilities from homologous models (arXiv:2311.03099)"


@register_merge_method(
    "dare_linear", reference=_DARE_PAPER, parameters=(_alpha(0.3), _density(0.5), _RESCALE, _SEED), seeded=True
)
def dare_linear(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *,
                alpha: float = 0.3, density: float = 0.5,
                rescale: Literal["inverse_density", "l1_norm"] = "inverse_density", seed: int = 0) -> torch.Tensor:  # fmt: skip
    """DARE then task arithmetic: ``theta_0 + alpha * sum_t w_t DARE(tau_t)``.

    DARE drops each entry with probability ``1 - density`` and rescales the survivors (``rescale``). Model ``t``'s
    mask is drawn from ``torch.Generator().manual_seed(seed + t)``; the engine passes a seed derived from the
    recipe's ``seed`` and the tensor name, so masks differ between tensors and do not depend on processing order.
    """
    return _weighted_sum(base, finetuned, weights, alpha, _dare_sparsifier(density, rescale, seed))


@register_merge_method(
    "dare_ties", reference=_DARE_PAPER,
    parameters=(_alpha(1.0), _density(0.5), _RESCALE, _SEED, _SIGN_ELECTION, _DISJOINT_MEAN), seeded=True,
)  # fmt: skip
def dare_ties(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *,
              alpha: float = 1.0, density: float = 0.5,
              rescale: Literal["inverse_density", "l1_norm"] = "inverse_density", seed: int = 0,
              sign_election: Literal["weighted", "unweighted"] = "weighted",
              disjoint_mean: Literal["weight_sum", "count"] = "weight_sum") -> torch.Tensor:  # fmt: skip
    """DARE in place of TIES' magnitude trim, then TIES sign election and disjoint mean (as in ``ties``);
    masks are seeded as in ``dare_linear``."""
    return _sign_consensus(
        base, finetuned, weights, alpha, _dare_sparsifier(density, rescale, seed), sign_election, disjoint_mean
    )


def _check_band(parameters: dict[str, Any], where: str) -> None:
    if parameters["density"] + parameters["gamma"] > 1:
        raise ValueError(f"{where}.gamma: density + gamma must be <= 1, got {parameters['density']} + "
                         f"{parameters['gamma']}")  # fmt: skip


@register_merge_method(
    "breadcrumbs",
    reference="Davari & Belilovsky 2024, Model breadcrumbs: scaling multi-task model merging with sparse masks "
    "(arXiv:2312.06795)",
    parameters=(
        _alpha(0.3), _density(0.9),
        MethodParameter("gamma", "Fraction of largest-magnitude entries (outliers) removed.", 0.01, minimum=0.0,
                        maximum=1.0),
    ),
    check=_check_band,
)  # fmt: skip
def breadcrumbs(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *,
                alpha: float = 0.3, density: float = 0.9, gamma: float = 0.01) -> torch.Tensor:  # fmt: skip
    """Model breadcrumbs: per tensor and model, drop the top ``gamma`` fraction of ``tau_t`` by magnitude
    (outliers) and keep the next ``density`` fraction, then ``theta_0 + alpha * sum_t w_t masked_t`` (mergekit's
    convention). ``gamma = 0`` is plain magnitude pruning followed by task arithmetic."""
    return _weighted_sum(base, finetuned, weights, alpha, _magnitude_sparsifier(density, gamma))


@register_merge_method(
    "model_stock", reference="Jang et al. 2024, Model stock: all we need is just a few fine-tuned models "
    "(arXiv:2403.19522)", min_models=2, uses_weights=False,
)  # fmt: skip
def model_stock(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Model stock, per tensor: ``theta_0 + t * mean_t tau_t`` with ``t = T cos / ((T - 1) cos + 1)``.

    ``cos`` is the mean pairwise cosine between the task vectors of this tensor, obtained in one pass from
    ``sum_{i<j} u_i.u_j = (|sum u_i|^2 - sum |u_i|^2) / 2`` for the unit vectors ``u_i``; a zero task vector has
    cosine 0 with every other. Weights are not used.
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
    ratio = count * cosine / denominator if denominator != 0 else 0.0
    return base64.add_(total, alpha=ratio / count)


@register_merge_method(
    "linear_interpolation", reference="Ainsworth et al. 2023 / the implicit-bias merging paper: "
    "theta = (1 - alpha) theta_A + alpha theta_B", parameters=(
        MethodParameter("alpha", "Position on the line from the first model (0) to the second (1).", 0.5),
    ), min_models=2, max_models=2, uses_weights=False,
)  # fmt: skip
def linear_interpolation(base: torch.Tensor, finetuned: Sequence[torch.Tensor], weights: Sequence[float], *,
                         alpha: float = 0.5) -> torch.Tensor:  # fmt: skip
    """``(1 - alpha) theta_A + alpha theta_B`` for the two listed models (the base is not used; ``alpha`` outside
    [0, 1] extrapolates). ``alpha = 0`` and ``1`` give the end points exactly."""
    first, second = finetuned
    return _as_compute(first).mul_(1.0 - alpha).add_(second.to(COMPUTE_DTYPE), alpha=alpha)
