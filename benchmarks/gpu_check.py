"""Checks for the first GPU run of SAFTTrainer: correctness on the device, then the time and memory ratios.

    python benchmarks/gpu_check.py [--device cuda] [--batch-size 32] [--models clip-vit-b32 flan-t5-base]

No Hub access: every model is built from a config. Under 5 minutes on one GPU. Checks:

- fp32 step: two SAFT (ASAM) optimizer steps of a tiny T5 (gradient accumulation 2) and a tiny CLIP vision tower
  equal hand-computed steps (`tests/sam_reference.py`, float64 perturbation math) on the device, with TF32 off;
- bf16 autocast and fp16 with `GradScaler`: two SAFT steps of a tiny T5, the second with an ascent gradient made
  infinite: the losses and norms are finite, `sam/skipped` is 0 then 1, and before each optimizer step the weights
  are exactly those the step started from (restored, or never perturbed);
- with `--models`: `benchmarks/saft_overhead.py`'s table for those models at `--batch-size` on the device
  (subprocesses), with its targets (SAFT/plain time <= 2.0, interval-4/plain <= 1.3, peak memory <= 1.10).

Prints one summary table and exits with status 1 if any check fails (a missed performance target is reported, not
a failure). `--device cuda` without a GPU fails. On CPU (`--device cpu --models`, what the test suite runs) fp16 with
`GradScaler` does not apply and is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import T5ForConditionalGeneration, TrainerCallback, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from saft_overhead import CONFIGURATIONS, MODELS, report, run_worker  # noqa: E402
from sam_reference import AdamW, reference_training  # noqa: E402

from saft_hf import SAFTConfig, SAFTTrainer  # noqa: E402
from saft_hf.models.clip import CLIPVisionClassifier, build_zero_shot_head  # noqa: E402
from saft_hf.testing import build_tiny_clip, tiny_t5_config  # noqa: E402

VOCAB = 64
LR = 1e-3
# Adam's eps bounds how much float32 rounding in near-zero gradient entries can move a weight (see
# tests/test_trainer.py); the tolerances are those of the CPU tests.
ADAM = dict(adam_epsilon=1e-2, weight_decay=0.1, max_grad_norm=1.0)
WEIGHT_TOLERANCE = 1e-6
GRADIENT_TOLERANCE = 1e-5


def tiny_t5(device: str) -> T5ForConditionalGeneration:
    config = tiny_t5_config(vocab_size=VOCAB)
    config.dropout_rate = 0.0
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).to(device)


def tiny_clip(device: str) -> CLIPVisionClassifier:
    clip, tokenizer, _ = build_tiny_clip(seed=0)
    head = build_zero_shot_head(clip, ["zero", "one", "two", "three"], ["a photo of the number {}."], tokenizer)
    return CLIPVisionClassifier(clip.config.vision_config, head, clip.vision_model).to(device)


def t5_samples(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(2, VOCAB, (8,), generator=generator),
            "labels": torch.randint(2, VOCAB, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def clip_samples(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": torch.tensor(i % 4)}
        for i in range(count)
    ]


def train(model, samples, device: str, *, steps: int, callbacks=(), **overrides) -> SAFTTrainer:
    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="saft_hf-gpu-check-"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    trainer = SAFTTrainer(model=model, args=SAFTConfig(**settings), train_dataset=samples, callbacks=list(callbacks))
    trainer.train()
    return trainer


class GradientRecorder(TrainerCallback):
    """The flattened gradient the optimizer steps with (after clipping), per optimizer step."""

    def __init__(self):
        self.gradients: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))


class RestoreChecker(TrainerCallback):
    """Whether, before each optimizer step, the weights are exactly those the step started from."""

    def __init__(self):
        self.restored: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.start = [p.detach().clone() for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.restored.append(all(torch.equal(p, w) for p, w in zip(model.parameters(), self.start)))


def check_fp32_step(device: str) -> str:
    """Two SAFT steps equal the hand-computed ones (weights to 1e-6, gradients to 1e-5 relative)."""
    details = []
    for name, build, samples, accumulation in [
        ("tiny T5", tiny_t5, t5_samples(8), 2),
        ("tiny CLIP", tiny_clip, clip_samples(4), 1),
    ]:
        model = build(device)
        reference = copy.deepcopy(model)
        recorder = GradientRecorder()
        trainer = train(
            model,
            samples,
            device,
            steps=2,
            gradient_accumulation_steps=accumulation,
            callbacks=[recorder],
            sam_mode="asam",
            sam_rho=0.5,
            **ADAM,
        )
        batches = [
            {key: value.to(device) for key, value in default_data_collator(samples[i : i + 2]).items()}
            for i in range(0, len(samples), 2)
        ]
        steps = [batches[s * accumulation : (s + 1) * accumulation] for s in range(2)]
        adam = AdamW(
            lr=LR,
            eps=ADAM["adam_epsilon"],
            weight_decay=ADAM["weight_decay"],
            max_grad_norm=ADAM["max_grad_norm"],
            decay_names=trainer.get_decay_parameter_names(trainer.model),
        )
        log = reference_training(reference, steps, adam, mode="asam", rho=0.5)
        for gradient, expected in zip(recorder.gradients, log.step_gradients, strict=True):
            error = ((gradient - expected).norm() / expected.norm()).item()
            if not error <= GRADIENT_TOLERANCE:
                raise AssertionError(f"{name}: step gradient off by {error:.2e} (relative)")
        difference = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        if not difference <= WEIGHT_TOLERANCE:
            raise AssertionError(f"{name}: weights off by {difference:.2e}")
        details.append(f"{name} weights within {difference:.1e}")
    return "; ".join(details)


def check_mixed_precision_step(device: str, precision: str) -> str:
    """Two steps in `precision` ("bf16" autocast or "fp16" with GradScaler), the second one's ascent gradient
    poisoned: finite, skipped 0 then 1, weights restored exactly before each optimizer step."""
    model = tiny_t5(device)
    backward_calls = []

    def poison_the_second_ascent(grad):
        backward_calls.append(None)
        return grad * float("inf") if len(backward_calls) == 3 else grad  # ascent, descent, then step 2's ascent

    model.lm_head.weight.register_hook(poison_the_second_ascent)
    checker = RestoreChecker()
    trainer = train(model, t5_samples(4), device, steps=2, callbacks=[checker], **{precision: True})
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if [entry["sam/skipped"] for entry in logs] != [0, 1]:
        raise AssertionError(f"sam/skipped per step: {[entry['sam/skipped'] for entry in logs]}, expected [0, 1]")
    values = [logs[0]["loss"], logs[0]["sam/grad_norm"], logs[0]["sam/sharpness"], logs[1]["loss"]]
    if not all(math.isfinite(value) for value in values):
        raise AssertionError(f"non-finite loss or norms: {values}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise AssertionError("non-finite weights after the steps")
    if checker.restored != [True, True]:
        raise AssertionError(f"weights before each optimizer step equal those at its start: {checker.restored}")
    return f"loss {logs[0]['loss']:.3f}, sam/grad_norm {logs[0]['sam/grad_norm']:.3g}, skipped [0, 1], restored"


def run(name: str, check: Callable[[], str], summary: list[tuple[str, str, str]]) -> None:
    print(f"running: {name} ...", flush=True)
    try:
        summary.append((name, "PASS", check()))
    except Exception as error:  # noqa: BLE001 -- every failure is reported in the summary and fails the run
        traceback.print_exc()
        summary.append((name, "FAIL", f"{type(error).__name__}: {error}".splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False.")
        # The fp32 comparison is with float32 arithmetic: TF32 matmuls and convolutions round to 10-bit mantissas.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    summary: list[tuple[str, str, str]] = []
    run("fp32 step = hand-computed", lambda: check_fp32_step(args.device), summary)
    run("bf16 autocast step", lambda: check_mixed_precision_step(args.device, "bf16"), summary)
    if args.device == "cuda":
        run("fp16 GradScaler step", lambda: check_mixed_precision_step(args.device, "fp16"), summary)
    else:
        summary.append(("fp16 GradScaler step", "n/a", "needs CUDA"))
    if args.models:
        rows = {}

        def ratios() -> str:
            for model in args.models:
                for configuration in CONFIGURATIONS:
                    print(f"running {model} / batch {args.batch_size} / {configuration} ...", flush=True)
                    rows[model, args.batch_size, configuration] = run_worker(
                        model, configuration, args.batch_size, 2, torch.get_num_threads(), args.device
                    )
            return f"{len(rows)} runs"

        run(f"ratio table, batch {args.batch_size}", ratios, summary)
        if len(rows) == len(args.models) * len(CONFIGURATIONS):
            print()
            memory = "peak CUDA MB" if args.device == "cuda" else "peak anon MB"
            for description, _, met in report(rows, memory):
                summary.append((description, "target", "met" if met else "MISSED"))

    width = max(len(name) for name, _, _ in summary)
    print(f"\nsummary ({args.device}{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}):")
    for name, result, detail in summary:
        print(f"  {name:<{width}}  {result:<6}  {detail}")
    failed = [name for name, result, _ in summary if result == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
