"""`SAFTTrainer`: sharpness-aware fine-tuning inside `transformers.Trainer`."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from .config import SAFTConfig
from .sharpness import all_reduce_mean_, gradients_to_perturbation_


# Backends where each process holds full gradients of its own micro-batch.
_DATA_PARALLEL = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU)


class SAFTTrainer(Trainer):
    r"""
    [`~transformers.Trainer`] whose training step is the two-pass (A)SAM step of SAFT (Lee et al., ICLR 2025).

    What changes compared to `Trainer` (everything else — optimizer, scheduler, clipping, mixed precision, gradient
    accumulation, checkpointing, logging — is the stock behaviour):

    - `training_step`: for each micro-batch of a perturbed optimizer step (one step out of `args.sam_interval`):
      1. the gradient accumulated so far in `.grad` is moved aside (no copy);
      2. ascent pass: `super().training_step` at `w` under `no_sync`, so DDP does not all-reduce it (with
         `sam_sync_perturbation` the gradient is averaged over processes instead);
      3. the gradient is turned in place into the perturbation `e` (see `saft_hf.sharpness`); if its norm is not
         finite the perturbation is skipped and counted;
      4. `w` is saved and the weights become `w + e`; the accumulated gradient goes back into `.grad`;
      5. descent pass: `super().training_step` at `w + e` with the RNG state of the ascent pass (same dropout
         masks), in the synchronisation context the Trainer chose, so its gradient adds to the accumulated one;
      6. `w` is restored by copying the saved values (exact in every dtype).
      Both passes go through `super().training_step`, so the installed version's loss scaling (gradient
      accumulation, fp16 `GradScaler`) stays in force; nothing is unscaled between the passes.
    - The loss-kwargs detection: models that accept `**kwargs` but ignore `num_items_in_batch` (T5, CLIP in
      transformers 5.x) would get a loss multiplied by the accumulation steps; unless the model declares
      `accepts_loss_kwargs = True`, the loss is divided by the accumulation steps as for any other model.
    - `log`: adds `sam/grad_norm`, `sam/perturbation_norm`, `sam/sharpness` (loss at `w + e` minus loss at `w`,
      per micro-batch) averaged since the last log, and `sam/skipped` (perturbations skipped since the last log).

    Extra memory over plain fine-tuning: one parameter-sized buffer (the ascent gradient, which then holds the
    saved weights). DeepSpeed is refused: its `backward` steps the engine and ZeRO frees `.grad`.
    """

    def __init__(self, model=None, args: SAFTConfig | None = None, **kwargs):
        if args is None:
            args = SAFTConfig(output_dir="saft_output")
        if not isinstance(args, SAFTConfig):
            raise TypeError(f"SAFTTrainer needs `args` to be a SAFTConfig, got {type(args).__name__}.")
        super().__init__(model=model, args=args, **kwargs)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and args.sam_enabled:
            raise ValueError(
                "SAFTTrainer does not support DeepSpeed: `accelerator.backward` steps the DeepSpeed engine and ZeRO "
                "frees `.grad`, so the two-pass (A)SAM step cannot be done. Use DDP or FSDP, or sam_mode='none'."
            )
        if getattr(self.accelerator.unwrap_model(self.model), "accepts_loss_kwargs", None) is not True:
            self.model_accepts_loss_kwargs = False
        self._sam_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._sam_skipped = 0

    def _perturbs_this_step(self) -> bool:
        return self.args.sam_enabled and self.state.global_step % self.args.sam_interval == 0

    def _ascent_context(self, model):
        # FSDP gradients only exist reduce-scattered, so its ascent pass must sync; DDP's may stay per device.
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.NO):
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._perturbs_this_step():
            return super().training_step(model, inputs, num_items_in_batch)

        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        accumulated = [p.grad for p in params]
        for param in params:
            param.grad = None
        rng_state = _RNGState.capture()

        with self._ascent_context(model):
            loss_at_w = super().training_step(model, inputs, num_items_in_batch)

        perturbed = [(n, p) for n, p in zip(names, params) if p.grad is not None]
        grads = [p.grad for _, p in perturbed]
        distributed = self.accelerator.distributed_type
        if self.args.sam_sync_perturbation and distributed in _DATA_PARALLEL:
            all_reduce_mean_(grads)
        stats = gradients_to_perturbation_(
            [p for _, p in perturbed],
            grads,
            mode=self.args.sam_mode,
            rho=self.args.sam_rho,
            eta=self.args.sam_eta,
            adaptive=[self.args.sam_adaptive_scope == "all" or "weight" in n for n, _ in perturbed],
            sharded=distributed == DistributedType.FSDP,
        )
        del grads

        saved_weights = []
        with torch.no_grad():
            for _, param in perturbed:
                if stats.finite:
                    saved_weights.append(param.detach().clone())
                    param.add_(param.grad)
                param.grad = None
        for param, grad in zip(params, accumulated):
            param.grad = grad
        del accumulated

        rng_state.restore()
        loss_at_w_plus_e = super().training_step(model, inputs, num_items_in_batch)

        with torch.no_grad():
            for (_, param), saved in zip(perturbed, saved_weights):
                param.copy_(saved)

        self._record(stats, loss_at_w, loss_at_w_plus_e)
        return loss_at_w_plus_e

    def _record(self, stats, loss_at_w: torch.Tensor, loss_at_w_plus_e: torch.Tensor) -> None:
        if not stats.finite:
            self._sam_skipped += 1
            return
        # The Trainer returns each micro-batch's loss divided by the accumulation steps; undo that for a per-batch
        # sharpness.
        steps = self.current_gradient_accumulation_steps
        self._sam_metrics["grad_norm"].append(stats.grad_norm)
        self._sam_metrics["perturbation_norm"].append(stats.perturbation_norm)
        self._sam_metrics["sharpness"].append((loss_at_w_plus_e - loss_at_w).float() * steps)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.sam_enabled:
            for name, values in self._sam_metrics.items():
                mean = torch.stack([v.to(self.args.device) for v in values]).mean()
                logs[f"sam/{name}"] = self.accelerator.reduce(mean, reduction="mean").item()
            skipped = torch.tensor(float(self._sam_skipped), device=self.args.device)
            logs["sam/skipped"] = self.accelerator.reduce(skipped, reduction="sum").item()
            self._sam_metrics.clear()
            self._sam_skipped = 0
        super().log(logs, start_time)


class _RNGState:
    """The CPU and current-accelerator RNG states, so a second forward pass sees the same dropout masks."""

    def __init__(self, cpu: torch.Tensor, device: torch.Tensor | None):
        self.cpu = cpu
        self.device = device

    @classmethod
    def capture(cls) -> _RNGState:
        device = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return cls(torch.get_rng_state(), device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device)
