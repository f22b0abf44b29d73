"""SAFTTrainer against hand-computed (A)SAM steps, the stock Trainer, and its own invariants (tiny models, CPU)."""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from sam_reference import AdamW, reference_training
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from saft_hf import SAFTConfig, SAFTTrainer
from saft_hf.models.clip import CLIPVisionClassifier, build_zero_shot_head
from saft_hf.modes import linearize
from saft_hf.testing import build_tiny_clip, tiny_t5_config
from saft_hf.trainer import forward_consumes_num_items_in_batch

LR = 1e-3
VOCAB = 64
CLASS_NAMES = ["zero", "one", "two", "three"]
TEMPLATES = ["a photo of the number {}.", "a handwritten digit {}."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones (the suite shares 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_t5(dropout: float = 0.0) -> T5ForConditionalGeneration:
    """Flan-T5-shaped (gated GELU), d_model 32; dropout 0 unless asked for. (transformers 5.x ties `lm_head` to the
    shared embedding of a T5 built from a config.)"""
    config = tiny_t5_config(vocab_size=VOCAB)
    config.dropout_rate = dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5ForConditionalGeneration(config)


@functools.cache
def _tiny_clip_classifier() -> CLIPVisionClassifier:
    clip, tokenizer, _ = build_tiny_clip(seed=0)
    head = build_zero_shot_head(clip, CLASS_NAMES, TEMPLATES, tokenizer)
    return CLIPVisionClassifier(clip.config.vision_config, head, clip.vision_model)


def tiny_clip() -> CLIPVisionClassifier:
    """Trainable tiny CLIP vision tower under a frozen zero-shot head."""
    return copy.deepcopy(_tiny_clip_classifier())


def t5_samples(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(2, VOCAB, (8,), generator=generator),
            "labels": torch.randint(2, VOCAB, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def clip_samples(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(3, 32, 32, generator=generator),
            "labels": torch.randint(0, len(CLASS_NAMES), (), generator=generator),
        }
        for _ in range(count)
    ]


MODELS = {"t5": (tiny_t5, t5_samples), "clip": (tiny_clip, clip_samples)}


def train(
    model,
    samples,
    output_dir,
    *,
    trainer_class=SAFTTrainer,
    steps: int,
    batch_size: int = 2,
    resume_from=None,
    callbacks=None,
    data_collator=None,
    **overrides,
):
    """Train with a constant learning rate, samples in order, one log per step, no checkpoints (unless overridden)."""
    settings = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=LR,
        weight_decay=0.1,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    args_class = SAFTConfig if issubclass(trainer_class, SAFTTrainer) else TrainingArguments
    trainer = trainer_class(
        model=model,
        args=args_class(**settings),
        train_dataset=samples,
        callbacks=callbacks,
        data_collator=data_collator,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def optimizer_steps(samples, steps: int, accumulation: int, batch_size: int = 2) -> list[list[dict]]:
    """The micro-batches of each optimizer step, as the sequential sampler and default collator form them."""
    batches = [default_data_collator(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    return [batches[s * accumulation : (s + 1) * accumulation] for s in range(steps)]


def assert_same_weights(model, reference, *, exact: bool = False, tolerance: float = 1e-6) -> None:
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if exact:
            assert torch.equal(param, expected), name
        else:
            torch.testing.assert_close(param, expected, rtol=tolerance, atol=tolerance, msg=name)


def max_difference(model, reference) -> float:
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))


class GradientRecorder(TrainerCallback):
    """The flattened gradient the optimizer steps with (after clipping), per optimizer step."""

    def __init__(self):
        self.gradients: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainable = [param for param in model.parameters() if param.requires_grad]
        self.gradients.append(torch.cat([param.grad.reshape(-1) for param in trainable]))


class RecordingSAFTTrainer(SAFTTrainer):
    """Records each micro-batch's RNG state at entry, so a hand-computed reference can replay the dropout masks."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.rng_states = getattr(self, "rng_states", []) + [torch.get_rng_state()]
        return super().training_step(model, inputs, num_items_in_batch)


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# 1. + 3. One or two optimizer steps equal hand-computed (A)SAM steps; with gradient accumulation the reference
# perturbs each micro-batch with that micro-batch's gradient alone.
STEP_CASES = [
    ("t5", "asam", 0.5, 0.01, "all", 1, False),
    ("t5", "asam", 0.5, 0.0, "all", 2, False),
    ("t5", "asam", 0.5, 0.01, "weights", 1, False),
    ("t5", "sam", 0.05, 0.01, "all", 2, False),
    ("clip", "asam", 0.5, 0.01, "all", 2, False),
    ("clip", "asam", 0.5, 0.0, "weights", 1, False),
    ("clip", "sam", 0.05, 0.01, "all", 1, False),
    # The fused sweeps compiled by torch.compile (slow: inductor compiles C++ once per process).
    pytest.param("clip", "asam", 0.5, 0.01, "weights", 2, True, marks=pytest.mark.slow),
]


# Adam's update g / (|g| + eps) turns float32 rounding of size d in near-zero gradient entries into weight changes up
# to lr * d / eps: at the default eps 1e-8 a gradient entry of 1e-7 that rounds to the other sign moves a weight by
# 2 lr (measured: 1e-4 apart on the tiny CLIP). eps 1e-2 bounds that by ~1e-7 and keeps every AdamW mechanism; the
# gradients themselves are compared directly as well. The stock Trainer comparison below uses the default eps.
ADAM = dict(adam_epsilon=1e-2, weight_decay=0.1, max_grad_norm=1.0)


def assert_same_gradients(gradients, reference_gradients) -> None:
    assert len(gradients) == len(reference_gradients)
    for gradient, expected in zip(gradients, reference_gradients):
        assert (gradient - expected).norm() <= 1e-5 * expected.norm()


def reference_adam(trainer) -> AdamW:
    return AdamW(
        lr=LR,
        eps=ADAM["adam_epsilon"],
        weight_decay=ADAM["weight_decay"],
        max_grad_norm=ADAM["max_grad_norm"],
        decay_names=trainer.get_decay_parameter_names(trainer.model),
    )


@pytest.mark.parametrize(("model_name", "mode", "rho", "eta", "scope", "accumulation", "compiled"), STEP_CASES)
def test_steps_equal_the_hand_computed_sharpness_aware_steps(
    tmp_path, model_name, mode, rho, eta, scope, accumulation, compiled
):
    build, make_samples = MODELS[model_name]
    model = build()
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    samples = make_samples(2 * accumulation * 2)
    recorder = GradientRecorder()
    trainer = train(
        model,
        samples,
        tmp_path,
        steps=2,
        gradient_accumulation_steps=accumulation,
        callbacks=[recorder],
        sam_mode=mode,
        sam_rho=rho,
        sam_eta=eta,
        sam_adaptive_scope=scope,
        sam_compile_perturbation=compiled,
        **ADAM,
    )

    steps = optimizer_steps(samples, 2, accumulation)
    log = reference_training(reference, steps, reference_adam(trainer), mode=mode, rho=rho, eta=eta, scope=scope)
    reference_training(plain, steps, reference_adam(trainer), mode="none")

    assert_same_gradients(recorder.gradients, log.step_gradients)
    assert_same_weights(model, reference)
    assert max_difference(reference, plain) > 1e-4, "the perturbation must change the step for this test to mean much"
    logs = step_logs(trainer)
    assert len(logs) == 2
    for step, entry in enumerate(logs):
        micro = slice(step * accumulation, (step + 1) * accumulation)
        assert entry["loss"] == pytest.approx(log.losses[step], rel=1e-5)  # the loss at w, not at w + e
        # The trainer backpropagates loss / accumulation steps, so its norms are those of the reference's scaled loss.
        assert entry["sam/grad_norm"] == pytest.approx(sum(log.grad_norms[micro]) / accumulation, rel=1e-5)
        perturbation_norm = sum(log.perturbation_norms[micro]) / accumulation
        assert entry["sam/perturbation_norm"] == pytest.approx(perturbation_norm, rel=1e-5)
        assert entry["sam/sharpness"] == pytest.approx(sum(log.sharpness[micro]), rel=1e-4, abs=1e-6)
        assert entry["sam/skipped"] == 0
        if mode == "sam":
            assert entry["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-6)


def test_dropout_step_equals_the_reference_with_replayed_masks(tmp_path):
    model = tiny_t5(dropout=0.1)
    reference = copy.deepcopy(model)
    samples = t5_samples(8)
    recorder = GradientRecorder()
    trainer = train(
        model,
        samples,
        tmp_path,
        trainer_class=RecordingSAFTTrainer,
        steps=2,
        gradient_accumulation_steps=2,
        callbacks=[recorder],
        **ADAM,
    )
    log = reference_training(
        reference,
        optimizer_steps(samples, 2, 2),
        reference_adam(trainer),
        mode="asam",
        rho=0.5,
        rng_states=trainer.rng_states,
    )
    assert_same_gradients(recorder.gradients, log.step_gradients)
    assert_same_weights(model, reference)


@pytest.mark.parametrize("model_name", ["t5", "clip"])
def test_weights_are_restored_exactly_after_the_descent_pass(tmp_path, model_name):
    # With a zero learning rate the optimizer leaves w alone, so any rounding left by undoing `w + e` shows.
    build, make_samples = MODELS[model_name]
    model = build()
    train(model, make_samples(8), tmp_path, steps=2, gradient_accumulation_steps=2, learning_rate=0.0, weight_decay=0.0)
    assert_same_weights(model, build(), exact=True)


# 2. rho = 0 is the stock Trainer, bit for bit, dropout and gradient accumulation included.
@pytest.mark.parametrize("mode", ["asam", "sam"])
def test_rho_zero_reproduces_the_stock_trainer_bit_for_bit(tmp_path, mode):
    saft_model, stock_model = tiny_t5(dropout=0.1), tiny_t5(dropout=0.1)
    # The stock Trainer needs the documented opt-out of loss kwargs (T5 ignores `num_items_in_batch`, see below),
    # which SAFTTrainer applies itself; both then divide the loss by the accumulation steps.
    stock_model.accepts_loss_kwargs = False
    common = dict(steps=3, gradient_accumulation_steps=2, optim="adamw_torch_fused", train_sampling_strategy="random")
    train(saft_model, t5_samples(12), tmp_path / "saft", sam_mode=mode, sam_rho=0.0, **common)
    train(stock_model, t5_samples(12), tmp_path / "stock", trainer_class=Trainer, **common)
    assert_same_weights(saft_model, stock_model, exact=True)
    assert max_difference(saft_model, tiny_t5()) > 1e-4


# 3. Gradient accumulation in plain training: 2 micro-batches of 2 equal 1 batch of 4.
PLAIN = dict(sam_mode="none", optim="sgd", weight_decay=0.0, max_grad_norm=0.0)


@pytest.mark.parametrize("model_name", ["t5", "clip"])
def test_plain_accumulation_equals_one_big_batch(tmp_path, model_name):
    build, make_samples = MODELS[model_name]
    accumulated, big_batch, initial = build(), build(), build()
    samples = make_samples(8)
    train(accumulated, samples, tmp_path / "ga2", steps=2, batch_size=2, gradient_accumulation_steps=2, **PLAIN)
    train(big_batch, samples, tmp_path / "ga1", steps=2, batch_size=4, **PLAIN)
    assert_same_weights(accumulated, big_batch, tolerance=1e-6)
    assert max_difference(accumulated, initial) > 1e-4


def test_stock_trainer_shows_the_accumulation_pitfall_this_trainer_fixes(tmp_path):
    # transformers 5.x: T5's forward takes **kwargs, so the stock Trainer passes `num_items_in_batch` and skips the
    # division by the accumulation steps, but T5 ignores it and returns a per-micro-batch mean: the accumulated
    # gradient is 2x too large (upstream #47688). With plain SGD one step moves the weights by lr * gradient.
    initial = tiny_t5()
    updates = {}
    for trainer_class, accumulation, batch_size in [(Trainer, 2, 2), (Trainer, 1, 4), (SAFTTrainer, 2, 2)]:
        model = tiny_t5()
        overrides = PLAIN if trainer_class is SAFTTrainer else {k: v for k, v in PLAIN.items() if k != "sam_mode"}
        train(
            model,
            t5_samples(4),
            tmp_path / f"{trainer_class.__name__}{accumulation}",
            trainer_class=trainer_class,
            steps=1,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            **overrides,
        )
        updates[trainer_class, accumulation] = torch.cat(
            [(p - q).reshape(-1) for p, q in zip(model.parameters(), initial.parameters())]
        )
    # Differences of float32 weights near 1 are exact to ~1e-7; the updates themselves are ~1e-3.
    assert updates[Trainer, 1].abs().max() > 1e-3
    torch.testing.assert_close(updates[Trainer, 2], 2 * updates[Trainer, 1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(updates[SAFTTrainer, 2], updates[Trainer, 1], rtol=1e-4, atol=1e-6)


# 3b. Models whose loss consumes `num_items_in_batch` (causal LMs) keep the stock token-weighted accumulation.
GPT2_LENGTHS = (4, 16, 7, 12)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


def gpt2_samples(lengths=GPT2_LENGTHS, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Sequences of different lengths, labels = inputs. Label 0 is masked: it is never a target (the loss shifts
    the labels), and with it masked the label count is the same whether or not the Trainer counts position 0
    (it does for `GPT2LMHeadModel`, whose class name matches no `LOSS_MAPPING` entry)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        input_ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = input_ids.clone()
        labels[0] = -100
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def pad_collator(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right padding: pad id 0, attention mask 0 and label -100 on the padding."""
    length = max(len(sample["input_ids"]) for sample in samples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for sample in samples:
        pad = length - len(sample["input_ids"])
        batch["input_ids"].append(torch.nn.functional.pad(sample["input_ids"], (0, pad), value=0))
        batch["attention_mask"].append(torch.nn.functional.pad(torch.ones_like(sample["input_ids"]), (0, pad)))
        batch["labels"].append(torch.nn.functional.pad(sample["labels"], (0, pad), value=-100))
    return {name: torch.stack(values) for name, values in batch.items()}


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][..., 1:] != -100).sum())


def token_weighted_sgd_step(model, samples, lr: float) -> None:
    """One SGD step on the mean token loss over all samples' targets, by hand."""
    params = list(model.parameters())
    total_tokens = sum(label_tokens(sample) for sample in samples)
    loss = (
        sum(
            model(input_ids=sample["input_ids"][None], labels=sample["labels"][None]).loss * label_tokens(sample)
            for sample in samples
        )
        / total_tokens
    )
    with torch.no_grad():
        for param, grad in zip(params, torch.autograd.grad(loss, params)):
            param -= lr * grad


def test_causal_lm_accumulation_is_token_weighted_as_in_the_stock_trainer(tmp_path):
    # 4 micro-batches of 3-15 target tokens, one SGD step at lr 0.1. Before the per-model loss-kwargs rule this
    # trainer divided GPT-2's loss by the accumulation steps (each micro-batch's mean weighing the same) and ended
    # 2.4e-2 away from the stock Trainer (now: bit-identical to it, 4e-9 from the hand-computed step).
    sgd = {key: value for key, value in PLAIN.items() if key != "sam_mode"} | {"learning_rate": 0.1}
    common = dict(steps=1, data_collator=pad_collator, **sgd)
    samples = gpt2_samples()
    stock, saft, big_batch, reference = tiny_gpt2(), tiny_gpt2(), tiny_gpt2(), tiny_gpt2()
    train(
        stock, samples, tmp_path / "stock", trainer_class=Trainer, batch_size=1, gradient_accumulation_steps=4, **common
    )
    trainer = train(
        saft, samples, tmp_path / "saft", batch_size=1, gradient_accumulation_steps=4, sam_mode="none", **common
    )
    train(big_batch, samples, tmp_path / "big", batch_size=4, sam_mode="none", **common)
    token_weighted_sgd_step(reference, samples, lr=0.1)

    assert trainer.model_accepts_loss_kwargs is True
    assert max_difference(saft, stock) <= 1e-8
    assert_same_weights(saft, reference, tolerance=1e-7)
    assert_same_weights(big_batch, reference, tolerance=1e-7)
    # The rule matters here: per-micro-batch means weighed equally give a different step.
    assert max_difference(reference, tiny_gpt2()) > 1e-2


def test_causal_lm_sharpness_aware_accumulation_equals_the_hand_computed_steps(tmp_path):
    model, reference = tiny_gpt2(), tiny_gpt2()
    samples = gpt2_samples((4, 16, 7, 12, 9, 5, 14, 6))
    recorder = GradientRecorder()
    trainer = train(
        model,
        samples,
        tmp_path,
        steps=2,
        batch_size=1,
        gradient_accumulation_steps=4,
        callbacks=[recorder],
        sam_mode="asam",
        sam_rho=0.5,
        sam_eta=0.01,
        **ADAM,
    )
    steps = optimizer_steps(samples, 2, 4, batch_size=1)
    # Each micro-batch's loss enters as its share of the step's target tokens (the Trainer's `num_items_in_batch`);
    # the perturbation of a micro-batch comes from that micro-batch's (scaled) gradient alone.
    scales = [[label_tokens(batch) / sum(map(label_tokens, step)) for batch in step] for step in steps]
    log = reference_training(reference, steps, reference_adam(trainer), mode="asam", rho=0.5, scales=scales)

    assert trainer.model_accepts_loss_kwargs is True
    assert_same_gradients(recorder.gradients, log.step_gradients)
    assert_same_weights(model, reference)
    for step, entry in enumerate(step_logs(trainer)):
        micro = slice(step * 4, (step + 1) * 4)
        assert entry["loss"] == pytest.approx(log.losses[step], rel=1e-5)
        assert entry["sam/grad_norm"] == pytest.approx(sum(log.grad_norms[micro]) / 4, rel=1e-5)
        assert entry["sam/sharpness"] == pytest.approx(sum(log.sharpness[micro]), rel=1e-4, abs=1e-6)


class DeclaresLossKwargs(torch.nn.Module):
    accepts_loss_kwargs = True

    def forward(self, **inputs):
        return inputs


class ForwardsKwargs(torch.nn.Module):
    def forward(self, labels=None, **kwargs):
        return self.helper(labels, **kwargs)


class ReadsTheCount(torch.nn.Module):
    def forward(self, labels=None, **kwargs):
        return labels.sum() / kwargs.get("num_items_in_batch", 1)


def _gpt2_classifier():
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny_gpt2, True),  # `self.loss_function(..., **kwargs)`, ForCausalLMLoss takes the count
        (tiny_t5, False),  # **kwargs, but `CrossEntropyLoss()` of its own
        (tiny_clip, False),  # no **kwargs
        (_gpt2_classifier, False),  # `self.loss_function` is ForSequenceClassificationLoss: ignores the count
        (lambda: linearize(tiny_gpt2()), False),  # FTTS wrapper: its own mean cross-entropy
        (DeclaresLossKwargs, True),
        (ForwardsKwargs, False),  # hands **kwargs on: unknown, so the safe answer
        (ReadsTheCount, True),
    ],
)
def test_which_models_consume_num_items_in_batch(build, expected):
    assert forward_consumes_num_items_in_batch(build()) is expected


