"""mergekit recipes (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``, ``dtype``) read as
saft_hf merge recipes, mapping mergekit's semantics exactly and refusing, in one line naming the field, what saft_hf
does not do.

Mapping (mergekit 0.1.5 definitions; ``w_t`` per-model ``weight``, ``lambda`` defaults to 1):

- ``linear`` -> ``weight_average`` (``normalize: false`` only where the weights sum to 1, the same thing);
- ``task_arithmetic``, ``dare_linear``, ``breadcrumbs``, ``della_linear`` -> the same names, ``alpha = lambda``, or
  ``lambda / sum_t w_t`` with ``normalize: true`` (mergekit divides by the weight sum unless it is below 1e-8);
- ``ties``, ``dare_ties``, ``della`` -> the same names with mergekit's sign rule (``sign_election: weighted``: the
  sign of ``sum_t w_t tau_t``, agreement on ``w_t tau_t``) and divisor (``normalize: true`` -> ``disjoint_mean:
  weight_sum``, the agreeing weights; ``false`` -> ``none``), ``alpha = lambda``;
- ``rescale`` (DARE, DELLA): ``true`` -> ``l1_norm``, ``false`` -> ``none``; ``density >= 1`` -> 1 (mergekit keeps
  every entry there); ``gamma`` and ``epsilon`` as they are;
- ``model_stock`` (not ``filter_wise``) and ``slerp`` (``base_model`` is the ``t = 0`` end) -> the same names.

Parameter values may be scalars or mergekit's filter lists (``[{filter, value}, ..., {value}]``, substring
filters, first match wins), which become ``tensor_parameters``; gradients (lists of values over layers) are refused.
Per-model ``density``, ``gamma``, ``epsilon`` (one number per model) become the models' own ``parameters``, which
win over the recipe-wide value, filtered or not, as a model's own value does in mergekit.
``int8_mask`` only changes the dtype of mergekit's mask and is ignored. mergekit computes in ``dtype``; saft_hf
always computes in float64, so results agree to the precision of mergekit's ``dtype``; the output dtype is
``out_dtype``, else ``dtype``. DARE and DELLA masks are saft_hf's seeded draws (``parameters.seed``, default 0),
where mergekit draws from torch's global generator. Model stock: mergekit clamps each pair's norm product at 1e-6
(see ``model_stock``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OUR_FIELDS = (
    "output_dir",
    "max_shard_size",
    "allow_pickle",
    "allow_other_base",
    "allow_nonfinite",
    "allow_mixed_finetune_modes",
    "push_to_hub",
)
_MERGEKIT_FIELDS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "modules",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
_PER_MODEL = ("weight", "density", "gamma", "epsilon")  # mergekit's per-input parameters


def is_mergekit_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


@dataclass(frozen=True)
class _Method:
    """One mergekit method: saft_hf's name, mergekit's parameters with their defaults, and the translation of
    resolved mergekit values (plus the weight sum) into saft_hf parameters."""

    ours: str
    shared: dict[str, Any]  # recipe-wide parameters and mergekit's defaults
    per_model: dict[str, Any] = field(default_factory=dict)  # per-model parameters other than weight
    translate: Callable[[dict[str, Any], float], dict[str, Any]] = lambda values, weight_sum: {}
    base: str = "required"  # "required": a base plus other models; "input": the base is one of the merged models
    weighted: bool = True


def _scale(values: dict[str, Any], weight_sum: float) -> float:
    """mergekit's ``lambda``, divided by the weight sum where it normalizes a sum without sign consensus."""
    if values["normalize"] and abs(weight_sum) >= 1e-8:
        return values["lambda"] / weight_sum
    return values["lambda"]


def _rescale(values: dict[str, Any]) -> str:
    return "l1_norm" if values["rescale"] else "none"


def _no_rescale(method: str) -> Callable[[dict[str, Any]], None]:
    def check(values: dict[str, Any]) -> None:
        if values["rescale"]:
            raise ValueError(f"parameters.rescale: saft_hf's {method} does not rescale magnitude-pruned task vectors")

    return check


