"""FTTS: fine-tuning in the tangent space of the pre-trained model.

Ortiz-Jimenez et al., "Task arithmetic in the tangent space: Improved editing of pre-trained models", NeurIPS 2023;
one of the merge-friendly fine-tuning baselines SAFT composes with (Lee et al., ICLR 2025, Table 1). The model is
replaced by its first-order Taylor expansion around the pre-trained weights `w0`:

    f_lin(x; w) = f(x; w0) + J_w f(x; w0) (w - w0)

computed in one forward-mode pass, `torch.func.jvp` of `torch.func.functional_call(model, ., x)` at `w0` with
tangent `w - w0`. Gradients reach `w` through the tangent (reverse-over-forward), so any optimizer, and SAFT's
(A)SAM perturbation of `w`, work unchanged. The primal and the tangent come out of one forward pass over dual
tensors, so they share every dropout mask; `SAFTTrainer` replays the RNG so both of its passes see the same masks.

What is linearised is the `logits` of the wrapped model's output; the loss is the cross-entropy of the linearised
logits (positions labelled -100 ignored), the loss the CLIP classifier and T5 compute themselves. Encoder-decoder
models (Flan-T5) are teacher-forced: `decoder_input_ids` are the labels shifted right, as in their own forward.

The artifact is `w` in the base model's key space, saved by the wrapped model's own `save_pretrained` (a normal
model folder) with `config.saft_finetune_mode = "ftts"` and `config.saft_base_model` (the base's name or path).
Task vectors `w - w0` are taken from it like from any fine-tune. Weights in that key space, a fine-tuned folder or
a merged state dict, become a linearised model again with `load_linearized(weights, base)`: a merge of FTTS models
must be evaluated that way, since the same weights under the plain forward are a different function.

A linearised encoder-decoder model (Flan-T5) generates greedily with its own `generate`: every decoding step is one
linearised forward over the whole decoder prefix. The model's key/value cache cannot serve it (it holds the plain
forward's keys and values, not their tangents); the encoder's output and its tangent are computed once and reused,
which by the chain rule is the same linearisation as running the whole model at every step.

Attention runs through PyTorch's math `scaled_dot_product_attention` kernel (the fused kernels have no forward-mode
derivative) or the eager implementation; `flash_attention_2` models are not supported. Also not supported: sampling
and beam search, generation with decoder-only models, FSDP (`w0` is kept whole on every rank), gradient
checkpointing.

Cost, measured on CPU (a 4-layer, width-256 CLIP vision tower, batch 16): a training forward + backward takes 1.4x
the plain model's, an inference forward 4.5x (the plain one uses a fused attention kernel).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.utils import CONFIG_NAME, cached_file

from ..layout import FTTS_MODE, HEAD_FILE
from ..models.clip import CLIPVisionClassifier

IGNORE_INDEX = -100


@dataclass
class LinearizedOutput(ModelOutput):
    """Output of `LinearizedModel`: the linearised logits and, when labels are given, their cross-entropy loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class _BaseWeights(nn.Module):
    """`w0` as non-persistent buffers: they follow `.to()` and casts, and stay out of the state dict."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        # Buffer names cannot contain dots, parameter names do.
        self._buffer_names = {name: f"w0_{i}" for i, name in enumerate(weights)}
        for name, buffer_name in self._buffer_names.items():
            self.register_buffer(buffer_name, weights[name].detach().clone(), persistent=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, self._buffer_names[name])


class LinearizedModel(PreTrainedModel):
    """`model` linearised around its current (or the given) weights `w0`; its parameters are the trainable `w`.

    `forward` takes the wrapped model's inputs (plus `labels`) and returns a `LinearizedOutput`. The state dict,
    `save_pretrained` and `load_state_dict` are the wrapped model's, so `Trainer` checkpoints, best-model reloading
    and saved folders all hold `w` under the base model's keys.

    Args:
        model: the model to linearise, e.g. a `CLIPVisionClassifier` or a `T5ForConditionalGeneration`. Its output
            must have `logits`. It is taken over: its parameters are `w`.
        base_weights: `w0` for every parameter name of `model`; defaults to `model`'s current parameters.
        base_model_name_or_path: the base model's folder or Hub id, recorded as `config.saft_base_model` so
            `load_linearized` can rebuild `w0`; defaults to `model.name_or_path`.
    """

    # The wrapped model runs its own attention: let `PreTrainedModel.__init__` accept whatever its config names.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        model: PreTrainedModel,
        base_weights: Mapping[str, torch.Tensor] | None = None,
        base_model_name_or_path: str | os.PathLike | None = None,
    ):
        # `PreTrainedModel.__init__` resolves the attention implementation for this class on the config it gets;
        # give it a copy so the wrapped model's choice stands. `post_init` is not called: it would re-initialise
        # the wrapped model's weights.
        super().__init__(copy.deepcopy(model.config))
        self.config = model.config
        self.model = model
        parameters = dict(model.named_parameters())
        if base_weights is None:
            base_weights = parameters
        missing = sorted(set(parameters) - set(base_weights))
        if missing:
            raise ValueError(f"base_weights lacks {len(missing)} parameter(s) of the model, e.g. {missing[:5]}.")
        for name, param in parameters.items():
            if base_weights[name].shape != param.shape:
                raise ValueError(
                    f"base_weights[{name!r}] has shape {tuple(base_weights[name].shape)}, the model's parameter "
                    f"{tuple(param.shape)}."
                )
        self.base_weights = _BaseWeights(
            {name: base_weights[name].to(device=param.device, dtype=param.dtype) for name, param in parameters.items()}
        )
        # `w0` is identical on every rank: DDP need not broadcast these buffers before each forward.
        self._ddp_params_and_buffers_to_ignore = [f"base_weights.{n}" for n, _ in self.base_weights.named_buffers()]
        self.main_input_name = model.main_input_name
        base_model_name_or_path = str(base_model_name_or_path or model.name_or_path or "")
        model.config.saft_finetune_mode = FTTS_MODE
        if base_model_name_or_path:
            model.config.saft_base_model = base_model_name_or_path
        # `Trainer` keeps only the dataset columns named in `inspect.signature(model.forward)`: show it the wrapped
        # model's inputs rather than this class's `**inputs`.
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    def forward(self, labels: torch.Tensor | None = None, **inputs) -> LinearizedOutput:
        if labels is not None and self.config.is_encoder_decoder and inputs.get("decoder_input_ids") is None:
            inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        base, delta = self._base_and_delta()
        logits, tangent = self._jvp(lambda params: self._output(params, inputs).logits, (base,), (delta,))
        logits = logits + tangent
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.flatten(0, -2).float(), labels.to(logits.device).flatten(), ignore_index=IGNORE_INDEX
            )
        return LinearizedOutput(loss=loss, logits=logits)

    def _base_and_delta(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`w0` and the tangent `w - w0`, by parameter name."""
        weights = dict(self.model.named_parameters())
        base = {name: self.base_weights[name] for name in weights}
        return base, {name: weights[name] - base[name] for name in weights}

    def _output(self, params: dict[str, torch.Tensor], inputs: Mapping) -> ModelOutput:
        output = functional_call(self.model, params, args=(), kwargs=inputs)
        if getattr(output, "logits", None) is None:
            raise TypeError(
                f"LinearizedModel linearises the `logits` of the model's output, but {type(self.model).__name__} "
                f"returned {type(output).__name__} without them."
            )
        return output

    @staticmethod
    def _jvp(function: Callable, primals: tuple, tangents: tuple):
        # The fused scaled-dot-product-attention kernels have no forward-mode derivative; the math one does.
        with sdpa_kernel(SDPBackend.MATH):
            return jvp(function, primals, tangents)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        num_beams: int = 1,
        synced_gpus: bool = False,
    ) -> torch.LongTensor:
        """Greedy decoding of an encoder-decoder model with the linearised forward at every step.

        Returns the decoder ids as `generate` does: `decoder_start_token_id`, then up to `max_new_tokens` argmax
        tokens, a row that produced `eos_token_id` padded with `pad_token_id` (both from the wrapped model's
        `generation_config`) until every row has, or the budget is spent. No logits processors are applied: the
        plain greedy search of a generation config that sets none, as Flan-T5's.
        """
        if not self.config.is_encoder_decoder:
            raise NotImplementedError(
                f"LinearizedModel.generate decodes with encoder-decoder models only, not {type(self.model).__name__}."
            )
        if do_sample or num_beams != 1 or synced_gpus:
            raise ValueError(
                "LinearizedModel.generate is greedy search on one process only: got "
                f"do_sample={do_sample}, num_beams={num_beams}, synced_gpus={synced_gpus}."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        generation = self.model.generation_config
        if None in (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id):
            raise ValueError(
                "LinearizedModel.generate needs decoder_start_token_id, eos_token_id and pad_token_id in the "
                f"model's generation_config; it has {generation.decoder_start_token_id}, "
                f"{generation.eos_token_id}, {generation.pad_token_id}."
            )
        eos = torch.tensor(generation.eos_token_id, device=input_ids.device).flatten()
        base, delta = self._base_and_delta()
        decoder_ids = torch.full(
            (input_ids.shape[0], 1), generation.decoder_start_token_id, dtype=torch.long, device=input_ids.device
        )
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

        # Only the last position's logits choose the next token.
        def first_step(params):
            output = self._output(params, {**inputs, "decoder_input_ids": decoder_ids})
            return output.logits[:, -1], output.encoder_last_hidden_state

        def next_step(params, encoder_hidden):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)
            return self._output(
                params, {**inputs, "encoder_outputs": encoder_outputs, "decoder_input_ids": decoder_ids}
            ).logits[:, -1]

        (logits, encoder_hidden), (tangent, encoder_tangent) = self._jvp(first_step, (base,), (delta,))
        for step in range(max_new_tokens):
            if step > 0:
                logits, tangent = self._jvp(next_step, (base, encoder_hidden), (delta, encoder_tangent))
            tokens = (logits + tangent).argmax(dim=-1).masked_fill(finished, generation.pad_token_id)
            decoder_ids = torch.cat([decoder_ids, tokens[:, None]], dim=1)
            finished |= torch.isin(tokens, eos)
            if finished.all():
                break
        return decoder_ids

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save `w` as the wrapped model's folder (its config carries `saft_finetune_mode = "ftts"`)."""
        self.model.save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> LinearizedModel:
        """`load_linearized(pretrained_model_name_or_path, *args, **kwargs)`."""
        return load_linearized(pretrained_model_name_or_path, *args, **kwargs)