def test_label_smoothing_keeps_the_stock_loss_kwargs(tmp_path):
    # The label smoother normalises by `num_items_in_batch` itself, whatever the model's forward does.
    args = SAFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1)
    assert SAFTTrainer(model=tiny_t5(), args=args).model_accepts_loss_kwargs is True
    args = SAFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert SAFTTrainer(model=tiny_t5(), args=args).model_accepts_loss_kwargs is False


# 4. Invariants of the two-pass step.
def test_dropout_masks_are_identical_in_both_passes(tmp_path):
    model = tiny_t5(dropout=0.1)
    passes: list[list[torch.Tensor]] = []
    model.register_forward_pre_hook(lambda module, args: passes.append([]))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda module, args, output: passes[-1].append(output == 0))
    train(model, t5_samples(8), tmp_path, steps=2, gradient_accumulation_steps=2)

    assert len(passes) == 8  # 2 steps x 2 micro-batches x (ascent, descent)
    for ascent, descent in zip(passes[0::2], passes[1::2]):
        assert len(ascent) == len(descent) > 0
        assert all(torch.equal(a, d) for a, d in zip(ascent, descent))
    dropped = torch.cat([mask.reshape(-1) for mask in passes[0]]).float().mean().item()
    assert 0.05 < dropped < 0.2
    assert not all(torch.equal(a, b) for a, b in zip(passes[0], passes[2])), "each micro-batch draws new masks"


