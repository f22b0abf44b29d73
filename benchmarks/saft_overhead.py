"""Step time split into phases, and peak memory, of plain fine-tuning vs SAFT vs SAFT every 4th step, side by side.

    python benchmarks/saft_overhead.py [--models clip-vit-b32 flan-t5-base] [--batch-sizes 2 16] [--cycles 2]
                                       [--threads 1] [--device cpu] [--perturbation compiled]

Models, randomly initialised from their configs (no download):

- clip-vit-b32: the `CLIPVisionClassifier` the recipes train, with a `CLIPVisionConfig()` (ViT-B/32) vision tower
  under a frozen 10-class zero-shot head; 224x224 images.
- flan-t5-base: `T5ForConditionalGeneration` with flan-t5-base's config (d_model 768, d_ff 2048, 12+12 layers,
  12 heads, vocabulary 32128, gated GELU); 32 input tokens, 4 target tokens (a GLUE sentence and a label word).

Each (model, batch size, configuration) runs in a fresh subprocess through `SAFTTrainer` with the Trainer's default
optimizer (AdamW), so peaks do not leak between measurements. Configurations: `sam_mode="none"` (plain), ASAM on
every step, ASAM with `sam_interval=4`. After 2 warm-up steps, the timed steps form whole cycles of 4 optimizer
steps, each holding exactly one perturbed step of the interval-4 run. Step time ("step s"): the fastest timed step
of each kind (plain, perturbed), weighted by that kind's share of the run's steps: on a machine shared with other
work, the fastest of several identical steps is the least disturbed estimate of its cost. The phases of a step, each
the fastest over the run's steps of its kind, are timed without changing the trainer: a class placed between
`SAFTTrainer` and `Trainer` in the method resolution order times each forward/backward pass (`Trainer.training_step`,
called once by a plain step and twice by a perturbed one); "bookkeeping" is the rest of a perturbed
`training_step` before the second pass (moving gradients aside, the norm, saving `w`, `w + e`), "restore" the rest
after it, "optimizer" `optimizer.step()`, "other" the rest of the step (gradient clipping, zeroing, data). torch runs
on `--threads` threads (1 by default: on 2 shared cores a second thread mostly waits for the other work). Memory on
CPU: peak anonymous memory (`RssAnon` sampled every 2 ms: what the process allocates), for the whole process; set
`MALLOC_MMAP_THRESHOLD_=65536` in the environment to make glibc return every freed tensor to the system, so that
`RssAnon` tracks live allocations only. On CUDA (`--device cuda`, as `gpu_check.py` runs it): the clock reads follow
a device synchronisation and memory is `torch.cuda.max_memory_allocated`.

`--perturbation compiled` (the default) runs SAFT with `sam_compile_perturbation=True`: on CPU the perturbation's two
sweeps are loops compiled by `torch.compile`, compiled during the first perturbed step (a warm-up step; its
bookkeeping time, compiling included, is printed below the table); `eager` measures the default multi-tensor ops.

Targets: SAFT/plain time <= 2.0 at batch >= 8, bookkeeping <= 10% of a plain step at batch 2, interval-4/plain time
<= 1.3 at every batch, SAFT/plain peak memory <= 1.10 at batch 16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from memory import AnonSampler

CONFIGURATIONS = {
    "plain": {"sam_mode": "none"},
    "saft": {"sam_mode": "asam"},
    "saft-interval-4": {"sam_mode": "asam", "sam_interval": 4},
}
MODELS = ("clip-vit-b32", "flan-t5-base")
WARMUP_STEPS = 2
INTERVAL = 4
KB_PER_MB = 1024


def build(model_name: str, samples: int):
    """The model and `samples` random training examples."""
    import torch
    from transformers import CLIPVisionConfig, T5Config, T5ForConditionalGeneration

    from saft_hf.models.clip import CLIPVisionClassifier, ZeroShotHead

    generator = torch.Generator().manual_seed(0)
    if model_name == "clip-vit-b32":
        config = CLIPVisionConfig()
        classes, projection_dim = 10, 512
        head = ZeroShotHead(
            visual_projection=torch.randn(projection_dim, config.hidden_size, generator=generator) * 0.02,
            class_embeddings=torch.nn.functional.normalize(torch.randn(classes, projection_dim, generator=generator)),
            logit_scale=torch.tensor(4.6052),
            class_names=tuple(f"class {i}" for i in range(classes)),
            templates=("a photo of a {}.",),
        )
        model = CLIPVisionClassifier(config, head)
        data = [
            {"pixel_values": torch.randn(3, 224, 224, generator=generator), "labels": torch.tensor(i % classes)}
            for i in range(samples)
        ]
    else:
        config = T5Config(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=2048,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.1,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = T5ForConditionalGeneration(config)
        # transformers 5.x ties `lm_head` to the shared embedding of a T5 built from a config; Flan-T5 has its own.
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        data = [
            {
                "input_ids": torch.randint(2, 32128, (32,), generator=generator),
                "labels": torch.randint(2, 32128, (4,), generator=generator),
            }
            for _ in range(samples)
        ]
    return model, data


PHASES = ("pass 1", "bookkeeping", "pass 2", "restore", "optimizer", "other")
# Targets, each: (what, applies at this batch size, ratio key, limit).
TARGETS = (
    ("SAFT/plain time", lambda batch: batch >= 8, "saft time", 2.0),
    ("bookkeeping/plain step", lambda batch: batch == 2, "bookkeeping", 0.10),
    ("interval-4/plain time", lambda batch: True, "interval time", 1.3),
    ("SAFT/plain peak memory", lambda batch: batch >= 16, "saft memory", 1.10),
)


def measure(
    model_name: str, configuration: str, batch_size: int, cycles: int, threads: int, device: str, compiled: bool
) -> dict:
    """One (model, batch size, configuration) run: per-step wall times split into phases, and the memory peak."""
    import torch
    from transformers import Trainer, TrainerCallback

    from saft_hf import SAFTConfig, SAFTTrainer

    cuda = device == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class PassTimer(Trainer):
        """Between `SAFTTrainer` and `Trainer` in the MRO: marks the start and end of each forward/backward pass."""

        def training_step(self, *args, **kwargs):
            self.marks.append(clock())
            loss = super().training_step(*args, **kwargs)
            self.marks.append(clock())
            return loss

    class TimedTrainer(SAFTTrainer, PassTimer):
        """Marks the start and end of each `training_step`, around the passes' marks."""

        def training_step(self, *args, **kwargs):
            self.marks = [clock()]
            loss = super().training_step(*args, **kwargs)
            self.marks.append(clock())
            self.step_marks.append(self.marks)
            return loss

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step and of its `optimizer.step()`, and whether it was a perturbed one."""

        def __init__(self):
            self.seconds: list[float] = []
            self.optimizer: list[float] = []
            self.perturbed: list[bool] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.perturbed.append(args.sam_perturbs_step(state.global_step))
            self.start = clock()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = clock()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer.append(clock() - self.optimizer_start)

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(clock() - self.start)

    torch.set_num_threads(threads)
    steps = WARMUP_STEPS + cycles * INTERVAL
    model, data = build(model_name, steps * batch_size)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = SAFTConfig(
        output_dir=tempfile.mkdtemp(prefix="saft_hf-overhead-"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-5,
        train_sampling_strategy="sequential",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        disable_tqdm=True,
        sam_compile_perturbation=compiled,
        **CONFIGURATIONS[configuration],
    )
    timer = StepTimer()
    trainer = TimedTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    trainer.step_marks = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak_mb = torch.cuda.max_memory_allocated() / 1024**2
    else:
        with AnonSampler() as sampler:
            trainer.train()
        peak_mb = sampler.peak_kb / KB_PER_MB
    phases = []
    for seconds, optimizer, marks in zip(timer.seconds, timer.optimizer, trainer.step_marks, strict=True):
        if len(marks) == 6:  # step start, pass 1 start and end, pass 2 start and end, step end
            start, first, first_end, second, second_end, end = marks
            split = [first_end - first, first - start + second - first_end, second_end - second, end - second_end]
        else:
            split = [marks[-1] - marks[0], 0.0, 0.0, 0.0]
        phases.append(dict(zip(PHASES, [*split, optimizer, seconds - (marks[-1] - marks[0]) - optimizer])))
    timed = list(zip(timer.seconds, timer.perturbed, phases))[WARMUP_STEPS:]
    fastest = {}
    for kind in (False, True):
        of_kind = [(seconds, split) for seconds, perturbed, split in timed if perturbed == kind]
        if of_kind:
            fastest[kind] = {"step": min(s for s, _ in of_kind)}
            fastest[kind].update({phase: min(split[phase] for _, split in of_kind) for phase in PHASES})
    share = sum(perturbed for _, perturbed, _ in timed) / len(timed)
    first_perturbed = [split["bookkeeping"] for split, perturbed in zip(phases, timer.perturbed) if perturbed]
    return {
        "model": model_name,
        "configuration": configuration,
        "batch_size": batch_size,
        "trainable_parameters": parameters,
        "step_seconds": sum(fastest[kind]["step"] * (share if kind else 1 - share) for kind in fastest),
        "phases": {phase: fastest[max(fastest)][phase] for phase in PHASES},  # of a perturbed step if any
        "first_bookkeeping": first_perturbed[0] if first_perturbed else 0.0,
        "steps": timer.seconds,
        "perturbed": timer.perturbed,
        "peak_mb": peak_mb,
    }


def run_worker(
    model_name: str,
    configuration: str,
    batch_size: int,
    cycles: int,
    threads: int,
    device: str,
    perturbation: str = "eager",
) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, configuration, "--batch-sizes", str(batch_size)]
    command += ["--cycles", str(cycles), "--threads", str(threads), "--device", device, "--perturbation", perturbation]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """SAFT and interval-4 against plain, for one model and batch size (`rows` by configuration)."""
    plain, saft, interval = (rows[name] for name in CONFIGURATIONS)
    return {
        "saft time": saft["step_seconds"] / plain["step_seconds"],
        "saft memory": saft["peak_mb"] / plain["peak_mb"],
        "interval time": interval["step_seconds"] / plain["step_seconds"],
        "interval memory": interval["peak_mb"] / plain["peak_mb"],
        "bookkeeping": saft["phases"]["bookkeeping"] / plain["step_seconds"],
    }


def report(rows: dict[tuple[str, int, str], dict], memory: str = "peak anon MB") -> list[tuple[str, float, bool]]:
    """Print the table and the targets; returns each applicable target as (description, ratio, met)."""
    header = f"{'model':<14}{'batch':>6}  {'configuration':<17}{'step s':>8}"
    header += "".join(f"{phase:>{max(len(phase) + 2, 8)}}" for phase in PHASES)
    header += f"{memory:>14}{'time/plain':>12}{'mem/plain':>11}"
    print(header + "\n" + "-" * len(header))
    groups: dict[tuple[str, int], dict[str, dict]] = {}
    for (model, batch, configuration), row in rows.items():
        groups.setdefault((model, batch), {})[configuration] = row
    results = []
    for (model, batch), group in groups.items():
        plain = group["plain"]
        for configuration, row in group.items():
            line = f"{model:<14}{batch:>6}  {configuration:<17}{row['step_seconds']:>8.2f}"
            line += "".join(f"{row['phases'][phase]:>{max(len(phase) + 2, 8)}.2f}" for phase in PHASES)
            line += f"{row['peak_mb']:>14.0f}{row['step_seconds'] / plain['step_seconds']:>12.2f}"
            print(line + f"{row['peak_mb'] / plain['peak_mb']:>11.2f}")
        measured = ratios(group)
        for name, applies, key, limit in TARGETS:
            if applies(batch):
                results.append(
                    (
                        f"{model} batch {batch}: {name} {measured[key]:.2f} (<= {limit:.2f})",
                        measured[key],
                        measured[key] <= limit,
                    )
                )
        extra_mb = group["saft"]["peak_mb"] - plain["peak_mb"]
        copy_mb = plain["trainable_parameters"] * 4 / 1024**2
        print(
            f"{'':<22}SAFT - plain peak memory: {extra_mb:+.0f} MB; one float32 copy of the "
            f"{plain['trainable_parameters'] / 1e6:.1f}M trainable parameters: {copy_mb:.0f} MB; first perturbed "
            f"step's bookkeeping (compiling included if compiled): {group['saft']['first_bookkeeping']:.1f} s"
        )
    print("\ntargets:")
    for description, _, met in results:
        print(f"  {description}: {'OK' if met else 'MISSED'}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 16])
    parser.add_argument("--cycles", type=int, default=2, help="Timed cycles of 4 optimizer steps after warm-up.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--perturbation",
        choices=("compiled", "eager"),
        default="compiled",
        help="SAFT's perturbation on CPU: sam_compile_perturbation=True (compiled sweeps) or the eager default.",
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIGURATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        compiled = args.perturbation == "compiled"
        print(json.dumps(measure(*args.worker, args.batch_sizes[0], args.cycles, args.threads, args.device, compiled)))
        return
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    print(f"perturbation: {args.perturbation}", flush=True)
    rows = {}
    for model in args.models:
        for batch in args.batch_sizes:
            for configuration in CONFIGURATIONS:
                print(f"running {model} / batch {batch} / {configuration} ...", flush=True)
                rows[model, batch, configuration] = run_worker(
                    model, configuration, batch, args.cycles, args.threads, args.device, args.perturbation
                )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(
        "seconds per step and per phase, each the fastest over the timed steps; phases of a perturbed step if the "
        "configuration has any\n"
    )
    report(rows, "peak anon MB" if args.device == "cpu" else "peak CUDA MB")


if __name__ == "__main__":
    main()