def _gta(ours: str, *, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool) -> _Method:
    """mergekit's generalized task arithmetic family."""
    shared = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    per_model = {"density": 1.0}
    if sparsify == "breadcrumbs":
        per_model["gamma"] = 0.01
    if sparsify == "della":
        per_model["epsilon"] = 0.15

    def translate(values: dict[str, Any], weight_sum: float) -> dict[str, Any]:
        if consensus:
            result = {
                "alpha": values["lambda"],
                "sign_election": "weighted",
                "disjoint_mean": "weight_sum" if values["normalize"] else "none",
            }
        else:
            result = {"alpha": _scale(values, weight_sum)}
        if sparsify is not None:
            result["density"] = min(1.0, values["density"])
        if sparsify in ("magnitude", "breadcrumbs"):
            _no_rescale(ours)(values)
        if sparsify in ("random", "della"):
            result["rescale"] = _rescale(values)
        for name in ("gamma", "epsilon"):
            if name in per_model:
                result[name] = values[name]
        return result

    return _Method(ours, shared, per_model, translate)


def _linear(values: dict[str, Any], weight_sum: float) -> dict[str, Any]:
    if not values["normalize"] and not math.isclose(weight_sum, 1.0, rel_tol=0, abs_tol=1e-12):
        raise ValueError(
            "parameters.normalize: saft_hf's weight_average normalises; false is only supported with "
            f"weights summing to 1 (got {weight_sum})"
        )
    return {}


def _model_stock(values: dict[str, Any], weight_sum: float) -> dict[str, Any]:
    if values["filter_wise"]:
        raise ValueError("parameters.filter_wise: per-row model stock is not supported (whole tensors only)")
    return {}


METHODS: dict[str, _Method] = {
    "linear": _Method("weight_average", {"normalize": True}, translate=_linear, base="input"),
    "task_arithmetic": _gta("task_arithmetic", consensus=False, sparsify=None, normalize=False, rescale=False),
    "ties": _gta("ties", consensus=True, sparsify="magnitude", normalize=True, rescale=False),
    "dare_linear": _gta("dare_linear", consensus=False, sparsify="random", normalize=False, rescale=True),
    "dare_ties": _gta("dare_ties", consensus=True, sparsify="random", normalize=False, rescale=True),
    "breadcrumbs": _gta("breadcrumbs", consensus=False, sparsify="breadcrumbs", normalize=False, rescale=False),
    "della": _gta("della", consensus=True, sparsify="della", normalize=True, rescale=True),
    "della_linear": _gta("della_linear", consensus=False, sparsify="della", normalize=False, rescale=True),
    "model_stock": _Method("model_stock", {"filter_wise": False}, translate=_model_stock, weighted=False),
    "slerp": _Method(
        "slerp", {"t": None}, translate=lambda values, weight_sum: {"t": values["t"]}, base="input", weighted=False
    ),
}


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        raise ValueError(f"{where}: gradients (lists of values over layers) are not supported; give one value")
    if isinstance(value, dict):
        raise ValueError(f"{where}: expected a value, got {value!r}")
    return value


