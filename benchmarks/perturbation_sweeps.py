"""The (A)SAM perturbation's bookkeeping against the memory-traffic floor of this machine, side by side.

    python benchmarks/perturbation_sweeps.py [--model clip-vit-b32] [--repeats 7] [--threads 1]

Random float32 tensors shaped like the trainable parameters of `saft_overhead.py`'s models (weights ~ 0.02 N(0, 1),
gradients ~ 1e-3 N(0, 1)); no training. Timed, interleaved and each the fastest of `--repeats` rounds (on a machine
shared with other work the fastest is the least disturbed estimate):

- `copy`: one flat `copy_` of N floats (reads 4N bytes, writes 4N): the machine's copy bandwidth;
- `read`: one flat `sum` of N floats (reads 4N bytes): its read bandwidth;
- `eager perturb` / `compiled perturb`: `perturb_weights_` (ASAM) with multi-tensor ops, and with the fused sweeps
  compiled by `torch.compile` (`compiled=True`; the first call, compiling included, is printed separately);
- `restore`: `restore_weights_` (a copy);
- `AdamW step`: `torch.optim.AdamW(fused=True)`, the Trainer's default optimizer, over the same tensors.

The floor of the perturbation: sweep 1 reads `w` and `g` (8N bytes, at the read bandwidth), sweep 2 reads them and
writes `saved` and `w + e` (16N bytes: two copies' worth, at the copy bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch
from memory import status_kb
from saft_overhead import MODELS, build

from saft_hf.sharpness import flat_buffers_like, perturb_weights_, restore_weights_

RHO = 0.5


def fastest(rounds: list[dict[str, float]], name: str) -> float:
    return min(times[name] for times in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = build(args.model, 0)
    shapes = [param.shape for param in model.parameters() if param.requires_grad]
    del model
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in shapes]
    saved = flat_buffers_like(weights)
    count = sum(weight.numel() for weight in weights)
    source, target = torch.randn(count, generator=generator), torch.empty(count)
    params = [torch.nn.Parameter(weight.clone()) for weight in weights]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    adamw = torch.optim.AdamW(params, lr=1e-5, fused=True)
    adamw.step()  # allocates the moments

    perturb_weights_(weights, grads, saved, mode="asam", rho=RHO)  # the saved buffer's pages become resident
    restore_weights_(weights, saved)
    anon_kb = status_kb("RssAnon")
    start = time.perf_counter()
    perturb_weights_(weights, grads, saved, mode="asam", rho=RHO, compiled=True)
    first_call = time.perf_counter() - start
    compiler_mb = (status_kb("RssAnon") - anon_kb) / 1024
    restore_weights_(weights, saved)

    runs = {
        "copy": lambda: target.copy_(source),
        "read": lambda: source.sum(),
        "eager perturb": lambda: perturb_weights_(weights, grads, saved, mode="asam", rho=RHO),
        "compiled perturb": lambda: perturb_weights_(weights, grads, saved, mode="asam", rho=RHO, compiled=True),
        "restore": lambda: restore_weights_(weights, saved),
        "AdamW step": adamw.step,
    }
    rounds = []
    for _ in range(args.repeats):
        times = {}
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name] = time.perf_counter() - start
            if name.endswith("perturb"):
                restore_weights_(weights, saved)
        rounds.append(times)

    megabytes = count * 4 / 1e6
    copy_bandwidth = 2 * megabytes / fastest(rounds, "copy")
    read_bandwidth = megabytes / fastest(rounds, "read")
    floor = 2 * megabytes / read_bandwidth + 4 * megabytes / copy_bandwidth  # seconds
    print(f"{args.model}: {len(shapes)} tensors, N = {count / 1e6:.1f}M float32 ({megabytes:.0f} MB per tensor set)")
    print(
        f"copy bandwidth {copy_bandwidth / 1e3:.1f} GB/s (read + write), read bandwidth {read_bandwidth / 1e3:.1f} GB/s"
    )
    for name in runs:
        print(f"  {name:<18}{fastest(rounds, name):>8.3f} s")
    print(f"  {'first compiled call':<18}{first_call:>8.3f} s (compiling included); RssAnon +{compiler_mb:.0f} MB")
    print(
        f"floor of the perturbation: 2 x {megabytes:.0f} MB read at {read_bandwidth / 1e3:.1f} GB/s + "
        f"4 x {megabytes:.0f} MB moved at {copy_bandwidth / 1e3:.1f} GB/s = {floor:.3f} s"
    )


if __name__ == "__main__":
    main()
