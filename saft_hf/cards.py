"""Model cards for SAFT fine-tunes, task vectors and merged models.

Each card is rendered from a Jinja template in `model_cards/` (installed as `saft_hf/model_cards/`) with
`huggingface_hub.ModelCard.from_template`: a YAML metadata block built with `ModelCardData`, then the body.
Every input goes through `redact_secrets` first, so a token that slipped into a recipe never reaches a card.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .hub import is_local, parse_model_ref, public_ref
from .layout import SAFT_HF_TAG

__all__ = ["finetune_card", "merged_model_card", "redact_secrets", "task_vector_card"]

REDACTED = "<redacted>"
# Keys whose values are credentials (`token`, `hf_token`, `hub_token`, `use_auth_token`, `api_key` ...).
_SECRET_KEY = re.compile(r"(?:.*_)?(?:token|secret|password|api_key|credentials?|authorization)", re.IGNORECASE)
# Hub user access tokens and organisation API tokens, wherever they appear in a string.
_TOKEN_VALUE = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}\b")
MISSING = "—"


def redact_secrets(value: Any) -> Any:
    """A plain-data copy of `value` that is safe to write: entries whose key names a credential are dropped and
    token-like strings are masked. Paths become strings and tuples lists, so the result dumps as YAML."""
    if isinstance(value, Mapping):
        return {str(key): redact_secrets(item) for key, item in value.items() if not _SECRET_KEY.fullmatch(str(key))}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return _TOKEN_VALUE.sub(REDACTED, value)
    return value


@contextmanager
def _template_path(name: str) -> Iterator[Path]:
    # The templates live in the package (the top-level model_cards/ is a link to them), so wheels carry them.
    template = importlib.resources.files("saft_hf") / "model_cards" / name
    if not template.is_file():
        raise FileNotFoundError(f"Model card template '{name}' is missing from the installed saft_hf package.")
    with importlib.resources.as_file(template) as path:
        yield path


def _render(template: str, card_data: ModelCardData, **fields: Any) -> ModelCard:
    with _template_path(template) as path:
        return ModelCard.from_template(card_data, template_path=str(path), **fields)


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, Mapping):
        text = ", ".join(f"{key}={_cell(item)}" for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(item) for item in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(mapping: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    return [(_cell(key), _cell(value)) for key, value in (mapping or {}).items()]


def _hub_ids(refs: Sequence[str | None]) -> list[str]:
    """The Hub model ids among `refs` (revisions stripped, duplicates and local paths dropped): the only values
    the Hub accepts as `base_model`."""
    ids = [parse_model_ref(ref)[0] for ref in refs if ref and not is_local(ref)]
    return list(dict.fromkeys(ids))


def _tags(*tags: str | None) -> list[str]:
    return list(dict.fromkeys(tag for tag in tags if tag and tag != "none"))


def merged_model_card(
    recipe: Mapping[str, Any],
    sources: Sequence[Mapping[str, Any]],
    search_table: Sequence[Mapping[str, Any]] | None = None,
    *,
    method_summary: str,
    method_reference: str,
) -> ModelCard:
    """The card of a merged model.

    Hub inputs are shown by id; local ones by folder name, marked local (`saft_hf.hub.public_ref`), and they are
    never Hub lineage (`base_model` metadata).

    Args:
        recipe: the merge recipe, as written next to the merged weights (`MergeConfig.to_dict()`).
        sources: `{"model", "revision", "weight"}` per input, the base first with `"role": "base"`.
        search_table: one mapping per coefficient-search grid point (parameters and validation scores), if any.
        method_summary, method_reference: what the recipe's method does and its paper (the merge engine passes
            the merge-method registry's `summary` and `reference`).
    """
    recipe, sources = redact_secrets(recipe), redact_secrets(list(sources))
    search_table = redact_secrets(list(search_table or []))
    if not recipe.get("method"):
        raise ValueError("The merge recipe has no 'method'.")
    base_models = _hub_ids([source.get("model") for source in sources])
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        library_name="transformers",
        tags=_tags("merge", SAFT_HF_TAG, recipe["method"]),
    )
    model_id = (recipe.get("push_to_hub") or {}).get("repo_id") or recipe.get("output_dir") or "path/to/merged-model"
    search_columns = list(dict.fromkeys(column for row in search_table for column in row))
    return _render(
        "merged.md",
        card_data,
        model_id=model_id,
        model_name=Path(model_id).name,
        method=recipe["method"],
        method_summary=method_summary,
        method_reference=method_reference,
        sources=[
            {
                "role": source.get("role", "model"),
                "model": _cell(public_ref(source["model"]) if source.get("model") else None),
                "revision": _cell(source.get("revision")),
                "weight": _cell(source.get("weight")),
            }
            for source in sources
        ],
        parameters=_rows(recipe.get("parameters")),
        tensor_parameters=[
            (_cell(override.get("filter")), _cell(override.get("parameters")))
            for override in recipe.get("tensor_parameters") or []
        ],
        search_columns=[_cell(column) for column in search_columns],
        search_rows=[[_cell(row.get(column)) for column in search_columns] for row in search_table],
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True),
    )


def task_vector_card(metadata: Mapping[str, Any]) -> ModelCard:
    """The card of a task vector folder, from its safetensors metadata (`base_model`, `base_revision`, `task`,
    `finetune_mode`, `sam_mode`, `sam_rho`, `sam_eta`, `saft_hf_version`, `base_fingerprint`, `source`; an optional
    `repo_id` names it in the usage example). Local models are shown as `saft_hf.hub.public_ref` shows them, and
    only a Hub base is linked."""
    metadata = redact_secrets(metadata)
    if not metadata.get("base_model"):
        raise ValueError("Task vector metadata has no 'base_model'.")
    base_models = _hub_ids([metadata["base_model"]])
    card_data = ModelCardData(
        base_model=base_models or None,
        # A task vector is a weight delta applied on top of its base model, which is the Hub's notion of an adapter.
        base_model_relation="adapter" if base_models else None,
        library_name="saft_hf",
        tags=_tags(SAFT_HF_TAG, "task-vector", metadata.get("sam_mode"), metadata.get("finetune_mode")),
    )
    model_id = metadata.get("repo_id") or "path/to/task-vector"
    return _render(
        "task_vector.md",
        card_data,
        model_id=model_id,
        model_name=Path(model_id).name,
        base_model=public_ref(metadata["base_model"]),
        base_model_id=next(iter(base_models), None),
        task=metadata.get("task"),
        fields=_rows(
            {
                "base model": public_ref(metadata["base_model"]),
                "base revision": metadata.get("base_revision"),
                "base fingerprint": metadata.get("base_fingerprint"),
                "fine-tuned model": public_ref(metadata["source"]) if metadata.get("source") else None,
                "task": metadata.get("task"),
                "fine-tuning mode": metadata.get("finetune_mode"),
                "sam_mode": metadata.get("sam_mode"),
                "sam_rho": metadata.get("sam_rho"),
                "sam_eta": metadata.get("sam_eta"),
                "saft_hf version": metadata.get("saft_hf_version"),
            }
        ),
    )


# What each SAFT setting means, for the card's settings table.
SAM_SETTING_MEANINGS = {
    "sam_mode": "sharpness-aware step: asam (adaptive SAM, the paper's), sam, or none (plain fine-tuning)",
    "sam_rho": "radius of the weight perturbation",
    "sam_eta": "ASAM's eta in T = |w| + eta",
    "sam_adaptive_scope": "tensors ASAM scales by |w| + eta: all trainable tensors, or weights only",
    "sam_interval": "one optimizer step out of this many is perturbed",
    "sam_sync_perturbation": "under DDP, perturbation from the all-reduced gradient (else each device's own)",
}


def finetune_card(info: Mapping[str, Any]) -> ModelCard:
    """The card of a SAFT fine-tune (what `SAFTTrainer.create_model_card` writes).

    `info` keys: `base_model` (required unless `architecture` is given: a model built from a config has no base),
    `base_revision`, `architecture` (the model class, shown when there is no base model), `task`, `dataset`,
    `finetune_mode` (`lora` makes the card a PEFT adapter's), `sam_mode`, `sam_rho`, `sam_eta` (and any other
    `sam_*` setting), `training_args` (a mapping of hyper-parameters), `eval_metrics` (a mapping of metric name to
    value), `repo_id` (names the model in the usage example), `model_name` (the title; default the repo name),
    `tags` (extra tags), `language`, `license`.

    Local paths (base model, dataset) are shown by folder name only (`saft_hf.hub.public_ref`); only Hub ids are
    linked and become metadata.
    """
    info = redact_secrets(info)
    if not info.get("base_model") and not info.get("architecture"):
        raise ValueError("Fine-tune info has no 'base_model'.")
    base_model = info.get("base_model")
    base_models = _hub_ids([base_model])
    dataset = info.get("dataset")
    dataset_ids = _hub_ids([dataset])
    sam_mode = info.get("sam_mode")
    finetune_mode = info.get("finetune_mode")
    sam_tag = "sharpness-aware-minimization" if sam_mode not in (None, "none") else None
    adapter = finetune_mode == "lora"
    extra_tags = info.get("tags") or []
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation=("adapter" if adapter else "finetune") if base_models else None,
        datasets=dataset_ids or None,
        language=info.get("language"),
        license=info.get("license"),
        library_name="peft" if adapter else "transformers",
        tags=_tags(SAFT_HF_TAG, sam_tag, sam_mode, finetune_mode, *extra_tags),
    )
    model_id = info.get("repo_id") or "path/to/fine-tuned-model"
    sam_settings = {key: value for key, value in info.items() if key.startswith("sam_")}
    return _render(
        "finetune.md",
        card_data,
        model_id=model_id,
        model_name=info.get("model_name") or Path(model_id).name,
        base_model=public_ref(base_model) if base_model else None,
        base_model_id=next(iter(base_models), None),
        base_revision=info.get("base_revision"),
        architecture=info.get("architecture"),
        task=info.get("task"),
        dataset=public_ref(dataset) if dataset else None,
        dataset_id=next(iter(dataset_ids), None),
        finetune_mode=finetune_mode,
        adapter=adapter,
        sam_mode=sam_mode,
        sam_settings=[
            (name, value, _cell(SAM_SETTING_MEANINGS.get(key, "")))
            for (name, value), key in zip(_rows(sam_settings), sam_settings)
        ],
        training_args=_rows(info.get("training_args")),
        eval_metrics=_rows(info.get("eval_metrics")),
    )