def _typed(value: Any, default: Any, where: str) -> Any:
    """``value`` if it has the type of mergekit's ``default`` (true/false for flags, else a finite number): YAML
    reads `5e-1` as a string and mergekit takes any truthy value as true, so `normalize: "false"` would be true."""
    value = _scalar(value, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    return _number(value, where)


def _conditional(value: Any, default: Any, where: str) -> list[tuple[str | None, Any]]:
    """A parameter setting as ``[(filter, value), ..., (None, fallback)]``: up to the first unfiltered entry, or
    with mergekit's default as the fallback where the recipe has none."""
    if not isinstance(value, list) or not value or not all(isinstance(entry, dict) for entry in value):
        return [(None, _typed(value, default, where))]
    options = []
    for index, entry in enumerate(value):
        unknown = sorted(set(entry) - {"filter", "value"})
        if unknown or "value" not in entry:
            raise ValueError(f"{where}[{index}]: expected {{filter, value}}, got {entry!r}")
        condition = entry.get("filter")
        condition = None if condition in (None, "*") else str(condition)
        options.append((condition, _typed(entry["value"], default, f"{where}[{index}].value")))
        if condition is None:
            return options
    return [*options, (None, default)]


_Entry = tuple[str, dict[str, Any], str]  # (model reference, its mergekit parameters, where it is in the recipe)


def _model_entries(data: dict[str, Any]) -> list[_Entry]:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("models: a mergekit recipe needs a list of models (layer `slices` are not supported)")
    entries = []
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ValueError(f"{where}.model: required (a local folder or Hub id)")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field in a mergekit model entry")
        if "+" in entry["model"]:
            raise ValueError(
                f"{where}.model: mergekit's `model+lora` references are not supported; merge the "
                "adapter first or give its task vector folder"
            )
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}.parameters: expected a mapping, got {parameters!r}")
        entries.append((entry["model"], parameters, where))
    return entries


def _check_unsupported(data: dict[str, Any]) -> None:
    known = set(_MERGEKIT_FIELDS) | set(OUR_FIELDS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field in a mergekit recipe (known: {', '.join(sorted(known))})")
    for name in ("slices", "modules"):
        if data.get(name) is not None:
            raise ValueError(f"{name}: mergekit's layer {name} are not supported; list whole models under `models`")
    source = data.get("tokenizer_source")
    if source not in (None, "base", data.get("base_model")):
        raise ValueError(f"tokenizer_source: only the base model's tokenizer is supported, got {source!r}")
    for name, what in (("tokenizer", "tokenizer surgery"), ("chat_template", "setting a chat template")):
        if data.get(name) is not None:
            raise ValueError(f"{name}: {what} is not supported (the merge keeps the base model's tokenizer files)")


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """A saft_hf merge recipe dict from a mergekit recipe dict (saft_hf's own ``output_dir``, ``push_to_hub`` ...
    may stand beside mergekit's fields)."""
    _check_unsupported(data)
    name = data["merge_method"]
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(
            f"merge_method: mergekit method {name!r} is not supported (supported: {', '.join(sorted(METHODS))})"
        )
    spec = METHODS[name]
    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise ValueError(f"base_model: expected a model id or path, got {base_model!r}")
    entries = _model_entries(data)
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"parameters: expected a mapping, got {parameters!r}")
    allowed = set(spec.shared) | set(spec.per_model) | ({"weight"} if spec.weighted else set())
    for key in sorted(set(parameters) - allowed):
        known = ", ".join(sorted(allowed))
        raise ValueError(f"parameters.{key}: not a parameter of mergekit's {name} (known: {known})")

    models, base_model = _inputs(spec, name, base_model, entries)
    weights = [
        _weight(parameters, model_parameters, where) if spec.weighted else 1.0 for _, model_parameters, where in models
    ]
    for _, model_parameters, where in models:
        for key in sorted(set(model_parameters) - (set(spec.per_model) | {"weight"})):
            raise ValueError(f"{where}.parameters.{key}: not a per-model parameter of mergekit's {name}")
        if not spec.weighted and "weight" in model_parameters:
            raise ValueError(f"{where}.parameters.weight: mergekit's {name} does not use per-model weights")
    settings = {
        key: _conditional(parameters[key], default, f"parameters.{key}") if key in parameters else [(None, default)]
        for key, default in {**spec.shared, **spec.per_model}.items()
    }
    fallback = {key: options[-1][1] for key, options in settings.items()}
    missing = sorted(key for key, value in fallback.items() if value is None)
    if missing:
        raise ValueError(f"parameters.{missing[0]}: required by mergekit's {name} (for every tensor)")

    try:
        weight_sum = math.fsum(weights)
    except OverflowError:
        raise ValueError("models: the weights sum to more than a float64 holds; use smaller weights") from None
    result: dict[str, Any] = {
        "base_model": base_model,
        "models": [
            {"model": model, "weight": weight, "parameters": _own_parameters(spec, model_parameters, where)}
            if spec.weighted
            else model
            for (model, model_parameters, where), weight in zip(models, weights)
        ],
        "method": spec.ours,
        "parameters": spec.translate(fallback, weight_sum),
        "tensor_parameters": _tensor_parameters(spec, settings, fallback, weight_sum),
    }
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        result["dtype"] = dtype
    result.update({key: data[key] for key in OUR_FIELDS if key in data})
    return result


