"""The merge recipe: a YAML file (or dict) parsed and validated into :class:`MergeConfig`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import hub
from ..io import parse_size
from .mergekit_format import from_mergekit, is_mergekit_recipe
from .methods import get_method

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
REGEX_PREFIX = "re:"


def _reject_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass
class ModelSpec:
    """One model to merge."""

    model: str = field(metadata={"help": "Local folder, Hub id (optionally `id@revision`) or saved TaskVector folder."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (alternative to `@rev` in `model`)."})
    weight: float = field(default=1.0, metadata={"help": "Per-model weight, as the method defines it."})
    parameters: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "This model's own values of the method's per-model parameters (density, gamma, epsilon); "
            "they win over `parameters` and `tensor_parameters` for this model, as in mergekit."
        },
    )

    @classmethod
    def from_any(cls, data: Any, where: str) -> ModelSpec:
        if isinstance(data, str):
            data = {"model": data}
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a model id/path or a mapping with `model`, got {data!r}")
        _reject_unknown(data, _field_names(cls), f"{where}.")
        if not data.get("model") or not isinstance(data["model"], str):
            raise ValueError(f"{where}.model: required (a local folder or Hub id)")
        weight = data.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"{where}.weight: expected a finite number, got {weight!r}")
        revision = data.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise ValueError(f"{where}.revision: expected a string, got {revision!r}")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}.parameters: expected a mapping of per-model parameters, got {parameters!r}")
        for name, value in parameters.items():
            if isinstance(value, list | tuple | dict):
                raise ValueError(f"{where}.parameters.{name}: expected one value for this model, got {value!r}")
        return cls(model=data["model"], revision=revision, weight=float(weight), parameters=dict(parameters))


@dataclass
class TensorParameters:
    """Parameter overrides for the tensors whose names match ``filter``."""

    filter: str = field(metadata={"help": "Substring of the tensor name, or a regex (re.search) after `re:`."})
    parameters: dict[str, Any] = field(default_factory=dict, metadata={"help": "Overrides of method parameters."})

    def matches(self, name: str) -> bool:
        if self.filter.startswith(REGEX_PREFIX):
            return re.search(self.filter[len(REGEX_PREFIX) :], name) is not None
        return self.filter in name


@dataclass
class PushToHub:
    repo_id: str = field(metadata={"help": "Hub repo to create (if missing) and upload the merged folder to."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})


@dataclass
class MergeConfig:
    """A merge recipe. Validation happens on construction; errors name the offending field."""

    base_model: str = field(metadata={"help": "Base model: local folder or Hub id with optional `@revision`."})
    models: list[ModelSpec] = field(metadata={"help": "Models (or task vector folders) to merge, at least one."})
    method: str = field(metadata={"help": "Registered merge method name, e.g. `ties`."})
    parameters: dict[str, Any] = field(default_factory=dict, metadata={"help": "Method parameters."})
    tensor_parameters: list[TensorParameters] = field(
        default_factory=list, metadata={"help": "Per-tensor-name overrides; the first matching filter wins."}
    )
    dtype: str | None = field(default=None, metadata={"help": f"Output dtype {OUTPUT_DTYPES}; default: the base's."})
    max_shard_size: int | str = field(default="2GB", metadata={"help": "Largest weight shard, e.g. `2GB`."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept pickle `.bin` weights (can run code)."})
    allow_other_base: bool = field(
        default=False,
        metadata={
            "help": "Accept inputs made from another base than base_model: task vectors of another base (or that "
            "record no base fingerprint), FTTS fine-tunes and LoRA adapters whose recorded base model is another."
        },
    )
    allow_nonfinite: bool = field(
        default=False,
        metadata={
            "help": "Merge inputs holding NaN or infinite values and write non-finite merged values (by "
            "default both are refused, naming the tensor)."
        },
    )
    allow_mixed_finetune_modes: bool = field(
        default=False,
        metadata={
            "help": "Merge inputs that record different fine-tuning modes (e.g. an FTTS fine-tune and a full one; "
            "refused by default, no one forward scores them). The merged folder then records no mode: it is a plain "
            "model, scored with the plain forward f(w)."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder the merged model is written to."})
    push_to_hub: PushToHub | None = field(default=None, metadata={"help": "`{repo_id, private}` to upload to."})

    def __post_init__(self):
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError("base_model: required (a local folder or Hub id)")
        if not isinstance(self.models, list) or not self.models:
            raise ValueError("models: at least one model is required")
        self.models = [
            m if isinstance(m, ModelSpec) else ModelSpec.from_any(m, f"models[{i}]") for i, m in enumerate(self.models)
        ]
        # Repo ids and revisions are checked here, so a bad one fails before anything is downloaded or written.
        hub.parse_model_ref(self.base_model, where="base_model")
        seen: dict[tuple[str, str | None], int] = {}
        for index, model in enumerate(self.models):
            if (first := seen.setdefault((model.model, model.revision), index)) != index:
                raise ValueError(
                    f"models[{index}]: the same model as models[{first}] ({model.model}); list each model once and "
                    "give it the weight it should have (mergekit counts a repeated model once)"
                )
            if model.revision is not None:
                hub.check_revision(model.revision, f"models[{index}].revision")
            hub.parse_model_ref(model.model, model.revision, where=f"models[{index}].model")
        if not isinstance(self.method, str):
            raise ValueError(f"method: expected a method name, got {self.method!r}")
        method = get_method(self.method)
        method.check_model_count(len(self.models))
        if not method.uses_weights:
            for index, model in enumerate(self.models):
                if model.weight != 1.0:
                    raise ValueError(f"models[{index}].weight: method {self.method!r} does not use per-model weights")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"parameters: expected a mapping, got {self.parameters!r}")
        method.resolve_parameters(self.parameters)
        if not isinstance(self.tensor_parameters, list):
            raise ValueError("tensor_parameters: expected a list of {filter, parameters}")
        self.tensor_parameters = [self._tensor_parameters(entry, i) for i, entry in enumerate(self.tensor_parameters)]
        # Each model's own values with the recipe-wide parameters and with every tensor_parameters entry.
        for overrides in ({}, *(entry.parameters for entry in self.tensor_parameters)):
            self.model_arguments(method.resolve_parameters({**self.parameters, **overrides}))
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype: must be one of {list(OUTPUT_DTYPES)} or null, got {self.dtype!r}")
        parse_size(self.max_shard_size)
        for flag in ("allow_pickle", "allow_other_base", "allow_nonfinite", "allow_mixed_finetune_modes"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected true or false, got {getattr(self, flag)!r}")
        if self.output_dir is not None and not isinstance(self.output_dir, str | Path):
            raise ValueError(f"output_dir: expected a path, got {self.output_dir!r}")
        if self.output_dir is not None:
            self.output_dir = str(self.output_dir)
        if isinstance(self.push_to_hub, str):
            self.push_to_hub = {"repo_id": self.push_to_hub}
        if isinstance(self.push_to_hub, dict):
            _reject_unknown(self.push_to_hub, _field_names(PushToHub), "push_to_hub.")
            if not self.push_to_hub.get("repo_id"):
                raise ValueError("push_to_hub.repo_id: required when push_to_hub is set")
            self.push_to_hub = PushToHub(**self.push_to_hub)
        elif self.push_to_hub is not None and not isinstance(self.push_to_hub, PushToHub):
            raise ValueError(f"push_to_hub: expected {{repo_id, private}} or null, got {self.push_to_hub!r}")
        if self.push_to_hub is not None:
            hub.check_repo_id(self.push_to_hub.repo_id, "push_to_hub.repo_id")
            if not isinstance(self.push_to_hub.private, bool):  # "no" would be truthy: a public repo made private
                raise ValueError(f"push_to_hub.private: expected true or false, got {self.push_to_hub.private!r}")

    def _tensor_parameters(self, entry: Any, index: int) -> TensorParameters:
        where = f"tensor_parameters[{index}]"
        if isinstance(entry, dict):
            _reject_unknown(entry, _field_names(TensorParameters), f"{where}.")
            if not isinstance(entry.get("filter"), str) or not entry["filter"]:
                raise ValueError(f"{where}.filter: required (a substring, or a regex after `re:`)")
            parameters = entry.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise ValueError(f"{where}.parameters: expected a mapping of parameter values, got {parameters!r}")
            entry = TensorParameters(entry["filter"], dict(parameters))
        if not isinstance(entry, TensorParameters):
            raise ValueError(f"{where}: expected {{filter, parameters}}, got {entry!r}")
        if entry.filter.startswith(REGEX_PREFIX):
            try:
                re.compile(entry.filter[len(REGEX_PREFIX) :])
            except re.error as error:
                raise ValueError(f"{where}.filter: invalid regex ({error})") from error
        get_method(self.method).resolve_parameters(entry.parameters, where=f"{where}.parameters")
        return entry

    def model_arguments(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """The method's arguments for one tensor from its resolved ``parameters``: per-model parameters that some
        model sets become one value per model (see :meth:`MergeMethod.per_model_arguments`)."""
        models = [model.parameters for model in self.models]
        return get_method(self.method).per_model_arguments(parameters, models)

    def parameters_for(self, tensor_name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validated method parameters for one tensor: defaults, then ``parameters`` (updated by ``overrides``, as
        in a coefficient search), then the first matching ``tensor_parameters`` entry."""
        method = get_method(self.method)
        parameters = method.resolve_parameters({**self.parameters, **(overrides or {})})
        for index, entry in enumerate(self.tensor_parameters):
            if entry.matches(tensor_name):
                where = f"tensor_parameters[{index}].parameters"
                return method.resolve_parameters(entry.parameters, where=where, defaults=parameters)
        return parameters

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        if not isinstance(data, dict):
            raise ValueError(f"merge recipe: expected a mapping, got {type(data).__name__}")
        if is_mergekit_recipe(data):  # mergekit's format, read with its semantics (see mergekit_format)
            data = from_mergekit(data)
        _reject_unknown(data, _field_names(cls), "")
        for required in ("base_model", "models", "method"):
            if required not in data:
                raise ValueError(f"{required}: required")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, config: MergeConfig | dict | str | Path) -> MergeConfig:
        if isinstance(config, MergeConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        return cls.from_yaml(config)

    def replace(self, **changes: Any) -> MergeConfig:
        """A validated copy with some fields changed, e.g. ``replace(output_dir=..., push_to_hub=...)``."""
        return MergeConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a dict; a model without its own parameters is written without the empty mapping."""
        data = dataclasses.asdict(self)
        for entry in data["models"]:
            if not entry["parameters"]:
                del entry["parameters"]
        return data
