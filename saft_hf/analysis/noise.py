"""The effective noise scale of stochastic training, and a `TrainerCallback` that logs it.

The optimizer-implicit-bias paper (Eq. 3) summarises how learning rate ``eta``, batch size ``B`` and momentum ``mu``
set the "temperature" of SGD as

    S_eff = eta / (B (1 - mu)^2) * tr Sigma(theta)      and its normalised proxy      S~ = eta / (B (1 - mu)^2)

where ``Sigma`` is the per-example gradient-noise covariance (raised by data augmentation and data diversity).
Merging success is a non-monotonic function of it. :func:`effective_noise_scale` returns the proxy ``S~``, or
``S_eff`` when a gradient-noise trace is supplied (estimating the trace is left to the caller: it needs per-example
gradients, which this module does not compute).

The paper derives the proxy for SGD with heavy-ball momentum and does not say which ``mu`` it uses for its AdamW
runs. For Adam-family optimizers the choice is explicit here (``adam_momentum``): ``"beta1"``, saft_hf's default,
takes ``mu = beta1``, the decay rate of the first-moment average that plays the role of SGD's momentum; ``"none"``
takes ``mu = 0``, the plain ``eta / B``. Either way the adaptive second-moment scaling is not part of the formula.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

NOISE_SCALE_LOG_KEY = "noise/effective_scale"
ADAM_MOMENTUM_CHOICES = ("beta1", "none")


def effective_noise_scale(
    learning_rate: float, batch_size: int, momentum: float = 0.0, gradient_noise_trace: float | None = None
) -> float:
    """``learning_rate / (batch_size (1 - momentum)^2)``, times ``gradient_noise_trace`` when given."""
    if not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    scale = learning_rate / (batch_size * (1 - momentum) ** 2)
    if gradient_noise_trace is not None:
        if gradient_noise_trace < 0:
            raise ValueError(f"gradient_noise_trace must be >= 0, got {gradient_noise_trace}.")
        scale *= gradient_noise_trace
    return scale


def _check_adam_momentum(adam_momentum: str) -> None:
    if adam_momentum not in ADAM_MOMENTUM_CHOICES:
        choices = ", ".join(ADAM_MOMENTUM_CHOICES)
        raise ValueError(f"adam_momentum must be one of {choices}, got {adam_momentum!r}.")


def optimizer_momentum(optimizer: torch.optim.Optimizer, adam_momentum: str = "beta1") -> float:
    """The momentum the formula uses: for Adam-family optimizers (``betas``) ``betas[0]`` if ``adam_momentum`` is
    ``"beta1"`` (saft_hf's choice, the default) or 0 if it is ``"none"``; else ``momentum`` (SGD, RMSprop), else 0."""
    _check_adam_momentum(adam_momentum)
    group = optimizer.param_groups[0]
    if "betas" in group:
        return float(group["betas"][0]) if adam_momentum == "beta1" else 0.0
    return float(group.get("momentum", 0.0))


class EffectiveNoiseScaleCallback(TrainerCallback):
    """Adds ``noise/effective_scale`` to every training log of a `Trainer` (and to ``state.log_history``).

    ``eta`` is the logged ``learning_rate`` (the scheduler's current value; the optimizer's when a log lacks it),
    ``B`` the samples per optimizer step, ``per-device batch x gradient accumulation x world size``, and the
    momentum is read from the optimizer (:func:`optimizer_momentum`; ``adam_momentum`` picks ``beta1``, the default,
    or 0 for Adam-family optimizers). Reporting integrations (TensorBoard, W&B, ...) see the value only if this
    callback runs before them: use :func:`add_noise_scale_logging`.
    """

    def __init__(self, gradient_noise_trace: float | None = None, adam_momentum: str = "beta1"):
        _check_adam_momentum(adam_momentum)  # at construction, not at the first log of a long run
        self.gradient_noise_trace = gradient_noise_trace
        self.adam_momentum = adam_momentum

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        # Training logs carry the loss; evaluation and end-of-training summaries do not.
        if logs is None or "loss" not in logs or optimizer is None:
            return
        learning_rate = logs.get("learning_rate", optimizer.param_groups[0]["lr"])
        per_device = state.train_batch_size or args.train_batch_size
        batch_size = per_device * args.gradient_accumulation_steps * args.world_size
        momentum = optimizer_momentum(optimizer, self.adam_momentum)
        scale = effective_noise_scale(float(learning_rate), batch_size, momentum, self.gradient_noise_trace)
        logs[NOISE_SCALE_LOG_KEY] = scale
        # The Trainer appended its copy of these logs to the history just before calling the callbacks.
        latest = state.log_history[-1] if state.log_history else {}
        if latest.get("step") == state.global_step and "loss" in latest:
            latest[NOISE_SCALE_LOG_KEY] = scale


def add_noise_scale_logging(
    trainer: Any, gradient_noise_trace: float | None = None, adam_momentum: str = "beta1"
) -> EffectiveNoiseScaleCallback:
    """Put an :class:`EffectiveNoiseScaleCallback` first in ``trainer``'s callbacks, so that every reporting
    integration logs the value too; returns it."""
    callback = EffectiveNoiseScaleCallback(gradient_noise_trace, adam_momentum)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def logged_noise_scale(run_folder: str | os.PathLike) -> float:
    """The mean of the ``noise/effective_scale`` values logged in a run's ``trainer_state.json`` (the average
    temperature of the run, the x-axis of the paper's merge-gain plots)."""
    path = Path(run_folder) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_folder} has no trainer_state.json to read the logged noise scale from.")
    history = json.loads(path.read_text()).get("log_history", [])
    values = [entry[NOISE_SCALE_LOG_KEY] for entry in history if NOISE_SCALE_LOG_KEY in entry]
    if not values:
        raise ValueError(
            f"{path} logs no {NOISE_SCALE_LOG_KEY!r}: train with saft_hf.analysis.EffectiveNoiseScaleCallback."
        )
    return sum(values) / len(values)
