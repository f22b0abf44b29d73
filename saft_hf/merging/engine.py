"""The streaming merge engine: one tensor name at a time from memory-mapped inputs to sharded, atomic output.

Peak allocated memory is the method's working set for the largest tensor (constant in the number of models, see
``methods``) plus the output shard being filled (at most ``max_shard_size``); inputs are memory-mapped, so reading
them costs page cache, not allocations.

Dtypes: inputs (models, task vectors, the base) may hold any floating-point dtype, mixed freely; differences and
merges are computed in float64 and the result is stored in the base's dtype unless the recipe's ``dtype`` asks for
another. Methods registered with ``float32=True`` (task arithmetic) compute in float32 when the base, every input
model and the output are float32 or narrower: several times faster, and within float32 summation's error bound of
the float64 result (at most 1.2e-7 apart on ViT-B/32 weights). Non-finite numbers are refused by default: every
input tensor is checked as it is read (NaN or infinity in a model, task vector or the base raises
:class:`~saft_hf.errors.NonFiniteError` naming the input, the tensor and the counts; for methods registered with
``propagates_nonfinite=True``, whose output is non-finite wherever an input is, the inputs are checked only when the
output is not finite, which finds the same input at one pass less over every input), and every output tensor after
the cast to the output dtype, before it is written (the message names the likely cause: the method's parameters or
model weights, e.g. ``alpha: -1e300``, or an output ``dtype`` narrower than the base's). ``allow_nonfinite: true``
lets such values through float64 arithmetic as is: task arithmetic and averages propagate them; TIES' magnitude trim
drops NaN entries and keeps infinite ones (the largest
magnitudes).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import hub
from ..cards import merged_model_card
from ..io import (
    KeyAlignment,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    check_finite,
    check_outside_inputs,
    check_replaceable,
    nonfinite_counts,
    tensor_dtype,
    tensor_shape,
)
from ..layout import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    HEAD_FILE,
    RECIPE_NAME,
    is_adapter_folder,
    is_adapter_listing,
    is_task_vector_folder,
    is_task_vector_listing,
)
from ..model_weights import ModelWeights, align_models, open_model_weights
from ..task_vectors import TaskVector
from .config import MergeConfig
from .finetuning import BASE_FIELD, MODE_FIELD, common_finetune_mode, copy_shared_head, record_finetune_mode
from .methods import get_method

# What an input is: a model folder, a saved task vector, or a PEFT LoRA adapter (merged as its dense delta).
MODEL, TASK_VECTOR, ADAPTER = "model", "task vector", "adapter"
SEARCH_TABLE_NAME = "search_table"
_NONFINITE_INPUT_ADVICE = "fix the input, or set allow_nonfinite: true in the recipe to merge such values as they are"
# Base-folder files not copied into the merged folder: weights (rewritten), the base's card and recipe (replaced).
_NOT_COPIED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "README.md",
    RECIPE_NAME,
    f"{SEARCH_TABLE_NAME}.*",
    ".*",
)


@dataclass
class _Input:
    label: str
    weights: ModelWeights
    alignment: KeyAlignment
    task_vector: TaskVector | None = None  # set when the input is a delta, not weights (a task vector, an adapter)
    kind: str = MODEL

    @property
    def finetune_mode(self) -> str | None:
        """The fine-tuning mode the input records, if any (see :mod:`saft_hf.merging.finetuning`)."""
        if self.task_vector is not None:
            return self.task_vector.metadata.get("finetune_mode") or None
        return self.weights.config.get(MODE_FIELD) or None

    @property
    def head_file(self) -> Path | None:
        """The zero-shot head the input's folder carries, if any (a model's or an adapter's; a task vector carries
        none)."""
        path = None if self.kind == TASK_VECTOR else self.weights.folder / HEAD_FILE
        return path if path is not None and path.is_file() else None


class _FinetunedTensors(Sequence[torch.Tensor]):
    """The inputs' tensors for one base name, each read when the method reaches it (a task vector's ``base +
    delta`` computed in float64 then), so a method looping over the models holds one of them at a time."""

    def __init__(
        self,
        inputs: Sequence[_Input],
        name: str,
        base_tensor: torch.Tensor,
        checked: Callable[[int, str, torch.Tensor], torch.Tensor],
    ):
        self._inputs, self._name, self._base, self._checked = inputs, name, base_tensor, checked

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._inputs[index]
        input_name = item.alignment.mapping[self._name]
        tensor = self._checked(index, input_name, item.weights.tensors[input_name])
        if item.task_vector is not None:
            return self._base.to(torch.float64, copy=True).add_(tensor.double())
        return tensor


# Tensors merged at once, each by its own Python thread (torch releases the GIL), so a 2-core machine uses both cores
# without the per-op synchronisation of intra-op threads.
COMPUTE_WORKERS = 2


@contextlib.contextmanager
def one_compute_thread() -> Iterator[None]:
    """Run each torch op on one thread (the calling one), restoring the thread count after.

    Merging is memory-bound: measured on a shared 2-core machine (load average 3-4), two intra-op threads made sums,
    ``aminmax`` and subtractions of ViT-sized tensors 4-10x slower than one (each op waits for its slowest thread),
    and a ViT-B/32 task arithmetic merge of 8 models 9x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unchecked(index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A per-tensor seed from the recipe's seed: masks differ between tensors, independent of processing order."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class MergePlan:
    """A validated merge with its inputs resolved and open (memory-mapped), ready to stream merged tensors.

    Construction does all checks that need no tensor data, the whole recipe before the first weight download:
    every Hub reference must exist at its revision (each is pinned to the commit it resolves to, one API call, no
    download), a Hub input without config.json must hold a task vector or a PEFT adapter, the configs must agree,
    and an FTTS fine-tune (``config.saft_base_model``) or LoRA adapter (``base_model_name_or_path``) must not
    record another base than ``base_model`` (see :func:`saft_hf.hub.names_another_model`; ``allow_other_base``
    accepts it). Then the weights are opened (an adapter as its dense delta, :meth:`TaskVector.from_lora`) and
    names, shapes, task vector fingerprints, coverage and the inputs' fine-tuning modes checked. Errors name the
    input and tensor.
    """

    def __init__(self, config: MergeConfig, *, token: str | bool | None = None):
        self.config = config
        self.method = get_method(config.method)
        self.token = token
        base_model, base_revision, base_kind = self._locate("base_model", config.base_model, None)
        if base_kind != MODEL:
            raise ValueError(f"base_model: {config.base_model} is a {base_kind}, not a model")
        located = [self._locate(f"models[{i}]", spec.model, spec.revision) for i, spec in enumerate(config.models)]
        models = [(ref, revision) for ref, revision, kind in located if kind == MODEL]
        hub.check_same_architecture(base_model, [ref for ref, _ in models], [revision for _, revision in models], token)
        if not config.allow_other_base:
            for index, (spec, where) in enumerate(zip(config.models, located)):
                self._check_recorded_base(f"models[{index}] ({spec.model})", *where)
        self.base = open_model_weights(base_model, base_revision, allow_pickle=config.allow_pickle, token=token)
        self.inputs = [self._open_input(i, spec, *where) for i, (spec, where) in enumerate(zip(config.models, located))]
        # The forward the merge is scored with; inputs no one forward fits fail before anything is written.
        self.finetune_mode = common_finetune_mode(
            {item.label: item.finetune_mode for item in self.inputs}, allow_mixed=config.allow_mixed_finetune_modes
        )
        self.merged_names = self._common_coverage()
        self.base_ties = self.inputs[0].alignment.base_ties
        self.weights = [spec.weight for spec in config.models]
        # (input index, tensor name) already found finite (the base is index -1): a method reading the models twice
        # per tensor, or a coefficient search merging at every grid point, checks each input tensor once.
        self._finite: set[tuple[int, str]] = set()

    def _locate(self, field: str, ref: str, revision: str | None) -> tuple[str, str | None, str]:
        """``(ref, revision, kind)`` to open an input with (kind: ``MODEL``, ``TASK_VECTOR`` or ``ADAPTER``), asking
        the Hub one listing and downloading nothing: a Hub reference is pinned to the commit its revision resolves
        to now (every later download reads that commit); without config.json it must hold task vector weights or
        an adapter_config.json (a repo with neither is refused); a local folder is taken as it is."""
        try:
            listing = hub.list_hub_files(ref, revision, token=self.token)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{field}: {error}") from error
        if listing is None:
            folder = Path(ref).expanduser()
            kind = TASK_VECTOR if is_task_vector_folder(folder) else ADAPTER if is_adapter_folder(folder) else MODEL
            return ref, revision, kind
        if is_task_vector_listing(listing.files):
            return listing.repo_id, listing.commit, TASK_VECTOR
        if is_adapter_listing(listing.files):
            return listing.repo_id, listing.commit, ADAPTER
        if CONFIG_NAME not in listing.files:
            raise FileNotFoundError(
                f"{field}: Hub repo '{listing.repo_id}@{listing.commit}' has no {CONFIG_NAME} (a model), no "
                f"task_vector.safetensors (a task vector) and no {ADAPTER_CONFIG_NAME} (a PEFT adapter); files: "
                f"{sorted(listing.files)}"
            )
        return listing.repo_id, listing.commit, MODEL

    def _check_recorded_base(self, label: str, ref: str, revision: str | None, kind: str) -> None:
        """Refuse an FTTS fine-tune or LoRA adapter that records another base than the recipe's (from its config
        file alone). A task vector's base is checked by fingerprint when it is opened."""
        if kind == TASK_VECTOR:
            return
        filename, field = (
            (ADAPTER_CONFIG_NAME, "base_model_name_or_path") if kind == ADAPTER else (CONFIG_NAME, BASE_FIELD)
        )
        recorded = hub.fetch_config(ref, revision, self.token, filename=filename).get(field)
        hub.check_recorded_base(label, recorded, f"{filename} {field}", self.config.base_model)

    def _open_input(self, index: int, spec, ref: str, revision: str | None, kind: str) -> _Input:
        label = f"models[{index}] ({spec.model})"
        if kind == MODEL:
            weights = open_model_weights(ref, revision, allow_pickle=self.config.allow_pickle, token=self.token)
            return _Input(label, weights, align_models(self.base, weights, other_label=label))
        folder = hub.resolve_model(ref, revision, allow_pickle=self.config.allow_pickle, token=self.token)
        weights_revision = hub.resolved_revision(ref, revision, self.token)
        if kind == ADAPTER:
            # Its dense delta over this very base (the recorded base was checked above).
            vector = TaskVector.from_lora(
                self.base.folder, folder, allow_pickle=self.config.allow_pickle, allow_other_base=True
            )
            weights = ModelWeights(vector, spec.model, weights_revision, folder)
            return _Input(label, weights, vector.alignment_with(self.base, label=f"base for {label}"), vector, kind)
        vector = TaskVector.load(folder)
        weights = ModelWeights(vector, spec.model, weights_revision, folder)
        alignment = vector.alignment_with(self.base, label=f"base for {label}")
        vector.check_base(
            self.base.tensors,
            label=f"{label}: its base",
            alignment=alignment,
            allow_other_base=self.config.allow_other_base,
        )
        return _Input(label, weights, alignment, vector, kind)

    def _common_coverage(self) -> set[str]:
        """Base tensors every input provides; inputs must agree on which those are."""
        first = self.inputs[0]
        covered = set(first.alignment.mapping)
        for other in self.inputs[1:]:
            difference = covered.symmetric_difference(other.alignment.mapping)
            if difference:
                name = min(difference)
                has, lacks = (first, other) if name in covered else (other, first)
                raise ValueError(f"{lacks.label}: has no tensor for base tensor {name!r}, which {has.label} has")
        return covered

    def output_dtype(self, name: str) -> torch.dtype:
        dtype = tensor_dtype(self.base.tensors, name)
        if self.config.dtype is not None and dtype.is_floating_point:
            return getattr(torch, self.config.dtype)
        return dtype

    def merge_tensor(self, name: str, overrides: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The merged tensor ``name`` (a base name the inputs cover), in the output dtype."""
        # A method whose output is non-finite wherever an input is reads its inputs unchecked (one pass less over
        # each); ``_to_output`` traces a non-finite output back to its input.
        checked = _unchecked if self.method.propagates_nonfinite else self._checked_input
        base_tensor = checked(-1, name, self.base.tensors[name])
        finetuned = _FinetunedTensors(self.inputs, name, base_tensor, checked)
        parameters = self.config.parameters_for(name, overrides)
        arguments = self.config.model_arguments(parameters)
        if self.method.seeded:
            arguments["seed"] = tensor_seed(parameters["seed"], name)
        if self.method.float32 and self._float32_enough(name):
            arguments["dtype"] = torch.float32
        merged = self.method.function(base_tensor, finetuned, self.weights, **arguments)
        return self._to_output(name, merged, parameters)

    def _float32_enough(self, name: str) -> bool:
        """Whether tensor ``name`` may be merged in float32: the base, every input and the output are float32 or
        narrower, and no input is a task vector (whose ``base + delta`` would be rounded once more)."""
        dtypes = [self.output_dtype(name), tensor_dtype(self.base.tensors, name)]
        for item in self.inputs:
            if item.task_vector is not None:
                return False
            dtypes.append(tensor_dtype(item.weights.tensors, item.alignment.mapping[name]))
        return all(dtype.is_floating_point and dtype.itemsize <= 4 for dtype in dtypes)

    def _base_tensor(self, name: str) -> torch.Tensor:
        return self._checked_input(-1, name, self.base.tensors[name])

    def _checked_input(self, index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (``name`` of input ``index``, -1 for the base), refused when it holds NaN or infinities."""
        if self.config.allow_nonfinite or (index, name) in self._finite:
            return tensor
        label = f"base_model ({self.config.base_model})" if index < 0 else self.inputs[index].label
        check_finite(tensor, where=f"{label}: tensor {name!r}", advice=_NONFINITE_INPUT_ADVICE)
        self._finite.add((index, name))
        return tensor

    def _check_inputs(self, name: str) -> None:
        """Raise naming the first of the base and the inputs whose tensor for ``name`` holds NaN or infinities."""
        self._base_tensor(name)
        for index, item in enumerate(self.inputs):
            input_name = item.alignment.mapping[name]
            self._checked_input(index, input_name, item.weights.tensors[input_name])

    def _to_output(self, name: str, tensor: torch.Tensor, parameters: Mapping[str, Any] | None = None) -> torch.Tensor:
        """``tensor`` (merged with ``parameters``, or the base's own when None) cast to the output dtype of ``name``,
        checked to be finite: the inputs were (a method that read them unchecked has them checked now, when its
        output is not finite), so the method's arithmetic or the cast overflowed."""
        dtype = self.output_dtype(name)
        result = tensor.to(dtype)
        # One pass over the output on the usual (finite) path: this runs for every tensor of every merge.
        if self.config.allow_nonfinite or nonfinite_counts(result) == (0, 0):
            return result
        if parameters is not None and self.method.propagates_nonfinite:
            self._check_inputs(name)
        causes = []
        if parameters is not None:
            causes.append(
                f"method {self.method.name!r} with parameters {dict(parameters)} and model weights "
                f"{self.weights} (e.g. a huge alpha)"
            )
        base_dtype = tensor_dtype(self.base.tensors, name)
        if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(base_dtype).max:
            causes.append(f"the output dtype {dtype} (recipe field dtype), narrower than the base's {base_dtype}")
        return check_finite(  # raises: the result is not finite
            result,
            where=f"output tensor {name!r} in {dtype}",
            advice=f"likely cause: {' or '.join(causes)}; fix the recipe, or set allow_nonfinite: true to "
            "write such values",
        )

    def merged_tensors(self, overrides: Mapping[str, Any] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every base tensor, in the base's order: merged where the inputs cover it, the
        base's own (in the output dtype) elsewhere; a tensor the base stores under two tied names is merged once.

        ``COMPUTE_WORKERS`` tensors are computed at once, each on one torch thread (see :func:`one_compute_thread`);
        at most ``COMPUTE_WORKERS + 1`` results wait to be consumed. Errors surface in the base's order."""
        tied_sources = set(self.base_ties.values())
        tied_results: dict[tuple[str, str], torch.Tensor] = {}
        # (output name, what computes it): ("merge", source) or ("base", name); a tied alias shares its source's job.
        jobs = []
        for name in self.base.tensors:
            source = self.base_ties.get(name, name)
            jobs.append((name, ("merge", source) if source in self.merged_names else ("base", name)))

        def run(job: tuple[str, str]) -> torch.Tensor:
            kind, name = job
            if kind == "merge":
                return self.merge_tensor(name, overrides)
            return self._to_output(name, self._base_tensor(name))

        with one_compute_thread(), ThreadPoolExecutor(max_workers=COMPUTE_WORKERS) as pool:
            pending: dict[tuple[str, str], Future] = {}
            submitted = 0
            for index, (name, job) in enumerate(jobs):
                while submitted < len(jobs) and submitted <= index + COMPUTE_WORKERS:
                    ahead = jobs[submitted][1]
                    if ahead not in pending and ahead not in tied_results:
                        pending[ahead] = pool.submit(run, ahead)
                    submitted += 1
                if job not in pending:  # a tied alias of a tensor already yielded
                    yield name, tied_results[job].clone()
                    continue
                tensor = pending.pop(job).result()
                if job[0] == "merge" and job[1] in tied_sources:
                    tied_results[job] = tensor
                yield name, tensor

    def _shown(self, ref: str) -> str:
        """A local reference as the recipe and card of this merge show it: as written, unless the merge is pushed,
        then as :func:`saft_hf.hub.public_ref` shows it (folder name and a local marker, no absolute path)."""
        return ref if self.config.push_to_hub is None else hub.public_ref(ref)

    def recorded_recipe(self, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The recipe as run: Hub references pinned to the commits they resolved to.

        Not pushed, local inputs and ``output_dir`` stay as the user wrote them, so the recipe re-runs here. With
        ``push_to_hub`` the recipe is public: each local input becomes ``"<folder name> (local folder)"`` (see
        :func:`saft_hf.hub.public_ref`; re-running it then fails naming that input, which the reader must supply)
        and ``output_dir`` its last folder name, a relative path.
        """
        recipe = self.config.to_dict()
        if parameters is not None:
            recipe["parameters"] = dict(parameters)
        if self.base.revision is not None:
            recipe["base_model"] = f"{hub.parse_model_ref(self.config.base_model)[0]}@{self.base.revision}"
        else:
            recipe["base_model"] = self._shown(recipe["base_model"])
        for entry, item in zip(recipe["models"], self.inputs):
            if item.weights.revision is not None:
                entry["model"] = hub.parse_model_ref(entry["model"])[0]
                entry["revision"] = item.weights.revision
            else:
                entry["model"] = self._shown(entry["model"])
        if self.config.push_to_hub is not None and recipe.get("output_dir"):
            recipe["output_dir"] = Path(recipe["output_dir"]).expanduser().resolve().name
        return recipe

    def sources(self) -> list[dict[str, Any]]:
        """``{"model", "revision", "weight"}`` per input, the base first with ``"role": "base"`` (for the card);
        local models as :meth:`recorded_recipe` shows them."""
        base_id = self._shown(hub.parse_model_ref(self.config.base_model)[0])
        sources = [{"model": base_id, "revision": self.base.revision, "weight": None, "role": "base"}]
        for spec, item in zip(self.config.models, self.inputs):
            model = self._shown(hub.parse_model_ref(spec.model, spec.revision)[0])
            sources.append({"model": model, "revision": item.weights.revision, "weight": spec.weight})
        return sources


def merge(config: MergeConfig | dict | str | Path, *, token: str | bool | None = None, progress: bool = True) -> Path:
    """Merge the models of ``config`` (a :class:`MergeConfig`, its dict, or a YAML path) into ``output_dir``.

    The folder is a loadable transformers model: config and tokenizer/processor files from the base, sharded
    safetensors weights with their index, the recipe as run (``merge_config.yaml``, revisions pinned) and a model
    card. It appears atomically; on any error nothing is left at ``output_dir`` (an existing merge there is kept).
    Pushed to the Hub in one commit when ``push_to_hub`` is set.
    """
    config = MergeConfig.coerce(config)
    check_output_dir(config, token=token)
    return write_merge(MergePlan(config, token=token), progress=progress)


def check_output_dir(config: MergeConfig, *, token: str | bool | None = None) -> Path:
    """``output_dir``, after checking (before any download) that it is set, lies apart from the recipe's local
    inputs and would replace nothing saft_hf did not write (see :func:`saft_hf.io.atomic_output_dir`); and that
    ``push_to_hub`` names no input and no repo holding what saft_hf did not push (see
    :func:`saft_hf.hub.check_push_target`)."""
    if not config.output_dir:
        raise ValueError("output_dir: required (where to write the merged model)")
    output_dir = Path(config.output_dir).expanduser()
    refs = [("base_model", config.base_model), *((f"models[{i}]", spec.model) for i, spec in enumerate(config.models))]
    check_outside_inputs(
        output_dir, [(f"{field} ({ref})", ref) for field, ref in refs if hub.is_local(ref)], field="output_dir"
    )
    check_replaceable(output_dir.resolve())
    if config.push_to_hub is not None:
        hub.check_push_target(config.push_to_hub.repo_id, "merge", token=token, inputs=refs)
    return output_dir


def write_merge(
    plan: MergePlan,
    *,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    search_table: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``plan`` (with parameter ``overrides``, e.g. a search's best point) to its ``output_dir``."""
    config = plan.config
    output_dir = check_output_dir(config, token=plan.token)
    parameters = {**config.parameters, **(overrides or {})}
    # Hub inputs are known as folders only now, resolved to their snapshots.
    inputs = [
        (f"base_model ({config.base_model})", plan.base.folder),
        *((item.label, item.weights.folder) for item in plan.inputs),
    ]
    with atomic_output_dir(output_dir, kind="merged_model", inputs=inputs, field="output_dir") as staging:
        write_model_folder(plan, staging, overrides=overrides, progress=progress)
        recipe = plan.recorded_recipe(parameters)
        (staging / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
        if search_table:
            write_search_table(search_table, staging)
        card = merged_model_card(
            recipe,
            plan.sources(),
            search_table,
            method_summary=plan.method.summary,
            method_reference=plan.method.reference,
        )
        card.save(staging / "README.md")
    if config.push_to_hub is not None:
        repo_id, private = config.push_to_hub.repo_id, config.push_to_hub.private
        retry = f"saft_hf.hub.push_folder('{output_dir}', '{repo_id}'{', private=True' if private else ''})"
        with hub.reporting_push_failure(repo_id, f"the merged model in '{output_dir}' is complete; retry with {retry}"):
            hub.push_folder(
                output_dir,
                repo_id,
                private=private,
                token=plan.token,
                commit_message=f"Merge with saft_hf ({config.method})",
            )
    return output_dir


def write_model_folder(
    plan: MergePlan, folder: Path, *, overrides: Mapping[str, Any] | None = None, progress: bool = True
) -> None:
    """Stream the merged weights into ``folder`` (sharded, with index), copy the base's support files, and record
    the inputs' fine-tuning mode with their shared zero-shot head (:mod:`saft_hf.merging.finetuning`)."""
    config = plan.config
    specs = [
        TensorSpec(name, tensor_shape(plan.base.tensors, name), plan.output_dtype(name)) for name in plan.base.tensors
    ]
    with ShardedSafetensorsWriter(folder, specs, max_shard_size=config.max_shard_size) as writer:
        tensors = plan.merged_tensors(overrides)
        for name, tensor in tqdm(
            tensors, total=len(specs), desc=f"merging ({config.method})", unit="tensor", disable=not progress
        ):
            writer.add(name, tensor)
        writer.close()
    _copy_support_files(plan.base.folder, folder, config.dtype)
    record_finetune_mode(folder, plan.finetune_mode, config.base_model, pushed=config.push_to_hub is not None)
    copy_shared_head(folder, {item.label: item.head_file for item in plan.inputs})


def _copy_support_files(base_folder: Path, target: Path, dtype: str | None) -> None:
    """Copy config, generation config, tokenizer and processor files; record a requested output dtype."""
    for path in sorted(base_folder.iterdir()):
        if path.is_file() and not any(fnmatch.fnmatch(path.name, pattern) for pattern in _NOT_COPIED):
            shutil.copy2(path, target / path.name)
    config_path = target / "config.json"
    if dtype is not None and config_path.is_file():
        model_config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in model_config or key == "dtype":
                model_config[key] = dtype
        config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")


def write_search_table(table: list[dict[str, Any]], folder: Path) -> None:
    """``search_table.json`` and ``search_table.csv``: one row per grid point with its parameters and score."""
    (folder / f"{SEARCH_TABLE_NAME}.json").write_text(json.dumps(table, indent=2))
    columns = list(dict.fromkeys(key for row in table for key in row))
    with open(folder / f"{SEARCH_TABLE_NAME}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


__all__ = [
    "MergePlan",
    "check_output_dir",
    "merge",
    "tensor_seed",
    "write_merge",
    "write_model_folder",
    "write_search_table",
]