def test_non_finite_ascent_gradient_skips_the_perturbation(tmp_path):
    model, plain = tiny_t5(), tiny_t5()
    backward_calls = []

    def poison_the_first_ascent(grad):
        backward_calls.append(None)
        return grad * float("inf") if len(backward_calls) == 1 else grad

    model.lm_head.weight.register_hook(poison_the_first_ascent)
    trainer = train(model, t5_samples(2), tmp_path / "saft", steps=1)
    train(plain, t5_samples(2), tmp_path / "plain", steps=1, sam_mode="none")

    assert len(backward_calls) == 2
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert_same_weights(model, plain, exact=True)  # the descent pass ran at w: a plain step
    (entry,) = step_logs(trainer)
    assert entry["sam/skipped"] == 1
    assert "sam/grad_norm" not in entry and "sam/perturbation_norm" not in entry
    assert entry["sam/sharpness"] == 0.0


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    settings = dict(
        steps=4,
        gradient_accumulation_steps=2,
        sam_interval=2,
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="random",
    )
    uninterrupted, resumed = tiny_t5(dropout=0.1), tiny_t5(dropout=0.1)
    train(uninterrupted, t5_samples(16), tmp_path / "uninterrupted", **settings)
    checkpoint = tmp_path / "uninterrupted" / "checkpoint-2"
    trainer = train(resumed, t5_samples(16), tmp_path / "resumed", resume_from=str(checkpoint), **settings)
    assert trainer.state.global_step == 4
    assert_same_weights(resumed, uninterrupted, exact=True)
    assert max_difference(resumed, tiny_t5()) > 1e-4


