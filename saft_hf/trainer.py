"""`SAFTTrainer`: sharpness-aware fine-tuning inside `transformers.Trainer`."""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedType
from torch.profiler import record_function
from transformers import Trainer

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
    - The loss-kwargs detection: models that accept `**kwargs` but ignore `num_items_in_batch` (T5, CLIP in
      transformers 5.x) would get a loss multiplied by the accumulation steps; unless the model declares
      `accepts_loss_kwargs = True`, the loss is divided by the accumulation steps as for any other model. This
      applies with `sam_mode="none"` too, so plain fine-tuning through this trainer is correct as well.
    - `log`: adds, averaged over the perturbations and processes since the last log, `sam/grad_norm` (the norm `e`
      is divided by, `||T g||` or `||g||`, of the loss as backpropagated: divided by the accumulation steps and
      times the fp16 loss scale), `sam/perturbation_norm` (`||e||`, `rho` for SAM), `sam/sharpness` (loss at
      `w + e` minus loss at `w`, summed over a step's micro-batches like the Trainer's `loss`, averaged over
      perturbed steps) and `sam/skipped` (perturbations skipped, summed over processes).

    Extra memory over plain fine-tuning: one parameter-sized buffer for the saved `w`, allocated at the first
    perturbed step and kept (reallocating it every step costs page faults on CPU). The perturbation is computed in
    the ascent gradient's storage (and the saved-`w` buffer, before `w` is saved there), which is freed once the
    weights are perturbed.

    Refused at construction: DeepSpeed (its `backward` steps the engine and ZeRO frees `.grad`), and FSDP with
    gradient accumulation unless gradients sync on every micro-batch (FSDP's `no_sync` keeps the accumulated
    gradient unsharded outside `.grad`, where it cannot be moved aside).
    """

    def __init__(self, model=None, args: SAFTConfig | None = None, **kwargs):
        if args is None:
            args = SAFTConfig(output_dir="saft_output")
        if not isinstance(args, SAFTConfig):
            raise TypeError(f"SAFTTrainer needs `args` to be a SAFTConfig, got {type(args).__name__}.")
        super().__init__(model=model, args=args, **kwargs)
        self._refuse_unsupported_backends()
        if getattr(self.accelerator.unwrap_model(self.model), "accepts_loss_kwargs", None) is not True:
            self.model_accepts_loss_kwargs = False
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
