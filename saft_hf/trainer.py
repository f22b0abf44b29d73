"""`SAFTTrainer`: sharpness-aware fine-tuning inside `transformers.Trainer`."""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.profiler import record_function
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model

from .cards import finetune_card
from .config import SAFTConfig
from .sharpness import (
    PerturbationStats,
    all_reduce_mean_,
    flat_buffers_like,
    is_fully_sharded,
    local_tensor,
    perturb_weights_,
    restore_weights_,
)

__all__ = ["SAFTTrainer", "forward_consumes_num_items_in_batch"]

# Running sums kept between two logs, reduced across processes in one collective when logging.
_SAM_TOTALS = ("grad_norm", "perturbation_norm", "sharpness", "perturbations", "perturbed_steps", "skipped")


class SAFTTrainer(Trainer):
    r"""
    [`~transformers.Trainer`] whose training step is the two-pass (A)SAM step of SAFT (Lee et al., "Mitigating
    Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning", ICLR 2025).

    What changes compared to `Trainer` (everything else — optimizer, scheduler, clipping, mixed precision, gradient
    accumulation, checkpointing, logging — is the stock behaviour):

    - `training_step`: for each micro-batch of a perturbed optimizer step (one step out of `args.sam_interval`):
      1. the gradient accumulated so far in `.grad` is moved aside (no copy);
      2. ascent pass: `super().training_step` at `w` under `no_sync`, so DDP does not all-reduce it (with
         `sam_sync_perturbation` the gradient is averaged over processes instead; under FSDP it is always the
         reduce-scattered global gradient);
      3. `w` is saved and the weights become `w + e`, the perturbation computed from that gradient (see
         `saft_hf.sharpness`); if its norm is not finite the perturbation is skipped and counted; the accumulated
         gradient goes back into `.grad`;
      4. descent pass: `super().training_step` at `w + e` with the RNG state of the ascent pass (same dropout
         masks), in the synchronisation context the Trainer chose, so its gradient adds to the accumulated one;
      5. `w` is restored by copying the saved values (exact in every dtype).
      Both passes go through `super().training_step`, so the installed version's loss scaling (gradient
      accumulation, fp16 `GradScaler`) stays in force; nothing is unscaled between the passes. The returned loss
      (what the Trainer logs as `loss`) is the ascent pass's loss at `w`, as in the SAM and ASAM reference code.
    - The loss-kwargs detection: the stock Trainer passes `num_items_in_batch` (the step's label count) to every
      model whose forward takes `**kwargs`, and then does not divide the loss by the accumulation steps. That is
      right for models whose loss uses it (causal LMs through `self.loss_function`: the step's loss is then
      token-weighted, as one big batch would be) and wrong for models that take `**kwargs` but ignore it (T5, CLIP in
      transformers 5.x return a per-micro-batch mean, so the accumulated gradient is the accumulation steps times
      too large). This trainer keeps the stock behaviour only for models whose forward consumes it (see
      `forward_consumes_num_items_in_batch`) or when the Trainer's label smoother computes the loss; for every other
      model the loss is divided by the accumulation steps. This applies with `sam_mode="none"` too.
    - `log`: adds, averaged over the perturbations and processes since the last log, `sam/grad_norm` (the norm `e`
      is divided by, `||T g||` or `||g||`, of the loss as backpropagated: scaled for gradient accumulation, i.e.
      divided by the accumulation steps, or for models that consume `num_items_in_batch` the micro-batch's summed
      loss over the step's label count, and times the fp16 loss scale), `sam/perturbation_norm` (`||e||`, `rho` for
      SAM), `sam/sharpness` (loss at `w + e` minus loss at `w`, summed over a step's micro-batches like the
      Trainer's `loss`, averaged over perturbed steps) and `sam/skipped` (perturbations skipped, summed over
      processes).
    - Model card: `create_model_card` writes `README.md` into `output_dir` from `saft_hf.cards.finetune_card`: the
      base model (a local path shown by folder name only), the SAFT settings, the training hyper-parameters, the
      latest evaluation metrics of the log history, the paper's BibTeX citation, and the tags `_tag_names` plus the
      SAM mode (the `sharpness-aware-minimization` tag only when a sharpness-aware step runs). `push_to_hub` writes
      it before uploading (stock behaviour), and so does every checkpoint save (as TRL's trainers do), so pushes
      from checkpoints carry it too.
    - Files beside the weights: `add_model_file(write)` registers `write(folder)`, run after every `save_model` (the
      final model, each checkpoint) before any push. `push_to_hub` uploads the whole `output_dir` (stock behaviour;
      names starting with `_` and `checkpoint-*` folders are skipped), so whatever a registered writer puts there,
      or anything a caller writes into `output_dir` before calling `push_to_hub`, is in the pushed repo.

    Extra memory over plain fine-tuning: one parameter-sized buffer for the saved `w`, allocated at the first
    perturbed step and kept (reallocating it every step costs page faults on CPU). The perturbation is computed in
    the ascent gradient's storage (and the saved-`w` buffer, before `w` is saved there), which is freed once the
    weights are perturbed. With `args.sam_compile_perturbation` (CPU) it is computed by compiled loops that only read
    the gradient; compiling costs seconds once per process and the compiler's own memory (tens of MB).

    Refused at construction: DeepSpeed (its `backward` steps the engine and ZeRO frees `.grad`), and FSDP with
    gradient accumulation unless gradients sync on every micro-batch (FSDP's `no_sync` keeps the accumulated
    gradient unsharded outside `.grad`, where it cannot be moved aside).
    """

    # Tags of the model card and of the model (`model.add_model_tags`), as TRL's trainers do.
    _tag_names = ["saft_hf", "sharpness-aware-minimization"]

    def __init__(self, model=None, args: SAFTConfig | None = None, **kwargs):
        if args is None:
            args = SAFTConfig(output_dir="saft_output")
        if not isinstance(args, SAFTConfig):
            raise TypeError(f"SAFTTrainer needs `args` to be a SAFTConfig, got {type(args).__name__}.")
        super().__init__(model=model, args=args, **kwargs)
        self._refuse_unsupported_backends()
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        # The stock rule (any `**kwargs` forward) narrowed to the models whose loss actually uses the count; the
        # label smoother, when set, computes the loss itself and does use it.
        self.model_accepts_loss_kwargs = bool(self.model_accepts_loss_kwargs) and (
            self.label_smoother is not None or forward_consumes_num_items_in_batch(unwrapped)
        )
        self._model_file_writers: list[Callable[[Path], Any]] = []
        if hasattr(unwrapped, "add_model_tags"):
            unwrapped.add_model_tags(self._card_tags())
        self._sam_totals: torch.Tensor | None = None
        self._sam_last_perturbed_step: int | None = None
        self._saved_weights: list[torch.Tensor] = []
        self._saved_weights_layout: list | None = None

    def _refuse_unsupported_backends(self) -> None:
        if not self.args.sam_enabled:
            return
        distributed = self.accelerator.distributed_type
        if self.is_deepspeed_enabled or distributed == DistributedType.DEEPSPEED:
            raise ValueError(
                "SAFTTrainer does not support DeepSpeed: `accelerator.backward` steps the DeepSpeed engine and ZeRO "
                "frees `.grad`, so the two-pass (A)SAM step cannot be done. Use DDP or FSDP, or sam_mode='none'."
            )
        sync_each_batch = self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        fsdp = distributed == DistributedType.FSDP or self.is_distributed_loading_by_transformers
        if fsdp and self.args.gradient_accumulation_steps > 1 and not sync_each_batch:
            raise ValueError(
                "SAFTTrainer under FSDP with gradient_accumulation_steps > 1 needs the gradients synced on every "
                "micro-batch: FSDP's `no_sync` accumulates unsharded gradients outside `.grad`, which the ascent pass "
                "would mix into the perturbation. Set `accelerator_config={'gradient_accumulation_kwargs': "
                "{'sync_each_batch': True}}` in SAFTConfig, or use gradient_accumulation_steps=1."
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.sam_perturbs_step(self.state.global_step):
            return super().training_step(model, inputs, num_items_in_batch)

        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        # Sharded by Accelerate, or by transformers at load time (`from_pretrained(distributed_config=...)`, which
        # leaves Accelerate's distributed type at DDP's).
        sharded = self.accelerator.distributed_type == DistributedType.FSDP or is_fully_sharded(trainable)
        accumulated = [param.grad for _, param in trainable]
        for _, param in trainable:
            param.grad = None
        rng_state = _RNGState.capture(self.args.device)

        # Sharded gradients only exist reduce-scattered, so that ascent pass must sync; DDP's may stay per device.
        # The `saft/*` ranges name the step's phases in a `torch.profiler` trace.
        with contextlib.nullcontext() if sharded else self.accelerator.no_sync(model), record_function("saft/ascent"):
            loss_at_w = super().training_step(model, inputs, num_items_in_batch)

        perturbed = [(name, param) for name, param in trainable if param.grad is not None]
        params = [param for _, param in perturbed]
        saved_weights = self._saved_weights_buffers(params)
        with record_function("saft/perturb"):
            stats = self._perturb_weights_(perturbed, saved_weights, sharded)
        for (_, param), grad in zip(trainable, accumulated):  # replaces `e` (perturbed is a subset of trainable)
            param.grad = grad
        del accumulated

        rng_state.restore()
        with record_function("saft/descent"):
            loss_at_w_plus_e = super().training_step(model, inputs, num_items_in_batch)

        if stats.finite:
            with record_function("saft/restore"):
                restore_weights_(params, saved_weights)
        self._record(stats, loss_at_w, loss_at_w_plus_e)
        return loss_at_w

    def _saved_weights_buffers(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Where `w` is saved: allocated at the first perturbed step and reused, since a fresh parameter-sized
        allocation every step costs page faults on CPU, and per-tensor copies fragment the heap."""
        layout = [(value.shape, value.dtype, value.device) for value in map(local_tensor, params)]
        if layout != self._saved_weights_layout:
            self._saved_weights, self._saved_weights_layout = flat_buffers_like(params), layout
        return self._saved_weights

    def _perturb_weights_(
        self, perturbed: list[tuple[str, torch.nn.Parameter]], saved_weights: list[torch.Tensor], sharded: bool
    ) -> PerturbationStats:
        """Save `w` and move the weights to `w + e`, with `e` from the ascent gradients in `.grad` (consumed)."""
        grads = [param.grad for _, param in perturbed]
        if self.args.sam_sync_perturbation and self.accelerator.num_processes > 1 and not sharded:
            all_reduce_mean_(grads)
        return perturb_weights_(
            [param for _, param in perturbed],
            grads,
            saved_weights,
            mode=self.args.sam_mode,
            rho=self.args.sam_rho,
            eta=self.args.sam_eta,
            adaptive=[self.args.sam_adaptive_scope == "all" or "weight" in name for name, _ in perturbed],
            sharded=sharded,
            compiled=self.args.sam_compile_perturbation,
        )

    def _record(self, stats: PerturbationStats, loss_at_w: torch.Tensor, loss_at_w_plus_e: torch.Tensor) -> None:
        device = self.args.device
        new_step = self._sam_last_perturbed_step != self.state.global_step
        self._sam_last_perturbed_step = self.state.global_step
        if stats.finite:
            sharpness = (loss_at_w_plus_e - loss_at_w).float().to(device)
            values = [stats.grad_norm.to(device), stats.perturbation_norm.to(device), sharpness]
            counts = [1.0, float(new_step), 0.0]
        else:
            values = [torch.zeros((), device=device)] * 3
            counts = [0.0, float(new_step), 1.0]
        update = torch.cat([torch.stack(values), torch.tensor(counts, device=device)])
        self._sam_totals = update if self._sam_totals is None else self._sam_totals.add_(update)

    def _pop_sam_metrics(self) -> dict[str, float]:
        local = self._sam_totals if self._sam_totals is not None else torch.zeros(len(_SAM_TOTALS))
        self._sam_totals = None
        totals = dict(zip(_SAM_TOTALS, self.accelerator.reduce(local.to(self.args.device), reduction="sum").tolist()))
        metrics = {"sam/skipped": totals["skipped"]}
        if totals["perturbations"]:
            metrics["sam/grad_norm"] = totals["grad_norm"] / totals["perturbations"]
            metrics["sam/perturbation_norm"] = totals["perturbation_norm"] / totals["perturbations"]
        if totals["perturbed_steps"]:
            metrics["sam/sharpness"] = totals["sharpness"] / totals["perturbed_steps"]
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.sam_enabled:
            logs.update(self._pop_sam_metrics())
        super().log(logs, start_time)

    # ---- Saving, model card, push ----

    def add_model_file(self, write: Callable[[Path], Any]) -> None:
        """Register `write(folder)`, which writes a file the saved model needs beside its weights (e.g. the frozen
        zero-shot head of a LoRA-tuned CLIP classifier, which the adapter folder does not hold).

        It runs on the saving process after the weights of every `save_model`: the final model in `output_dir`,
        each checkpoint folder, and so before every push (`push_to_hub` and `save_model` with `args.push_to_hub`
        save the model first; checkpoint pushes upload `output_dir`, where it is written too)."""
        self._model_file_writers.append(write)

    def _write_model_files(self, folder: str | os.PathLike) -> None:
        if self.args.should_save and self._model_file_writers:
            os.makedirs(folder, exist_ok=True)
            for write in self._model_file_writers:
                write(Path(folder))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # The stock method, with the registered files written after the weights and before its push.
        super().save_model(output_dir, _internal_call=True)
        self._write_model_files(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model, trial) -> None:
        # As TRL's trainers: `output_dir` holds a current card (and the registered files) whenever a checkpoint push
        # uploads it.
        if self.args.should_save:
            self.create_model_card()
            if self.args.push_to_hub:
                self._write_model_files(self.args.output_dir)
        super()._save_checkpoint(model, trial)

    def _card_tags(self) -> list[str]:
        tags = [tag for tag in self._tag_names if self.args.sam_enabled or tag != "sharpness-aware-minimization"]
        return tags + ([self.args.sam_mode] if self.args.sam_enabled else [])

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        *,
        finetuned_from: str | None = None,
        base_revision: str | None = None,
        task: str | None = None,
        finetune_mode: str | None = None,
        dataset: str | list[str] | None = None,
        language: str | list[str] | None = None,
        license: str | None = None,  # noqa: A002 - the stock Trainer's name
        **unused: Any,
    ) -> None:
        """Write the model card, `README.md` in `args.output_dir` (main process only), from
        `saft_hf.cards.finetune_card`.

        Args:
            model_name: the card's title; default the Hub repo name, else `output_dir`'s folder name.
            dataset_name: the training dataset (a Hub id is linked and becomes `datasets` metadata; a local path is
                shown by folder name). `dataset` (the stock Trainer's name) is accepted too.
            tags: extra tags, added to `_tag_names`, the SAM mode, the fine-tuning mode and the model's tags.
            finetuned_from: the base model; default what the model records (a LoRA adapter's base, an FTTS model's
                `config.saft_base_model`, else `name_or_path`). A local path is shown by folder name only and is never
                `base_model` metadata.
            base_revision: the base model's revision, shown beside it.
            task: what the model was fine-tuned for (shown in the card).
            finetune_mode: `full`/`ftlo`/`ftts`/`lora`; default `lora` for a PEFT model, else the model's
                `config.saft_finetune_mode`.
            language, license: card metadata.
            unused: the stock Trainer's other card arguments (`tasks`, `dataset_tags`, `dataset_args`) are accepted
                and not shown.
        """
        unknown = sorted(set(unused) - {"tasks", "dataset_tags", "dataset_args"})
        if unknown:
            raise TypeError(f"create_model_card() got unexpected keyword argument(s) {unknown}.")
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        base = unwrap_peft_model(model)
        peft_config = getattr(model, "peft_config", None)
        if finetuned_from is None:
            finetuned_from = _recorded_base_model(model, base)
        if finetune_mode is None:
            config = getattr(base, "config", None)
            finetune_mode = "lora" if peft_config else getattr(config, "saft_finetune_mode", None)
        dataset = dataset_name if dataset_name is not None else dataset
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        repo_id = self.hub_model_id or self.args.hub_model_id
        if model_name is None:
            model_name = repo_id.split("/")[-1] if repo_id else Path(self.args.output_dir).absolute().name
        args = self.args
        info = {
            "base_model": finetuned_from or None,
            "base_revision": base_revision,
            "architecture": type(base).__name__,
            "task": task,
            "dataset": dataset,
            "finetune_mode": finetune_mode,
            **_sam_settings(args),
            "training_args": _training_hyperparameters(args, self.state.global_step),
            "eval_metrics": _latest_eval_metrics(self.state.log_history),
            "repo_id": repo_id,
            "model_name": model_name,
            "tags": [*self._card_tags(), *extra_tags, *(getattr(base, "model_tags", None) or [])],
            "language": language,
            "license": license,
        }
        finetune_card(info).save(os.path.join(args.output_dir, "README.md"))


def forward_consumes_num_items_in_batch(model: nn.Module) -> bool:
    """Whether `model`'s forward normalises its loss by a `num_items_in_batch` keyword argument, so that the
    Trainer may pass the step's label count and skip dividing the loss by the accumulation steps.

    The stock Trainer (transformers 5.x) assumes so for every forward taking `**kwargs`, which is wrong for models
    that accept `**kwargs` for other reasons and ignore the count (T5 computes `CrossEntropyLoss()` itself, CLIP
    forwards them to attention). The rule, first match wins:

    1. the model declares `accepts_loss_kwargs` (transformers' own opt-in/opt-out attribute): that value;
    2. the forward (decorators unwrapped; for a bound `functools.partial`, the function it calls) has a
       `num_items_in_batch` parameter: yes; it has no `**kwargs`: no;
    3. its source names `num_items_in_batch` (a variable, keyword or `kwargs["num_items_in_batch"]`): yes;
    4. it calls `self.loss_function(..., **kwargs)` with its own `**kwargs`, and that loss function takes
       `num_items_in_batch` (`ForCausalLMLoss`, `ForMaskedLMLoss` do; `ForSequenceClassificationLoss` does not):
       yes;
    5. otherwise, including when the source cannot be read: no.

    A "no" is the safe error: the loss is then divided by the accumulation steps, so each micro-batch's mean weighs
    the same (the pre-4.46 behaviour), whereas a wrong "yes" multiplies the gradient by the accumulation steps.
    A wrapper whose forward hands `**kwargs` to an inner model that uses the count should declare
    `accepts_loss_kwargs = True`.
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    forward = model.forward
    if isinstance(forward, functools.partial):
        forward = forward.func
    forward = inspect.unwrap(getattr(forward, "__func__", forward))
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    if "num_items_in_batch" in parameters:
        return True
    var_keyword = next((name for name, p in parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if (
            (isinstance(node, ast.Name) and node.id == "num_items_in_batch")
            or (isinstance(node, ast.Constant) and node.value == "num_items_in_batch")
            or (isinstance(node, ast.keyword) and node.arg == "num_items_in_batch")
        ):
            return True
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "loss_function"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
            and any(
                keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id == var_keyword
                for keyword in node.keywords
            )
        ):
            try:
                return "num_items_in_batch" in inspect.signature(model.loss_function).parameters
            except (AttributeError, TypeError, ValueError):
                return False
    return False


def _recorded_base_model(model: nn.Module, base: nn.Module) -> str | None:
    """The base model a fine-tune records: a PEFT adapter's base, an FTTS model's `config.saft_base_model`, else
    the model's `name_or_path`."""
    for peft_config in (getattr(model, "peft_config", None) or {}).values():
        if getattr(peft_config, "base_model_name_or_path", None):
            return str(peft_config.base_model_name_or_path)
    config = getattr(base, "config", None)
    for value in (getattr(config, "saft_base_model", None), getattr(base, "name_or_path", None)):
        if value:
            return str(value)
    return None


def _plain(value: Any) -> Any:
    """Enum members (optimizer and scheduler names) as their values."""
    return getattr(value, "value", value)


def _sam_settings(args: SAFTConfig) -> dict[str, Any]:
    if not args.sam_enabled:
        return {"sam_mode": args.sam_mode}
    settings = {"sam_mode": args.sam_mode, "sam_rho": args.sam_rho}
    if args.sam_mode == "asam":
        settings |= {"sam_eta": args.sam_eta, "sam_adaptive_scope": args.sam_adaptive_scope}
    return settings | {"sam_interval": args.sam_interval, "sam_sync_perturbation": args.sam_sync_perturbation}


def _training_hyperparameters(args: SAFTConfig, global_step: int) -> dict[str, Any]:
    """What the card reports of the training arguments: the optimisation settings, never paths or credentials."""
    total_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    values = {
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": _plain(args.lr_scheduler_type),
        "warmup_steps": getattr(args, "warmup_steps", None) or None,
        "warmup_ratio": getattr(args, "warmup_ratio", None) or None,
        "optimizer": _plain(args.optim),
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_devices": args.world_size,
        "total_train_batch_size": total_batch_size,
        "training_steps": global_step or (args.max_steps if args.max_steps > 0 else None),
        "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else None,
        "seed": args.seed,
    }
    return {name: value for name, value in values.items() if value is not None}


_SPEED_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_jit_compilation_time")


def _latest_eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest value of each evaluation metric (`eval_*`, `test_*` ...) in the log history; timings left out."""
    metrics: dict[str, Any] = {}
    for entry in log_history:
        if "loss" in entry or "train_runtime" in entry:  # training logs and the end-of-training summary
            continue
        for name, value in entry.items():
            if "_" in name and not name.endswith(_SPEED_METRICS) and isinstance(value, (int, float)):
                metrics[name] = value
    return metrics


class _RNGState:
    """The CPU and accelerator RNG states, so a second forward pass sees the same dropout masks."""

    def __init__(self, device: torch.device, cpu: torch.Tensor, accelerator: torch.Tensor | None):
        self.device = device
        self.cpu = cpu
        self.accelerator = accelerator

    @classmethod
    def capture(cls, device: torch.device) -> _RNGState:
        accelerator = None if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)
        return cls(device, torch.get_rng_state(), accelerator)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(self.device).set_rng_state(self.accelerator, self.device)
