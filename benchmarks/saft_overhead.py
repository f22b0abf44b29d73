"""Step time and peak memory of plain fine-tuning vs SAFT vs SAFT every 4th step, side by side, on CPU.

    python benchmarks/saft_overhead.py [--models clip-vit-b32 flan-t5-base] [--batch-size 2] [--cycles 2] [--threads 1]

Models, randomly initialised from their configs (no download):

- clip-vit-b32: the `CLIPVisionClassifier` the recipes train, with a `CLIPVisionConfig()` (ViT-B/32) vision tower
  under a frozen 10-class zero-shot head; 224x224 images.
- flan-t5-base: `T5ForConditionalGeneration` with flan-t5-base's config (d_model 768, d_ff 2048, 12+12 layers,
  12 heads, vocabulary 32128, gated GELU); 32 input tokens, 4 target tokens (a GLUE sentence and a label word).

Each (model, configuration) runs in a fresh subprocess through `SAFTTrainer` with the Trainer's default optimizer
(AdamW), so peaks do not leak between measurements. Configurations: `sam_mode="none"` (plain), ASAM on every step,
ASAM with `sam_interval=4`. After 2 warm-up steps, the timed steps form whole cycles of 4 optimizer steps, each
holding exactly one perturbed step of the interval-4 run. Step time ("step s"): the fastest timed step of each kind
(plain, perturbed), weighted by that kind's share of the run's steps: on a machine shared with other work, the
fastest of several identical steps is the least disturbed estimate of its cost (the median over cycles of a cycle's
mean step time, "cycle s", is printed too). torch runs on `--threads` threads (1 by default: on 2 shared cores a
second thread mostly waits for the other work). Memory: peak anonymous memory (`RssAnon` sampled every 2 ms: what
the process allocates) and peak RSS (`VmHWM`), for the whole process. Set `MALLOC_MMAP_THRESHOLD_=65536` in the
environment to make glibc return every freed tensor to the system, so that `RssAnon` tracks live allocations only.
Targets: SAFT/plain time <= 2.0, SAFT/plain peak anonymous memory <= 1.10, interval-4/plain time <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from memory import AnonSampler, status_kb

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
            vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
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


def measure(model_name: str, configuration: str, batch_size: int, cycles: int, threads: int) -> dict:
    """One (model, configuration) run: per-step wall times and the process's memory peaks."""
    import torch
    from transformers import TrainerCallback

    from saft_hf import SAFTConfig, SAFTTrainer

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, and whether it was a perturbed (two-pass) one."""

        def __init__(self):
            self.seconds: list[float] = []
            self.perturbed: list[bool] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.perturbed.append(args.sam_perturbs_step(state.global_step))
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    torch.set_num_threads(threads)
    steps = WARMUP_STEPS + cycles * INTERVAL
    model, data = build(model_name, steps * batch_size)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = SAFTConfig(
        output_dir=tempfile.mkdtemp(prefix="saft_hf-overhead-"), max_steps=steps,
        per_device_train_batch_size=batch_size, learning_rate=1e-5, train_sampling_strategy="sequential",
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        **CONFIGURATIONS[configuration],
    )  # fmt: skip
    timer = StepTimer()
    trainer = SAFTTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    baseline_kb = status_kb("RssAnon")
    with AnonSampler() as sampler:
        trainer.train()
    timed = list(zip(timer.seconds, timer.perturbed))[WARMUP_STEPS:]
    fastest = {kind: min((s for s, perturbed in timed if perturbed == kind), default=None) for kind in (False, True)}
    share = sum(perturbed for _, perturbed in timed) / len(timed)
    cycle_means = [statistics.mean(s for s, _ in timed[i : i + INTERVAL]) for i in range(0, len(timed), INTERVAL)]
    return {
        "model": model_name, "configuration": configuration, "trainable_parameters": parameters,
        "step_seconds": sum(fastest[kind] * (share if kind else 1 - share) for kind in fastest if fastest[kind]),
        "cycle_median_seconds": statistics.median(cycle_means),
        "steps": timer.seconds, "perturbed": timer.perturbed, "peak_anon_mb": sampler.peak_kb / KB_PER_MB,
        "baseline_anon_mb": baseline_kb / KB_PER_MB, "peak_rss_mb": status_kb("VmHWM") / KB_PER_MB,
    }  # fmt: skip


def run_worker(model_name: str, configuration: str, batch_size: int, cycles: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, configuration]
    command += ["--batch-size", str(batch_size), "--cycles", str(cycles), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: dict[tuple[str, str], dict], models: list[str]) -> None:
    header = (f"{'model':<14}{'configuration':<17}{'step s':>8}{'cycle s':>9}{'peak anon MB':>14}"
              f"{'anon>base MB':>14}{'peak RSS MB':>13}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for (model, configuration), row in rows.items():
        print(f"{model:<14}{configuration:<17}{row['step_seconds']:>8.2f}{row['cycle_median_seconds']:>9.2f}"
              f"{row['peak_anon_mb']:>14.0f}{row['peak_anon_mb'] - row['baseline_anon_mb']:>14.0f}"
              f"{row['peak_rss_mb']:>13.0f}")  # fmt: skip
    print("\nper-step seconds (2 warm-up steps first; * = perturbed):")
    for (model, configuration), row in rows.items():
        steps = " ".join(f"{s:.2f}{'*' if p else ''}" for s, p in zip(row["steps"], row["perturbed"]))
        print(f"  {model:<14}{configuration:<17}{steps}")
    print()
    for model in models:
        plain, saft, interval = (rows[model, name] for name in CONFIGURATIONS)
        parameter_mb = plain["trainable_parameters"] * 4 / 1024**2
        checks = [
            ("SAFT/plain step time", saft["step_seconds"] / plain["step_seconds"], 2.0),
            ("SAFT/plain peak anon memory", saft["peak_anon_mb"] / plain["peak_anon_mb"], 1.10),
            ("SAFT/plain peak RSS", saft["peak_rss_mb"] / plain["peak_rss_mb"], 1.10),
            ("interval-4/plain step time", interval["step_seconds"] / plain["step_seconds"], 1.3),
        ]
        extra_mb = saft["peak_anon_mb"] - plain["peak_anon_mb"]
        print(f"{model}: {plain['trainable_parameters'] / 1e6:.1f}M trainable parameters ({parameter_mb:.0f} MB "
              f"in float32); SAFT - plain peak anon: {extra_mb:+.0f} MB")  # fmt: skip
        for name, ratio, target in checks:
            print(f"  {name:<30} {ratio:5.2f}  (target <= {target:.2f}: {'OK' if ratio <= target else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=2, help="Timed cycles of 4 optimizer steps after warm-up.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run.")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIGURATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.batch_size, args.cycles, args.threads)))
        return
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    rows = {}
    for model in args.models:
        for configuration in CONFIGURATIONS:
            print(f"running {model} / {configuration} ...", flush=True)
            rows[model, configuration] = run_worker(model, configuration, args.batch_size, args.cycles, args.threads)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    report(rows, args.models)


if __name__ == "__main__":
    main()