def linearize(model: PreTrainedModel, base_model_name_or_path: str | os.PathLike | None = None) -> LinearizedModel:
    """FTTS: `LinearizedModel(model)`, linearised around `model`'s current weights."""
    return LinearizedModel(model, base_model_name_or_path=base_model_name_or_path)


def load_pretrained_model(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a folder or Hub id as the model it holds: a `CLIPVisionClassifier` when it has a zero-shot head file,
    otherwise the `transformers` class named by `config.architectures`. `kwargs` go to `from_pretrained`."""
    if cached_file(name_or_path, HEAD_FILE, _raise_exceptions_for_missing_entries=False) is not None:
        return CLIPVisionClassifier.from_pretrained(name_or_path, **kwargs)
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise ValueError(
            f"{name_or_path}: cannot tell which model class to load (config.architectures={config.architectures}); "
            "pass load_model=..."
        )
    return model_class.from_pretrained(name_or_path, **kwargs)


def saved_finetune_mode(name_or_path: str | os.PathLike) -> str | None:
    """`config.saft_finetune_mode` of a saved model folder or Hub id (None when unset or there is no config)."""
    config_file = cached_file(name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("saft_finetune_mode")


def load_linearized(
    finetuned: str | os.PathLike | Mapping[str, torch.Tensor],
    base: str | os.PathLike | PreTrainedModel | None = None,
    *,
    load_model: Callable[[str], PreTrainedModel] = load_pretrained_model,
) -> LinearizedModel:
    """Rebuild the linearised model `f(x; w0) + J(x; w0) (w - w0)` from saved or merged weights `w`.

    Args:
        finetuned: an FTTS fine-tune's folder or Hub id, or a state dict `w` in the base model's key space (e.g.
            a merge of FTTS task vectors) holding every parameter of the model.
        base: the pre-trained model giving `w0`: a model object (copied, never modified), or a folder / Hub id
            whose state dict holds every parameter name of the fine-tuned model (a full `CLIPModel` serves a CLIP
            classifier). Defaults to the fine-tuned folder's `config.saft_base_model`. With a state dict as
            `finetuned`, the architecture comes from `base`: pass the pre-trained model of the task (e.g. the CLIP
            classifier with that task's zero-shot head).
        load_model: loads a folder / Hub id as a model; defaults to `load_pretrained_model`.
    """
    if isinstance(finetuned, Mapping):
        if base is None:
            raise ValueError("load_linearized: a state dict as `finetuned` needs `base`, the pre-trained model.")
        model = copy.deepcopy(base) if isinstance(base, nn.Module) else load_model(str(base))
        base_weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        _load_parameters(model, finetuned, source="finetuned state dict")
    else:
        model = load_model(str(finetuned))
        if base is None:
            base = getattr(model.config, "saft_base_model", None)
            if not base:
                raise ValueError(
                    f"load_linearized: {finetuned} does not name its base model (config.saft_base_model is unset); "
                    "pass `base`."
                )
        base_model = base if isinstance(base, nn.Module) else load_model(str(base))
        base_weights = _parameters_from(base_model.state_dict(), model, source=f"base model {base}")
    base_name = base.name_or_path if isinstance(base, nn.Module) else str(base)
    return LinearizedModel(model, base_weights=base_weights, base_model_name_or_path=base_name)


def _parameters_from(state: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} parameter(s) of {type(model).__name__}, e.g. {missing[:5]}.")
    return {name: state[name] for name in names}


@torch.no_grad()
def _load_parameters(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    parameters = dict(model.named_parameters())
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ValueError(
            f"{source} has {len(unexpected)} key(s) {type(model).__name__} does not, e.g. {unexpected[:5]}."
        )
    for name, value in _parameters_from(state, model, source).items():
        if value.shape != parameters[name].shape:
            raise ValueError(
                f"{source}[{name!r}] has shape {tuple(value.shape)}, the model's parameter "
                f"{tuple(parameters[name].shape)}."
            )
        parameters[name].copy_(value)