class PerturbationSpy(SAFTTrainer):
    """Records the optimizer step of every perturbation."""

    def _perturb_weights_(self, *args, **kwargs):
        self.perturbed_at = getattr(self, "perturbed_at", []) + [self.state.global_step]
        return super()._perturb_weights_(*args, **kwargs)


def test_sam_interval_perturbs_one_step_out_of_k(tmp_path):
    model = tiny_t5()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(None))
    trainer = train(
        model, t5_samples(9), tmp_path, trainer_class=PerturbationSpy, steps=9, batch_size=1, sam_interval=4
    )
    assert trainer.perturbed_at == [0, 4, 8]
    assert len(forwards) == 9 + 3
    logged = {entry["step"]: entry for entry in step_logs(trainer)}
    assert [step for step, entry in logged.items() if "sam/grad_norm" in entry] == [1, 5, 9]


@pytest.mark.parametrize(
    ("mode", "expected_keys"),
    [
        ("asam", {"sam/grad_norm", "sam/perturbation_norm", "sam/sharpness", "sam/skipped"}),
        ("none", set()),
    ],
)
def test_logged_keys(tmp_path, mode, expected_keys):
    trainer = train(tiny_t5(), t5_samples(4), tmp_path, steps=2, sam_mode=mode)
    for entry in step_logs(trainer):
        assert {key for key in entry if key.startswith("sam/")} == expected_keys