def _inputs(spec: _Method, name: str, base_model: str | None, entries: list[_Entry]) -> tuple[list[_Entry], str]:
    """The models saft_hf merges and its base: mergekit drops the base from the inputs of base-relative methods and
    adds it to those of slerp; linear has no base (saft_hf takes the first model's folder for config files)."""
    if spec.base == "input" and name == "linear":
        if base_model is not None and base_model not in [model for model, _, _ in entries]:
            raise ValueError(
                "base_model: mergekit's linear would merge it as one more input; list it under models with its weight"
            )
        return entries, base_model or entries[0][0]
    if base_model is None:
        raise ValueError(f"base_model: required by mergekit's {name}")
    others = [entry for entry in entries if entry[0] != base_model]
    if name == "slerp":
        if len(others) != 1:
            raise ValueError(f"models: mergekit's slerp needs the base model and one other, got {len(others)} others")
        return [(base_model, {}, "base_model"), others[0]], base_model
    return others, base_model


def _weight(parameters: dict[str, Any], model_parameters: dict[str, Any], where: str) -> float:
    if "weight" in model_parameters:
        return _number(model_parameters["weight"], f"{where}.parameters.weight")
    if "weight" in parameters:
        return _number(parameters["weight"], "parameters.weight")
    raise ValueError(f"{where}.parameters.weight: required by mergekit (no recipe-wide weight either)")


def _number(value: Any, where: str) -> float:
    if isinstance(value, list):
        raise ValueError(
            f"{where}: filters and gradients are not supported here (per model, or beside per-model "
            "values); give one number"
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _own_parameters(spec: _Method, model_parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """A model's own per-model parameters (other than its weight) as saft_hf's values."""
    own = {
        key: _number(model_parameters[key], f"{where}.parameters.{key}")
        for key in spec.per_model
        if key in model_parameters
    }
    if "density" in own:
        own["density"] = min(1.0, own["density"])  # mergekit keeps every entry at density >= 1
    return own


def _tensor_parameters(
    spec: _Method, settings: dict[str, list[tuple[str | None, Any]]], fallback: dict[str, Any], weight_sum: float
) -> list[dict[str, Any]]:
    """Filtered settings as saft_hf ``tensor_parameters`` (first match wins there too): plain substring filters
    when one parameter is filtered, otherwise one regex per combination of the parameters' choices."""
    filtered = {key: options for key, options in settings.items() if any(f is not None for f, _ in options)}
    if not filtered:
        return []
    base_parameters = spec.translate(fallback, weight_sum)
    choices = [[(key, index) for index in range(len(options))] for key, options in filtered.items()]
    result = []
    for combination in itertools.product(*choices):
        values = dict(fallback)
        lookaheads = []
        for key, index in combination:
            options = filtered[key]
            condition, values[key] = options[index]
            lookaheads += [f"(?!.*{re.escape(earlier)})" for earlier, _ in options[:index]]
            if condition is not None:
                lookaheads.append(f"(?=.*{re.escape(condition)})")
        if all(filtered[key][index][0] is None for key, index in combination):
            continue  # the fallback of every parameter: the recipe-wide parameters
        overrides = {k: v for k, v in spec.translate(values, weight_sum).items() if base_parameters.get(k) != v}
        if len(filtered) == 1:
            ((key, index),) = combination
            result.append({"filter": filtered[key][index][0], "parameters": overrides})
        else:
            result.append({"filter": "re:^" + "".join(lookaheads), "parameters": overrides})
    return result


__all__ = ["METHODS", "from_mergekit", "is_mergekit_recipe"]