# 4. Refusals.
@pytest.fixture
def reported_distributed_type(monkeypatch):
    """Make every Accelerator report the given distributed type (DeepSpeed and FSDP are not set up here)."""

    def report(distributed_type: DistributedType) -> None:
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: distributed_type))

    return report


def test_deepspeed_is_refused(tmp_path, reported_distributed_type):
    reported_distributed_type(DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        SAFTTrainer(model=tiny_t5(), args=SAFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))


@pytest.mark.parametrize(("sync_each_batch", "refused"), [(False, True), (True, False)])
def test_fsdp_with_accumulation_needs_sync_each_batch(tmp_path, reported_distributed_type, sync_each_batch, refused):
    reported_distributed_type(DistributedType.FSDP)
    args = SAFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        gradient_accumulation_steps=2,
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": sync_each_batch}},
    )
    if refused:
        with pytest.raises(ValueError, match="sync_each_batch"):
            SAFTTrainer(model=tiny_t5(), args=args)
    else:
        SAFTTrainer(model=tiny_t5(), args=args)


def test_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="SAFTConfig"):
        SAFTTrainer(model=tiny_t5(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


# 5. Memory: the two-pass step holds one parameter-sized copy more than plain fine-tuning.
def live_tensor_bytes(model) -> int:
    """Bytes of every distinct tensor storage Python can reach, plus the model's gradients (held by C++ only)."""
    gc.collect()
    # Plain tensors and parameters only: fake tensors left by an earlier torch.compile in this process (the compiled
    # perturbation's tests) have no storage to measure.
    tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
    tensors += [param.grad for param in model.parameters() if param.grad is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_extra_memory_is_one_copy_of_the_trainable_parameters(tmp_path):
    # What each run holds when the second micro-batch's (last) forward pass starts, beyond what it held when the
    # first one started: plain fine-tuning holds the accumulated gradient; SAFT also holds the saved weights, and
    # would show anything kept from an ascent gradient or a perturbation.
    growth = {}
    for mode, last_forward in [("none", 1), ("asam", 3)]:
        model = tiny_clip()
        measured = []
        model.register_forward_pre_hook(
            lambda module, args, measured=measured, model=model: measured.append(live_tensor_bytes(model))
        )
        train(model, clip_samples(4), tmp_path / mode, steps=1, gradient_accumulation_steps=2, sam_mode=mode)
        growth[mode] = measured[last_forward] - measured[0]
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert trainable <= growth["none"] <= trainable + 64 * 1024, "the accumulated gradient"
    extra = growth["asam"] - growth["none"]
    assert trainable <= extra <= trainable + 64 * 1024, (extra, trainable)
